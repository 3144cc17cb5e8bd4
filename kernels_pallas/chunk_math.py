r"""Per-chunk math of the chunked gated delta rule: the one home of its forward identities, shared by
the XLA path (`gdn_jax.ops.chunked`), the GPU (Triton) kernels and the TPU (Mosaic) kernel.

Every function works on the tiles of one chunk of C tokens of one value head, with any leading
(batch) dims: inside a Pallas kernel the tiles are 2-D ([C, K], [C, C]) and vectors 1-D ([C]); the
XLA path calls the same functions on [N, Z, C, ·] arrays (all chunks and heads at once), where each
`dot` is one batched matmul. They use only what both Pallas lowerings accept: `lax.dot_general` with
fp32 accumulation (`dot`), `iota` masks, `exp`, `where`, elementwise arithmetic, broadcasts along new
trailing axes and reductions along one axis at a time. No cumsum (a masked row-sum instead), no
triangular solve (block doubling), no value slicing (`last` is a masked sum).

Symbols (as in `docs/gated_delta_rule.md`), for one chunk with carry-in state h (K×V):

    γ_i = Σ_{j≤i} g_j                                   within-chunk cumulative log decay
    s_i = Σ_{j≤i} reset_j                               within-chunk document index (packed docs)
    Γ_ij = e^{γ_i−γ_j} [j ≤ i] [s_i = s_j]               (Γ_ii = 1 exactly)
    d_i = e^{γ_i} [s_i = 0],  w_j = e^{γ_C−γ_j} [s_j = s_C] (w_C = 1 exactly),  λ = e^{γ_C} [s_C = 0]
    L_ij = β_i (k_i·k_j) Γ_ij  for j < i,  A = (I + L)⁻¹
    W = A diag(β d) K,   U = A diag(β) V                 (UT / WY transform)
    Ṽ = U − W h   (= A (diag(β) V − diag(β d) K h))
    O = scale · [diag(d) Q h + P Ṽ],   P = (Q Kᵀ) ⊙ Γ
    h' = λ h + Kᵀ diag(w) Ṽ

Every exponent is ≤ 0 (masked before `exp`), so strong decay underflows to 0 and never overflows.
Padding tokens (g = β = k = v = 0, reset = 0) leave the state unchanged. The gradients of these
identities are `chunk_grads.py`.

Dtypes: q, k, v may be bf16; everything returned is float32. `dot` casts both operands to
`mm_dtype` (None: keep them, after promoting mixed dtypes to float32) and accumulates in float32;
`mm_dtype_for(dtype)` is the one policy both backends use for it. On Triton a float32 dot runs in TF32
(≈3e-4 relative), like fla's kernels.

Who uses what: the GPU kernels call the pieces one stage at a time (`gpu/`); the TPU kernel's step is
`chunk_forward` and its backward AD of it (`chunk_forward_vjp`); the XLA path calls the pieces on all
chunks at once and walks the state with `pseudo_values` / `next_state` in a scan.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def mm_dtype_for(dtype):
  """Operand dtype of the state and UT-transform matmuls for q, k, v of `dtype`: bfloat16 for
  bfloat16 inputs (fp32 accumulation; as fla does, the tensor cores' and MXU's native type), None
  (operands as given) for every other dtype.

  Only bf16 is narrowed because it keeps fp32's 8-bit exponent: the intermediates cast to it (A, W,
  the states h and the cotangents dṼ, dh) keep their range. float16 (5-bit exponent: |x| ≤ 65504,
  normal |x| ≥ 6e-5) would overflow or flush them, so fp16 inputs multiply as given (promoted to
  fp32 where mixed). The TPU kernel used to narrow to any input dtype below fp32, fp16 included;
  it accepts only float32 and bfloat16, where the two rules agree.
  """
  return jnp.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else None


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, mm_dtype=None):
  """op(a) @ op(b) over the last two axes, batched over the (equal) leading ones, with float32
  accumulation; op transposes when trans_* is set. 2-D operands (in a kernel): one 2-D product."""
  if mm_dtype is not None:
    a, b = a.astype(mm_dtype), b.astype(mm_dtype)
  elif a.dtype != b.dtype:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  n = a.ndim - 2
  batch = tuple(range(n))
  dims = (((n + (0 if trans_a else 1),), (n + (1 if trans_b else 0),)), (batch, batch))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def trailing(x, n: int = 1):
  """x with n new trailing axes, to broadcast a per-tile scalar or vector over a tile. A kernel's
  scalar (0-d) stays a scalar: it broadcasts by itself, and a (1,)-shaped value would be one more
  reshape for Triton / Mosaic."""
  return x if jnp.ndim(x) == 0 else x.reshape(x.shape + (1,) * n)


def iota2(C: int):
  """Row and column indices of a C×C tile."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return rows, cols


