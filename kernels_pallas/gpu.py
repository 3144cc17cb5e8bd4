r"""Chunked gated delta rule on NVIDIA GPUs: Pallas (Triton lowering) state walks + XLA chunk-parallel VJP.

Decomposition (symbols as in `chunk_math`):

  forward  one Pallas kernel per (batch, value head, V-block): walks the chunks in order and, per
           chunk, computes the chunk operators (Γ, A = (I+L)⁻¹, W, U, K̃, Qd, P) from the q/k/v/g/β
           tiles in registers/shared memory, then Ṽ = U − W h, O and h'. Only O, the final state and
           (when a gradient is needed) the carry-in state of every chunk h_r [N, K, V] leave the chip:
           O(T/C · K · V) per head, never a per-token state.
  backward (1) a Pallas kernel walks the chunks in reverse, recomputes each chunk's operators and
           propagates the state cotangent  dh_r = e^{γ_C} dh_{r+1} + scale Qdᵀ dO − Wᵀ dṼ,
           dṼ = scale Pᵀ dO + K̃ dh_{r+1}; it stores dh_{r+1} per chunk and returns dh_0 (the gradient
           of the initial state);
           (2) given h_r and dh_{r+1}, every chunk is independent: a second Pallas kernel, one program
           per (batch, value head, chunk), runs the hand-written `chunk_math.chunk_bwd` (the reverse of
           the per-chunk map (q, k, v, g, β, h_r) ↦ (O_r, h_{r+1})). For K or V > 128 (too large for
           one program's registers), or with PALLAS_CHUNK_BWD = False, XLA differentiates the same
           `chunk_math` functions under `jax.vmap` instead (faster at K=V=128, 3× the memory).

Backend choice: Pallas' Triton lowering (`pl.pallas_call` + `plt.CompilerParams`) compiles and runs with
jax 0.11.2 on the H100 and accepts 2-D `dot_general` with transposes, iota masks and `fori_loop`,
which is all these kernels need; the same kernels run on CPU with `interpret=True` and lower to Triton
IR on CPU for an abstract H100 (tests/pallas_gpu_test.py). Mosaic GPU (`plgpu` + wgmma) needs
M % 64 warpgroup tiles, explicit shared-memory pipelines, has no `dot_general` lowering, and its API
is marked unstable. Measured (NOTES_gpu.md) the gap to fla is algorithmic — these kernels recompute the
chunk operators (A = (I+L)⁻¹ above all) inside sequential loops — not the instruction choice, so the
deprecated-but-working Triton path was kept. Status on the H100 at B8 T2048 H16 K=V=128: forward
1.8 ms vs fla 0.95 ms; forward+backward 12.6 ms vs fla 2.5–3.8 ms; memory 807 MiB vs fla 932 MiB.
For training, impl="chunked" (pure XLA) is faster today.

Packed documents (`reset`) are handled inside the kernels through the masks of `chunk_math`.
T not a multiple of C is zero-padded (g = β = k = v = 0 leave the state unchanged).
Grouped value heads: the kernel for value head h reads q/k head h // (H / Hk) through its BlockSpec.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas import chunk_math as cm


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _mm_dtype(dtype):
  """Operand dtype of the state matmuls: bf16 inputs use bf16 operands (fp32 accumulate), as fla does."""
  return jnp.bfloat16 if dtype == jnp.bfloat16 else None


# Tuning knobs (read at trace time; experiments/bench_kernels.py --pallas_variants sweeps them).
BLOCK_V = 64      # V columns per program: more programs in flight vs. recomputing W per block
NUM_WARPS = 4
BWD_NUM_WARPS = 8
BWD_BLOCK_V = 128  # V columns per program of the chunk-parallel backward (64: 1.4x, 32: 1.7x slower on H100)
PALLAS_CHUNK_BWD = True   # False: chunk-parallel gradients by XLA autodiff of `chunk_math` (vmapped)


def _block_v(V: int) -> int:
  return min(V, BLOCK_V)


def _compiler_params(num_warps: int, num_stages: int = 1):
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, h0_ref, o_ref, ht_ref, *hs_refs,
                C, N, scale, mm_dtype):
  store_states = bool(hs_refs)

  def body(r, h_KxV):
    sl = pl.ds(pl.multiple_of(r * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    g, beta, reset = g_ref[sl], beta_ref[sl], reset_ref[sl]
    if store_states:
      hs_refs[0][r] = h_KxV
    P, W, U, Qd, Kw, decay_last = cm.chunk_operators(q, k, v, g, beta, reset, C, mm_dtype)
    o, h_next, _ = cm.chunk_step(h_KxV, P, W, U, Qd, Kw, decay_last, scale, mm_dtype)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return h_next

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...].astype(jnp.float32))


def _walk_specs(q, v, C):
  """Grid (B, H, V/BV) and BlockSpecs shared by the forward and the reverse chunk walk.

  Each program owns one (batch, value head, V block) and sees the whole padded sequence;
  q/k come from q/k head h // G (grouped value heads). Returns (grid, qk, v, g/β, reset,
  state [K, BV], per-chunk states [N, K, BV]) specs.
  """
  B, Tp, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  G, N, BV = H // Hk, Tp // C, _block_v(V)
  return ((B, H, V // BV),
          pl.BlockSpec((None, Tp, None, K), lambda b, h, j: (b, 0, h // G, 0)),
          pl.BlockSpec((None, Tp, None, BV), lambda b, h, j: (b, 0, h, j)),
          pl.BlockSpec((None, Tp, None), lambda b, h, j: (b, 0, h)),
          pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)),
          pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)))


def _forward(q, k, v, g, beta, reset_f, h0, *, scale, C, store_states):
  """q,k [B,Tp,Hk,K]; v [B,Tp,H,V]; g,beta [B,Tp,H] f32; reset_f [B,Tp] f32; Tp = N·C."""
  B, Tp, _, K = q.shape
  H, V = v.shape[2], v.shape[3]
  N = Tp // C
  grid, qk_spec, v_spec, gb_spec, r_spec, st_spec, hs_spec = _walk_specs(q, v, C)
  out_specs = [v_spec, st_spec]
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), v.dtype),
               jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
  if store_states:
    out_specs.append(hs_spec)
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
  kernel = functools.partial(_fwd_kernel, C=C, N=N, scale=scale, mm_dtype=_mm_dtype(q.dtype))
  return pl.pallas_call(
      kernel, grid=grid,
      in_specs=[qk_spec, qk_spec, v_spec, gb_spec, gb_spec, r_spec, st_spec],
      out_specs=out_specs, out_shape=out_shape, interpret=_interpret(),
      compiler_params=_compiler_params(NUM_WARPS), name="gdn_fwd",
  )(q, k, v, g, beta, reset_f, h0)


# ---------------------------------------------------------------------------------------- backward


def _bwd_walk_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, do_ref, dht_ref,
                     dh0_ref, dhs_ref, *, C, N, scale, mm_dtype):
  def body(i, dh_KxV):
    r = N - 1 - i
    sl = pl.ds(pl.multiple_of(r * C, C), C)
    q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
    g, beta, reset = g_ref[sl], beta_ref[sl], reset_ref[sl]
    do = do_ref[sl, :]
    dhs_ref[r] = dh_KxV                                  # cotangent of h_{r+1}
    P, W, _, Qd, Kw, decay_last = cm.chunk_operators(q, k, v, g, beta, reset, C, mm_dtype)
    return cm.chunk_step_bwd(dh_KxV, do, P, W, Qd, Kw, decay_last, scale, mm_dtype)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...].astype(jnp.float32))


def _backward_walk(q, k, v, g, beta, reset_f, do, dht, *, scale, C):
  """Returns (dh0 [B,H,K,V], dhs [B,H,N,K,V]) with dhs[:, :, r] the cotangent of h_{r+1}."""
  B, Tp, _, K = q.shape
  H, V = v.shape[2], v.shape[3]
  N = Tp // C
  # U (from v) is dead code here: chunk_step_bwd does not use it and the compiler drops it.
  grid, qk_spec, v_spec, gb_spec, r_spec, st_spec, hs_spec = _walk_specs(q, v, C)
  kernel = functools.partial(_bwd_walk_kernel, C=C, N=N, scale=scale, mm_dtype=_mm_dtype(q.dtype))
  return pl.pallas_call(
      kernel, grid=grid,
      in_specs=[qk_spec, qk_spec, v_spec, gb_spec, gb_spec, r_spec, v_spec, st_spec],
      out_specs=[st_spec, hs_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32)],
      interpret=_interpret(), compiler_params=_compiler_params(NUM_WARPS), name="gdn_bwd_walk",
  )(q, k, v, g, beta, reset_f, do, dht)


def _chunk_map(q, k, v, g, beta, reset, h, *, C, scale, mm_dtype):
  """(O_r, h_{r+1}) of one chunk given its carry-in state h_r (2-D tiles)."""
  P, W, U, Qd, Kw, decay_last = cm.chunk_operators(q, k, v, g, beta, reset, C, mm_dtype)
  o, h_next, _ = cm.chunk_step(h, P, W, U, Qd, Kw, decay_last, scale, mm_dtype)
  return o, h_next


def _to_chunks(x, B, N, C, H):
  """[B, N·C, H, ...] → [B, H, N, C, ...]."""
  x = x.reshape(B, N, C, H, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _from_chunks(x, B, N, C, H):
  """[B, H, N, C, ...] → [B, N·C, H, ...]."""
  x = jnp.moveaxis(x, 1, 3)
  return x.reshape(B, N * C, H, *x.shape[4:])


def _chunk_parallel_grads(q, k, v, g, beta, reset_f, hs, do, dhs, *, scale, C):
  """VJP of every chunk's (q, k, v, g, β, h_r) ↦ (O_r, h_{r+1}) at once (XLA, parallel over chunks)."""
  B, Tp, Hk, K = q.shape
  H = v.shape[2]
  G, N = H // Hk, Tp // C
  qh, kh = (jnp.repeat(x, G, axis=2) if G > 1 else x for x in (q, k))
  tiles = [_to_chunks(x, B, N, C, H) for x in (qh, kh, v, g, beta)]
  reset_t = jnp.broadcast_to(reset_f.reshape(B, 1, N, C), (B, H, N, C))
  fn = functools.partial(_chunk_map, C=C, scale=scale, mm_dtype=_mm_dtype(q.dtype))
  for _ in range(3):                                   # over N, H, B
    fn = jax.vmap(fn)
  _, vjp = jax.vjp(lambda q_, k_, v_, g_, b_: fn(q_, k_, v_, g_, b_, reset_t, hs), *tiles)
  dq, dk, dv, dg, dbeta = vjp((_to_chunks(do, B, N, C, H).astype(jnp.float32), dhs))
  dq, dk, dv, dg, dbeta = (_from_chunks(x, B, N, C, H) for x in (dq, dk, dv, dg, dbeta))
  if G > 1:  # value heads of one group share their q/k head: sum their gradients
    dq, dk = (x.reshape(B, Tp, Hk, G, K).sum(3) for x in (dq, dk))
  return dq, dk, dv, dg, dbeta


