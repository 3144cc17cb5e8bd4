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

Only the walk over chunks (Ṽ and h') is sequential (`lax.scan`); everything else is parallel over
chunks. Every exponent is a *relative* decay γ_i − γ_j ≤ 0 or γ_i ≤ 0 (never e^{+γ}), so a strong
decay (g ≈ −20 per token) underflows to 0 instead of overflowing.

Packed documents: s_i = number of segment starts in the chunk up to token i. Terms that cross a
segment start are dropped: Γ_ij and L_ij get the factor [s_i = s_j], the carry-in h is seen only
by tokens with s_i = 0, and only tokens with s_j = s_C write into h'.

Memory for the backward: reverse-mode AD of the scan keeps one state h per chunk plus Ṽ, i.e.
O(T/C · K · V) + O(T · V) per head: no per-token state is ever stored. Plain AD of this graph
was chosen over a hand-written VJP (that is the Pallas kernel's job, `kernels_pallas`).

Layout: every tile is [N, Z, C, ·] with Z = batch × value heads, so each matmul is a plain
batched 2-D product (q/k heads are repeated for grouped value heads).
"""
import jax
import jax.numpy as jnp


def unit_lower_inverse(L):
  """(I + L)⁻¹ for strictly lower-triangular L [..., C, C] (C a power of two), by matmuls only.

  Block forward substitution, bottom-up: the inverses of the diagonal blocks of size b are
  merged pairwise into blocks of size 2b with

      [[I + L₁₁, 0], [L₂₁, I + L₂₂]]⁻¹ = [[A₁₁, 0], [−A₂₂ L₂₁ A₁₁, A₂₂]],

  starting from b = 1 (A = 1). ~C³/6 flops in log2(C) batched matmuls: unlike a LAPACK
  triangular solve this vectorises under `jax.vmap` and runs on the matrix units of a GPU/TPU,
  and it is the exact inverse (no Neumann series, whose powers of L can overflow).
  """
  *batch, C, _ = L.shape
  hi = jax.lax.Precision.HIGHEST
  A = jnp.ones((*batch, C, 1, 1), L.dtype)                  # inverses of the 1×1 diagonal blocks
  b = 1
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


def _intra_chunk(q, k, v, g, beta, seg):
  """Chunk-parallel part on [N, Z, C, ·] tiles: Γ, the UT transform (W, U), the state writes.

  `seg` is the within-chunk document index s_i [N, Z, C], or None when nothing is packed
  (then every mask below is static and skipped). Returns (QK ⊙ Γ, W, U, k_write, decay_in,
  decay_last) with k_write_j = e^{γ_C−γ_j} [s_j = s_C] k_j, decay_in_i = e^{γ_i} [s_i = 0],
  decay_last = e^{γ_C} [s_C = 0].
  """
  C = g.shape[-1]
  gamma = jnp.cumsum(g, axis=-1)                                          # γ_i   [N,Z,C]
  eye_CxC = jnp.eye(C, dtype=bool)
  same = jnp.tril(~eye_CxC)                                               # j < i
  if seg is not None:
    same = same & (seg[..., :, None] == seg[..., None, :])                # ... same document
  # Γ_ij = e^{γ_i − γ_j}, masked *before* exp so no positive exponent is ever evaluated.
  # The diagonal Γ_ii = 1 is a constant: as e^{γ_i − γ_i} its O(1) gradients would cancel only
  # after the reverse cumsum that forms dg, leaving fp32 rounding that swamps the true dg under
  # strong decay. (Same for the last token's state write below.)
  Gamma = jnp.where(eye_CxC, 1.0,
                    jnp.exp(jnp.where(same, gamma[..., :, None] - gamma[..., None, :], -jnp.inf)))
  QK = jnp.einsum('nzik,nzjk->nzij', q, k)
  KK = jnp.einsum('nzik,nzjk->nzij', k, k)
  L = jnp.where(same, beta[..., :, None] * KK * Gamma, 0.0)               # L_ij, j < i
  decay_in = jnp.exp(gamma)
  if seg is not None:
    decay_in = jnp.where(seg == 0, decay_in, 0.0)
  A = unit_lower_inverse(L)                                               # A = (I + L)⁻¹
  W = jnp.einsum('nzij,nzjk->nzik', A, (beta * decay_in)[..., None] * k)  # A diag(β e^γ) K
  U = jnp.einsum('nzij,nzjv->nziv', A, beta[..., None] * v)               # A diag(β) V
  writes = jnp.arange(C) < C - 1
  if seg is not None:
    writes = writes & (seg == seg[..., -1:])
  k_write_scale = jnp.where(writes, jnp.exp(jnp.where(writes, gamma[..., -1:] - gamma, -jnp.inf)),
                            0.0)
  k_write_scale = jnp.where(jnp.arange(C) == C - 1, 1.0, k_write_scale)  # e^{γ_C − γ_j} [s_j = s_C]
  k_write = k_write_scale[..., None] * k
  decay_last = decay_in[..., -1]                                          # e^{γ_C} [s_C = 0]
  return QK * Gamma, W, U, k_write, decay_in, decay_last


def chunked_gated_delta_rule(q, k, v, g, beta, scale, h0, reset, chunk_size):
  """Chunked gated delta rule on validated inputs (see `gated_delta_rule`).

  q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H] float32; h0: [B, H, K, V] float32;
  reset: [B, T] bool, or None when there are no packed documents. Returns (o [B, T, H, V] float32, final state [B, H, K, V] float32).
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

  QK_Gamma, W, U, k_write, decay_in, decay_last = _intra_chunk(q_t, k_t, v_t, g_t, beta_t, seg)

  def walk(h_ZxKxV, chunk):
    W_r, U_r, k_write_r, decay_last_r = chunk
    v_new = U_r - jnp.einsum('zck,zkv->zcv', W_r, h_ZxKxV)                # Ṽ = U − W h
    h_next = (decay_last_r[:, None, None] * h_ZxKxV
              + jnp.einsum('zck,zcv->zkv', k_write_r, v_new))             # h' = e^{γ_C} h + K̃ᵀ Ṽ
    return h_next, (h_ZxKxV, v_new)

  h_final, (h_chunks, v_new) = jax.lax.scan(walk, h0.reshape(B * H, K, V),
                                            (W, U, k_write, decay_last))
  # O = scale · [diag(e^γ) Q h + ((Q Kᵀ) ⊙ Γ) Ṽ]
  o = scale * (decay_in[..., None] * jnp.einsum('nzck,nzkv->nzcv', q_t, h_chunks)
               + jnp.einsum('nzij,nzjv->nziv', QK_Gamma, v_new))
  o = jnp.moveaxis(o.reshape(N, B, H, C, V), (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
  return o, h_final.reshape(B, H, K, V)
