r"""Per-chunk math of the chunked gated delta rule, shared by the GPU (Triton) and TPU (Mosaic) kernels.

Every function works on the 2-D tiles of ONE chunk of C tokens of ONE value head, as values (not refs),
and uses only what both Pallas lowerings accept: 2-D `lax.dot_general` with fp32 accumulation
(`dot` below), `iota` masks, `exp`, `where`, elementwise arithmetic, broadcasts of 1-D vectors
(`x[:, None]`, `x[None, :]`) and reductions along one axis at a time. No cumsum (a masked row-sum instead),
no triangular solve (block doubling with masks instead), no value slicing (`x[i]` is a masked sum).
Under `jax.vmap` the same functions run as batched XLA ops.

Symbols (as in `gdn_jax/ops/chunked.py` and `docs/`), for one chunk with carry-in state h (K×V):

    γ_i = Σ_{j≤i} g_j                                   within-chunk cumulative log decay
    s_i = Σ_{j≤i} reset_j                               within-chunk document index (packed docs)
    Γ_ij = e^{γ_i−γ_j} [j ≤ i] [s_i = s_j]               (Γ_ii = 1 exactly)
    L_ij = β_i (k_i·k_j) Γ_ij  for j < i,  A = (I + L)⁻¹
    W = A diag(β e^γ [s=0]) K,   U = A diag(β) V          (UT / WY transform)
    Ṽ = U − W h
    O = scale · [diag(e^γ [s=0]) Q h + ((Q Kᵀ) ⊙ Γ) Ṽ]
    h' = e^{γ_C} [s_C=0] h + K̃ᵀ Ṽ,   K̃_j = e^{γ_C−γ_j} [s_j = s_C] k_j

Every exponent is ≤ 0 (masked before `exp`), so strong decay underflows to 0 and never overflows.
Padding tokens (g = β = k = v = 0, reset = 0) leave the state unchanged.

Dtypes: q, k, v may be bf16; everything returned is float32. `dot` casts both operands to
`mm_dtype` (None: keep them, after promoting mixed dtypes to float32) and accumulates in float32;
`mm_dtype_for(dtype)` is the one policy both backends use for it. On Triton a float32 dot runs in TF32
(≈3e-4 relative), like fla's kernels.

Who uses what: the forward (`chunk_decays`, `ut_inverse`, the W, U, O and state products) is shared;
the GPU backward is the hand-written pair `chunk_key_grads` + `chunk_wy_grads`, the TPU backward is
AD of `chunk_forward` (`chunk_forward_vjp`). The XLA path (`gdn_jax.ops.chunked`) has its own batched
forms of the same identities (its `unit_lower_inverse` and `chunk_grads`): the two are exact in real
arithmetic but round differently, and the training runs' numbers are pinned to that path's rounding.
"""
from __future__ import annotations

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
  """op(a) @ op(b) with float32 accumulation; op transposes when trans_* is set. 2-D only."""
  if mm_dtype is not None:
    a, b = a.astype(mm_dtype), b.astype(mm_dtype)
  elif a.dtype != b.dtype:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _iota2(C: int):
  rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return rows, cols


def inclusive_cumsum(x_C, C: int):
  """y_i = Σ_{j≤i} x_j for a 1-D float vector of length C (a masked row-sum: no cumsum op)."""
  rows, cols = _iota2(C)
  return jnp.sum(jnp.where(cols <= rows, x_C[None, :], 0.0), axis=1)


def last(x_C, C: int):
  """x_{C−1} as a scalar, without value slicing."""
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
  return jnp.sum(jnp.where(idx == C - 1, x_C, 0.0))