def inclusive_cumsum(x, C: int):
  """y_i = Σ_{j≤i} x_j along the last axis (length C), as a masked row-sum: no cumsum op."""
  rows, cols = iota2(C)
  return jnp.sum(jnp.where(cols <= rows, x[..., None, :], 0.0), axis=-1)


def reverse_cumsum(x, C: int):
  """y_j = Σ_{i≥j} x_i along the last axis (length C), as a masked column-sum."""
  rows, cols = iota2(C)
  return jnp.sum(jnp.where(rows >= cols, x[..., :, None], 0.0), axis=-2)


def last(x, C: int):
  """x[..., C−1], without value slicing."""
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
  return jnp.sum(jnp.where(idx == C - 1, x, 0.0), axis=-1)


def chunk_vector_decays(g, reset, C: int):
  """The per-token decays of one chunk, without the C×C matrix (what the state walks need).

  Args:
    g: float32 [..., C] log decays g_i (≤ 0).
    reset: float32 [..., C], 1.0 where a new document starts (state zeroed before that token), else
      0; or None (no packed documents: the document masks are skipped at trace time).
  Returns:
    gamma: γ_i = Σ_{j≤i} g_j;  seg: s_i = Σ_{j≤i} reset_j (the token's document in the chunk), or None.
    decay_in: d_i = e^{γ_i} [s_i = 0] (how much of the carry-in state token i sees).
    k_write: w_j = e^{γ_C−γ_j} [s_j = s_C] (how token j's write survives to the chunk end); w_C = 1
      is a constant: as e^{γ_C−γ_C} its O(1) gradients would cancel only after rounding (dg).
    decay_last: λ = e^{γ_C} [s_C = 0] (how much of h survives the chunk), one per tile.
  """
  gamma = inclusive_cumsum(g, C)
  gamma_last = jnp.sum(g, axis=-1)
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
  writes = idx < C - 1
  if reset is None:
    seg = None
    decay_in = jnp.exp(gamma)
    decay_last = jnp.exp(gamma_last)
  else:
    seg = inclusive_cumsum(reset, C)
    seg_last = jnp.sum(reset, axis=-1)
    decay_in = jnp.where(seg == 0.0, jnp.exp(gamma), 0.0)
    writes = writes & (seg == trailing(seg_last))
    decay_last = jnp.where(seg_last == 0.0, jnp.exp(gamma_last), 0.0)
  k_write = jnp.where(idx == C - 1, 1.0,
                      jnp.exp(jnp.where(writes, trailing(gamma_last) - gamma, -jnp.inf)))
  return gamma, seg, decay_in, k_write, decay_last


class Decays(NamedTuple):
  """Decays and masks of a chunk (`chunk_decays`)."""
  Gamma: jax.Array       # Γ [..., C, C]
  decay_in: jax.Array    # d [..., C]
  k_write: jax.Array     # w [..., C]
  decay_last: jax.Array  # λ [...]


def chunk_decays(g, reset, C: int) -> Decays:
  """Γ_ij = e^{γ_i−γ_j} [j ≤ i][s_i = s_j], masked *before* exp (no positive exponent is ever
  evaluated), and d, w, λ (arguments as `chunk_vector_decays`). Γ_ii = 1 is a constant: as
  e^{γ_i−γ_i} its O(1) gradients would cancel only after the reverse cumsum that forms dg, leaving
  fp32 rounding that swamps the true dg under strong decay. Γ carries the document mask, so
  L = strict(diag(β)(K Kᵀ) ⊙ Γ) and everything formed from Γ need no other."""
  rows, cols = iota2(C)
  gamma, seg, decay_in, k_write, decay_last = chunk_vector_decays(g, reset, C)
  strict = cols < rows
  if seg is not None:
    strict = strict & (seg[..., :, None] == seg[..., None, :])
  diff = jnp.where(strict, gamma[..., :, None] - gamma[..., None, :], -jnp.inf)
  return Decays(jnp.where(rows == cols, 1.0, jnp.exp(diff)), decay_in, k_write, decay_last)