def _bwd_chunk_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, h_ref, do_ref, dh_ref,
                      dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, C, scale, mm_dtype):
  grads = cm.chunk_bwd(q_ref[...], k_ref[...], v_ref[...], g_ref[...], beta_ref[...], reset_ref[...],
                       h_ref[...], do_ref[...], dh_ref[...], C, scale, mm_dtype)
  for ref, x in zip((dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref), grads):
    ref[...] = x.astype(ref.dtype)


def _chunk_parallel_grads_pallas(q, k, v, g, beta, reset_f, hs, do, dhs, *, scale, C):
  """Same as `_chunk_parallel_grads`, one Pallas program per (batch, value head, chunk, V-block).

  The rule is separable in the value columns (O[:, blk] and h'[:, blk] depend only on v[:, blk] and
  h[:, blk]), so the loss is a sum over V-blocks and each program runs `chunk_math.chunk_bwd` on its
  block: dv is its block, and the per-block dq, dk, dg, dβ are partial sums added up here. Smaller
  blocks keep h, dh (K × BV) in registers at the price of recomputing A per block.
  """
  B, Tp, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  G, N = H // Hk, Tp // C
  BV = min(V, BWD_BLOCK_V)
  nV = V // BV
  qk_spec = pl.BlockSpec((None, C, None, K), lambda b, h, n, j: (b, n, h // G, 0))
  dqk_spec = pl.BlockSpec((None, None, C, None, K), lambda b, h, n, j: (j, b, n, h, 0))
  v_spec = pl.BlockSpec((None, C, None, BV), lambda b, h, n, j: (b, n, h, j))
  gb_spec = pl.BlockSpec((None, C, None), lambda b, h, n, j: (b, n, h))
  dgb_spec = pl.BlockSpec((None, None, C, None), lambda b, h, n, j: (j, b, n, h))
  r_spec = pl.BlockSpec((None, C), lambda b, h, n, j: (b, n))
  st_spec = pl.BlockSpec((None, None, None, K, BV), lambda b, h, n, j: (b, h, n, 0, j))
  sum_in_f32 = G > 1 or nV > 1
  qk_dtype = jnp.float32 if sum_in_f32 else q.dtype
  kernel = functools.partial(_bwd_chunk_kernel, C=C, scale=scale, mm_dtype=_mm_dtype(q.dtype))
  dq, dk, dv, dg, dbeta = pl.pallas_call(
      kernel, grid=(B, H, N, nV),
      in_specs=[qk_spec, qk_spec, v_spec, gb_spec, gb_spec, r_spec, st_spec, v_spec, st_spec],
      out_specs=[dqk_spec, dqk_spec, v_spec, dgb_spec, dgb_spec],
      out_shape=[jax.ShapeDtypeStruct((nV, B, Tp, H, K), qk_dtype),
                 jax.ShapeDtypeStruct((nV, B, Tp, H, K), qk_dtype),
                 jax.ShapeDtypeStruct((B, Tp, H, V), v.dtype),
                 jax.ShapeDtypeStruct((nV, B, Tp, H), jnp.float32),
                 jax.ShapeDtypeStruct((nV, B, Tp, H), jnp.float32)],
      interpret=_interpret(), compiler_params=_compiler_params(BWD_NUM_WARPS), name="gdn_bwd_chunk",
  )(q, k, v, g, beta, reset_f, hs, do, dhs)
  dq, dk, dg, dbeta = (x.sum(0) for x in (dq, dk, dg, dbeta))   # partial sums over V-blocks
  if G > 1:
    dq, dk = (x.reshape(B, Tp, Hk, G, K).sum(3) for x in (dq, dk))
  return dq, dk, dv, dg, dbeta


def _use_pallas_chunk_bwd(K: int, V: int) -> bool:
  """The one-program-per-chunk backward holds h, dh (K×V) and C×max(K,V) tiles in registers."""
  return PALLAS_CHUNK_BWD and K <= 128 and V <= 128


# ------------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gdn(q, k, v, g, beta, reset_f, h0, scale, C):
  o, ht = _forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C, store_states=False)
  return o, ht


def _gdn_fwd(q, k, v, g, beta, reset_f, h0, scale, C):
  o, ht, hs = _forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C, store_states=True)
  return (o, ht), (q, k, v, g, beta, reset_f, hs)