def unit_lower_inverse(L_CxC, C: int):
  """A = (I + L)⁻¹ for strictly lower-triangular float32 L (C a power of two), by full-tile matmuls.

  Block forward substitution by doubling: if A_b is the inverse of the block diagonal of I + L with
  blocks of size b (zero elsewhere) and M_b keeps the entries of L inside a 2b-block but outside the
  b-blocks (the L₂₁ blocks), then

      A_2b = A_b − A_b M_b A_b      ([[A₁₁,0],[L₂₁·,A₂₂]]: the new block is −A₂₂ L₂₁ A₁₁).

  i//b = j//b ⟺ (i XOR j) < b for powers of two, so M_b = L ⊙ [b ≤ i⊕j < 2b]. A_2 = I − M_1 needs no
  matmul; then 2 (log₂C − 1) C×C matmuls. Exact (no Neumann series, whose powers of L can overflow).
  This is the in-kernel form of `gdn_jax.ops.chunked.unit_lower_inverse` (the same merges, done there
  on reshaped blocks after a substitution on the diagonal blocks): masks instead of reshapes and
  concatenations, which Triton and Mosaic tiles do not allow.
  """
  rows, cols = _iota2(C)
  x = rows ^ cols
  A = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(x == 1, L_CxC, 0.0)       # A_2
  b = 2
  while b < C:
    M = jnp.where((x >= b) & (x < 2 * b), L_CxC, 0.0)
    A = A - dot(dot(A, M), A)
    b *= 2
  return A


def chunk_vector_decays(g_C, reset_C, C: int):
  """The per-token decays of one chunk, without the C×C matrix (what the state walks need).

  Args:
    g_C: float32 [C] log decays g_i (≤ 0).
    reset_C: float32 [C], 1.0 where a new document starts (state zeroed before that token), else 0.
  Returns:
    gamma_C: γ_i = Σ_{j≤i} g_j;  seg_C: s_i = Σ_{j≤i} reset_j (the token's document in the chunk).
    decay_in_C: e^{γ_i} [s_i = 0] (how much of the carry-in state token i sees).
    k_write_C: e^{γ_C−γ_j} [s_j = s_C] (how token j's write survives to the chunk end); 1 at j = C−1.
    decay_last: scalar e^{γ_C} [s_C = 0] (how much of h survives the chunk).
  """
  gamma_C = inclusive_cumsum(g_C, C)
  seg_C = inclusive_cumsum(reset_C, C)
  decay_in_C = jnp.where(seg_C == 0.0, jnp.exp(gamma_C), 0.0)
  gamma_last = jnp.sum(g_C)
  seg_last = jnp.sum(reset_C)
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
  writes = (seg_C == seg_last) & (idx < C - 1)
  k_write_C = jnp.where(idx == C - 1, 1.0,
                        jnp.exp(jnp.where(writes, gamma_last - gamma_C, -jnp.inf)))
  decay_last = jnp.where(seg_last == 0.0, jnp.exp(gamma_last), 0.0)
  return gamma_C, seg_C, decay_in_C, k_write_C, decay_last


def chunk_decays(g_C, reset_C, C: int):
  """Decays and masks of one chunk (arguments as `chunk_vector_decays`).

  Returns:
    Gamma_CxC: Γ_ij = e^{γ_i−γ_j} [j ≤ i][s_i = s_j], with Γ_ii = 1 exactly (its e^{γ_i−γ_i} form would
      give O(1) gradients that cancel only after rounding, swamping dg under strong decay).
    decay_in_C, k_write_C, decay_last: as `chunk_vector_decays`.
  """
  rows, cols = _iota2(C)
  gamma_C, seg_C, decay_in_C, k_write_C, decay_last = chunk_vector_decays(g_C, reset_C, C)
  same = (cols <= rows) & (seg_C[:, None] == seg_C[None, :])
  diff = jnp.where(same & (cols < rows), gamma_C[:, None] - gamma_C[None, :], -jnp.inf)
  Gamma_CxC = jnp.where(rows == cols, 1.0, jnp.exp(diff))
  return Gamma_CxC, decay_in_C, k_write_C, decay_last


def ut_inverse(k_CxK, beta_C, Gamma_CxC, C: int):
  """A = (I + L)⁻¹ with L = strict(diag(β)(K Kᵀ) ⊙ Γ) (Γ carries the document mask)."""
  rows, cols = _iota2(C)
  KK = dot(k_CxK, k_CxK, trans_b=True)
  return unit_lower_inverse(jnp.where(cols < rows, beta_C[:, None] * KK * Gamma_CxC, 0.0), C)


def ut_transform(k_CxK, v_CxV, beta_C, Gamma_CxC, decay_in_C, C: int, mm_dtype=None):
  """W = A diag(β e^γ[s=0]) K and U = A diag(β) V with A = (I + L)⁻¹, L = strict(diag(β)(K Kᵀ) ⊙ Γ)."""
  A = ut_inverse(k_CxK, beta_C, Gamma_CxC, C)
  kf = k_CxK.astype(jnp.float32)
  W = dot(A, (beta_C * decay_in_C)[:, None] * kf, mm_dtype=mm_dtype)
  U = dot(A, beta_C[:, None] * v_CxV.astype(jnp.float32), mm_dtype=mm_dtype)
  return W, U


