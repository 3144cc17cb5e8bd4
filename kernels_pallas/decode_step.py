"""One decode token of the gated delta rule in one Pallas (Triton) kernel: S read and written once.

For a (batch, value head, V block) program with the state block S [K, BV] (float32 math; S stored
in float32 or bfloat16), the L2-normalised q, k [K] of its q/k head and v, e^g, β [BV]:

    a = Sᵀk,  c = Sᵀq                   (column sums over K of S ⊙ k, S ⊙ q)
    δ = β (v − e^g a)
    S' = e^g S + k δᵀ                    (= e^g (I − β k kᵀ) S + β k vᵀ)
    o = scale (e^g c + (kᵀq) δ)          (= scale S'ᵀ q)

The pure-jnp form of the same update is `gdn_jax.layers.gated_delta_rule_step` (the reference;
XLA reads S twice there: once for the two sums, once for the update). The new state is written
into the old one's buffer (input_output_aliases), so the decode loop keeps one copy of the cache.
e^g and β come in broadcast over V: per-program scalars would need 0-d blocks, and the vectors
cost V/K of the state's traffic. On CPU the kernel runs in interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def unsupported(K: int, V: int) -> str | None:
  """Why the compiled (Triton) kernel cannot take head dims K, V; None when it can."""
  for name, dim in (("K", K), ("V", V)):
    if dim < 16 or dim & (dim - 1):
      return f"head dim {name}={dim}: Triton blocks need powers of two >= 16"
  return None


def default_block_v(K: int, V: int) -> int:
  """V block of one program: the [K, BV] float32 state block stays ≤ 8K elements (64 per thread
  at 4 warps)."""
  return max(1, min(V, 8192 // K))


def rule_update(S, q, k, v, e, beta, scale):
  """(S', o) of one state block, all float32: S [K, BV]; q, k [K]; v, e^g, β [BV] (the update in
  the module docstring; shared with decode_fused.py's kernel)."""
  a = jnp.sum(S * k[:, None], axis=0)                       # Sᵀk [BV]
  c = jnp.sum(S * q[:, None], axis=0)                       # Sᵀq
  delta = beta * (v - e * a)
  return e[None, :] * S + k[:, None] * delta[None, :], scale * (e * c + jnp.sum(k * q) * delta)


def _kernel(q_ref, k_ref, v_ref, e_ref, beta_ref, s_ref, o_ref, s_out_ref, *, scale):
  f32 = jnp.float32
  S_new, o = rule_update(s_ref[...].astype(f32), q_ref[...].astype(f32), k_ref[...].astype(f32),
                         v_ref[...].astype(f32), e_ref[...], beta_ref[...], scale)
  s_out_ref[...] = S_new.astype(s_out_ref.dtype)
  o_ref[...] = o.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_v", "num_warps", "interpret"))
def gated_delta_rule_step_pallas(q_BxHkxK, k_BxHkxK, v_BxHxV, g_BxH, beta_BxH, S_BxHxKxV, *,
                                 scale: float, block_v: int | None = None, num_warps: int = 4,
                                 interpret: bool | None = None):
  """`gdn_jax.layers.gated_delta_rule_step` as one kernel: (o [B, H, V] float32, S' in S's dtype).

  q, k: [B, Hk, K] L2-normalised (value head h reads q/k head h // (H / Hk)); v: [B, H, V];
  g, β: [B, H]; S: [B, H, K, V]. `block_v`: V columns per program (None: `default_block_v`).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  B, Hk, K = q_BxHkxK.shape
  H, V = v_BxHxV.shape[1:]
  if not interpret and (why := unsupported(K, V)) is not None:
    raise ValueError(f"gated_delta_rule_step_pallas: {why}; use the XLA step (impl='xla').")
  G, BV = H // Hk, min(V, block_v or default_block_v(K, V))
  e_BxHxV = jnp.broadcast_to(jnp.exp(g_BxH.astype(jnp.float32))[..., None], (B, H, V))
  beta_BxHxV = jnp.broadcast_to(beta_BxH.astype(jnp.float32)[..., None], (B, H, V))
  qk_spec = pl.BlockSpec((None, None, K), lambda b, h, j: (b, h // G, 0))
  row_spec = pl.BlockSpec((None, None, BV), lambda b, h, j: (b, h, j))
  s_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_kernel, scale=float(scale)),
      grid=(B, H, pl.cdiv(V, BV)),
      in_specs=[qk_spec,     # q
                qk_spec,     # k
                row_spec,    # v
                row_spec,    # e^g
                row_spec,    # β
                s_spec],     # S
      out_specs=[row_spec,   # o
                 s_spec],    # S'
      out_shape=[jax.ShapeDtypeStruct((B, H, V), jnp.float32),
                 jax.ShapeDtypeStruct(S_BxHxKxV.shape, S_BxHxKxV.dtype)],
      input_output_aliases={5: 1},
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      name="gdn_decode_step",
  )(q_BxHkxK, k_BxHkxK, v_BxHxV, e_BxHxV, beta_BxHxV, S_BxHxKxV)
