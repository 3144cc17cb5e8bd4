r"""Chunked gated delta rule on NVIDIA GPUs: Pallas (Triton lowering) kernels, fla's decomposition.

Two schedules of the same math (symbols as in `chunk_math` and `gdn_jax.ops.chunked`), `SCHEDULE`:

"walks" (the default; fla's decomposition): everything that does not depend on the carry-in state
  runs once per chunk, in parallel over all chunks; two Pallas kernels per direction walk the chunks
  in order doing only the state recursion. Who runs the chunk-parallel parts is `CHUNK_PARALLEL`
  ("auto": Pallas; `_chunk_parallel` has the numbers):
  forward  prep (`gdn_prep`, grid (B, H, N)): γ, Γ, A = (I+L)⁻¹ (fp32), W = A diag(βd) K,
           U = A diag(β) V; walk (`gdn_walk_fwd`, grid (V/BV, B, H)):
           Ṽ_r = U_r − W_r h_r,  h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r  (two C×K×BV matmuls per
           chunk; w_r, λ_r from the chunk's g inside the loop, k read in token layout), writing
           Ṽ and h_r (bf16 for bf16 inputs, as fla); output (`gdn_output`, grid (B, H, N)):
           O = scale (diag(d) Q h_r + ((Q Kᵀ) ⊙ Γ) Ṽ). The forward keeps the inputs, A, W, h_r and
           Ṽ: no per-token state.
  backward dṼ^local = scale Pᵀ dO (`gdn_dv_local`, grid (B, H, N)); the reverse walk
           (`gdn_walk_bwd`, W as the forward stored it, q, k, g, dO in token layout):
           dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1},
           dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r (writes dh_{r+1} and dṼ per
           chunk, returns dh_0); gradients in two kernels, split as fla's backward (`GRADS_SPLIT`):
           `gdn_grads_key`, grid (K/BK, B, H, N), everything that contracts over V into K (dq final,
           dk₁; `chunk_math.chunk_key_grads`), then `gdn_grads_wy`, grid (B, H, N), dv and the UT
           transform's part (dk = dk₁ + (dKK + dKKᵀ) K; `chunk_math.chunk_wy_grads`). The
           identities are those of `chunked.chunk_grads`.
  Grid order (`SIBLINGS_FIRST`): Triton launches grid axis 0 fastest, so the programs that read the
  same tiles (a walk's V-blocks, the key gradients' K-blocks) come first and share them through L2.
  With CHUNK_PARALLEL = "xla" the chunk-parallel parts are batched XLA ops instead
  (`chunked.chunk_ops` forward and backward, `chunked.chunk_grads`); only h_r is kept and A is
  recomputed in the backward.
"fused" (the first version, kept as the low-memory option): the forward and reverse walks recompute
  each chunk's operators inside the sequential loop (`chunk_math.chunk_operators`), and a third
  kernel (one program per chunk, `chunk_math.chunk_bwd`) forms the gradients; for K or V > 128 XLA
  differentiates the vmapped `chunk_math` instead. 2.6× slower than "walks" with XLA parts.

Measured on the H100 (bf16, C = 64, experiments/results/bench_kernels_h100_v8c.md; log and earlier
versions in NOTES_gpu.md), fwd+bwd against fla, all shapes in one run: 2.25 vs 2.86 ms at B8 T2048
H16 K=V=128 (0.79×), 2.36 vs 3.01 at B2 T8192 (0.78×), 7.73 vs 8.29 at B16 T4096 (0.93×), 3.96 vs
4.01 at K = 256, V = 512 (0.99×; 0.89× in the run before); memory 742 / 742 / 2968 / 1264 MiB against
fla's 932 / 932 / 3728 / 1502. fla's own time moves by up to 25 % between runs (B8 T2048: 2.86-3.59
ms this session; ours 2.18-2.25).
Errors equal or beat fla's (o 3.3e-3, gradients ≤ 3.3e-3 against an fp32 reference).
The Pallas chunk-parallel parts halved the forward (1.74 → 0.86 ms in one run) and the memory (1416
→ 690 MiB): the XLA parts sent ~20 fp32 [B, H, N, C, ·] intermediates and two layout transposes
through HBM; the kernels keep them in registers and read/write the [B, T, H, ·] layout directly.

Backend choice: Pallas' Triton lowering (`pl.pallas_call` + `plt.CompilerParams`) compiles and runs with
jax 0.11.2 on the H100 and accepts 2-D `dot_general` with transposes, iota masks and `fori_loop`,
which is all these kernels need; the same kernels run on CPU with `interpret=True` and lower to Triton
IR on CPU for an abstract H100 (tests/pallas_gpu_test.py). Mosaic GPU (`plgpu` + wgmma) needs
M % 64 warpgroup tiles, explicit shared-memory pipelines, has no `dot_general` lowering, and its API
is marked unstable. The gains so far came from the decomposition and the memory traffic, not from
instruction choice, so the deprecated-but-working Triton path was kept. Triton needs head dims that are powers of two ≥ 16 (`kernels_pallas.unsupported_shape`).

Packed documents (`reset`) are handled through the masks of the chunk math (None: no documents).
T not a multiple of C is zero-padded (g = β = k = v = 0 leave the state unchanged).
Grouped value heads: q/k are repeated over the value heads of a group for the XLA parts, or read
through the BlockSpec index maps (the Pallas parts, "fused"); their gradients are summed over the group.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from gdn_jax.ops import chunked as xc
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
SCHEDULE = "walks"        # "walks": XLA chunk operators + Pallas state walks; "fused": operators in the walks
CHUNK_PARALLEL = "auto"   # who does the walks' chunk-parallel parts: "pallas" (four chunk-parallel
                          # kernels; A formed once in the forward and stored), "xla", or "auto":
                          # pallas for K, V <= 128, xla above (`_chunk_parallel`)
PART_BLOCK_V = 64         # V columns per step of the chunk-parallel kernels' V loops
PART_NUM_WARPS = 4        # warps of the forward's prep and output kernels
BWD_PART_NUM_WARPS = 4    # ... of the backward's dṼ^local kernel
GRADS_NUM_WARPS = 4       # ... of the gradients kernel (the key-gradients one with GRADS_SPLIT)
GRADS_NUM_WARPS_LARGE_K = 8  # ... for K > 128: K = 256, V = 512 fwd+bwd 5.69 against 6.21 ms at 4
                             # warps in one run (bench_kernels_h100_v8_k256c, V loop still unrolled)
GRADS_BLOCK_V = 128       # V columns per step of the gradients kernel's V loop
GRADS_BLOCK_K = 64        # K columns per program of the gradients kernel (< K: K split over programs)
GRADS_SPLIT = True        # two kernels, split as fla's backward is: per K-block everything that
                          # contracts over V into K (`chunk_math.chunk_key_grads`), then per chunk
                          # dv and the UT transform's part (`chunk_wy_grads`); no dVb, dL or KKᵀ per
                          # K-block. H100, B8 T2048 H16 K=V=128: fwd+bwd 2.71 ms against 3.48 for
                          # the one-kernel version (False) in one run (bench_kernels_h100_v7)
GRADS_WY_NUM_WARPS = 4    # warps of the split's second kernel
GRADS_V_LOOP = True       # the split gradients kernels walk V in a fori_loop when V > GRADS_BLOCK_V.
                          # Unrolled (False), every V-block's tiles were live at once: at K = 256,
                          # V = 512 the key kernel spilled (24 M local requests, ncu_pallas_k256_v8)
                          # and the gradients took 3.88 ms against 1.59 in the loop (one session)
WALK_NUM_STAGES = 3       # Triton software-pipelining depth of the walks' chunk loop (loads of chunk
                          # r+1, r+2 overlap chunk r's matmuls); B16 T4096: fwd+bwd 7.84 / 8.28 ms at
                          # 3 / 2 stages in one run (bench_kernels_h100_v8_b16), 2.36 / 2.43 at 2 / 1
                          # at B8 T2048 (_v8_k128)
WALK_NUM_STAGES_LARGE_K = 2  # ... for K > 128 (three stages of C×256 tiles exceed the 227 KB of smem)
BLOCK_V_LARGE_K = 32      # BLOCK_V of the walks when K > 128
WALK_MIN_PROGRAMS = 128   # walks of the "walks" schedule: halve BV (to 16 at least) while B·H·V/BV is
                          # below this; B2 T8192 H16 (three pipeline stages): fwd+bwd 2.42 ms at 128
                          # (BV 32) against 2.78 at 256 (BV 16) in one run (bench_kernels_h100_v8_t8192;
                          # at one stage BV 16 had been best). 0: off
WALK_BWD_DO_TOKENS = True  # the reverse walk reads dO in token layout (False: XLA makes [B,H,N,C,V] tiles)
SIBLINGS_FIRST = True     # grid axis 0 (CUDA's x, launched fastest) is the one whose programs read the
                          # same tiles: the walks' V-blocks (W, k of a chunk) and the key-gradient
                          # kernel's K-blocks (dO, Ṽ, dṼ, A of a chunk). Launched side by side, they
                          # share those reads through L2 instead of each fetching them from HBM in
                          # another wave. False: (B, H, ·) first, as before


def _chunk_parallel() -> str:
  """Resolves CHUNK_PARALLEL: "auto" is "pallas" at every head size. Measured on the H100: at K = V =
  128 the Pallas parts gave fwd+bwd 3.25-3.39 ms against 4.46 ms with xla (bench_kernels_h100_v5*)
  and memory 690 against 1416 MiB; at K = 256, V = 512 they gave 6.11 ms against 5.91 with xla in one
  run (bench_kernels_h100_v8_k256b; fla 4.11) at 1264 against 1982 MiB (fla 1502), and a forward of
  1.48 against 2.00 ms (fla 1.44); with the gradients' V loop (GRADS_V_LOOP) 3.82 ms (_v8_k256d)."""
  return CHUNK_PARALLEL if CHUNK_PARALLEL != "auto" else "pallas"


