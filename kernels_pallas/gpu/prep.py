"""The forward's prep kernel (`gdn_prep`): the UT transform of every chunk, in parallel over chunks.

One program per (batch row, value head, chunk): γ, Γ, A = (I + L)⁻¹ in fp32, W = A diag(βd) K and
U = A diag(β) V, V in blocks of `part_block_v` columns. A and W are kept for the backward (A read by
both gradients kernels, W by the reverse walk); U feeds only the forward walk. A walk that forms
its products from A (`GpuConfig.walk_fwd_from_a`, `walk_bwd_from_a`) needs no U, and with both no
W: then A is the prep's only output.

Two ways to the same A, W, U (`GpuConfig.prep_block`):

* whole tiles (0): A by masked doubling on the C×C tile (`chunk_math.unit_lower_inverse`), W and U
  as C×C by C×· products. Simple, but every doubling level multiplies full C×C tiles that are
  mostly zero blocks.
* b×b blocks (b): with the chunk's rows in n = C/b blocks, only the lower blocks are formed,

      L_ij = diag(β_i) (K_i K_jᵀ ⊙ Γ_ij)          (j ≤ i; strictly lower within L_ii)
      A_ii = (I + L_ii)⁻¹                          (masked doubling on a b×b tile)
      A_ij = −A_ii Σ_{j≤l<i} L_il A_lj             (i > j: row block i of (I + L) A = I)
      W_i = Σ_{j≤i} A_ij diag(β_j d_j) K_j,   U_i = Σ_{j≤i} A_ij diag(β_j) V_j

  each block read from and written to the refs (Triton cannot slice a value, only a ref), and
  γ, the document ids s and d per row block from running sums over the blocks before.
"""
from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import chunk_math as cm
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout


def _out_refs(refs, with_w, with_u):
  """(a_ref, w_ref or None, u_ref or None) from the kernel's output refs."""
  refs = list(refs)
  a_ref = refs.pop(0)
  w_ref = refs.pop(0) if with_w else None
  u_ref = refs.pop(0) if with_u else None
  return a_ref, w_ref, u_ref


def _prep_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, *out_refs, C, mm_dtype, block_v,
                 with_w, with_u):
  """One chunk of one value head: A = (I + L)⁻¹ (masked doubling, fp32), W = A diag(βd) K,
  U = A diag(β) V (by V-blocks); W and U only where a walk reads them (`with_w`, `with_u`)."""
  a_ref, w_ref, u_ref = _out_refs(out_refs, with_w, with_u)
  k, beta = k_ref[...], beta_ref[...]
  Gamma, d, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  A = cm.ut_inverse(cm.dot(k, k, trans_b=True), beta, Gamma, C, masks=True)
  a_ref[...] = A.astype(a_ref.dtype)
  if with_w:
    w_ref[...] = cm.ut_keys(A, k, beta, d, mm_dtype).astype(w_ref.dtype)
  for blk in layout.column_blocks(v_ref.shape[-1], block_v) if with_u else ():
    u_ref[:, blk] = cm.ut_values(A, v_ref[:, blk], beta, mm_dtype).astype(u_ref.dtype)


def _sum(terms):
  """The sum of tiles (no 0 + tile term for Triton)."""
  return functools.reduce(operator.add, terms)


