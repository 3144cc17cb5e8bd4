"""The train step: one pure function that the trainer, the LR sweeps and the studies all use.

    loss = mean_t −log softmax(model(x_{<T}))[x_{t+1}]
    g = ∇loss;   u, state ← tx(g, state, θ)            tx: clipping + μP/SP optimizer, LR factor
    θ ← θ + peak_lr · u                                  (tx's schedule has peak 1)
    if loss or ‖g‖ is not finite: θ and state are kept (the update is dropped in-graph)

`peak_lr` is an argument, not part of tx, so one compiled step serves every learning rate of a
sweep (vmapped over replicas) and the trainer (a scalar): both train with the same code.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_loss_fn(graphdef) -> Callable:
  """(params, tokens [B, T+1]) → mean next-token cross-entropy of the model (fused with the LM
  head when its config's loss_chunk_size > 0)."""
  def loss_fn(params, tokens_BxT1):
    model = nnx.merge(graphdef, params)
    return model.loss(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
  return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
  """step(params, opt_state, tokens [B, T+1], peak_lr) → (params, opt_state, metrics).

  metrics: {"loss", "grad_norm" (of the raw gradient, before clipping), "finite"}.
  """
  loss_fn = make_loss_fn(graphdef)

  def step(params, opt_state, tokens_BxT1, peak_lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxT1)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (peak_lr * u).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics

  return step