def chunk_operators(q_CxK, k_CxK, v_CxV, g_C, beta_C, reset_C, C: int, mm_dtype=None):
  """Everything of a chunk that does not depend on the carry-in state h.

  Returns (P, W, U, Qd, Kw, decay_last): P = (Q Kᵀ) ⊙ Γ [C×C], W [C×K], U [C×V],
  Qd = diag(e^γ[s=0]) Q [C×K], Kw = K̃ = diag(e^{γ_C−γ}[s=s_C]) K [C×K], decay_last scalar; all float32.
  """
  Gamma, decay_in, k_write, decay_last = chunk_decays(g_C, reset_C, C)
  W, U = ut_transform(k_CxK, v_CxV, beta_C, Gamma, decay_in, C, mm_dtype)
  P = dot(q_CxK, k_CxK, trans_b=True) * Gamma
  Qd = decay_in[:, None] * q_CxK.astype(jnp.float32)
  Kw = k_write[:, None] * k_CxK.astype(jnp.float32)
  return P, W, U, Qd, Kw, decay_last


def chunk_step(h_KxV, P_CxC, W_CxK, U_CxV, Qd_CxK, Kw_CxK, decay_last, scale: float, mm_dtype=None):
  """One chunk of the state walk: Ṽ = U − W h; O = scale (Qd h + P Ṽ); h' = e^{γ_C} h + K̃ᵀ Ṽ.

  Returns (O [C×V], h' [K×V], Ṽ [C×V]), float32.
  """
  v_new = U_CxV - dot(W_CxK, h_KxV, mm_dtype=mm_dtype)
  o = scale * (dot(Qd_CxK, h_KxV, mm_dtype=mm_dtype) + dot(P_CxC, v_new, mm_dtype=mm_dtype))
  h_next = decay_last * h_KxV + dot(Kw_CxK, v_new, trans_a=True, mm_dtype=mm_dtype)
  return o, h_next, v_new


def chunk_forward(q_CxK, k_CxK, v_CxV, g_C, beta_C, reset_C, h_KxV, *, scale: float, C: int,
                  mm_dtype=None):
  """(O [C×V], h' [K×V]) of one chunk from its inputs and carry-in state h: `chunk_operators` then
  `chunk_step` (the TPU kernel's step)."""
  P, W, U, Qd, Kw, decay_last = chunk_operators(q_CxK, k_CxK, v_CxV, g_C, beta_C, reset_C, C,
                                                mm_dtype)
  o_CxV, h_next_KxV, _ = chunk_step(h_KxV, P, W, U, Qd, Kw, decay_last, scale, mm_dtype)
  return o_CxV, h_next_KxV


def chunk_forward_vjp(q_CxK, k_CxK, v_CxV, g_C, beta_C, reset_C, h_KxV, do_CxV, dh_next_KxV, *,
                      scale: float, C: int, mm_dtype=None):
  """(dq, dk, dv, dg, dβ, dh) of one chunk given the cotangents dO, dh' of (O, h'): AD of
  `chunk_forward` (recompute the chunk, pull back; the TPU kernel's backward step)."""
  f = lambda q, k, v, g, b, h: chunk_forward(q, k, v, g, b, reset_C, h, scale=scale, C=C,
                                             mm_dtype=mm_dtype)
  _, vjp = jax.vjp(f, q_CxK, k_CxK, v_CxV, g_C, beta_C, h_KxV)
  return vjp((do_CxV, dh_next_KxV))


def reverse_cumsum(x_C, C: int):
  """y_j = Σ_{i≥j} x_i for a 1-D float vector of length C (a masked column-sum)."""
  rows, cols = _iota2(C)
  return jnp.sum(jnp.where(rows >= cols, x_C[:, None], 0.0), axis=0)


