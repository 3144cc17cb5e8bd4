r"""Chunkwise-parallel gated delta rule: the WY / UT-transform algorithm in pure JAX.

Split time into chunks of C tokens. Inside chunk r, with the state h = S before the chunk,
γ_i = Σ_{j≤i} g_j (within-chunk cumulative log decay) and the delta rule written as

    S_i = e^{g_i} S_{i−1} + k_i ṽ_iᵀ,     ṽ_i = β_i (v_i − e^{g_i} S_{i−1}ᵀ k_i),

unrolling S_{i−1} = e^{γ_{i−1}} h + Σ_{j<i} e^{γ_{i−1}−γ_j} k_j ṽ_jᵀ gives a unit lower-triangular
system for the pseudo-values Ṽ (C×V):

    (I + L) Ṽ = diag(β) V − diag(β e^γ) K h,      L_ij = β_i e^{γ_i−γ_j} k_i·k_j   (j < i)
    ⇒  Ṽ = U − W h,   U = A diag(β) V,   W = A diag(β e^γ) K,   A = (I + L)⁻¹.

Then the chunk output and the next state are dense matmuls:

    O = scale · [diag(e^γ) Q h + ((Q Kᵀ) ⊙ Γ) Ṽ],          Γ_ij = e^{γ_i−γ_j} [j ≤ i]
    h' = e^{γ_C} h + (diag(e^{γ_C−γ}) K)ᵀ Ṽ.

Only the walk over chunks (Ṽ and h') is sequential; everything else is parallel over chunks.
Every exponent is a *relative* decay γ_i − γ_j ≤ 0 or γ_i ≤ 0 (never e^{+γ}), so a strong decay
(g ≈ −20 per token) underflows to 0 instead of overflowing.

Packed documents: s_i = number of segment starts in the chunk up to token i. Terms that cross a
segment start are dropped: Γ_ij and L_ij get the factor [s_i = s_j], the carry-in h is seen only
by tokens with s_i = 0, and only tokens with s_j = s_C write into h'.

Backward: a hand-written `jax.custom_vjp` (`_chunked_tiles_bwd`, math in its docstring). The
forward keeps only the inputs and the state h before each chunk, O(T/C · K · V) per head (no
per-token state, no Ṽ, no A); the backward recomputes each chunk's operators, walks dh' in reverse
over chunks, and forms every gradient with dense matmuls. It is exact (same math as AD of the
forward, to fp32 rounding) and needs less memory and time than AD of the forward, whose
intermediates ([N, Z, C, C] per op) it would otherwise keep. Forward-mode AD (`jax.jvp`) is not
defined for it: use `impl="recurrent"` for that.

Two schedules of the same math (`fused`):
  * parallel (accelerators): all chunk operators at once as [N, Z, C, ·] batched matmuls, then a
    `lax.scan` over the state walk only. Big matmuls; the intermediates are [N, Z, C, C] arrays.
  * fused (the default on CPU from 8 chunks on): one `lax.scan` over chunks does all of a chunk's
    work, so its working set ([Z, C, ·] tiles) stays in cache. Fwd+bwd on 2 CPU cores, K = V = 64,
    C = 64, interleaved timings (one run): B2 T2048 H4 fused 72 ms, parallel 98 ms; B4 T512 H4
    (8 chunks) 29 vs 43 ms; B16 T128 H2 (2 chunks) 13 vs 11 ms. On CPU the inverse solves its
    8×8 diagonal blocks by substitution before doubling (`unit_lower_inverse`): ~10% off fwd+bwd;
    dKb = −dVb hᵀ and dL = −strict(dVb Ṽᵀ) in `chunk_grads` (10 matmuls instead of 12): 5–10%
    in interleaved A/B runs (per-round median ratios 0.95 and 0.91). The fused schedule never
    forms W and U: Ṽ = A (Vb − Kb h) and, in the backward, Wᵀ dṼ = Kbᵀ dVb (one matmul fewer in
    each direction; A/B ratio 0.91).
    Tried and not kept (slower in interleaved A/B runs on 2 cores): keeping A from the forward;
    merging matmuls that share an operand; a LAPACK-style triangular solve for A; splitting the
    fused scan over two head groups; C = 128 (fwd+bwd 1.5× C = 64's).

`chunk_ops` (the UT transform) and `chunk_grads` (a chunk's gradients) work on tiles with any
leading dims. The Pallas kernels have their own per-tile forms of the same identities
(`kernels_pallas/chunk_math.py`): exact in real arithmetic, rounded differently, and this module
imports nothing from them (the kernels are an optional leaf package).

Layout: every tile is [N, Z, C, ·] with Z = batch × value heads, so each matmul is a plain
batched 2-D product (q/k heads are repeated for grouped value heads).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def unit_lower_inverse(L, diag_block: int | None = None):
  """(I + L)⁻¹ for strictly lower-triangular L [..., C, C] (C a power of two), exact.

  1. The diagonal blocks of size b₀ = `diag_block` are inverted by forward substitution, all
     blocks at once, one row per step: A_i = e_i − Σ_{j<i} L_ij A_j (b₀ steps of batched
     vector–matrix products).
  2. Block doubling merges them pairwise into blocks of size 2b, 4b, … C with

         [[I + L₁₁, 0], [L₂₁, I + L₂₂]]⁻¹ = [[A₁₁, 0], [−A₂₂ L₂₁ A₁₁, A₂₂]]

     (log2(C/b₀) levels of batched matmuls, ~C³/6 flops in all).

  Unlike a LAPACK triangular solve this vectorises under `jax.vmap` and runs on the matrix units
  of a GPU/TPU, and it is the exact inverse (no Neumann series, whose powers of L can overflow).
  `diag_block` None picks by backend: 8 on CPU, where the first doubling levels are many tiny
  batched matmuls (measured on 2 cores, 256 inverses of 64×64: 1.8 ms with b₀ = 8 against 6.2 ms
  with b₀ = 1, and 4.6 against 9.4 ms inside the fused chunk scan); 1 elsewhere (pure doubling:
  a few large batched matmuls instead of b₀ sequential steps).
  """
  *batch, C, _ = L.shape
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


def _decays(g, seg):
  """Decays and masks on [..., C] tiles (`seg`: within-chunk document index s_i, or None).

  Returns (gamma, strict, decay_in, k_write, decay_last): γ_i = Σ_{j≤i} g_j;
  strict = [j < i][s_i = s_j];  d_i = e^{γ_i} [s_i = 0];  w_j = e^{γ_C−γ_j} [s_j = s_C] with
  w_C = 1 exactly;  λ = e^{γ_C} [s_C = 0]. Every exponent is ≤ 0 (masked before exp).
  """
  C = g.shape[-1]
  gamma = jnp.cumsum(g, axis=-1)
  strict = jnp.tril(~jnp.eye(C, dtype=bool))                             # j < i
  if seg is not None:
    strict = strict & (seg[..., :, None] == seg[..., None, :])           # ... same document
  decay_in = jnp.exp(gamma)
  if seg is not None:
    decay_in = jnp.where(seg == 0, decay_in, 0.0)
  writes = jnp.arange(C) < C - 1
  if seg is not None:
    writes = writes & (seg == seg[..., -1:])
  k_write = jnp.where(writes, jnp.exp(jnp.where(writes, gamma[..., -1:] - gamma, -jnp.inf)), 0.0)
  k_write = jnp.where(jnp.arange(C) == C - 1, 1.0, k_write)
  return gamma, strict, decay_in, k_write, decay_in[..., -1]


def _gamma_matrix(gamma, strict):
  """Γ_ij = e^{γ_i−γ_j} [j ≤ i] [s_i = s_j], masked *before* exp (no positive exponent is ever
  evaluated). Γ_ii = 1 is a constant: as e^{γ_i−γ_i} its O(1) gradients would cancel only after
  the reverse cumsum that forms dg, leaving fp32 rounding that swamps the true dg under strong
  decay (the same holds for w_C = 1)."""
  C = gamma.shape[-1]
  return jnp.where(jnp.eye(C, dtype=bool), 1.0,
                   jnp.exp(jnp.where(strict, gamma[..., :, None] - gamma[..., None, :], -jnp.inf)))


_FUSED_MIN_CHUNKS = 8


def mm(spec, a, b):
  """einsum over any leading (batch) dims with float32 accumulation."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class ChunkOps(NamedTuple):
  """What a chunk's walk step and backward need, all independent of the carry-in state h."""
  Gamma: jax.Array       # Γ [..., C, C]
  strict: jax.Array      # [j < i][s_i = s_j]
  decay_in: jax.Array    # d [..., C]
  k_write: jax.Array     # w [..., C]
  decay_last: jax.Array  # λ [...]
  QK: jax.Array          # Q Kᵀ
  KK: jax.Array          # K Kᵀ
  A: jax.Array           # (I + L)⁻¹
  W: jax.Array           # A diag(β d) K
  U: jax.Array           # A diag(β) V