def _gdn_bwd(scale, C, res, cts):
  q, k, v, g, beta, reset_f, hs = res
  do, dht = cts
  do = do.astype(v.dtype)
  dh0, dhs = _backward_walk(q, k, v, g, beta, reset_f, do, dht, scale=scale, C=C)
  grads_fn = (_chunk_parallel_grads_pallas if _use_pallas_chunk_bwd(q.shape[3], v.shape[3])
              else _chunk_parallel_grads)
  dq, dk, dv, dg, dbeta = grads_fn(q, k, v, g, beta, reset_f, hs, do, dhs, scale=scale, C=C)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta,
          jnp.zeros_like(reset_f), dh0)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size):
  """The `kernels_pallas.gated_delta_rule_pallas` contract on GPU (interpret mode on CPU).

  q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H] float32; scale: float; h0: [B, H, K, V]
  float32; reset: [B, T] bool; chunk_size: power of two in [16, 128].
  Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
  """
  B, T, Hk, K = q.shape
  C = int(chunk_size)
  N = -(-T // C)
  pad = N * C - T

  def padded(x):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x

  q, k, v = padded(q), padded(k), padded(v)
  g, beta = padded(g.astype(jnp.float32)), padded(beta.astype(jnp.float32))
  reset_f = padded(reset.astype(jnp.float32))
  o, ht = _gdn(q, k, v, g, beta, reset_f, h0.astype(jnp.float32), float(scale), C)
  return o[:, :T], ht