def _blocked_prep_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, *out_refs, C, b, mm_dtype,
                         block_v, with_w, with_u):
  """One chunk of one value head as `_prep_kernel`, in b×b blocks (the module docstring)."""
  a_ref, w_ref, u_ref = _out_refs(out_refs, with_w, with_u)
  n = C // b
  rows = [pl.ds(i * b, b) for i in range(n)]
  blk_rows, blk_cols = cm.iota2(b)
  k = [k_ref[r, :] for r in rows]
  beta = [beta_ref[r] for r in rows]
  gamma, seg, Kb = [], [], []
  g_before = s_before = 0.0                     # Σ g, Σ reset over the blocks before
  for i, r in enumerate(rows):
    g_i, reset_i = g_ref[r], reset_ref[r]
    gamma.append(g_before + cm.inclusive_cumsum(g_i, b))
    seg.append(s_before + cm.inclusive_cumsum(reset_i, b))
    g_before, s_before = g_before + jnp.sum(g_i), s_before + jnp.sum(reset_i)
    if with_w:
      decay_in = jnp.where(seg[i] == 0.0, jnp.exp(gamma[i]), 0.0)
      Kb.append((beta[i] * decay_in)[:, None] * k[i].astype(jnp.float32))

  def lower(i, j):
    """L_ij: Γ_ij masked before exp (other documents, and j ≥ i inside a diagonal block)."""
    keep = seg[i][:, None] == seg[j][None, :]
    if i == j:
      keep = keep & (blk_cols < blk_rows)
    decay = jnp.exp(jnp.where(keep, gamma[i][:, None] - gamma[j][None, :], -jnp.inf))
    return beta[i][:, None] * cm.dot(k[i], k[j], trans_b=True) * decay

  A = {}
  for i in range(n):
    L = [lower(i, j) for j in range(i + 1)]
    A[i, i] = cm.unit_lower_inverse(L[i], masks=True)
    for j in range(i - 1, -1, -1):
      rest = _sum(cm.dot(L[l], A[l, j]) for l in range(j, i))
      A[i, j] = -cm.dot(A[i, i], rest)
  zeros = jnp.zeros((b, b), a_ref.dtype)
  for i, r in enumerate(rows):
    for j, c in enumerate(rows):
      a_ref[r, c] = A[i, j].astype(a_ref.dtype) if j <= i else zeros
    if with_w:
      w_ref[r, :] = _sum(cm.dot(A[i, j], Kb[j], mm_dtype=mm_dtype)
                        for j in range(i + 1)).astype(w_ref.dtype)
  for blk in layout.column_blocks(v_ref.shape[-1], block_v) if with_u else ():
    Vb = [beta[j][:, None] * v_ref[r, blk].astype(jnp.float32) for j, r in enumerate(rows)]
    for i, r in enumerate(rows):
      u_ref[r, blk] = _sum(cm.dot(A[i, j], Vb[j], mm_dtype=mm_dtype)
                          for j in range(i + 1)).astype(u_ref.dtype)


def prep(q, k, v, g, beta, reset_f, *, C: int, config: GpuConfig):
  """(A [B,H,N,C,C], W [B,H,N,C,K], U [B,H,N,C,V]), in `layout.op_dtype` (bf16 for bf16 inputs);
  W is None where no walk reads it (`config.prep_writes_w`), U likewise (`prep_writes_u`).

  q, k [B,Tp,Hk,K] (q gives only the dtype policy), v [B,Tp,H,V], g, β [B,Tp,H] f32, reset_f [B,Tp]
  f32 (zeros without packed documents); Tp = N·C."""
  B, _, H, V = v.shape
  K = q.shape[3]
  cfg = config.resolve(B, H, K, V)
  op = layout.op_dtype(q.dtype)
  specs = layout.chunk_specs(q, v, C)
  tiles = lambda d: layout.per_chunk(v, C, C, d, dtype=op)
  with_w, with_u = cfg.prep_writes_w, cfg.prep_writes_u
  launch = dict(C=C, mm_dtype=cm.mm_dtype_for(q.dtype), block_v=cfg.part_block_v,
                with_w=with_w, with_u=with_u)
  if cfg.prep_block and cfg.prep_block < C:
    kernel = functools.partial(_blocked_prep_kernel, b=cfg.prep_block, **launch)
  else:
    kernel = functools.partial(_prep_kernel, **launch)
  outputs = [(specs.tile_c, tiles(C))]                      # A
  outputs += [(specs.tile_k, tiles(K))] if with_w else []   # W
  outputs += [(specs.tile_v, tiles(V))] if with_u else []   # U
  out = layout.chunk_call(
      kernel, v, C,
      in_specs=[specs.qk,        # k
                specs.v,         # v
                specs.gate,      # g
                specs.gate,      # β
                specs.reset],    # reset
      out_specs=[spec for spec, _ in outputs],
      out_shape=[shape for _, shape in outputs],
      name="gdn_prep", num_warps=cfg.part_num_warps, interpret=cfg.interpret,
  )(k, v, g, beta, reset_f)
  out = list(out)
  A = out.pop(0)
  return A, out.pop(0) if with_w else None, out.pop(0) if with_u else None