def chunk_ops(q, k, v, g, beta, seg) -> ChunkOps:
  """The UT transform: A = (I + L)⁻¹, L = strict(diag(β)(K Kᵀ) ⊙ Γ); W = A diag(β d) K; U = A diag(β) V.

  Tiles [..., C, ·] with any leading dims, float32."""
  gamma, strict, decay_in, k_write, decay_last = _decays(g, seg)
  QK = mm('...ik,...jk->...ij', q, k)
  KK = mm('...ik,...jk->...ij', k, k)
  Gamma = _gamma_matrix(gamma, strict)
  A = unit_lower_inverse(jnp.where(strict, beta[..., :, None] * KK * Gamma, 0.0))
  W = mm('...ij,...jk->...ik', A, (beta * decay_in)[..., None] * k)
  U = mm('...ij,...jv->...iv', A, beta[..., None] * v)
  return ChunkOps(Gamma, strict, decay_in, k_write, decay_last, QK, KK, A, W, U)


def _pseudo_values(ops: ChunkOps, k, h, direct=None):
  """Ṽ = U − W h, or with `direct` = (v, β) the same Ṽ as A (diag(β) V − diag(β d) K h): one
  matmul fewer where W and U are not needed otherwise (the fused schedule; XLA then drops them)."""
  if direct is None:
    return ops.U - mm('...ck,...kv->...cv', ops.W, h)
  v, beta = direct
  Kb_h = mm('...ck,...kv->...cv', (beta * ops.decay_in)[..., None] * k, h)
  return mm('...ij,...jv->...iv', ops.A, beta[..., None] * v - Kb_h)


