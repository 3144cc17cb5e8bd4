"""Train one model at many learning rates in one compiled program (for LR-transfer sweeps).

The replicas share the initial parameters and the batches; only the learning rate differs.
`jax.vmap` maps one pure train step over the stacked (params, optimizer state, lr):

    params_r ← params_r + lr_r · schedule(t) · u(grad_r, state_r)

where u is the μP/SP transform of `gdn_jax.mup.make_optimizer` built with learning_rate = 1.
This is exact for AdamW and SGD(+momentum): both updates are linear in the learning rate
(AdamW's decoupled decay enters as lr · wd · p, so lr · wd stays what the transform defines).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdn_jax import mup
from gdn_jax.loss import cross_entropy


def warmup_cosine(step, total_steps: int, warmup_steps: int, final_fraction: float = 0.1):
  """LR factor: linear warm-up to 1, then cosine decay to `final_fraction`."""
  step = jnp.asarray(step, jnp.float32)
  warm = jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
  progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(math.pi * progress))
  return jnp.where(step < warmup_steps, warm, cosine)


@dataclasses.dataclass(frozen=True)
class SweepResult:
  learning_rates: np.ndarray        # [R]
  train_loss: np.ndarray            # [R, steps] per-step training loss
  grad_norm: np.ndarray             # [R, steps] global gradient norm before clipping
  val_loss: np.ndarray              # [R] final validation loss (NaN if diverged)
  seconds: float                    # wall time of the training loop (compile excluded)
  compile_seconds: float


def train_learning_rates(config, learning_rates, batches: Callable[[int], np.ndarray],
                         val_batches: list[np.ndarray], *, steps: int, parametrization: str,
                         optimizer: str, base_config=None, weight_decay: float = 0.0,
                         warmup_steps: int = 0, momentum: float = 0.0, grad_clip: float | None = None,
                         seed: int = 0, vectorize: bool = True,
                         max_lrs_per_program: int | None = None,
                         lr_overrides=None) -> SweepResult:
  """Trains `len(learning_rates)` replicas of one model (same init, same data).

  Args:
    config: the model config (`gdn_jax.model.ModelConfig`).
    learning_rates: base learning rates η (the μP/SP table scales them per parameter).
    batches: step → int tokens [B, T + 1] (the same batch for every replica).
    val_batches: held-out [B, T + 1] batches for the final validation loss.
    vectorize: True runs all replicas in one vmapped program; False runs them one by one
      (same math; used to measure the speed-up of vectorizing).
    max_lrs_per_program: with `vectorize`, vmap at most this many replicas at once (memory grows
      with it); the groups run one after another through one compiled program (the last group is
      padded by repeating its last learning rate, and the padding is dropped).
    lr_overrides: extra per-parameter LR width scalings (`gdn_jax.mup.multipliers`).
  """
  model = mup.build_model(config, parametrization=parametrization, base_config=base_config,
                          rngs=nnx.Rngs(seed))
  tx = mup.make_optimizer(model, parametrization=parametrization, optimizer=optimizer,
                          learning_rate=1.0, weight_decay=weight_decay, base_config=base_config,
                          momentum=momentum, lr_overrides=lr_overrides)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  def loss_fn(params, tokens_BxT1):
    logits = nnx.merge(graphdef, params, rest)(tokens_BxT1[:, :-1])
    return cross_entropy(logits, tokens_BxT1[:, 1:])

  def step(params, opt_state, lr, tokens, t):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    factor = lr * warmup_cosine(t, steps, warmup_steps)
    params = optax.apply_updates(params, jax.tree.map(lambda u: factor * u, updates))
    return params, opt_state, jnp.stack([loss, optax.global_norm(grads)])

  eval_fn = jax.jit(jax.vmap(loss_fn, in_axes=(0, None)) if vectorize else loss_fn)
  lrs = jnp.asarray(learning_rates, jnp.float32)
  R = len(learning_rates)
  if max_lrs_per_program is not None and max_lrs_per_program < 1:
    raise ValueError(f"`max_lrs_per_program`={max_lrs_per_program}; expected ≥ 1 or None.")
  if vectorize:
    G = min(R, max_lrs_per_program or R)
    groups = [lrs[i:i + G] for i in range(0, R, G)]
    groups[-1] = jnp.pad(groups[-1], (0, G - len(groups[-1])), mode="edge")
    stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (G, *x.shape)), tree)
    runs = [(stack(params), stack(opt_state), group) for group in groups]
    step_fn = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1))
  else:
    fresh = lambda tree: jax.tree.map(jnp.copy, tree)   # each run donates its own buffers
    runs = [(fresh(params), fresh(opt_state), lrs[r]) for r in range(R)]
    step_fn = jax.jit(step, donate_argnums=(0, 1))

  start = time.perf_counter()
  compiled = step_fn.lower(*runs[0], jnp.asarray(batches(0)), 0).compile()
  compile_seconds = time.perf_counter() - start

  start = time.perf_counter()
  final, losses = [], []
  for p, o, lr in runs:
    run_losses = []
    for t in range(steps):
      p, o, loss_norm = compiled(p, o, lr, jnp.asarray(batches(t)), t)
      run_losses.append(loss_norm)           # stays on device: dispatch runs ahead
    final.append(p)
    losses.append(np.asarray(jnp.stack(run_losses)))   # [steps, (G,) 2]: loss, gradient norm
  seconds = time.perf_counter() - start
  val = [np.mean([np.asarray(eval_fn(p, jnp.asarray(b))) for b in val_batches], axis=0)
         for p in final]
  if vectorize:     # per group: [steps, G, 2], val [G]; concatenate and drop the padding
    curves = np.concatenate([np.moveaxis(x, 0, 1) for x in losses])[:R]   # [R, steps, 2]
    val = np.concatenate(val)[:R]
  else:
    curves, val = np.stack(losses), np.asarray(val)
  val = np.where(np.isfinite(val), val, np.nan)
  return SweepResult(np.asarray(learning_rates), curves[..., 0], curves[..., 1], val, seconds,
                     compile_seconds)


def loss_spike(train_loss: np.ndarray, window: int = 10) -> float:
  """Largest rise of the `window`-step moving average of the training loss above its running
  minimum so far (0 for a loss that never goes back up; NaN if the loss became non-finite).

  Separates a run that spiked and recovered part-way from one that converged to a worse loss."""
  if not np.all(np.isfinite(train_loss)):
    return float("nan")
  window = max(1, min(window, len(train_loss)))
  smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
  return float(np.max(smooth - np.minimum.accumulate(smooth)))


def window_sampler(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int
                   ) -> Callable[[int], np.ndarray]:
  """step → [batch_size, seq_len + 1] windows at random offsets (deterministic in (seed, step))."""
  def batch(step: int) -> np.ndarray:
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return batch


def fixed_windows(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
                  ) -> list[np.ndarray]:
  """Evenly spaced, non-overlapping validation windows."""
  n = batch_size * num_batches
  stride = max((len(tokens) - seq_len - 1) // n, 1)
  windows = [tokens[i * stride:i * stride + seq_len + 1] for i in range(n)]
  return [np.stack(windows[b * batch_size:(b + 1) * batch_size]).astype(np.int32)
          for b in range(num_batches)]
