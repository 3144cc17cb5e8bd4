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
    8×8 diagonal blocks by substitution before doubling (`chunk_math.unit_lower_inverse`): ~10%
    off fwd+bwd; dKb = −dVb hᵀ and dL = −strict(dVb Ṽᵀ) in `chunk_grads.chunk_grads` (10 matmuls
    instead of 12): 5–10% in interleaved A/B runs (per-round median ratios 0.95 and 0.91). The
    fused schedule never
    forms W and U: Ṽ = A (Vb − Kb h) and, in the backward, Wᵀ dṼ = Kbᵀ dVb (one matmul fewer in
    each direction; A/B ratio 0.91).
    Tried and not kept (slower in interleaved A/B runs on 2 cores): keeping A from the forward;
    merging matmuls that share an operand; a LAPACK-style triangular solve for A; splitting the
    fused scan over two head groups; C = 128 (fwd+bwd 1.5× C = 64's).

The per-chunk identities (decays, the inverse, the UT transform, the state step and every gradient)
are written once, in `kernels_pallas/chunk_math.py` and `kernels_pallas/chunk_grads.py`, shared with
the Pallas kernels: this module calls them on [N, Z, C, ·] tiles (each `dot` one batched matmul over
all chunks and heads) and holds only the two schedules, the custom VJP and the layout. It imports
those two leaf modules, never the kernels (`kernels_pallas.gpu`, `.tpu`).

Layout: every tile is [N, Z, C, ·] with Z = batch × value heads, so each matmul is a plain
batched 2-D product (q/k heads are repeated for grouped value heads).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import chunk_grads as cg
from kernels_pallas import chunk_math as cm

_FUSED_MIN_CHUNKS = 8


class ChunkOps(NamedTuple):
  """What a chunk's walk step and backward need, all independent of the carry-in state h."""
  dec: cm.Decays   # Γ, d, w, λ
  P: jax.Array     # (Q Kᵀ) ⊙ Γ
  KK: jax.Array    # K Kᵀ
  A: jax.Array     # (I + L)⁻¹
  W: jax.Array     # A diag(β d) K
  U: jax.Array     # A diag(β) V


def chunk_ops(q, k, v, g, beta, reset) -> ChunkOps:
  """Decays, P and the UT transform of every chunk at once (tiles [..., C, ·], float32; `reset`
  [..., C] float or None). W and U cost nothing where unused: XLA drops them (fused schedule)."""
  C = g.shape[-1]
  dec = cm.chunk_decays(g, reset, C)
  KK = cm.dot(k, k, trans_b=True)
  A = cm.ut_inverse(KK, beta, dec.Gamma, C)
  return ChunkOps(dec, cm.decayed_scores(q, k, dec.Gamma), KK, A,
                  cm.ut_keys(A, k, beta, dec.decay_in), cm.ut_values(A, v, beta))


def _forward(xs, reset, h0, scale, fused):
  """Returns (O [N,Z,C,V], final state, the state before each chunk [N,Z,K,V])."""
  q, k, v, _, beta = xs
  if fused:   # one chunk per scan step; Ṽ = A (Vb − Kb h): W and U are never formed
    def body(h, chunk):
      x, r = chunk
      ops = chunk_ops(*x, r)
      d = ops.dec.decay_in
      v_new = cm.pseudo_values_direct(h, ops.A, x[1], x[2], x[4], d)
      o = cm.chunk_output(h, d[..., None] * x[0], ops.P, v_new, scale)
      return cm.next_state(h, x[1], ops.dec.k_write, ops.dec.decay_last, v_new), (o, h)
    h_final, (o, h_chunks) = jax.lax.scan(body, h0, (xs, reset))
    return o, h_final, h_chunks
  ops = chunk_ops(*xs, reset)

  # Only the state recursion is sequential; O is formed from the kept states after it.
  def walk(h, chunk):
    W_r, U_r, k_r, w_r, lam_r = chunk
    return cm.next_state(h, k_r, w_r, lam_r, cm.pseudo_values(h, W_r, U_r)), h
  h_final, h_chunks = jax.lax.scan(walk, h0, (ops.W, ops.U, k, ops.dec.k_write,
                                              ops.dec.decay_last))
  v_new = cm.pseudo_values(h_chunks, ops.W, ops.U)
  o = cm.chunk_output(h_chunks, ops.dec.decay_in[..., None] * q, ops.P, v_new, scale)
  return o, h_final, h_chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_tiles(xs, reset, h0, scale, fused):
  o, h_final, _ = _forward(xs, reset, h0, scale, fused)
  return o, h_final


def _chunked_tiles_fwd(xs, reset, h0, scale, fused):
  o, h_final, h_chunks = _forward(xs, reset, h0, scale, fused)
  return (o, h_final), (xs, reset, h_chunks)


def _chunked_tiles_bwd(scale, fused, residuals, cotangents):
  """Reverse walk over chunks for dh, then `chunk_grads.chunk_grads`. Only h per chunk was kept by
  the forward (O(T/C · K · V) per head); every chunk operator is recomputed here."""
  xs, reset, h_chunks = residuals
  do, dh_final = cotangents
  C = xs[3].shape[-1]
  if fused:    # per chunk: recompute its operators, step dh back, form its gradients
    def body(dh_next, chunk):
      x, r, h, do_r = chunk
      q, k, v, _, beta = x
      ops = chunk_ops(*x, r)
      d = ops.dec.decay_in
      dv_new = cg.pseudo_value_grad(cg.local_pseudo_value_grad(ops.P, do_r, scale), k,
                                    ops.dec.k_write, dh_next)
      v_new = cm.pseudo_values_direct(h, ops.A, k, v, beta, d)
      grads, dVb = cg.chunk_grads(q, k, v, beta, ops.dec, ops.KK, ops.A, h, v_new, do_r, dh_next,
                                  dv_new, scale=scale, C=C)
      # Wᵀ dṼ = Kbᵀ (Aᵀ dṼ) = Kbᵀ dVb from the gradients: W is never formed (one matmul fewer).
      dh = cg.state_grad(dh_next, ops.dec.decay_last, cg.local_state_grad(q, d, do_r, scale),
                         (beta * d)[..., None] * k, dVb)
      return dh, grads
    dh0, grads = jax.lax.scan(body, dh_final, (xs, reset, h_chunks, do), reverse=True)
  else:        # all chunk operators at once; only the dh walk is sequential
    q, k, v, _, beta = xs
    ops = chunk_ops(*xs, reset)
    dv_local = cg.local_pseudo_value_grad(ops.P, do, scale)
    dh_local = cg.local_state_grad(q, ops.dec.decay_in, do, scale)

    def walk_back(dh_next, chunk):
      dv_local_r, dh_local_r, k_r, w_r, W_r, lam_r = chunk
      dv_new = cg.pseudo_value_grad(dv_local_r, k_r, w_r, dh_next)
      return cg.state_grad(dh_next, lam_r, dh_local_r, W_r, dv_new), (dh_next, dv_new)
    dh0, (dh_next, dv_new) = jax.lax.scan(
        walk_back, dh_final, (dv_local, dh_local, k, ops.dec.k_write, ops.W, ops.dec.decay_last),
        reverse=True)
    v_new = cm.pseudo_values(h_chunks, ops.W, ops.U)
    grads, _ = cg.chunk_grads(q, k, v, beta, ops.dec, ops.KK, ops.A, h_chunks, v_new, do,
                              dh_next, dv_new, scale=scale, C=C)
  dreset = None if reset is None else jnp.zeros_like(reset)
  return grads, dreset, dh0


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
  reset_t = None
  if reset is not None:   # 1.0 where a document starts, shared by the heads: [N, B·H, C]
    reset_t = tiles(jnp.broadcast_to(reset[:, :, None], (B, T, H)))

  if fused is None:  # measured on 2 CPU cores: fused pays for long sequences, parallel for short
    fused = jax.default_backend() == "cpu" and N >= _FUSED_MIN_CHUNKS
  o, h_final = _chunked_tiles((q_t, k_t, v_t, g_t, beta_t), reset_t, h0.reshape(B * H, K, V),
                              float(scale), fused)
  o = jnp.moveaxis(o.reshape(N, B, H, C, V), (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
  return o, h_final.reshape(B, H, K, V)
