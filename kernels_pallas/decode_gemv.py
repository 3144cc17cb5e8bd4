"""A decode step's weight products at small batch as one Pallas (Triton) GEMV each: W read once.

At batch 1 a decode step is a chain of products y = x W (x [B, K], W [K, N] in bf16), each of
which should take the time of reading W. XLA lowers them to reduction fusions (unpadded) or to
GEMMs on 8 padded rows with split-K and a separate reduction kernel plus a padding kernel
(experiments/NOTES_decode.md, the B1 profiles). This kernel reads W in [BK, BN] tiles and keeps
the B ≤ 8 rows of x in registers:

    program (j, s):   y_s[b, n] = Σ_{k ∈ K-split s} x[b, k] W[k, n],   n ∈ column block j
    y = Σ_s y_s                                                  (float32; XLA sums the splits)

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

MAX_ROWS = 8   # rows of x kept in registers; larger batches are GEMMs (generate's matmul_rows)


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


def _kernel(x_ref, w_ref, y_ref, *, rows, n, block_n, block_k, tiles, transposed):
  """x_ref: [B, Ks] (`transposed`) or [Ks, B]; w_ref: [BN, Ks] or [Ks, BN]; y_ref: [B, BN]."""
  f32 = jnp.float32
  cols = pl.program_id(0) * block_n + jnp.arange(block_n)
  valid = cols < n

  def body(i, acc):
    ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    if transposed:   # rows of the W block are output columns
      w = plt.load(w_ref.at[:, ks], mask=valid[:, None], other=0).astype(f32)     # [BN, BK]
      return tuple(a + jnp.sum(w * x_ref[pl.ds(b, 1), ks].astype(f32), axis=1)
                   for b, a in enumerate(acc))
    w = plt.load(w_ref.at[ks, :], mask=valid[None, :], other=0).astype(f32)       # [BK, BN]
    return tuple(a + jnp.sum(w * x_ref[ks, pl.ds(b, 1)].astype(f32), axis=0)
                 for b, a in enumerate(acc))

  acc = jax.lax.fori_loop(0, tiles, body,
                          tuple(jnp.zeros((block_n,), f32) for _ in range(rows)))
  for b in range(rows):
    plt.store(y_ref.at[pl.ds(b, 1), :], acc[b][None, :], mask=valid[None, :])


@functools.partial(jax.jit, static_argnames=("transposed", "block_n", "block_k", "splits",
                                             "min_programs", "num_warps", "interpret"))
def gemv_pallas(x_BxK, w, *, transposed: bool = False, block_n: int = 64, block_k: int = 128,
                splits: int | None = None, min_programs: int = 256, num_warps: int = 4,
                interpret: bool | None = None):
  """x @ W (W [K, N]) or x @ Wᵀ (`transposed`, W [N, K]) in float32, for B ≤ `MAX_ROWS` rows.

  `block_n` columns and `block_k` rows of W per tile (powers of two; block_k is lowered to the
  largest power of two dividing K); `splits`: K splits (None: the fewest giving ≥ `min_programs`
  programs, `choose_splits`).
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
  for name, value in (("block_n", block_n), ("block_k", block_k)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"gemv_pallas: `{name}`={value}; expected a power of two (Triton blocks).")
  bk = block_k_for(K, block_k)
  if not interpret and bk < 16:
    raise ValueError(f"gemv_pallas: K={K} has no power-of-two factor ≥ 16 for the K tile; "
                     "expected K divisible by 16, or the XLA product.")
  tiles = K // bk
  S = splits or choose_splits(K, N, block_n, bk, min_programs)
  if tiles % S:
    raise ValueError(f"gemv_pallas: `splits`={S} does not divide the {tiles} K tiles of {bk}; "
                     "expected a divisor (or None).")
  Ks = K // S
  w_block = (block_n, Ks) if transposed else (Ks, block_n)
  w_index = (lambda j, s: (j, s)) if transposed else (lambda j, s: (s, j))
  y = pl.pallas_call(
      functools.partial(_kernel, rows=B, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=transposed),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=[pl.BlockSpec((B, Ks), lambda j, s: (0, s)) if transposed
                else pl.BlockSpec((Ks, B), lambda j, s: (s, 0)),
                pl.BlockSpec(w_block, w_index)],
      out_specs=pl.BlockSpec((None, B, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((S, B, N), jnp.float32),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
      name="decode_gemv",
  )(x_BxK if transposed else x_BxK.T, w)
  return y[0] if S == 1 else jnp.sum(y, axis=0)
