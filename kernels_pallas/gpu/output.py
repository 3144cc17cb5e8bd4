"""The chunk-parallel kernels on either side of the walks that involve P = (Q Kᵀ) ⊙ Γ.

`gdn_output` (forward, after the walk):   O = scale (diag(d) Q h_r + P Ṽ_r), written in token layout.
`gdn_dv_local` (backward, before the reverse walk):   dṼ^local = scale Pᵀ dO.
One program per (batch row, value head, chunk); V in blocks of `part_block_v` columns.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import chunk_grads as cg
from kernels_pallas import chunk_math as cm
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout


def _output_kernel(q_ref, k_ref, g_ref, reset_ref, h_ref, vnew_ref, o_ref, *, C, scale, mm_dtype,
                   block_v):
  """One chunk: O = scale (diag(d) Q h_r + ((Q Kᵀ) ⊙ Γ) Ṽ_r), written in token layout."""
  q = q_ref[...]
  Gamma, d, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  P = cm.decayed_scores(q, k_ref[...], Gamma)
  Qd = d[:, None] * q.astype(jnp.float32)
  for blk in layout.column_blocks(vnew_ref.shape[-1], block_v):
    o = cm.chunk_output(h_ref[:, blk], Qd, P, vnew_ref[:, blk], scale, mm_dtype)
    o_ref[:, blk] = o.astype(o_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, g_ref, reset_ref, do_ref, dvl_ref, *, C, scale, mm_dtype,
                     block_v):
  """One chunk: dṼ^local = scale Pᵀ dO with P = (Q Kᵀ) ⊙ Γ (by V-blocks)."""
  Gamma, _, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  P = cm.decayed_scores(q_ref[...], k_ref[...], Gamma)
  for blk in layout.column_blocks(do_ref.shape[-1], block_v):
    dvl_ref[:, blk] = cg.local_pseudo_value_grad(P, do_ref[:, blk], scale,
                                                 mm_dtype).astype(dvl_ref.dtype)


def output(q, k, v, g, reset_f, hs, v_new, *, scale: float, C: int, config: GpuConfig):
  """O [B,Tp,H,V] in v's dtype from the walk's h_r [B,H,N,K,V] and Ṽ [B,H,N,C,V]."""
  B, _, H, V = v.shape
  cfg = config.resolve(B, H, q.shape[3], V)
  specs = layout.chunk_specs(q, v, C)
  kernel = functools.partial(_output_kernel, C=C, scale=scale, mm_dtype=cm.mm_dtype_for(q.dtype),
                             block_v=cfg.part_block_v)
  return layout.chunk_call(
      kernel, v, C,
      in_specs=[specs.qk,        # q
                specs.qk,        # k
                specs.gate,      # g
                specs.reset,     # reset
                specs.state,     # h_r
                specs.tile_v],   # Ṽ
      out_specs=specs.v,         # O
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
      name="gdn_output", num_warps=cfg.part_num_warps, interpret=cfg.interpret,
  )(q, k, g, reset_f, hs, v_new)


def dv_local(q, k, v, g, reset_f, do, *, scale: float, C: int, config: GpuConfig):
  """dṼ^local [B,H,N,C,V] (in `layout.op_dtype`) from dO [B,Tp,H,V]; v gives only its shape."""
  B, _, H, V = v.shape
  cfg = config.resolve(B, H, q.shape[3], V)
  specs = layout.chunk_specs(q, v, C)
  kernel = functools.partial(_dv_local_kernel, C=C, scale=scale,
                             mm_dtype=cm.mm_dtype_for(q.dtype), block_v=cfg.part_block_v)
  return layout.chunk_call(
      kernel, v, C,
      in_specs=[specs.qk,        # q
                specs.qk,        # k
                specs.gate,      # g
                specs.reset,     # reset
                specs.v],        # dO
      out_specs=specs.tile_v,    # dṼ^local
      out_shape=layout.per_chunk(v, C, C, V, dtype=layout.op_dtype(q.dtype)),
      name="gdn_dv_local", num_warps=cfg.dv_local_num_warps, interpret=cfg.interpret,
  )(q, k, g, reset_f, do)