# ------------------------------------------------------------------------------------------------
# The GPU backward's gradients, in two kernels split as fla splits its backward (`gpu/grads.py`): one
# program per (chunk, block of K columns) for everything that contracts over V into K, then one
# program per chunk for the UT transform's part (dv and the gradient through L = strict(β KKᵀ ⊙ Γ)).
# A = (I + L)⁻¹ comes stored from the forward. V-wide tiles come in blocks of columns (the rule is
# separable in the value columns). dq is final after the first; dk = dk₁ + dk₂; dg and dβ are sums of
# the two kernels' parts (dg is linear in dγ, so each part is reverse-cumsummed on its own).
#
# The identities (as in `gdn_jax.ops.chunked.chunk_grads`), with Kb = diag(β d) K, Vb = diag(β) V,
# d = e^γ[s=0], w = e^{γ_C−γ}[s=s_C], λ = e^{γ_C}[s_C=0]:
#     dP = scale dO Ṽᵀ   dQd = scale dO hᵀ   dK̃ = Ṽ dh'ᵀ   dλ = Σ h ⊙ dh'
#     dVb = Aᵀ dṼ,  dKb = −Aᵀ dṼ hᵀ,  dL = −strict(dVb Ṽᵀ)   (Aᵀ dA Aᵀ = dVb Ṽᵀ as Ṽ = A (Vb − Kb h))
#     through L = strict(β_i (KKᵀ)_ij Γ_ij) and P = (QKᵀ) ⊙ Γ to dq, dk, dv = β dVb, dβ and
#     dγ_i = Σ_j (Γ ⊙ dΓ)_ij − Σ_j (Γ ⊙ dΓ)_ji + d_i dd_i − w_i dw_i,  dγ_C = Σ_j w_j dw_j + λ dλ,
#     dg = reverse_cumsum(dγ) + dγ_C       (γ = cumsum g; Γ_ii = w_C = 1 are constants)


def fold_blocks(blocks, step, init):
  """step(carry, block) folded over `blocks`: an iterable (unrolled at trace time), or a pair
  (n, block_fn) with block_fn(j) the j-th block for a traced j, folded by `fori_loop`. The loop keeps
  one block's tiles live at a time: unrolled, a GPU kernel's compiler may hoist every block's loads
  and spill registers (K = 256, V = 512: four 128-wide V-blocks)."""
  if isinstance(blocks, tuple) and len(blocks) == 2 and callable(blocks[1]):
    n, block_fn = blocks
    return jax.lax.fori_loop(0, n, lambda j, carry: step(carry, block_fn(j)), init)
  carry = init
  for block in blocks:
    carry = step(carry, block)
  return carry


