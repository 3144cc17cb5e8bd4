"""The forward's prep kernel (`gdn_prep`): the UT transform of every chunk, in parallel over chunks.

One program per (batch row, value head, chunk): γ, Γ, A = (I + L)⁻¹ by masked doubling in fp32,
W = A diag(βd) K and U = A diag(β) V, V in blocks of `part_block_v` columns. A and W are kept for the
backward (A read by both gradients kernels, W by the reverse walk); U feeds only the forward walk.
"""
from __future__ import annotations

import functools

from kernels_pallas import chunk_math as cm
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout


def _prep_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, a_ref, w_ref, u_ref, *, C, mm_dtype,
                 block_v):
  """One chunk of one value head: A = (I + L)⁻¹ (masked doubling, fp32), W = A diag(βd) K,
  U = A diag(β) V (by V-blocks)."""
  k, beta = k_ref[...], beta_ref[...]
  Gamma, d, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  A = cm.ut_inverse(cm.dot(k, k, trans_b=True), beta, Gamma, C, masks=True)
  a_ref[...] = A.astype(a_ref.dtype)
  w_ref[...] = cm.ut_keys(A, k, beta, d, mm_dtype).astype(w_ref.dtype)
  for blk in layout.column_blocks(v_ref.shape[-1], block_v):
    u_ref[:, blk] = cm.ut_values(A, v_ref[:, blk], beta, mm_dtype).astype(u_ref.dtype)


def prep(q, k, v, g, beta, reset_f, *, C: int, config: GpuConfig):
  """A [B,H,N,C,C], W [B,H,N,C,K], U [B,H,N,C,V], in `layout.op_dtype` (bf16 for bf16 inputs).

  q, k [B,Tp,Hk,K] (q gives only the dtype policy), v [B,Tp,H,V], g, β [B,Tp,H] f32, reset_f [B,Tp]
  f32 (zeros without packed documents); Tp = N·C."""
  B, _, H, V = v.shape
  K = q.shape[3]
  cfg = config.resolve(B, H, K, V)
  op = layout.op_dtype(q.dtype)
  specs = layout.chunk_specs(q, v, C)
  tiles = lambda d: layout.per_chunk(v, C, C, d, dtype=op)
  kernel = functools.partial(_prep_kernel, C=C, mm_dtype=cm.mm_dtype_for(q.dtype),
                             block_v=cfg.part_block_v)
  return layout.chunk_call(
      kernel, v, C,
      in_specs=[specs.qk,        # k
                specs.v,         # v
                specs.gate,      # g
                specs.gate,      # β
                specs.reset],    # reset
      out_specs=[specs.tile_c,   # A
                 specs.tile_k,   # W
                 specs.tile_v],  # U
      out_shape=[tiles(C), tiles(K), tiles(V)],
      name="gdn_prep", num_warps=cfg.part_num_warps, interpret=cfg.interpret,
  )(k, v, g, beta, reset_f)
