"""A decode step's weight products at small batch as one Pallas (Triton) GEMV each: W read once.

At batch 1 a decode step is a chain of products y = x W (x [B, K], W [K, N] in bf16), each of
which should take the time of reading W. XLA lowers them to reduction fusions (unpadded) or to
GEMMs on 8 padded rows with split-K and a separate reduction kernel plus a padding kernel
(experiments/NOTES_decode.md, the B1 profiles). This kernel reads W in [BK, BN] tiles:

    program (j, s):   y_s[b, n] = Σ_{k ∈ K-split s} x[b, k] W[k, n],   n ∈ column block j
    y = Σ_s y_s                                                  (float32; XLA sums the splits)

Two inner loops, by batch:
- B = 1: a [BK, BN] float32 accumulator takes x[k] W[k, n] element by element and is summed
  over k once, after the last tile (no reduction across warps inside the loop);
- 2 ≤ B ≤ 8: x is padded to 16 rows (the smallest tensor-core tile) and each tile is one
  product of [16, BK] × [BK, BN] into a [16, BN] float32 accumulator.
(What an earlier version did instead, and its timings: experiments/NOTES_decode.md.)

The S splits of K give enough programs when N / BN alone would leave SMs idle (the MLP's down
product: N = 1024); their sum is left to XLA, which can fuse it into the consumer's elementwise
kernel. `transposed=True` takes W as [N, K] (a tied read-out, h Eᵀ, without a transpose). Columns
past N (N need not divide by BN) are masked. On CPU the kernel runs in interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas.config import GEMV_MAX_ROWS as MAX_ROWS   # larger batches: GEMMs
DOT_ROWS = 16   # batches 2 … MAX_ROWS are padded to this many rows for the tensor cores


def block_k_for(K: int, block_k: int) -> int:
  """The K tile: the largest power of two ≤ `block_k` dividing K (K 2816, block_k 512 → 256)."""
  return min(block_k, K & -K)


def choose_splits(K: int, N: int, block_n: int, block_k: int, min_programs: int) -> int:
  """The fewest K splits (each a whole number of K tiles) that give ≥ `min_programs` programs,
  or as many as the K tiles allow."""
  tiles = K // block_k
  col_blocks = pl.cdiv(N, block_n)
  for s in range(1, tiles + 1):
    if tiles % s == 0 and col_blocks * s >= min_programs:
      return s
  return tiles


def _tiling(where, K, N, block_n, block_k, splits, min_programs, interpret):
  """(K tile, K splits, K per split) of a product with K rows of W and N columns; ValueError
  naming the setting that does not fit."""
  for name, value in (("block_n", block_n), ("block_k", block_k)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{where}: `{name}`={value}; expected a power of two (Triton blocks).")
  bk = block_k_for(K, block_k)
  if not interpret and bk < 16:
    raise ValueError(f"{where}: K={K} has no power-of-two factor ≥ 16 for the K tile; "
                     "expected K divisible by 16, or the XLA product.")
  tiles = K // bk
  S = splits or choose_splits(K, N, block_n, bk, min_programs)
  if tiles % S:
    raise ValueError(f"{where}: `splits`={S} does not divide the {tiles} K tiles of {bk}; "
                     "expected a divisor (or None).")
  return bk, S, K // S


def _swiglu_tile(gate_ref, up_ref, ks, dtype):
  """[1, BK] float32: SiLU(g) · u of the K tile `ks`, g and u the sums of their split partials
  ([S_in, 1, Ks] blocks), each rounded to `dtype` as the unfused step's products and the
  product's input are."""
  f32 = jnp.float32
  rnd = lambda a: a.astype(dtype).astype(f32)
  g = sum(gate_ref[i, :, ks].astype(f32) for i in range(gate_ref.shape[0]))
  u = sum(up_ref[i, :, ks].astype(f32) for i in range(up_ref.shape[0]))
  return rnd(jax.nn.silu(rnd(g)) * rnd(u))


def _kernel(*refs, n, block_n, block_k, tiles, transposed, swiglu_dtype=None):
  """x_ref: [R, Ks] (R = 1 or 16 padded rows), or (`swiglu_dtype`) gate and up partials
  [S_in, 1, Ks] each; w_ref: [BN, Ks] (`transposed`) or [Ks, BN]; y_ref: [R, BN]."""
  f32 = jnp.float32
  if swiglu_dtype is not None:
    gate_ref, up_ref, w_ref, y_ref = refs
    rows = 1
  else:
    x_ref, w_ref, y_ref = refs
    rows = x_ref.shape[0]
  cols = pl.program_id(0) * block_n + jnp.arange(block_n)
  valid = cols < n

  def w_tile(ks):
    if transposed:   # rows of the W block are output columns
      return plt.load(w_ref.at[:, ks], mask=valid[:, None], other=0)      # [BN, BK]
    return plt.load(w_ref.at[ks, :], mask=valid[None, :], other=0)        # [BK, BN]

  def k_slice(i):
    return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

  if rows == 1:
    def body(i, acc):
      ks = k_slice(i)
      x = (_swiglu_tile(gate_ref, up_ref, ks, swiglu_dtype) if swiglu_dtype is not None
           else x_ref[:, ks].astype(f32))                                  # [1, BK]
      w = w_tile(ks).astype(f32)
      return acc + (w * x if transposed else w * x.reshape(block_k, 1))
    shape = (block_n, block_k) if transposed else (block_k, block_n)
    acc = jax.lax.fori_loop(0, tiles, body, jnp.zeros(shape, f32))
    y = jnp.sum(acc, axis=1 if transposed else 0)[None, :]                 # [1, BN]
  else:
    # float32 weights: IEEE products, as the B = 1 loop (Triton's default would be TF32).
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == f32 else None
    dims = (((1,), (1 if transposed else 0,)), ((), ()))

    def body(i, acc):
      ks = k_slice(i)
      return acc + jax.lax.dot_general(x_ref[:, ks], w_tile(ks), dims, precision=precision,
                                       preferred_element_type=f32)          # [16, BN]
    y = jax.lax.fori_loop(0, tiles, body, jnp.zeros((rows, block_n), f32))
  plt.store(y_ref.at[:, :], y, mask=valid[None, :])