def _state_step(ops: ChunkOps, q, k, h, scale, direct=None):
  """Ṽ (`_pseudo_values`);  O = scale (diag(d) Q h + (QKᵀ ⊙ Γ) Ṽ);  h' = λ h + (diag(w) K)ᵀ Ṽ."""
  v_new = _pseudo_values(ops, k, h, direct)
  o = scale * (ops.decay_in[..., None] * mm('...ck,...kv->...cv', q, h)
               + mm('...ij,...jv->...iv', ops.QK * ops.Gamma, v_new))
  h_next = (ops.decay_last[..., None, None] * h
            + mm('...ck,...cv->...kv', ops.k_write[..., None] * k, v_new))
  return o, h_next


def chunk_grads(ops: ChunkOps, q, k, v, beta, h, do, dh_next, dv_new, scale, direct=False):
  r"""Gradients of a chunk's (q, k, v, g, β) given h, dO, dh' and dṼ (Kb = diag(β d) K, Vb = diag(β) V):

      dP = scale dO Ṽᵀ   d(DQ) = scale dO hᵀ   dK̃ = Ṽ dh'ᵀ   dλ = Σ h ⊙ dh'
      dVb = Aᵀ dṼ,  dKb = Aᵀ dW = −dVb hᵀ   (dW = −dṼ hᵀ),
      dL = −strict(Aᵀ dA Aᵀ) = −strict(dVb Ṽᵀ)
      (dA = dṼ Vbᵀ + dW Kbᵀ = dṼ (Vb − Kb h)ᵀ is never formed: as Ṽ = A (Vb − Kb h),
      Aᵀ dA Aᵀ = (Aᵀ dṼ)(A (Vb − Kb h))ᵀ = dVb Ṽᵀ, one C×V×C product)
      L = strict(β_i (KKᵀ)_ij Γ_ij), P = (QKᵀ) ⊙ Γ  →  dq, dk, dv, dβ, dΓ, dd, dw
      dγ_i = Σ_j (Γ⊙dΓ)_ij − Σ_j (Γ⊙dΓ)_ji + d_i dd_i − w_i dw_i;  dγ_C = Σ_j w_j dw_j + λ dλ
      dg = reverse_cumsum(dγ) + dγ_C          (γ = cumsum g; Γ_ii = w_C = 1 are constants)

  `direct`: form Ṽ as A (Vb − Kb h) instead of U − W h (`_pseudo_values`; the fused schedule,
  which never forms W and U). Returns ((dq, dk, dv, dg, dβ), dVb); with dVb the caller can form
  Wᵀ dṼ = Kbᵀ dVb without W.
  """
  A, Gamma, d, w = ops.A, ops.Gamma, ops.decay_in, ops.k_write
  v_new = _pseudo_values(ops, k, h, (v, beta) if direct else None)
  dP = scale * mm('...iv,...jv->...ij', do, v_new)
  dQd = scale * mm('...cv,...kv->...ck', do, h)
  dKw = mm('...cv,...kv->...ck', v_new, dh_next)
  dlam = jnp.sum(h * dh_next, axis=(-2, -1))
  dVb = mm('...ji,...jv->...iv', A, dv_new)
  dKb = -mm('...cv,...kv->...ck', dVb, h)           # Aᵀ dW with dW = −dṼ hᵀ
  # dL = −strict(Aᵀ dA Aᵀ), dA = dṼ (Vb − Kb h)ᵀ; as Ṽ = A (Vb − Kb h) this is −strict(dVb Ṽᵀ).
  dL = jnp.where(ops.strict, -mm('...iv,...jv->...ij', dVb, v_new), 0.0)
  dKK = beta[..., :, None] * Gamma * dL
  dQK = dP * Gamma
  dq = mm('...ij,...jk->...ik', dQK, k) + d[..., None] * dQd
  dKK_sym = dKK + dKK.swapaxes(-1, -2)                                    # KKᵀ is symmetric
  dk = (mm('...ij,...ik->...jk', dQK, q) + mm('...ij,...jk->...ik', dKK_sym, k)
        + w[..., None] * dKw + (beta * d)[..., None] * dKb)
  dv = beta[..., None] * dVb
  kb_dot = jnp.sum(dKb * k, axis=-1)
  dbeta = jnp.sum(ops.KK * Gamma * dL, axis=-1) + jnp.sum(dVb * v, axis=-1) + d * kb_dot
  dd = beta * kb_dot + jnp.sum(dQd * q, axis=-1)
  C = d.shape[-1]
  dw = jnp.where(jnp.arange(C) < C - 1, jnp.sum(dKw * k, axis=-1), 0.0)
  GdG = jnp.where(ops.strict, Gamma * (beta[..., :, None] * ops.KK * dL + dP * ops.QK), 0.0)
  dgamma = jnp.sum(GdG, axis=-1) - jnp.sum(GdG, axis=-2) + d * dd - w * dw
  dgamma_last = jnp.sum(w * dw, axis=-1) + ops.decay_last * dlam
  dg = jnp.flip(jnp.cumsum(jnp.flip(dgamma, -1), -1), -1) + dgamma_last[..., None]
  return (dq, dk, dv, dg, dbeta), dVb