def _block_v(V: int, K: int = 0, heads: int = 0) -> int:
  """V columns per walk program; K > 128 halves it (the K×BV state tiles and the C×K operands
  must fit the 227 KB of shared memory of an H100). With `heads` = B·H given (the "walks"
  schedule), BV is halved down to 16 while the grid has fewer than WALK_MIN_PROGRAMS programs:
  each walk is sequential over the chunks, so at small B·H (long sequences) the GPU needs more of
  them in flight."""
  BV = min(V, BLOCK_V if K <= 128 else BLOCK_V_LARGE_K)
  while heads and BV > 16 and heads * (V // BV) < WALK_MIN_PROGRAMS:
    BV //= 2
  return BV


def _walk_stages(K: int) -> int:
  return WALK_NUM_STAGES if K <= 128 else WALK_NUM_STAGES_LARGE_K


def _siblings_first(grid, index_map=None):
  """With SIBLINGS_FIRST, moves the last grid axis (the programs that share their inputs) to the
  front, so that the Triton launch (axis 0 → CUDA x, the fastest) runs them side by side; returns
  the grid, or the index map rewritten for it (its arguments stay in the original order)."""
  if not SIBLINGS_FIRST:
    return grid if index_map is None else index_map
  if index_map is None:
    return (grid[-1], *grid[:-1])
  return lambda j, *rest: index_map(*rest, j)


def _spec(block_shape, index_map):
  """A BlockSpec over a grid whose last axis `_siblings_first` may move to the front."""
  return pl.BlockSpec(block_shape, _siblings_first(None, index_map))


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
  return ((B, H, V // BV), *_token_specs(Tp, K, G, BV, spec=pl.BlockSpec),
          *_state_specs(N, K, BV, spec=pl.BlockSpec))


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


# ----------------------------------------------------- "walks": XLA chunk operators + Pallas walks


def _walk_fwd_kernel(w_ref, u_ref, k_ref, g_ref, reset_ref, h0_ref, vnew_ref, ht_ref, hs_ref, *,
                     N, C, mm_dtype):
  """h_r → Ṽ_r = U_r − W_r h_r → h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r, for r = 0 … N−1 (one V-block).
  w_r (how each write survives to the chunk end) and λ_r come from the chunk's g inside the loop: no
  K̃ = diag(w) K goes through HBM, and the C×BV Ṽ is scaled rather than the C×K keys."""
  def body(r, h_KxV):
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    _, _, _, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    hs_ref[r] = h_KxV.astype(hs_ref.dtype)
    v_new = u_ref[r].astype(jnp.float32) - cm.dot(w_ref[r], h_KxV, mm_dtype=mm_dtype)
    vnew_ref[r] = v_new.astype(vnew_ref.dtype)
    return lam * h_KxV + cm.dot(k_ref[rows, :], k_write[:, None] * v_new, trans_a=True,
                                mm_dtype=mm_dtype)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...].astype(jnp.float32))


