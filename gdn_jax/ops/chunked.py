"""Placeholder: being written now (chunked WY algorithm)."""
from gdn_jax.ops.recurrent import recurrent_gated_delta_rule


def chunked_gated_delta_rule(q, k, v, g, beta, scale, h0, reset, chunk_size):
  import jax.numpy as jnp
  H = v.shape[2]
  rep = lambda x: jnp.repeat(x, H // x.shape[2], axis=2)
  return recurrent_gated_delta_rule(rep(q), rep(k), v, g, beta, scale, h0, reset)