def _forward(xs, seg, h0, scale, fused):
  """Returns (O [N,Z,C,V], final state, the state before each chunk [N,Z,K,V])."""
  q, k = xs[0], xs[1]
  if fused:
    def body(h, chunk):
      x, s = chunk
      o, h_next = _state_step(chunk_ops(*x, s), x[0], x[1], h, scale, direct=(x[2], x[4]))
      return h_next, (o, h)
    h_final, (o, h_chunks) = jax.lax.scan(body, h0, (xs, seg))
    return o, h_final, h_chunks
  ops = chunk_ops(*xs, seg)

  # Only the state recursion is sequential; O is formed from the kept states after it.
  def walk(h, chunk):
    W_r, U_r, Kw_r, decay_last_r = chunk
    v_new = U_r - mm('zck,zkv->zcv', W_r, h)
    return decay_last_r[:, None, None] * h + mm('zck,zcv->zkv', Kw_r, v_new), h
  h_final, h_chunks = jax.lax.scan(walk, h0, (ops.W, ops.U, ops.k_write[..., None] * k,
                                              ops.decay_last))
  o, _ = _state_step(ops, q, k, h_chunks, scale)
  return o, h_final, h_chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_tiles(xs, seg, h0, scale, fused):
  o, h_final, _ = _forward(xs, seg, h0, scale, fused)
  return o, h_final


def _chunked_tiles_fwd(xs, seg, h0, scale, fused):
  o, h_final, h_chunks = _forward(xs, seg, h0, scale, fused)
  return (o, h_final), (xs, seg, h_chunks)