@functools.partial(jax.jit, static_argnames=("transposed", "block_n", "block_k", "splits",
                                             "min_programs", "num_warps", "sum_splits",
                                             "interpret"))
def gemv_pallas(x_BxK, w, *, transposed: bool = False, block_n: int = 64, block_k: int = 128,
                splits: int | None = None, min_programs: int = 256, num_warps: int = 4,
                sum_splits: bool = True, interpret: bool | None = None):
  """x @ W (W [K, N]) or x @ Wᵀ (`transposed`, W [N, K]) in float32, for B ≤ `MAX_ROWS` rows.

  `block_n` columns and `block_k` rows of W per tile (powers of two; block_k is lowered to the
  largest power of two dividing K); `splits`: K splits (None: the fewest giving ≥ `min_programs`
  programs, `choose_splits`). `sum_splits=False` returns the splits' partial products
  [S, B, N] unsummed (`gemv_swiglu_pallas` sums them as it reads them).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  B, K = x_BxK.shape
  N, Kw = (w.shape if transposed else w.shape[::-1])
  if Kw != K:
    raise ValueError(f"gemv_pallas: x has K={K} columns but `w` {w.shape} "
                     f"({'[N, K]' if transposed else '[K, N]'}) has K={Kw}; expected equal.")
  if not 1 <= B <= MAX_ROWS:
    raise ValueError(f"gemv_pallas: batch {B}; expected 1 … {MAX_ROWS} (larger batches are "
                     "GEMMs: layers.decode_dot without the GEMV).")
  bk, S, Ks = _tiling("gemv_pallas", K, N, block_n, block_k, splits, min_programs, interpret)
  R = 1 if B == 1 else DOT_ROWS
  x = x_BxK if R == B else jnp.pad(x_BxK, ((0, R - B), (0, 0)))
  w_block = (block_n, Ks) if transposed else (Ks, block_n)
  w_index = (lambda j, s: (j, s)) if transposed else (lambda j, s: (s, j))
  y = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=transposed),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=[pl.BlockSpec((R, Ks), lambda j, s: (0, s)), pl.BlockSpec(w_block, w_index)],
      out_specs=pl.BlockSpec((None, R, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((S, R, N), jnp.float32),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      name="decode_gemv",
  )(x.astype(w.dtype), w)
  if not sum_splits:
    return y[:, :B]
  y = y[0] if S == 1 else jnp.sum(y, axis=0)
  return y[:B]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "min_programs",
                                             "num_warps", "interpret"))
def gemv_swiglu_pallas(gate_up_SxBx2F, w_FxN, *, block_n: int = 64, block_k: int = 128,
                       splits: int | None = None, min_programs: int = 256, num_warps: int = 4,
                       interpret: bool | None = None):
  """(SiLU(g) ⊙ u) @ W_down in float32 at batch 1, where [g | u] = Σ_s gate_up[s] (the MLP's
  gate and up products, e.g. `gemv_pallas(..., sum_splits=False)`'s partials [S_in, 1, 2F]):
  the split sum, SiLU and product are made as the tiles are read, so no kernel runs between the
  two products. g, u and the SiLU product are rounded to W's dtype, as the unfused step's are.
  S_in must be a power of two (Triton blocks); W: [F, N]. The tiles and splits as `gemv_pallas`.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  S_in, B, F2 = gate_up_SxBx2F.shape
  F, N = w_FxN.shape
  if B != 1 or F2 != 2 * F or S_in & (S_in - 1):
    raise ValueError(f"gemv_swiglu_pallas: gate_up {gate_up_SxBx2F.shape} and W {w_FxN.shape}; "
                     "expected gate_up [S_in, 1, 2·F] with S_in a power of two (its split "
                     "partials; batch 1) and W [F, N].")
  bk, S, Ks = _tiling("gemv_swiglu_pallas", F, N, block_n, block_k, splits, min_programs,
                      interpret)
  y = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=False, swiglu_dtype=w_FxN.dtype),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=[pl.BlockSpec((S_in, 1, Ks), lambda j, s: (0, 0, s)),
                pl.BlockSpec((S_in, 1, Ks), lambda j, s: (0, 0, S + s)),
                pl.BlockSpec((Ks, block_n), lambda j, s: (s, j))],
      out_specs=pl.BlockSpec((None, 1, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((S, 1, N), jnp.float32),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      name="decode_gemv_swiglu",
  )(gate_up_SxBx2F, gate_up_SxBx2F, w_FxN)
  return y[0] if S == 1 else jnp.sum(y, axis=0)
