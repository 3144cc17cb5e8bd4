"""Sampling from a GatedDeltaNetLM: chunked prefill, then one recurrent step per new token.

    generate(model, prompt_BxT, max_new_tokens, *, temperature=1.0, top_k=None, rng) -> tokens

Decoding costs O(1) per token (a K×V state and W−1 conv inputs per head), whatever the
prompt length. The model's own `init_cache` / `prefill` / `decode_step` do the work; this module
only jit-compiles them and samples.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BxV, rng, *, temperature: float = 1.0, top_k: int | None = None):
  """Samples one token per row. temperature 0 means greedy (argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k is not None:
    kth_B = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_B, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'temperature', 'top_k'))
def _generate(graphdef, state, prompt_BxT, rng, *, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  logits_BxTxV, cache = model.prefill(prompt_BxT)
  rng, first_rng = jax.random.split(rng)
  token_B = sample_logits(logits_BxTxV[:, -1], first_rng, temperature=temperature, top_k=top_k)

  def step(carry, step_rng):
    token_B, cache = carry
    logits_BxV, cache = model.decode_step(token_B, cache)
    next_B = sample_logits(logits_BxV, step_rng, temperature=temperature, top_k=top_k)
    return (next_B, cache), token_B

  rngs = jax.random.split(rng, max_new_tokens - 1)
  (last_B, _), tokens_NxB = jax.lax.scan(step, (token_B, cache), rngs)
  new_BxN = jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1)
  return jnp.concatenate([prompt_BxT.astype(jnp.int32), new_BxN], axis=1)


def generate(model, prompt_BxT, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, rng) -> jax.Array:
  """Returns [B, T + max_new_tokens] int32: the prompt followed by the sampled tokens.

  Args:
    model: a GatedDeltaNetLM.
    prompt_BxT: integer prompt tokens, T ≥ 1.
    max_new_tokens: tokens to sample (≥ 1).
    temperature: softmax temperature; 0 means greedy.
    top_k: sample among the k most likely tokens only (None: all).
    rng: a jax PRNG key.
  """
  prompt_BxT = jnp.asarray(prompt_BxT)
  if (prompt_BxT.ndim != 2 or prompt_BxT.shape[1] < 1
      or not jnp.issubdtype(prompt_BxT.dtype, jnp.integer)):
    raise ValueError(f"generate: `prompt_BxT` has shape {tuple(prompt_BxT.shape)} and dtype "
                     f"{prompt_BxT.dtype}; expected integer tokens [B, T] with T ≥ 1.")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: `max_new_tokens`={max_new_tokens!r}; expected an int ≥ 1.")
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"generate: `temperature`={temperature!r}; expected a float ≥ 0 "
                     "(0 = greedy).")
  vocab = model.config.vocab_size
  if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
    raise ValueError(f"generate: `top_k`={top_k!r}; expected None or an int in [1, {vocab}].")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_BxT, rng, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=top_k)