def _chunked_tiles_bwd(scale, fused, residuals, cotangents):
  """Reverse walk over chunks for dh, then `chunk_grads`. Only h per chunk was kept by the
  forward (O(T/C · K · V) per head); every chunk operator is recomputed here."""
  xs, seg, h_chunks = residuals
  do, dh_final = cotangents
  if fused:    # per chunk: recompute its operators, step dh back, form its gradients
    def body(dh_next, chunk):
      x, s, h, do_r = chunk
      q, k, v, _, beta = x
      ops = chunk_ops(*x, s)
      # dṼ = scale Pᵀ dO + K̃ dh';  dh = λ dh' + scale Q̃ᵀ dO − Wᵀ dṼ, with Wᵀ dṼ = Kbᵀ (Aᵀ dṼ) =
      # Kbᵀ dVb from the gradients: W and U are never formed here (one matmul fewer).
      dv_new = (scale * mm('...ij,...iv->...jv', ops.QK * ops.Gamma, do_r)
                + ops.k_write[..., None] * mm('...ck,...kv->...cv', k, dh_next))
      grads, dVb = chunk_grads(ops, q, k, v, beta, h, do_r, dh_next, dv_new, scale, direct=True)
      dh = (ops.decay_last[..., None, None] * dh_next
            + scale * mm('...ck,...cv->...kv', ops.decay_in[..., None] * q, do_r)
            - mm('...ck,...cv->...kv', (beta * ops.decay_in)[..., None] * k, dVb))
      return dh, grads
    dh0, grads = jax.lax.scan(body, dh_final, (xs, seg, h_chunks, do), reverse=True)
  else:        # all chunk operators at once; only the dh walk is sequential
    ops = chunk_ops(*xs, seg)
    q, k = xs[0], xs[1]
    dv_local = scale * mm('nzij,nziv->nzjv', ops.QK * ops.Gamma, do)
    dh_local = scale * mm('nzck,nzcv->nzkv', ops.decay_in[..., None] * q, do)
    Kw = ops.k_write[..., None] * k

    def walk_back(dh_next, chunk):
      dv_local_r, dh_local_r, Kw_r, W_r, lam_r = chunk
      dv_new = dv_local_r + mm('zck,zkv->zcv', Kw_r, dh_next)
      dh = lam_r[:, None, None] * dh_next + dh_local_r - mm('zck,zcv->zkv', W_r, dv_new)
      return dh, (dh_next, dv_new)
    dh0, (dh_next, dv_new) = jax.lax.scan(walk_back, dh_final,
                                          (dv_local, dh_local, Kw, ops.W, ops.decay_last),
                                          reverse=True)
    grads, _ = chunk_grads(ops, q, k, xs[2], xs[4], h_chunks, do, dh_next, dv_new, scale)
  dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
  return grads, dseg, dh0


_chunked_tiles.defvjp(_chunked_tiles_fwd, _chunked_tiles_bwd)


def chunked_gated_delta_rule(q, k, v, g, beta, scale, h0, reset, chunk_size, fused=None):
  """Chunked gated delta rule on validated inputs (see `gated_delta_rule`).

  q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H] float32; h0: [B, H, K, V] float32;
  reset: [B, T] bool, or None when there are no packed documents. `fused`: the schedule (see the
  module docstring); None picks fused on CPU when there are ≥ 8 chunks, else parallel.
  Returns (o [B, T, H, V] float32, final state [B, H, K, V] float32).
  """
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  C = chunk_size
  N = -(-T // C)
  pad = N * C - T
  if H != Hk:  # grouped value heads: value head h reads q/k head h // (H / Hk)
    q, k = (jnp.repeat(x, H // Hk, axis=2) for x in (q, k))

  def tiles(x):
    """[B, T, H, ...] → [N, B·H, C, ...]; padding tokens (g = β = k = v = 0) leave S unchanged."""
    x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x.reshape(B, N, C, H, *x.shape[3:]), (1, 3), (0, 2))  # [N,B,H,C,...]
    return x.reshape(N, B * H, C, *x.shape[4:])

  q_t, k_t, v_t, g_t, beta_t = map(tiles, (q, k, v, g, beta))
  seg = None
  if reset is not None:
    seg_BxNxC = jnp.cumsum(jnp.pad(reset, [(0, 0), (0, pad)]).reshape(B, N, C).astype(jnp.int32),
                           axis=-1)                                       # s_i
    seg = jnp.broadcast_to(jnp.moveaxis(seg_BxNxC, 1, 0)[:, :, None], (N, B, H, C))
    seg = seg.reshape(N, B * H, C)

  if fused is None:  # measured on 2 CPU cores: fused pays for long sequences, parallel for short
    fused = jax.default_backend() == "cpu" and N >= _FUSED_MIN_CHUNKS
  o, h_final = _chunked_tiles((q_t, k_t, v_t, g_t, beta_t), seg, h0.reshape(B * H, K, V),
                              float(scale), fused)
  o = jnp.moveaxis(o.reshape(N, B, H, C, V), (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
  return o, h_final.reshape(B, H, K, V)