def _walk_bwd_kernel(w_ref, k_ref, q_ref, g_ref, reset_ref, do_ref, dvl_ref, dht_ref,
                     dh0_ref, dhs_ref, dvnew_ref, *, N, C, scale, mm_dtype, do_tokens):
  """dh_{r+1} → dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1} →
  dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r, for r = N−1 … 0; d, w, λ from the
  chunk's g in the loop (no Q̃ or K̃ through HBM); dṼ^local = scale Pᵀ dO comes precomputed."""
  def body(i, dh_KxV):
    r = N - 1 - i
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    _, _, d, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    dhs_ref[r] = dh_KxV.astype(dhs_ref.dtype)
    dv_new = dvl_ref[r].astype(jnp.float32) + k_write[:, None] * cm.dot(
        k_ref[rows, :], dh_KxV, mm_dtype=mm_dtype)
    dvnew_ref[r] = dv_new.astype(dvnew_ref.dtype)
    do = (do_ref[rows, :] if do_tokens else do_ref[r]).astype(jnp.float32)
    return (lam * dh_KxV
            + cm.dot(q_ref[rows, :], (scale * d)[:, None] * do, trans_a=True, mm_dtype=mm_dtype)
            - cm.dot(w_ref[r], dv_new, trans_a=True, mm_dtype=mm_dtype))

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...].astype(jnp.float32))


def _tile_specs(N, C, K, BV):
  """BlockSpecs over [B, H, N, C, ·] tiles for a grid (B, H, V/BV) (axis order as `_siblings_first`
  makes it): every program sees all N chunks of its (batch, value head) and indexes chunk r inside
  (`ref[r]`)."""
  return (_spec((None, None, N, C, K), lambda b, h, j: (b, h, 0, 0, 0)),     # [C, K] rows
          _spec((None, None, N, C, BV), lambda b, h, j: (b, h, 0, 0, j)),   # [C, BV] rows
          *_state_specs(N, K, BV))


def _state_specs(N, K, BV, spec=_spec):
  """A walk program's [K, BV] state and its [N, K, BV] states per chunk, over a grid (B, H, V/BV)
  (`spec=pl.BlockSpec`: in that order, as the "fused" schedule launches it)."""
  return (spec((None, None, K, BV), lambda b, h, j: (b, h, 0, j)),
          spec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)))


