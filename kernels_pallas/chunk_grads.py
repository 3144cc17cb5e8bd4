r"""Gradients of a chunk of the chunked gated delta rule: each identity written once, for the XLA path
(`gdn_jax.ops.chunked`, all chunks at once, all of V in one block) and the GPU kernels (`gpu/walks.py`,
`gpu/grads.py`: per chunk, V in blocks). Tiles with any leading dims, as `chunk_math`; float32 out.

With Kb = diag(β d) K, Vb = diag(β) V and the forward's symbols (`chunk_math`):

    state walk (reverse):  dṼ = scale Pᵀ dO + diag(w) K dh',   dh = λ dh' + scale Qᵀ diag(d) dO − Wᵀ dṼ
    V-contractions:        dQd = scale dO hᵀ   dK̃ = Ṽ dh'ᵀ   dP = scale dO Ṽᵀ   dλ = Σ h ⊙ dh'
                           dVb = Aᵀ dṼ,   dKb = −Aᵀ dṼ hᵀ = −dVb hᵀ,   dL = −strict(dVb Ṽᵀ)
    (dA = dṼ (Vb − Kb h)ᵀ is never formed: as Ṽ = A (Vb − Kb h), Aᵀ dA Aᵀ = dVb Ṽᵀ, one C×V×C
    product, and dL = −strict(Aᵀ dA Aᵀ))
    through P = (QKᵀ) ⊙ Γ, d, w, λ (`key_grads`) and L = strict(β_i (KKᵀ)_ij Γ_ij), Vb (`wy_grads`)
    to dq, dk, dv = β dVb, dβ and
        dγ_i = Σ_j (Γ⊙dΓ)_ij − Σ_j (Γ⊙dΓ)_ji + d_i dd_i − w_i dw_i,   dγ_C = Σ_j w_j dw_j + λ dλ,
        dg = reverse_cumsum(dγ) + dγ_C          (γ = cumsum g; Γ_ii = w_C = 1 are constants).

The split into `key_grads` (everything that contracts over V into K: separable in K-columns) and
`wy_grads` (the UT transform's part: needs all of K) is fla's, and the GPU's two gradients kernels;
dq is final after the first, dk = dk₁ + (dKK + dKKᵀ) K, and dg, dβ are sums of the two parts (dg is
linear in dγ, so each part is reverse-cumsummed on its own). `chunk_grads` composes them for the
XLA path; `chunk_key_grads` / `chunk_wy_grads` fold V-blocks for the kernels (`fold_blocks`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.chunk_math import Decays, chunk_decays, dot, iota2, reverse_cumsum, trailing


# --- the reverse state walk --------------------------------------------------------------------

def local_pseudo_value_grad(P, do, scale: float, mm_dtype=None):
  """dṼ^local = scale Pᵀ dO (what O contributes to dṼ; independent of the walk)."""
  return scale * dot(P, do, trans_a=True, mm_dtype=mm_dtype)


def pseudo_value_grad(dv_local, k, k_write, dh_next, mm_dtype=None):
  """dṼ = dṼ^local + diag(w) K dh' (h' = λ h + Kᵀ diag(w) Ṽ pulled back to Ṽ)."""
  return dv_local.astype(jnp.float32) + k_write[..., :, None] * dot(k, dh_next, mm_dtype=mm_dtype)


def local_state_grad(q, decay_in, do, scale: float, mm_dtype=None):
  """scale Qᵀ diag(d) dO (what O contributes to dh; independent of the walk)."""
  return dot(q, (scale * decay_in)[..., :, None] * do.astype(jnp.float32), trans_a=True,
             mm_dtype=mm_dtype)


def state_grad(dh_next, decay_last, dh_local, W, dv_new, mm_dtype=None):
  """dh = λ dh' + dh^local − Wᵀ dṼ. (Wᵀ dṼ = Kbᵀ dVb: a caller without W passes (Kb, dVb).)"""
  return (trailing(decay_last, 2) * dh_next + dh_local
          - dot(W, dv_new, trans_a=True, mm_dtype=mm_dtype))


# --- the V-contractions, per block of value columns ----------------------------------------------

class KeySums(NamedTuple):
  """The V-contractions of `key_grads` (sums over V-blocks)."""
  dQd: jax.Array   # scale dO hᵀ   [..., C, BK]
  dKw: jax.Array   # Ṽ dh'ᵀ        [..., C, BK]
  dP: jax.Array    # scale dO Ṽᵀ   [..., C, C]
  dlam: jax.Array  # Σ h ⊙ dh'     [...]


