"""The gated delta rule as a `lax.scan` over time: the readable reference.

For one value head with state S (K×V, float32), token t:

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
        = e^{g_t} S_{t−1} + β_t k_t (v_t − e^{g_t} S_{t−1}ᵀ k_t)ᵀ
    o_t = scale · S_tᵀ q_t

At a segment start (packed documents) S_{t−1} is replaced by 0.
Inputs arrive already validated, L2-normalised if asked, and with q/k broadcast
to the value heads (see `gated_delta_rule.py`).
"""
import jax
import jax.numpy as jnp


def recurrent_gated_delta_rule(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH,
                               scale, h0_BxHxKxV, reset_BxT):
  """Returns (o [B,T,H,V] float32, final state [B,H,K,V] float32)."""
  f32 = jnp.float32
  xs = (jnp.moveaxis(q_BxTxHxK.astype(f32), 1, 0),
        jnp.moveaxis(k_BxTxHxK.astype(f32), 1, 0),
        jnp.moveaxis(v_BxTxHxV.astype(f32), 1, 0),
        jnp.moveaxis(g_BxTxH.astype(f32), 1, 0),
        jnp.moveaxis(beta_BxTxH.astype(f32), 1, 0),
        None if reset_BxT is None else jnp.moveaxis(reset_BxT, 1, 0))

  def step(S_BxHxKxV, x):
    q, k, v, g, beta, reset = x
    S = S_BxHxKxV if reset is None else jnp.where(reset[:, None, None, None], 0.0, S_BxHxKxV)
    S = jnp.exp(g)[..., None, None] * S                      # e^{g_t} S_{t−1}
    pred_BxHxV = jnp.einsum('bhk,bhkv->bhv', k, S)            # (e^{g} S)ᵀ k
    delta_BxHxV = beta[..., None] * (v - pred_BxHxV)
    S = S + k[..., :, None] * delta_BxHxV[..., None, :]
    o_BxHxV = scale * jnp.einsum('bhk,bhkv->bhv', q, S)
    return S, o_BxHxV

  # Rematerialise the step in the backward: AD then keeps only the carried state per token
  # (one K×V matrix) instead of every intermediate of the step.
  S_final, o_TxBxHxV = jax.lax.scan(jax.checkpoint(step), h0_BxHxKxV.astype(f32), xs)
  return jnp.moveaxis(o_TxBxHxV, 0, 1), S_final