def unit_lower_inverse(L, diag_block: int | None = None, *, masks: bool = False):
  """(I + L)⁻¹ for strictly lower-triangular float32 L [..., C, C] (C a power of two), exact.

  Block forward substitution by doubling: the inverses A₁₁, A₂₂ of two neighbouring diagonal blocks
  of size b merge into that of their 2b-block,

      [[I + L₁₁, 0], [L₂₁, I + L₂₂]]⁻¹ = [[A₁₁, 0], [−A₂₂ L₂₁ A₁₁, A₂₂]],

  for b = b₀, 2b₀, … C/2. Unlike a LAPACK triangular solve this vectorises and runs on the matrix
  units of a GPU/TPU, and it is exact (no Neumann series, whose powers of L can overflow). Two ways
  of addressing the blocks, the same merges:

  * `masks=False` (the XLA path): the blocks are reshaped out of L, so a level costs ~C³/(2·C/b)
    flops, ~C³/6 in all. The b₀ = `diag_block` diagonal blocks are first inverted by forward
    substitution, all at once, one row per step: A_i = e_i − Σ_{j<i} L_ij A_j. None picks by
    backend: 8 on CPU, where the first doubling levels are many tiny batched matmuls (2 cores, 256
    inverses of 64×64: 1.8 ms with b₀ = 8 against 6.2 ms with b₀ = 1, and 4.6 against 9.4 ms inside
    the fused chunk scan); 1 elsewhere (a few large batched matmuls instead of b₀ sequential steps).
  * `masks=True` (inside a kernel, whose tiles cannot be reshaped or concatenated): full-tile
    matmuls on masked copies of L. With A_b the block-diagonal inverse and M_b = L ⊙ [b ≤ i⊕j < 2b]
    (its L₂₁ blocks; i//b = j//b ⟺ i⊕j < b for powers of two), A_2b = A_b − A_b M_b A_b. A_2 = I − M₁
    needs no matmul (b₀ = 2 in closed form, `diag_block` must be None or 2); then 2 (log₂C − 1) C×C
    matmuls at the default precision (TF32 on Triton).
  """
  *batch, C, _ = L.shape
  if masks:
    if diag_block not in (None, 2):
      raise ValueError(f"unit_lower_inverse: `diag_block`={diag_block} with masks=True; the masked "
                       "form starts from 2×2 blocks (None or 2).")
    rows, cols = iota2(C)
    x = rows ^ cols
    A = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(x == 1, L, 0.0)          # A_2
    b = 2
    while b < C:
      A = A - dot(dot(A, jnp.where((x >= b) & (x < 2 * b), L, 0.0)), A)
      b *= 2
    return A
  if diag_block is None:
    diag_block = 8 if jax.default_backend() == "cpu" else 1
  b = min(diag_block, C)
  hi = jax.lax.Precision.HIGHEST
  n = C // b
  blocks = L.reshape(*batch, n, b, n, b)
  diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)   # [..., n, b, b]
  eye = jnp.eye(b, dtype=L.dtype)

  def substitute(i, A):                # row i of every diagonal block's inverse
    return A.at[..., i, :].set(eye[i] - jnp.einsum('...j,...jc->...c', diag[..., i, :], A,
                                                    precision=hi))
  if b == 1:
    A = jnp.ones_like(diag)                                                # 1×1 blocks: A = 1
  else:
    A = jax.lax.fori_loop(0, b, substitute, jnp.zeros_like(diag))         # [..., n, b, b]
  while b < C:
    n = C // (2 * b)
    pairs = A.reshape(*batch, n, 2, b, b)
    A11, A22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
    blocks = L.reshape(*batch, n, 2 * b, n, 2 * b)
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., n, 2b, 2b]
    L21 = diag[..., b:, :b]
    A21 = -jnp.matmul(jnp.matmul(A22, L21, precision=hi), A11, precision=hi)
    top = jnp.concatenate([A11, jnp.zeros_like(A11)], axis=-1)
    A = jnp.concatenate([top, jnp.concatenate([A21, A22], axis=-1)], axis=-2)
    b *= 2
  return A.reshape(*batch, C, C)