def key_sums(h, v_new, do, dh_next, scale: float, mm_dtype=None) -> KeySums:
  """One V-block's `KeySums` (h, dh': the state rows of the K-columns at hand)."""
  hd = h.astype(jnp.float32) * dh_next.astype(jnp.float32)
  return KeySums(scale * dot(do, h, trans_b=True, mm_dtype=mm_dtype),
                 dot(v_new, dh_next, trans_b=True, mm_dtype=mm_dtype),
                 scale * dot(do, v_new, trans_b=True, mm_dtype=mm_dtype),
                 jnp.sum(jnp.sum(hd, axis=-1), axis=-1))


def wy_sums(A, v, v_new, dv_new, mm_dtype=None):
  """One V-block's (dVb = Aᵀ dṼ, −dVb Ṽᵀ, Σ dVb ⊙ v): dv = β dVb; the second sums to dL before the
  strict mask (`wy_grads`), the third to dβ's Vb term."""
  dVb = dot(A, dv_new, trans_a=True, mm_dtype=mm_dtype)
  return (dVb, -dot(dVb, v_new, trans_b=True, mm_dtype=mm_dtype),
          jnp.sum(dVb * v.astype(jnp.float32), axis=-1))


# --- the gradients from the sums ----------------------------------------------------------------

def key_grads(q, k, beta, dec: Decays, sums: KeySums, dKb, C: int, mm_dtype=None):
  r"""dq, dk₁, and the dg, dβ terms through P, d, w, λ, for the K-columns of q, k (C×BK; BK = K
  allowed), from the V-contractions `sums` and dKb = −Aᵀ dṼ hᵀ (the caller picks the association:
  −Aᵀ (dṼ hᵀ) per K-block in a kernel, −dVb hᵀ where dVb is at hand):

      dq  = d ⊙ dQd + (dP ⊙ Γ) K                                         (final)
      dk₁ = w ⊙ dK̃ + βd ⊙ dKb + (dP ⊙ Γ)ᵀ Q

  The P part of dγ, Σ_{j<i} (Γ ⊙ dP ⊙ QKᵀ)_ij − Σ_{j>i} (Γ ⊙ dP ⊙ QKᵀ)_ji, needs no Q Kᵀ:
  Σ_{j<i} (dP ⊙ Γ)_ij (QKᵀ)_ij = Σ_k q_ik (strict(dP ⊙ Γ) K)_ik is a row sum of Q ⊙ dq_P over the
  columns. The diagonal (Γ_ii = 1, a constant) is added to dq, dk apart, as dP_ii k_i and dP_ii q_i:
  kept in both row sums it would cancel only after rounding, leaving an O(eps · dP_ii q_i·k_i) error
  that swamps dg under strong decay (g ≈ −20: dg ~1e-9). Every term of dg, dβ here contracts over
  K, so per K-block they are partial sums (the caller adds them up).
  Returns (dq, dk₁ [..., C, BK], dg₁, dβ₁ [..., C]), float32.
  """
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  d, w = dec.decay_in, dec.k_write
  rows, cols = iota2(C)
  idx = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
  dQK = jnp.where(cols < rows, sums.dP * dec.Gamma, 0.0)
  dP_diag = jnp.sum(jnp.where(rows == cols, sums.dP, 0.0), axis=-1)[..., :, None]
  dq_P = dot(dQK, k, mm_dtype=mm_dtype)
  dk_P = dot(dQK, q, trans_a=True, mm_dtype=mm_dtype)
  kb_dot = jnp.sum(dKb * kf, axis=-1)
  kw_dot = jnp.where(idx < C - 1, jnp.sum(sums.dKw * kf, axis=-1), 0.0)   # w_C = 1 is a constant
  dd = beta * kb_dot + jnp.sum(sums.dQd * qf, axis=-1)
  dgamma = jnp.sum(qf * dq_P, axis=-1) - jnp.sum(kf * dk_P, axis=-1) + d * dd - w * kw_dot
  dg = reverse_cumsum(dgamma, C) + trailing(jnp.sum(w * kw_dot, axis=-1)
                                            + dec.decay_last * sums.dlam)
  dq = d[..., :, None] * sums.dQd + dq_P + dP_diag * kf
  dk = w[..., :, None] * sums.dKw + (beta * d)[..., :, None] * dKb + dk_P + dP_diag * qf
  return dq, dk, dg, d * kb_dot


