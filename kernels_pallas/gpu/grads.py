r"""The backward's gradients in two chunk-parallel kernels, split as fla splits its backward.

`gdn_grads_key`, grid (K/BK, B, H, N) (`chunk_grads.chunk_key_grads`): per block of BK K-columns,
  everything that contracts over V into K: dO hᵀ, Ṽ dh'ᵀ, dṼ hᵀ and dO Ṽᵀ over V, dKb = −Aᵀ(dṼ hᵀ),
  dq (final), dk₁ (f32) and the dg, dβ terms through P, d, w, λ, as partial sums over K-blocks.
`gdn_grads_wy`, grid (B, H, N) (`chunk_grads.chunk_wy_grads`): the UT transform's part, once per
  chunk: dVb = Aᵀ dṼ, dv = β dVb, dL = −strict(dVb Ṽᵀ), dk = dk₁ + (dKK + dKKᵀ) K, dg₂, dβ₂.
Both read A as the forward stored it and the walks' h_r, Ṽ, dh_{r+1}, dṼ; both walk V in blocks of
`grads_block_v` columns, in a `fori_loop` when there are several (one block's tiles live at a time).
H100 B8 T2048 H16 K=V=128: fwd+bwd 2.71 ms against 3.48 for one kernel doing both (`_v7a_split`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import chunk_grads as cg
from kernels_pallas import chunk_math as cm
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout


def _v_blocks(V: int, block_v: int, block_fn):
  """The V-blocks of a gradients kernel for `chunk_grads.fold_blocks`: block_fn(cols) for each
  `block_v`-wide column slice, as a (count, fn) `fori_loop` when there are several, else the one."""
  BV = min(V, block_v)
  if V > BV:
    return V // BV, lambda j: block_fn(pl.ds(pl.multiple_of(j * BV, BV), BV))
  return (block_fn(blk) for blk in layout.column_blocks(V, block_v))


def _grads_key_kernel(q_ref, k_ref, g_ref, beta_ref, reset_ref, a_ref, h_ref, vnew_ref, do_ref,
                      dh_ref, dvnew_ref, dq_ref, dk_ref, dg_ref, dbeta_ref, *, C, scale, mm_dtype,
                      BK, block_v):
  """One chunk and one block of BK K-columns (grid axis 0; all of K when BK = K): dq (final),
  dk₁ (float32) and the partial sums of dg, dβ through P, d, w, λ."""
  split = BK < q_ref.shape[-1]
  cols = pl.ds(pl.multiple_of(pl.program_id(0) * BK, BK), BK) if split else slice(None)
  blocks = _v_blocks(vnew_ref.shape[-1], block_v, lambda blk: (
      h_ref[cols, blk], vnew_ref[:, blk], do_ref[:, blk], dh_ref[cols, blk], dvnew_ref[:, blk]))
  q_cols, k_cols = (q_ref[:, cols], k_ref[:, cols]) if split else (q_ref[...], k_ref[...])
  dq, dk, dg, dbeta = cg.chunk_key_grads(q_cols, k_cols, g_ref[...], beta_ref[...], reset_ref[...],
                                         a_ref[...], blocks, C, scale, mm_dtype)
  for ref, x in ((dq_ref, dq), (dk_ref, dk), (dg_ref, dg), (dbeta_ref, dbeta)):
    ref[...] = x.astype(ref.dtype)


def _grads_wy_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, a_ref, vnew_ref, dvnew_ref, dk1_ref,
                     dk_ref, dv_ref, dg_ref, dbeta_ref, *, C, mm_dtype, block_v):
  """One chunk: dv, dk = dk₁ + (dKK + dKKᵀ) K by column blocks of K, and dg, dβ through L and Vb."""
  def block(blk):
    def write_dv(x):
      dv_ref[:, blk] = x.astype(dv_ref.dtype)
    return (v_ref[:, blk], vnew_ref[:, blk], dvnew_ref[:, blk]), write_dv
  dKK, dg, dbeta = cg.chunk_wy_grads(k_ref[...], g_ref[...], beta_ref[...], reset_ref[...],
                                     a_ref[...], _v_blocks(v_ref.shape[-1], block_v, block), C,
                                     mm_dtype)
  for blk in layout.column_blocks(k_ref.shape[-1], block_v):      # column blocks of K
    dk_ref[:, blk] = (dk1_ref[:, blk] + cm.dot(dKK, k_ref[:, blk], mm_dtype=mm_dtype)
                      ).astype(dk_ref.dtype)
  dg_ref[...], dbeta_ref[...] = dg, dbeta


def grads(q, k, v, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new, *, scale: float, C: int,
          config: GpuConfig):
  """dq, dk [B,Tp,Hk,K] (f32 under grouped value heads, else q's dtype), dv [B,Tp,H,V], dg, dβ
  [B,Tp,H] f32, from the inputs in token layout, the forward's A and h_r, the forward walk's Ṽ, dO,
  and the reverse walk's dh_{r+1} and dṼ (per-chunk arrays as `prep` and the walks wrote them)."""
  B, Tp, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  cfg = config.resolve(B, H, K, V)
  mm_dtype = cm.mm_dtype_for(q.dtype)
  dqk_dtype = jnp.float32 if H != Hk else q.dtype
  BK = min(K, cfg.grads_block_k)
  nK = K // BK
  key = layout.chunk_specs(q, v, C, k_split=nK > 1)
  if nK > 1:    # dq, dk by column block; dg, dβ partial sums, one per K-block
    key_out = [pl.BlockSpec((None, C, None, BK), lambda kb, b, h, n: (b, n, h, kb)),        # dq
               pl.BlockSpec((None, C, None, BK), lambda kb, b, h, n: (b, n, h, kb)),        # dk₁
               pl.BlockSpec((None, None, C, None), lambda kb, b, h, n: (kb, b, n, h)),      # dg
               pl.BlockSpec((None, None, C, None), lambda kb, b, h, n: (kb, b, n, h))]      # dβ
    partial_shape = (nK, B, Tp, H)
  else:
    key_out = [key.dqk, key.dqk, key.gate, key.gate]                 # dq, dk₁, dg, dβ
    partial_shape = (B, Tp, H)
  dq, dk1, dg, dbeta = layout.chunk_call(
      functools.partial(_grads_key_kernel, C=C, scale=scale, mm_dtype=mm_dtype, BK=BK,
                        block_v=cfg.grads_block_v),
      v, C,
      in_specs=[key.qk,          # q
                key.qk,          # k
                key.gate,        # g
                key.gate,        # β
                key.reset,       # reset
                key.tile_c,      # A
                key.state,       # h_r
                key.tile_v,      # Ṽ
                key.v,           # dO
                key.state,       # dh_{r+1}
                key.tile_v],     # dṼ
      out_specs=key_out,
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), dqk_dtype),
                 jax.ShapeDtypeStruct((B, Tp, H, K), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
      name="gdn_grads_key", num_warps=cfg.grads_key_num_warps, interpret=cfg.interpret,
      k_blocks=nK if nK > 1 else None,
  )(q, k, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new)
  if nK > 1:
    dg, dbeta = dg.sum(0), dbeta.sum(0)
  wy = layout.chunk_specs(q, v, C)
  dk, dv, dg2, dbeta2 = layout.chunk_call(
      functools.partial(_grads_wy_kernel, C=C, mm_dtype=mm_dtype, block_v=cfg.grads_block_v),
      v, C,
      in_specs=[wy.qk,           # k
                wy.v,            # v
                wy.gate,         # g
                wy.gate,         # β
                wy.reset,        # reset
                wy.tile_c,       # A
                wy.tile_v,       # Ṽ
                wy.tile_v,       # dṼ
                wy.dqk],         # dk₁
      out_specs=[wy.dqk,         # dk
                 wy.v,           # dv
                 wy.gate,        # dg₂
                 wy.gate],       # dβ₂
      out_shape=[jax.ShapeDtypeStruct((B, Tp, H, K), dqk_dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((B, Tp, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, Tp, H), jnp.float32)],
      name="gdn_grads_wy", num_warps=cfg.grads_wy_num_warps, interpret=cfg.interpret,
  )(k, v, g, beta, reset_f, A, v_new, dv_new, dk1)
  dg, dbeta = dg + dg2, dbeta + dbeta2
  if H != Hk:  # value heads of one group share their q/k head: sum their gradients
    dq, dk = (x.reshape(B, Tp, Hk, H // Hk, K).sum(3) for x in (dq, dk))
  return dq, dk, dv, dg, dbeta