def chunk_key_grads(q_cols, k_cols, g_C, beta_C, reset_C, A_CxC, blocks, C: int, scale: float,
                    mm_dtype=None):
  r"""First half: one chunk, one block of K columns (`q_cols`, `k_cols`: C×BK; BK = K allowed).

  `blocks` (see `fold_blocks`) gives per V-block (h, Ṽ, dO, dh', dṼ) with h, dh' holding the state
  rows of these columns:

      dQd = scale Σ dO hᵀ    dK̃ = Σ Ṽ dh'ᵀ    X = Σ dṼ hᵀ    dP = scale Σ dO Ṽᵀ    dλ = Σ h ⊙ dh'
      dKb = −Aᵀ X            (= −dVb hᵀ with dVb = Aᵀ dṼ, without forming the C×V dVb)
      dq  = d ⊙ dQd + (dP ⊙ Γ) K_cols                                       (final)
      dk₁ = w ⊙ dK̃ + βd ⊙ dKb + (dP ⊙ Γ)ᵀ Q_cols

  dg, dβ through P, d, w, λ (`_gradients_from_products` without the dL terms). The P part of dγ,
  Σ_j (Γ ⊙ dP ⊙ QKᵀ)_ij − Σ_j (Γ ⊙ dP ⊙ QKᵀ)_ji, needs no Q Kᵀ: Σ_j (dP ⊙ Γ)_ij (QKᵀ)_ij =
  Σ_k q_ik ((dP ⊙ Γ) K)_ik is a row sum of Q ⊙ dq_P over the columns (the diagonal, Γ_ii = 1, is in
  both sums and cancels). Every term of dg, dβ here contracts over K, so per K-block they are
  partial sums (the caller adds them up) and no term needs a `first` gate.
  Returns (dq, dk₁ [C×BK], dg, dβ [C]), float32.
  """
  BK = q_cols.shape[1]
  qf, kf = q_cols.astype(jnp.float32), k_cols.astype(jnp.float32)
  Gamma, d, w, lam = chunk_decays(g_C, reset_C, C)
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)

  def step(carry, block):
    dQd, dKw, X, dP, dlam = carry
    h, v_new, do, dh, dv_new = block
    return (dQd + scale * dot(do, h, trans_b=True, mm_dtype=mm_dtype),
            dKw + dot(v_new, dh, trans_b=True, mm_dtype=mm_dtype),
            X + dot(dv_new, h, trans_b=True, mm_dtype=mm_dtype),
            dP + scale * dot(do, v_new, trans_b=True, mm_dtype=mm_dtype),
            dlam + jnp.sum(jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32), axis=1)))

  zeros_cols = jnp.zeros((C, BK), jnp.float32)
  dQd, dKw, X, dP, dlam = fold_blocks(
      blocks, step, (zeros_cols, zeros_cols, zeros_cols, jnp.zeros((C, C), jnp.float32),
                     jnp.zeros((), jnp.float32)))
  dKb = -dot(A_CxC, X, trans_a=True, mm_dtype=mm_dtype)
  dQK = dP * Gamma
  dq_P = dot(dQK, k_cols, mm_dtype=mm_dtype)
  dk_P = dot(dQK, q_cols, trans_a=True, mm_dtype=mm_dtype)
  kb_dot = jnp.sum(dKb * kf, axis=1)
  kw_dot = jnp.where(idx < C - 1, jnp.sum(dKw * kf, axis=1), 0.0)   # w_{C−1} = 1 is a constant
  dd = beta_C * kb_dot + jnp.sum(dQd * qf, axis=1)
  dgamma = jnp.sum(qf * dq_P, axis=1) - jnp.sum(kf * dk_P, axis=1) + d * dd - w * kw_dot
  dg = reverse_cumsum(dgamma, C) + jnp.sum(w * kw_dot) + lam * dlam
  dq = d[:, None] * dQd + dq_P
  dk = w[:, None] * dKw + (beta_C * d)[:, None] * dKb + dk_P
  return dq, dk, dg, d * kb_dot


def chunk_wy_grads(k_CxK, g_C, beta_C, reset_C, A_CxC, blocks, C: int, mm_dtype=None):
  r"""Second half: one chunk, all of K; the UT transform's part of the gradients.

  `blocks` (see `fold_blocks`) gives per V-block ((v, Ṽ, dṼ), a `write_dv` callback):

      dVb = Aᵀ dṼ    dv = β dVb (per block)    dL = −strict(Σ dVb Ṽᵀ)    dKK = β Γ ⊙ dL
      dk₂ = (dKK + dKKᵀ) K                     (the caller forms it by column blocks of K)
      dβ₂ = Σ_j (K Kᵀ ⊙ Γ ⊙ dL)_ij + Σ dVb ⊙ v
      dγ₂ = Σ_j (dKK ⊙ K Kᵀ)_ij − Σ_j (dKK ⊙ K Kᵀ)_ji,   dg₂ = reverse_cumsum(dγ₂)

  Returns (dKK + dKKᵀ [C×C], dg₂, dβ₂ [C]), float32.
  """
  rows, cols = _iota2(C)

  def step(carry, block):
    dL, dbeta_v = carry
    (v, v_new, dv_new), write_dv = block
    dVb = dot(A_CxC, dv_new, trans_a=True, mm_dtype=mm_dtype)
    write_dv(beta_C[:, None] * dVb)
    return (dL - dot(dVb, v_new, trans_b=True, mm_dtype=mm_dtype),
            dbeta_v + jnp.sum(dVb * v.astype(jnp.float32), axis=1))

  dL, dbeta_v = fold_blocks(blocks, step, (jnp.zeros((C, C), jnp.float32),
                                           jnp.zeros((C,), jnp.float32)))
  Gamma, _, _, _ = chunk_decays(g_C, reset_C, C)
  KK = dot(k_CxK, k_CxK, trans_b=True)
  dLG = jnp.where(cols < rows, dL, 0.0) * Gamma
  dKK = beta_C[:, None] * dLG
  GdG = dKK * KK
  dg = reverse_cumsum(jnp.sum(GdG, axis=1) - jnp.sum(GdG, axis=0), C)
  return dKK + dKK.T, dg, jnp.sum(KK * dLG, axis=1) + dbeta_v