def wy_grads(KK, beta, Gamma, dL, dbeta_v, C: int):
  r"""The UT transform's part, from KK = K Kᵀ and the sums of `wy_sums` (dL before the mask):

      dL = strict(dL)    dKK = β Γ ⊙ dL    dk₂ = (dKK + dKKᵀ) K    (the caller forms it)
      dβ₂ = Σ_j (K Kᵀ ⊙ Γ ⊙ dL)_ij + Σ dVb ⊙ v
      dγ₂ = Σ_j (dKK ⊙ K Kᵀ)_ij − Σ_j (dKK ⊙ K Kᵀ)_ji,   dg₂ = reverse_cumsum(dγ₂)

  Returns (dKK + dKKᵀ [..., C, C], dg₂, dβ₂ [..., C]), float32.
  """
  rows, cols = iota2(C)
  dLG = jnp.where(cols < rows, dL, 0.0) * Gamma
  dKK = beta[..., :, None] * dLG
  GdG = dKK * KK
  dg = reverse_cumsum(jnp.sum(GdG, axis=-1) - jnp.sum(GdG, axis=-2), C)
  return dKK + jnp.swapaxes(dKK, -1, -2), dg, jnp.sum(KK * dLG, axis=-1) + dbeta_v


def chunk_grads(q, k, v, beta, dec: Decays, KK, A, h, v_new, do, dh_next, dv_new, *, scale: float,
                C: int, mm_dtype=None):
  """All of a chunk's gradients with V in one block (the XLA path): `key_sums` and `wy_sums` once,
  dKb = −dVb hᵀ, then `key_grads` + `wy_grads`. Returns ((dq, dk, dv, dg, dβ), dVb); with dVb the
  caller can form Wᵀ dṼ = Kbᵀ dVb without W."""
  sums = key_sums(h, v_new, do, dh_next, scale, mm_dtype)
  dVb, dL, dbeta_v = wy_sums(A, v, v_new, dv_new, mm_dtype)
  dKb = -dot(dVb, h, trans_b=True, mm_dtype=mm_dtype)
  dq, dk1, dg1, dbeta1 = key_grads(q, k, beta, dec, sums, dKb, C, mm_dtype)
  dKK_sym, dg2, dbeta2 = wy_grads(KK, beta, dec.Gamma, dL, dbeta_v, C)
  dk = dk1 + dot(dKK_sym, k, mm_dtype=mm_dtype)
  return (dq, dk, beta[..., :, None] * dVb, dg1 + dg2, dbeta1 + dbeta2), dVb


# --- the kernels' forms: V in blocks -------------------------------------------------------------

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


def _add(a, b):
  return type(a)(*(x + y for x, y in zip(a, b)))


def chunk_key_grads(q_cols, k_cols, g, beta, reset, A, blocks, C: int, scale: float,
                    mm_dtype=None):
  """`key_grads` of one chunk and one block of K columns (`q_cols`, `k_cols`: C×BK), with `blocks`
  (see `fold_blocks`) giving per V-block (h, Ṽ, dO, dh', dṼ), h and dh' holding the state rows of
  these columns. dKb = −Aᵀ X with X = Σ dṼ hᵀ (C×V×BK, then C×C×BK: no C×V dVb per K-block)."""
  BK = q_cols.shape[-1]

  def step(carry, block):
    sums, X = carry
    h, v_new, do, dh, dv_new = block
    return (_add(sums, key_sums(h, v_new, do, dh, scale, mm_dtype)),
            X + dot(dv_new, h, trans_b=True, mm_dtype=mm_dtype))

  zeros_cols = jnp.zeros((C, BK), jnp.float32)
  init = KeySums(zeros_cols, zeros_cols, jnp.zeros((C, C), jnp.float32), jnp.zeros((), jnp.float32))
  sums, X = fold_blocks(blocks, step, (init, zeros_cols))
  dKb = -dot(A, X, trans_a=True, mm_dtype=mm_dtype)
  return key_grads(q_cols, k_cols, beta, chunk_decays(g, reset, C), sums, dKb, C, mm_dtype)


def chunk_wy_grads(k, g, beta, reset, A, blocks, C: int, mm_dtype=None):
  """`wy_grads` of one chunk (all of K), with `blocks` (see `fold_blocks`) giving per V-block
  ((v, Ṽ, dṼ), a `write_dv` callback that stores dv = β dVb of the block).
  Returns (dKK + dKKᵀ [C×C], dg₂, dβ₂ [C]), float32."""

  def step(carry, block):
    dL, dbeta_v = carry
    (v, v_new, dv_new), write_dv = block
    dVb, dL_block, dbeta_block = wy_sums(A, v, v_new, dv_new, mm_dtype)
    write_dv(beta[:, None] * dVb)
    return dL + dL_block, dbeta_v + dbeta_block

  dL, dbeta_v = fold_blocks(blocks, step, (jnp.zeros((C, C), jnp.float32),
                                           jnp.zeros((C,), jnp.float32)))
  Gamma = chunk_decays(g, reset, C).Gamma
  return wy_grads(dot(k, k, trans_b=True), beta, Gamma, dL, dbeta_v, C)
