"""Train one config at many (seed, learning rate) pairs in one compiled program (LR sweeps).

    train_grid(config, learning_rates, seeds, train_tokens, val_batches) -> GridResult

`config` is a training config (configs/*.py); every replica trains it through the trainer's own
step and schedule (`gdn_jax.train.make_train_step`, `make_tx`), with its own peak LR. Replica
(s, l) is seed s (its init and its data order) at learning rate l. One program holds R = S · L
replicas (or `max_replicas_per_program` at a time):

    jit( scan over steps t:  batch_r = corpus[starts[s_r, t] + 0 … T]        (on the device)
                             vmap_r step(params_r, opt_r, batch_r, lr_r) )
    then vmap_r the validation loss over fixed validation batches

so a whole run is one dispatch: no host work between steps, and the replicas fill the GPU
where one small model cannot. The data order is an epoch over the corpus's windows
(`epoch_starts`): no window repeats within a run. A replica whose loss or gradient became
non-finite at any step counts as diverged (val_loss NaN), as `train.on_nonfinite="stop"` would.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gdn_jax import train as train_lib
from gdn_jax.model import flops_per_token


@dataclasses.dataclass(frozen=True)
class GridResult:
  learning_rates: np.ndarray        # [L]
  seeds: np.ndarray                 # [S]
  train_loss: np.ndarray            # [S, L, steps]
  grad_norm: np.ndarray             # [S, L, steps] global norm of the raw gradient
  nonfinite_steps: np.ndarray       # [S, L]
  val_loss: np.ndarray              # [S, L] final validation loss (NaN if diverged)
  seconds: float                    # training wall time, compilation excluded
  compile_seconds: float
  model_flops: float                # training FLOPs of all replicas (gdn_jax.model.flops_per_token)
  programs: int                     # compiled-program launches (groups of replicas)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows of seq_len + 1 tokens at stride seq_len (neighbours share one token)."""
  return (num_tokens - 1) // seq_len


def epoch_starts(num_tokens: int, *, seq_len: int, steps: int, batch_size: int,
                 seed: int) -> np.ndarray:
  """[steps, batch_size] window starts: a seeded permutation of the corpus's windows, so no
  window is seen twice in a run. Raises if the run needs more windows than the corpus has."""
  n = num_windows(num_tokens, seq_len)
  if steps * batch_size > n:
    raise ValueError(f"epoch_starts: {steps} steps × {batch_size} sequences need "
                     f"{steps * batch_size} windows of {seq_len + 1} tokens; the corpus has {n} "
                     "(expected a larger corpus, fewer steps or a smaller batch: sweeps never "
                     "repeat data).")
  order = np.random.default_rng((seed, 0x5EED)).permutation(n)[:steps * batch_size]
  return (order * seq_len).reshape(steps, batch_size).astype(np.int32)