def _token_specs(Tp, K, G, BV, spec=_spec):
  """BlockSpecs of the walks' inputs in token layout, a whole sequence per program: q/k rows
  [B, Tp, Hk, K] (value head h reads q/k head h // G), value columns [B, Tp, H, V], g [B, Tp, H] and
  the reset flags [B, Tp]; chunk r is `ref[pl.ds(r·C, C)]`."""
  return (spec((None, Tp, None, K), lambda b, h, j: (b, 0, h // G, 0)),
          spec((None, Tp, None, BV), lambda b, h, j: (b, 0, h, j)),
          spec((None, Tp, None), lambda b, h, j: (b, 0, h)),
          spec((None, Tp), lambda b, h, j: (b, 0)))


def _walk_forward(W, U, k, g, reset_f, h0, *, mm_dtype, state_dtype, vnew_dtype=jnp.float32):
  """W [B,H,N,C,K], U [B,H,N,C,V] tiles; k [B,Tp,Hk,K], g [B,Tp,H], reset_f [B,Tp] tokens;
  h0 [B,H,K,V] f32. Returns (Ṽ [B,H,N,C,V], final state f32, states before each chunk [B,H,N,K,V])."""
  B, H, N, C, K = W.shape
  V = U.shape[-1]
  BV = _block_v(V, K, B * H)
  rows_k, rows_v, st_spec, hs_spec = _tile_specs(N, C, K, BV)
  k_spec, _, g_spec, r_spec = _token_specs(N * C, K, H // k.shape[2], BV)
  kernel = functools.partial(_walk_fwd_kernel, N=N, C=C, mm_dtype=mm_dtype)
  return pl.pallas_call(
      kernel, grid=_siblings_first((B, H, V // BV)),
      in_specs=[rows_k, rows_v, k_spec, g_spec, r_spec, st_spec],
      out_specs=[rows_v, st_spec, hs_spec],
      out_shape=[jax.ShapeDtypeStruct(U.shape, vnew_dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), state_dtype)],
      interpret=_interpret(), compiler_params=_compiler_params(NUM_WARPS, _walk_stages(K)),
      name="gdn_walk_fwd",
  )(W, U, k, g, reset_f, h0)


def _walk_backward(W, k, q, g, reset_f, do, dv_local, dht, *, scale, mm_dtype, state_dtype,
                   dvnew_dtype=jnp.float32):
  """W, dv_local tiles; k, q, g, reset_f tokens; do: [B,H,N,C,V] tiles or [B,Tp,H,V] tokens.
  Returns (dh0 [B,H,K,V] f32, dh_{r+1} per chunk [B,H,N,K,V], dṼ [B,H,N,C,V])."""
  B, H, N, C, K = W.shape
  V = do.shape[-1]
  BV = _block_v(V, K, B * H)
  rows_k, rows_v, st_spec, hs_spec = _tile_specs(N, C, K, BV)
  qk_spec, do_tok_spec, g_spec, r_spec = _token_specs(N * C, K, H // k.shape[2], BV)
  do_tokens = do.ndim == 4
  kernel = functools.partial(_walk_bwd_kernel, N=N, C=C, scale=scale, mm_dtype=mm_dtype,
                             do_tokens=do_tokens)
  return pl.pallas_call(
      kernel, grid=_siblings_first((B, H, V // BV)),
      in_specs=[rows_k, qk_spec, qk_spec, g_spec, r_spec, do_tok_spec if do_tokens else rows_v,
                rows_v, st_spec],
      out_specs=[st_spec, hs_spec, rows_v],
      out_shape=[jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), state_dtype),
                 jax.ShapeDtypeStruct(dv_local.shape, dvnew_dtype)],
      interpret=_interpret(), compiler_params=_compiler_params(NUM_WARPS, _walk_stages(K)),
      name="gdn_walk_bwd",
  )(W, k, q, g, reset_f, do, dv_local, dht)


def _v_blocks(V: int, block=None):
  """Static column blocks of the chunk-parallel kernels' V loops."""
  BV = min(V, block or PART_BLOCK_V)
  return [pl.ds(j * BV, BV) for j in range(V // BV)]


def _prep_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, a_ref, w_ref, u_ref, *, C, mm_dtype):
  """Forward, one chunk of one value head: A = (I + L)⁻¹ (masked doubling, fp32), W = A diag(βd) K,
  U = A diag(β) V (by V-blocks). A and W are kept for the backward."""
  k, beta = k_ref[...], beta_ref[...]
  Gamma, d, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  A = cm.ut_inverse(k, beta, Gamma, C)
  a_ref[...] = A.astype(a_ref.dtype)
  w_ref[...] = cm.dot(A, (beta * d)[:, None] * k.astype(jnp.float32),
                      mm_dtype=mm_dtype).astype(w_ref.dtype)
  for blk in _v_blocks(v_ref.shape[-1]):
    vb = beta[:, None] * v_ref[:, blk].astype(jnp.float32)
    u_ref[:, blk] = cm.dot(A, vb, mm_dtype=mm_dtype).astype(u_ref.dtype)


def _output_kernel(q_ref, k_ref, g_ref, reset_ref, h_ref, vnew_ref, o_ref, *, C, scale, mm_dtype):
  """Forward, one chunk: O = scale (diag(d) Q h_r + ((Q Kᵀ) ⊙ Γ) Ṽ_r), written in token layout."""
  q = q_ref[...]
  Gamma, d, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  P = cm.dot(q, k_ref[...], trans_b=True) * Gamma
  Qd = d[:, None] * q.astype(jnp.float32)
  for blk in _v_blocks(vnew_ref.shape[-1]):
    o = (cm.dot(Qd, h_ref[:, blk], mm_dtype=mm_dtype)
         + cm.dot(P, vnew_ref[:, blk], mm_dtype=mm_dtype))
    o_ref[:, blk] = (scale * o).astype(o_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, g_ref, reset_ref, do_ref, dvl_ref, *, C, scale, mm_dtype):
  """Backward, one chunk: dṼ^local = scale Pᵀ dO with P = (Q Kᵀ) ⊙ Γ (by V-blocks)."""
  Gamma, _, _, _ = cm.chunk_decays(g_ref[...], reset_ref[...], C)
  P = cm.dot(q_ref[...], k_ref[...], trans_b=True) * Gamma
  for blk in _v_blocks(do_ref.shape[-1]):
    dvl_ref[:, blk] = (scale * cm.dot(P, do_ref[:, blk], trans_a=True, mm_dtype=mm_dtype)
                       ).astype(dvl_ref.dtype)


def _k_block(K: int, BK: int):
  """(split, first, cols) of a gradients program: with BK < K the grid's axis 3 picks this
  program's BK state rows / q-k columns, `first` marks the K-block that adds the terms that do not
  contract over K; else the whole of K."""
  if BK >= K:
    return False, True, slice(None)
  kb = pl.program_id(0 if SIBLINGS_FIRST else 3)
  return True, kb == 0, pl.ds(pl.multiple_of(kb * BK, BK), BK)


def _grads_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, a_ref, h_ref, vnew_ref, do_ref,
                  dh_ref, dvnew_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, C, scale,
                  mm_dtype, BK):
  """Backward, one chunk (and one block of BK state rows / q-k columns when K is split over
  programs): every input gradient (`chunk_math.chunk_gradients`), V in blocks. With a K split, dv
  is written by the first K-block only and dg, dβ are per-K-block partial sums."""
  split, first, cols = _k_block(q_ref.shape[-1], BK)

  def blocks():
    for blk in _v_blocks(v_ref.shape[-1], GRADS_BLOCK_V):
      def write_dv(x, blk=blk):
        if split:
          @pl.when(first)
          def _():
            dv_ref[:, blk] = x.astype(dv_ref.dtype)
        else:
          dv_ref[:, blk] = x.astype(dv_ref.dtype)
      yield (v_ref[:, blk], h_ref[cols, blk], vnew_ref[:, blk], do_ref[:, blk], dh_ref[cols, blk],
             dvnew_ref[:, blk]), write_dv
  q, k = q_ref[...], k_ref[...]
  qk_cols = (q_ref[:, cols], k_ref[:, cols]) if split else None
  dq, dk, dg, dbeta = cm.chunk_gradients(q, k, g_ref[...], beta_ref[...], reset_ref[...],
                                         a_ref[...], blocks(), C, scale, mm_dtype,
                                         qk_cols=qk_cols, first=first)
  for ref, x in ((dq_ref, dq), (dk_ref, dk), (dg_ref, dg), (dbeta_ref, dbeta)):
    ref[...] = x.astype(ref.dtype)


def _grads_v_blocks(V: int, block_fn):
  """The V-blocks of the split gradients kernels for `chunk_math.fold_blocks`: block_fn(cols) for
  each GRADS_BLOCK_V-wide column slice, as a (count, fn) loop (GRADS_V_LOOP) or unrolled."""
  BV = min(V, GRADS_BLOCK_V)
  if GRADS_V_LOOP and V > BV:
    return V // BV, lambda j: block_fn(pl.ds(pl.multiple_of(j * BV, BV), BV))
  return (block_fn(blk) for blk in _v_blocks(V, GRADS_BLOCK_V))


def _grads_key_kernel(q_ref, k_ref, g_ref, beta_ref, reset_ref, a_ref, h_ref, vnew_ref, do_ref,
                      dh_ref, dvnew_ref, dq_ref, dk_ref, dg_ref, dbeta_ref, *, C, scale, mm_dtype,
                      BK):
  """GRADS_SPLIT, first kernel, one chunk and one block of BK K-columns (`chunk_math.chunk_key_grads`):
  dq (final), dk₁ (float32) and the partial sums of dg, dβ through P, d, w, λ."""
  split, _, cols = _k_block(q_ref.shape[-1], BK)

  blocks = _grads_v_blocks(vnew_ref.shape[-1], lambda blk: (
      h_ref[cols, blk], vnew_ref[:, blk], do_ref[:, blk], dh_ref[cols, blk], dvnew_ref[:, blk]))
  q_cols, k_cols = (q_ref[:, cols], k_ref[:, cols]) if split else (q_ref[...], k_ref[...])
  dq, dk, dg, dbeta = cm.chunk_key_grads(q_cols, k_cols, g_ref[...], beta_ref[...], reset_ref[...],
                                         a_ref[...], blocks, C, scale, mm_dtype)
  for ref, x in ((dq_ref, dq), (dk_ref, dk), (dg_ref, dg), (dbeta_ref, dbeta)):
    ref[...] = x.astype(ref.dtype)


def _grads_wy_kernel(k_ref, v_ref, g_ref, beta_ref, reset_ref, a_ref, vnew_ref, dvnew_ref, dk1_ref,
                     dk_ref, dv_ref, dg_ref, dbeta_ref, *, C, mm_dtype):
  """GRADS_SPLIT, second kernel, one chunk (`chunk_math.chunk_wy_grads`): dv, dk = dk₁ + (dKK + dKKᵀ) K
  by column blocks of K, and dg, dβ through L and Vb."""
  def block(blk):
    def write_dv(x):
      dv_ref[:, blk] = x.astype(dv_ref.dtype)
    return (v_ref[:, blk], vnew_ref[:, blk], dvnew_ref[:, blk]), write_dv
  dKK, dg, dbeta = cm.chunk_wy_grads(k_ref[...], g_ref[...], beta_ref[...], reset_ref[...],
                                     a_ref[...], _grads_v_blocks(v_ref.shape[-1], block), C,
                                     mm_dtype)
  for blk in _v_blocks(k_ref.shape[-1], GRADS_BLOCK_V):      # column blocks of K
    dk_ref[:, blk] = (dk1_ref[:, blk] + cm.dot(dKK, k_ref[:, blk], mm_dtype=mm_dtype)
                      ).astype(dk_ref.dtype)
  dg_ref[...], dbeta_ref[...] = dg, dbeta


def _part_specs(q, v, C):
  """BlockSpecs of the chunk-parallel kernels, grid (B, H, N): one chunk of one value head.
  Returns (q/k tokens, v tokens [C, V], g/β tokens, reset, [C, d] tiles of [B,H,N,C,d] arrays as a
  function of d, state tile [K, V], value-head [C, K] tokens)."""
  K, V, G = q.shape[3], v.shape[3], v.shape[2] // q.shape[2]
  return (pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h // G, 0)),
          pl.BlockSpec((None, C, None, V), lambda b, h, n: (b, n, h, 0)),
          pl.BlockSpec((None, C, None), lambda b, h, n: (b, n, h)),
          pl.BlockSpec((None, C), lambda b, h, n: (b, n)),
          lambda d: pl.BlockSpec((None, None, None, C, d), lambda b, h, n: (b, h, n, 0, 0)),
          pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0)),
          pl.BlockSpec((None, C, None, K), lambda b, h, n: (b, n, h, 0)))


def _op_dtype(dtype):
  """Stored intermediates: bf16 for bf16 inputs (as fla), else float32."""
  return dtype if _mm_dtype(dtype) is not None else jnp.float32


def _per_chunk(v, C, *tail, dtype):
  """Shape of a per-chunk array [B, H, N, *tail] (N = Tp / C) for a chunk-parallel kernel's output."""
  B, Tp, H = v.shape[:3]
  return jax.ShapeDtypeStruct((B, H, Tp // C, *tail), dtype)


def _part_call(kernel, q, v, C, in_specs, out_specs, out_shape, name, *args, num_warps, nK=None):
  B, Tp, H = v.shape[:3]
  grid = (B, H, Tp // C) + ((nK,) if nK else ())
  grid = _siblings_first(grid) if nK else grid
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=_interpret(), compiler_params=_compiler_params(num_warps), name=name)(*args)


def _prep_pallas(q, k, v, g, beta, reset_f, *, C):
  """Forward prep kernel: A [B,H,N,C,C], W [B,H,N,C,K], U [B,H,N,C,V] (bf16 for bf16 inputs).
  reset_f: [B,Tp] float32 (zeros without packed documents)."""
  K, V, op = q.shape[3], v.shape[3], _op_dtype(q.dtype)
  qk_s, v_s, gb_s, r_s, tile, _, _ = _part_specs(q, v, C)
  tiles = lambda d: _per_chunk(v, C, C, d, dtype=op)
  return _part_call(
      functools.partial(_prep_kernel, C=C, mm_dtype=_mm_dtype(q.dtype)), q, v, C,
      [qk_s, v_s, gb_s, gb_s, r_s], [tile(C), tile(K), tile(V)],
      [tiles(C), tiles(K), tiles(V)],
      "gdn_prep", k, v, g, beta, reset_f, num_warps=PART_NUM_WARPS)


def _output_pallas(q, k, v, g, reset_f, hs, v_new, *, scale, C):
  """Forward output kernel: O [B,Tp,H,V] in v's dtype from h_r and Ṽ."""
  qk_s, v_s, gb_s, r_s, tile, st_s, _ = _part_specs(q, v, C)
  return _part_call(
      functools.partial(_output_kernel, C=C, scale=scale, mm_dtype=_mm_dtype(q.dtype)), q, v, C,
      [qk_s, qk_s, gb_s, r_s, st_s, tile(v.shape[3])], v_s, jax.ShapeDtypeStruct(v.shape, v.dtype),
      "gdn_output", q, k, g, reset_f, hs, v_new, num_warps=PART_NUM_WARPS)


def _dv_local_pallas(q, k, v, g, reset_f, do, *, scale, C):
  """Backward's chunk-parallel kernel before the reverse walk: dṼ^local [B,H,N,C,V]."""
  qk_s, v_s, gb_s, r_s, tile, _, _ = _part_specs(q, v, C)
  return _part_call(
      functools.partial(_dv_local_kernel, C=C, scale=scale, mm_dtype=_mm_dtype(q.dtype)), q, v, C,
      [qk_s, qk_s, gb_s, r_s, v_s], tile(v.shape[3]),
      _per_chunk(v, C, C, v.shape[3], dtype=_op_dtype(q.dtype)),
      "gdn_dv_local", q, k, g, reset_f, do, num_warps=BWD_PART_NUM_WARPS)


def _grads_pallas(q, k, v, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new, *, scale, C):
  """Gradients kernel: dq, dk [B,Tp,H,K] (value heads; f32 under GVA), dv, dg, dβ."""
  B, Tp, Hk, K = q.shape
  H = v.shape[2]
  qk_s, v_s, gb_s, r_s, tile, st_s, dqk_s = _part_specs(q, v, C)
  dqk_dtype = jnp.float32 if H != Hk else q.dtype
  BK = min(K, GRADS_BLOCK_K)
  nK = K // BK
  in_specs = [qk_s, qk_s, v_s, gb_s, gb_s, r_s, tile(C), st_s, tile(v.shape[3]), v_s, st_s,
              tile(v.shape[3])]
  out_specs = [dqk_s, dqk_s, v_s, gb_s, gb_s]
  partial_shape = (B, Tp, H)
  with_k = lambda spec: _spec(spec.block_shape,  # the same block for every K-block
                              lambda b, h, n, kb, f=spec.index_map: f(b, h, n))
  if nK > 1:  # grid (B, H, N, K/BK): dq, dk by column block; dg, dβ partial sums per K-block
    in_specs = [with_k(x) for x in in_specs]
    out_specs = [_spec((None, C, None, BK), lambda b, h, n, kb: (b, n, h, kb))] * 2 + [
        with_k(v_s)] + [_spec((None, None, C, None), lambda b, h, n, kb: (kb, b, n, h))] * 2
    partial_shape = (nK, B, Tp, H)
  mm_dtype = _mm_dtype(q.dtype)
  grads_warps = GRADS_NUM_WARPS if K <= 128 else GRADS_NUM_WARPS_LARGE_K
  if GRADS_SPLIT:
    key_in = [in_specs[i] for i in (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11)]
    dq, dk1, dg, dbeta = _part_call(
        functools.partial(_grads_key_kernel, C=C, scale=scale, mm_dtype=mm_dtype, BK=BK),
        q, v, C, key_in, [out_specs[i] for i in (0, 1, 3, 4)],
        [jax.ShapeDtypeStruct((B, Tp, H, K), dqk_dtype), jax.ShapeDtypeStruct((B, Tp, H, K), jnp.float32)]
        + [jax.ShapeDtypeStruct(partial_shape, jnp.float32)] * 2,
        "gdn_grads_key", q, k, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new,
        num_warps=grads_warps, nK=nK if nK > 1 else None)
    if nK > 1:
      dg, dbeta = dg.sum(0), dbeta.sum(0)
    dk, dv, dg2, dbeta2 = _part_call(
        functools.partial(_grads_wy_kernel, C=C, mm_dtype=mm_dtype), q, v, C,
        [qk_s, v_s, gb_s, gb_s, r_s, tile(C), tile(v.shape[3]), tile(v.shape[3]), dqk_s],
        [dqk_s, v_s, gb_s, gb_s],
        [jax.ShapeDtypeStruct((B, Tp, H, K), dqk_dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        + [jax.ShapeDtypeStruct((B, Tp, H), jnp.float32)] * 2,
        "gdn_grads_wy", k, v, g, beta, reset_f, A, v_new, dv_new, dk1,
        num_warps=GRADS_WY_NUM_WARPS)
    dg, dbeta = dg + dg2, dbeta + dbeta2
  else:
    dq, dk, dv, dg, dbeta = _part_call(
        functools.partial(_grads_kernel, C=C, scale=scale, mm_dtype=mm_dtype, BK=BK),
        q, v, C, in_specs, out_specs,
        [jax.ShapeDtypeStruct((B, Tp, H, K), dqk_dtype)] * 2
        + [jax.ShapeDtypeStruct(v.shape, v.dtype)]
        + [jax.ShapeDtypeStruct(partial_shape, jnp.float32)] * 2,
        "gdn_grads", q, k, v, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new,
        num_warps=grads_warps, nK=nK if nK > 1 else None)
    if nK > 1:
      dg, dbeta = dg.sum(0), dbeta.sum(0)
  if H != Hk:  # value heads of one group share their q/k head: sum their gradients
    dq, dk = (x.reshape(B, Tp, Hk, H // Hk, K).sum(3) for x in (dq, dk))
  return dq, dk, dv, dg, dbeta


def _walks_forward_pallas(q, k, v, g, beta, reset_f, h0, *, scale, C):
  """The "walks" forward with its chunk-parallel parts as Pallas kernels: prep (A, W, U), the state
  walk, the output. Returns (O, final state, saved = (A, W, h_r, Ṽ))."""
  mm_dtype, op = _mm_dtype(q.dtype), _op_dtype(q.dtype)
  reset_f = _zeros_if_none(reset_f, q)
  A, W, U = _prep_pallas(q, k, v, g, beta, reset_f, C=C)
  v_new, ht, hs = _walk_forward(W, U, k, g, reset_f, h0, mm_dtype=mm_dtype, state_dtype=op,
                                vnew_dtype=op)
  o = _output_pallas(q, k, v, g, reset_f, hs, v_new, scale=scale, C=C)
  return o, ht, (A, W, hs, v_new)


def _walks_backward_pallas(q, k, v, g, beta, reset_f, saved, do, dht, *, scale, C):
  """Backward of `_walks_forward_pallas`: dṼ^local, the reverse walk (reads q, k, g and dO in token
  layout, W as stored by the forward), the chunk gradients."""
  A, W, hs, v_new = saved
  mm_dtype = _mm_dtype(q.dtype)
  reset_f = _zeros_if_none(reset_f, q)
  dv_local = _dv_local_pallas(q, k, v, g, reset_f, do, scale=scale, C=C)
  B, Tp, H = v.shape[:3]
  do_walk = do if WALK_BWD_DO_TOKENS else _to_chunks(do, B, Tp // C, C, H)
  dh0, dhs, dv_new = _walk_backward(W, k, q, g, reset_f, do_walk, dv_local, dht, scale=scale,
                                    mm_dtype=mm_dtype, state_dtype=hs.dtype,
                                    dvnew_dtype=dv_local.dtype)
  grads = _grads_pallas(q, k, v, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new, scale=scale, C=C)
  return (*grads, dh0)


def _walks_tiles(q, k, v, g, beta, reset_f, C):
  """[B, Tp, ·, ·] inputs → [B, H, N, C, ·] tiles (q/k repeated over grouped value heads) and the
  within-chunk document index s (None without packed documents)."""
  B, Tp, Hk, _ = q.shape
  H = v.shape[2]
  N = Tp // C
  qh, kh = (jnp.repeat(x, H // Hk, axis=2) if H != Hk else x for x in (q, k))
  tiles = [_to_chunks(x, B, N, C, H) for x in (qh, kh, v, g, beta)]
  seg = None
  if reset_f is not None:
    seg = jnp.cumsum(reset_f.reshape(B, 1, N, C).astype(jnp.int32), axis=-1)
    seg = jnp.broadcast_to(seg, (B, H, N, C))
  return tiles, seg


def _walks_forward(q, k, v, g, beta, reset_f, h0, *, scale, C):
  """Returns (O [B,Tp,H,V] in v's dtype, final state, states before each chunk)."""
  B, Tp, _, _ = q.shape
  H = v.shape[2]
  N = Tp // C
  mm_dtype = _mm_dtype(q.dtype)
  (qt, kt, vt, gt, bt), seg = _walks_tiles(q, k, v, g, beta, reset_f, C)
  ops = xc.chunk_ops(qt, kt, vt, gt, bt, seg, mm_dtype)
  v_new, ht, hs = _walk_forward(ops.W.astype(k.dtype), ops.U, k, g, _zeros_if_none(reset_f, q), h0,
                                mm_dtype=mm_dtype,
                                state_dtype=q.dtype if mm_dtype is not None else jnp.float32)
  o = scale * (ops.decay_in[..., None] * xc.mm('...ck,...kv->...cv', qt, hs, mm_dtype)
               + xc.mm('...ij,...jv->...iv', ops.QK * ops.Gamma, v_new, mm_dtype))
  return _from_chunks(o.astype(v.dtype), B, N, C, H), ht, hs


def _walks_backward(q, k, v, g, beta, reset_f, hs, do, dht, *, scale, C):
  B, Tp, Hk, K = q.shape
  H = v.shape[2]
  N = Tp // C
  mm_dtype = _mm_dtype(q.dtype)
  (qt, kt, vt, gt, bt), seg = _walks_tiles(q, k, v, g, beta, reset_f, C)
  do_t = _to_chunks(do, B, N, C, H)
  ops = xc.chunk_ops(qt, kt, vt, gt, bt, seg, mm_dtype)       # recomputed, parallel over chunks
  dv_local = scale * xc.mm('...ij,...iv->...jv', ops.QK * ops.Gamma, do_t, mm_dtype)
  dh0, dhs, dv_new = _walk_backward(ops.W.astype(k.dtype), k, q, g, _zeros_if_none(reset_f, q),
                                    do if WALK_BWD_DO_TOKENS else do_t, dv_local, dht, scale=scale,
                                    mm_dtype=mm_dtype, state_dtype=hs.dtype)
  grads, _ = xc.chunk_grads(ops, qt, kt, vt, bt, hs.astype(jnp.float32), do_t,
                            dhs.astype(jnp.float32), dv_new, scale, mm_dtype)
  dq, dk, dv, dg, dbeta = (_from_chunks(x, B, N, C, H) for x in grads)
  if H != Hk:  # value heads of one group share their q/k head: sum their gradients
    dq, dk = (x.reshape(B, Tp, Hk, H // Hk, K).sum(3) for x in (dq, dk))
  return dq, dk, dv, dg, dbeta, dh0


# ------------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gdn(q, k, v, g, beta, reset_f, h0, scale, C):
  return _gdn_fwd(q, k, v, g, beta, reset_f, h0, scale, C, store_states=False)[0]


def _gdn_fwd(q, k, v, g, beta, reset_f, h0, scale, C, store_states=True):
  if SCHEDULE == "walks" and _chunk_parallel() == "pallas":
    o, ht, hs = _walks_forward_pallas(q, k, v, g, beta, reset_f, h0, scale=scale, C=C)
  elif SCHEDULE == "walks":
    o, ht, hs = _walks_forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C)
  else:
    reset_f = _zeros_if_none(reset_f, q)
    o, ht, *hs = _forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C,
                          store_states=store_states)
    hs = hs[0] if hs else None
  return (o, ht), (q, k, v, g, beta, reset_f, hs)


def _gdn_bwd(scale, C, res, cts):
  q, k, v, g, beta, reset_f, hs = res
  do, dht = cts
  do = do.astype(v.dtype)
  if SCHEDULE == "walks" and _chunk_parallel() == "pallas":
    dq, dk, dv, dg, dbeta, dh0 = _walks_backward_pallas(q, k, v, g, beta, reset_f, hs, do, dht,
                                                        scale=scale, C=C)
  elif SCHEDULE == "walks":
    dq, dk, dv, dg, dbeta, dh0 = _walks_backward(q, k, v, g, beta, reset_f, hs, do, dht,
                                                 scale=scale, C=C)
  else:
    dh0, dhs = _backward_walk(q, k, v, g, beta, reset_f, do, dht, scale=scale, C=C)
    grads_fn = (_chunk_parallel_grads_pallas if _use_pallas_chunk_bwd(q.shape[3], v.shape[3])
                else _chunk_parallel_grads)
    dq, dk, dv, dg, dbeta = grads_fn(q, k, v, g, beta, reset_f, hs, do, dhs, scale=scale, C=C)
  dreset = None if reset_f is None else jnp.zeros_like(reset_f)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dreset, dh0)


def _zeros_if_none(reset_f, q):
  """The fused kernels always read a [B, Tp] reset array."""
  return jnp.zeros(q.shape[:2], jnp.float32) if reset_f is None else reset_f


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size):
  """The `kernels_pallas.gated_delta_rule_pallas` contract on GPU (interpret mode on CPU).

  q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H] float32; scale: float; h0: [B, H, K, V]
  float32; reset: [B, T] bool or None; chunk_size: power of two in [16, 128].
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
  reset_f = None if reset is None else padded(reset.astype(jnp.float32))
  o, ht = _gdn(q, k, v, g, beta, reset_f, h0.astype(jnp.float32), float(scale), C)
  return o[:, :T], ht