def ut_inverse(KK, beta, Gamma, C: int, *, masks: bool = False):
  """A = (I + L)⁻¹ with L = strict(diag(β)(K Kᵀ) ⊙ Γ) (Γ carries the document mask); KK = K Kᵀ.
  `masks`: as `unit_lower_inverse` (True inside a kernel)."""
  rows, cols = iota2(C)
  L = jnp.where(cols < rows, beta[..., :, None] * KK * Gamma, 0.0)
  return unit_lower_inverse(L, masks=masks)


def ut_keys(A, k, beta, decay_in, mm_dtype=None):
  """W = A diag(β d) K."""
  return dot(A, (beta * decay_in)[..., :, None] * k.astype(jnp.float32), mm_dtype=mm_dtype)


def ut_values(A, v, beta, mm_dtype=None):
  """U = A diag(β) V (separable in the value columns: a kernel may pass a block of them)."""
  return dot(A, beta[..., :, None] * v.astype(jnp.float32), mm_dtype=mm_dtype)


def pseudo_values(h, W, U, mm_dtype=None):
  """Ṽ = U − W h."""
  return U.astype(jnp.float32) - dot(W, h, mm_dtype=mm_dtype)


def pseudo_values_direct(h, A, k, v, beta, decay_in, mm_dtype=None):
  """The same Ṽ as A (diag(β) V − diag(β d) K h), without W and U: one matmul fewer where they
  are not needed otherwise (the XLA path's fused schedule)."""
  Kb_h = dot((beta * decay_in)[..., :, None] * k.astype(jnp.float32), h, mm_dtype=mm_dtype)
  return dot(A, beta[..., :, None] * v.astype(jnp.float32) - Kb_h, mm_dtype=mm_dtype)


def decayed_scores(q, k, Gamma):
  """P = (Q Kᵀ) ⊙ Γ."""
  return dot(q, k, trans_b=True) * Gamma


def chunk_output(h, Qd, P, v_new, scale: float, mm_dtype=None):
  """O = scale (Qd h + P Ṽ), Qd = diag(d) Q (separable in the value columns of h and Ṽ)."""
  return scale * (dot(Qd, h, mm_dtype=mm_dtype) + dot(P, v_new, mm_dtype=mm_dtype))


def next_state(h, k, k_write, decay_last, v_new, mm_dtype=None):
  """h' = λ h + Kᵀ diag(w) Ṽ (w scales the C×V values, not the C×K keys)."""
  return (trailing(decay_last, 2) * h
          + dot(k, k_write[..., :, None] * v_new, trans_a=True, mm_dtype=mm_dtype))


def chunk_forward(q, k, v, g, beta, reset, h, *, scale: float, C: int, mm_dtype=None):
  """(O [C×V], h' [K×V]) of one chunk from its inputs and carry-in state h (the TPU kernel's step):
  decays, A (masked doubling), W, U, then Ṽ, O and h'."""
  dec = chunk_decays(g, reset, C)
  A = ut_inverse(dot(k, k, trans_b=True), beta, dec.Gamma, C, masks=True)
  v_new = pseudo_values(h, ut_keys(A, k, beta, dec.decay_in, mm_dtype),
                        ut_values(A, v, beta, mm_dtype), mm_dtype)
  Qd = dec.decay_in[..., :, None] * q.astype(jnp.float32)
  o = chunk_output(h, Qd, decayed_scores(q, k, dec.Gamma), v_new, scale, mm_dtype)
  return o, next_state(h, k, dec.k_write, dec.decay_last, v_new, mm_dtype)


def chunk_forward_vjp(q, k, v, g, beta, reset, h, do, dh_next, *, scale: float, C: int,
                      mm_dtype=None):
  """(dq, dk, dv, dg, dβ, dh) of one chunk given the cotangents dO, dh' of (O, h'): AD of
  `chunk_forward` (recompute the chunk, pull back; the TPU kernel's backward step)."""
  f = lambda q, k, v, g, b, h: chunk_forward(q, k, v, g, b, reset, h, scale=scale, C=C,
                                             mm_dtype=mm_dtype)
  _, vjp = jax.vjp(f, q, k, v, g, beta, h)
  return vjp((do, dh_next))