def fixed_windows(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
                  ) -> np.ndarray:
  """[num_batches, batch_size, seq_len + 1] evenly spaced, non-overlapping validation windows."""
  n = batch_size * num_batches
  stride = max((len(tokens) - seq_len - 1) // n, 1)
  windows = [tokens[i * stride:i * stride + seq_len + 1] for i in range(n)]
  return np.stack(windows).reshape(num_batches, batch_size, seq_len + 1).astype(np.int32)


def _gather(corpus, starts_RxB, length: int):
  window = lambda s: jax.lax.dynamic_slice(corpus, (s,), (length,))
  return jax.vmap(jax.vmap(window))(starts_RxB).astype(jnp.int32)


def train_grid(config: ml_collections.ConfigDict, learning_rates: Sequence[float],
               seeds: Sequence[int], train_tokens: np.ndarray, val_batches: np.ndarray, *,
               max_replicas_per_program: int | None = None) -> GridResult:
  """Trains `config` for every (seed, learning rate); see the module docstring.

  Args:
    config: a training config; its model, parametrization, optimizer, schedule, clipping,
      `train.num_steps`, `data.batch_size` and `data.seq_len` are used (not `optimizer.lr`).
    learning_rates: peak learning rates (the parametrization scales them per parameter).
    seeds: init and data-order seeds.
    train_tokens: 1-D integer tokens (uint8 for bytes) of the training corpus.
    val_batches: [N, B, T + 1] fixed validation batches.
    max_replicas_per_program: vmap at most this many replicas at once (memory grows with it);
      the groups run one after another through one compiled program (the last is padded).
  """
  train_lib.validate_config(config)
  lrs = np.asarray(learning_rates, np.float32)
  seeds = np.asarray(seeds, np.int64)
  S, L = len(seeds), len(lrs)
  if S == 0 or L == 0:
    raise ValueError(f"train_grid: {S} seeds and {L} learning rates; expected at least one of "
                     "each.")
  if max_replicas_per_program is not None and max_replicas_per_program < 1:
    raise ValueError(f"`max_replicas_per_program`={max_replicas_per_program}; expected ≥ 1 "
                     "or None.")
  steps, B, T = config.train.num_steps, config.data.batch_size, config.data.seq_len
  val_batches = np.asarray(val_batches)
  if val_batches.ndim != 3 or val_batches.shape[2] != T + 1:
    raise ValueError(f"train_grid: `val_batches` has shape {val_batches.shape}; expected "
                     f"[N, B, seq_len + 1 = {T + 1}].")

  models = [train_lib.build_model(config, seed=int(s)) for s in seeds]
  tx = train_lib.make_tx(models[0], config)
  graphdef = nnx.split(models[0])[0]
  inits = [nnx.split(m)[1] for m in models]
  step_fn = train_lib.make_train_step(graphdef, tx)
  loss_fn = train_lib.make_loss_fn(graphdef)
  starts = np.stack([epoch_starts(len(train_tokens), seq_len=T, steps=steps, batch_size=B,
                                  seed=int(s)) for s in seeds])          # [S, steps, B]

  R = S * L
  programs = -(-R // min(R, max_replicas_per_program or R))
  G = -(-R // programs)                     # balanced groups: the least padding
  groups = [list(range(i, min(i + G, R))) for i in range(0, R, G)]
  groups[-1] += [groups[-1][-1]] * (G - len(groups[-1]))              # pad: repeat the last

  def run(params, opt_state, lr_G, seed_idx_G, corpus, starts_SxNxB, val_NxBxT1):
    def body(carry, t):
      params, opt_state = carry
      batch = _gather(corpus, starts_SxNxB[seed_idx_G, t], T + 1)      # [G, B, T+1]
      params, opt_state, m = jax.vmap(step_fn)(params, opt_state, batch, lr_G)
      return (params, opt_state), (m["loss"], m["grad_norm"], m["finite"])

    (params, opt_state), curves = jax.lax.scan(body, (params, opt_state), jnp.arange(steps))
    val = jax.lax.map(lambda b: jax.vmap(loss_fn, in_axes=(0, None))(params, b), val_NxBxT1)
    # The trained replicas are returned (and dropped by the caller) so that the donated inputs'
    # buffers can hold the loop's state: without an output to alias, XLA cannot use them
    # ("Some donated buffers were not usable") and the state is held twice.
    return curves, jnp.mean(val, axis=0), params, opt_state

  def stacked(group):
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[inits[r // L] for r in group])
    return params, jax.vmap(tx.init)(params)

  corpus = jnp.asarray(train_tokens)
  starts_d, val_d = jnp.asarray(starts), jnp.asarray(val_batches, jnp.int32)
  lr_of = lambda g: jnp.asarray(lrs[[r % L for r in g]])
  seed_of = lambda g: jnp.asarray([r // L for r in g], jnp.int32)
  # CPU buffers cannot be donated; on accelerators the loop then runs in the inputs' buffers.
  compiled_fn = jax.jit(run, donate_argnums=() if jax.default_backend() == "cpu" else (0, 1))
  t0 = time.perf_counter()
  params0, opt0 = stacked(groups[0])
  compiled = compiled_fn.lower(params0, opt0, lr_of(groups[0]), seed_of(groups[0]), corpus,
                               starts_d, val_d).compile()
  compile_seconds = time.perf_counter() - t0

  t0 = time.perf_counter()
  outputs = []
  for i, group in enumerate(groups):
    params, opt_state = (params0, opt0) if i == 0 else stacked(group)
    outputs.append(compiled(params, opt_state, lr_of(group), seed_of(group), corpus, starts_d,
                            val_d)[:2])
  outputs = jax.device_get(outputs)        # one sync for everything
  seconds = time.perf_counter() - t0

  loss = np.concatenate([np.moveaxis(o[0][0], 0, 1) for o in outputs])[:R]   # [R, steps]
  norm = np.concatenate([np.moveaxis(o[0][1], 0, 1) for o in outputs])[:R]
  finite = np.concatenate([np.moveaxis(o[0][2], 0, 1) for o in outputs])[:R]
  val = np.concatenate([o[1] for o in outputs])[:R]
  nonfinite = (~finite).sum(axis=1)
  val = np.where((nonfinite == 0) & np.isfinite(val), val, np.nan)
  shape = lambda x: x.reshape(S, L, *x.shape[1:])
  flops = flops_per_token(train_lib.model_config(config), T) * steps * B * T * R
  return GridResult(lrs, seeds, shape(loss), shape(norm), shape(nonfinite), shape(val), seconds,
                    compile_seconds, flops, len(groups))


def loss_spike(train_loss: np.ndarray, window: int = 10) -> float:
  """Largest rise of the `window`-step moving average of the training loss above its running
  minimum so far (0 for a loss that never goes back up; NaN if the loss became non-finite).

  Separates a run that spiked and recovered part-way from one that converged to a worse loss."""
  if not np.all(np.isfinite(train_loss)):
    return float("nan")
  window = max(1, min(window, len(train_loss)))
  smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
  return float(np.max(smooth - np.minimum.accumulate(smooth)))
