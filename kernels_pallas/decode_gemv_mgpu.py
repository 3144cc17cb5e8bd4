"""A batch-1 decode GEMV in Pallas Mosaic GPU (Hopper): W's tiles in flight before the previous
kernel has finished.

The Triton GEMV (`decode_gemv.py`) cannot start reading W until its prologue is done, and cannot
start at all until the kernel before it has finished: at batch 1 each of a step's ~105 GEMVs is
5–10 µs, of which the launch, the first loads' latency and the last wave's tail are a large part
(experiments/NOTES_decode.md: the GEMVs run at 1.3–1.8 TB/s against a copy bandwidth of ~2.2–2.4
on an H100). Loading the first W tile early in Triton kept it in registers and lost occupancy
(session 32). Mosaic GPU can hold it in shared memory and can overlap kernels:

    program (j, s):   griddepcontrol.launch_dependents     (the next kernel may launch now)
                      TMA: W[K-split s, column block j] → SMEM, T tiles [BK, BN], one barrier each
                      griddepcontrol.wait                  (the previous kernel's outputs are ready)
                      TMA: x[K-split s] → SMEM
                      y_s[j] = Σ_t Σ_k x[k] W_t[k, n]      (float32, tile by tile as they land)

W does not depend on any earlier kernel, so its loads are issued before the wait: with
programmatic dependent launch (PDL: the kernel is launched with programmatic stream
serialisation, `pdl=True`) they overlap the previous kernel's tail and the launch. The product is
a column sum of W_t ⊙ x over the tile's rows in registers (a warpgroup's WGMMA layout; x in its
row-reduced layout), no tensor cores: at batch 1 the work is W's bytes.

Output: the K splits' partials [S, 1, N] float32, as `decode_gemv.gemv_pallas(...,
sum_splits=False)`. N must be a multiple of BN and K of the split's rows (no masks); W's T tiles
per program must fit shared memory. On CPU the kernel runs in Mosaic GPU's interpreter (without
the PDL instructions, which it does not model; they change no values).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.decode_gemv import block_k_for, choose_splits, summed_partials

SMEM_BYTES = 200 * 1024    # of the H100's 227 KB per block: W's tiles and x's slice must fit


def _vector(ref):
  """A [BK] slice of a shared-memory ref as float32, in the layout of W tiles' rows."""
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)


def _gemv(w_gmem, y_gmem, w_smem, w_barriers, *, block_n, block_k, tiles, pdl, inputs):
  """The program body both kernels share: W's tiles TMA-loaded into shared memory first (no
  earlier kernel writes W), then griddepcontrol.wait, then `inputs(s, rows)` (after the wait:
  it reads what the previous kernel wrote; returns h_tile(t) → the input's [BK] float32 for W
  tile t), and y_s[j] = Σ_t Σ_k h_t[k] W_t[k, n] written to the partials [S, 1, N]."""
  j, s = jax.lax.axis_index("j"), jax.lax.axis_index("s")
  rows = tiles * block_k                                  # this split's rows of W
  if pdl:
    plgpu.griddepcontrol_launch_dependents()
  for t in range(tiles):
    plgpu.copy_gmem_to_smem(
        w_gmem.at[pl.ds(s * rows + t * block_k, block_k), pl.ds(j * block_n, block_n)],
        w_smem.at[t], w_barriers.at[t])
  if pdl:
    plgpu.griddepcontrol_wait()
  h_tile = inputs(s, rows)
  y = None
  for t in range(tiles):
    h = h_tile(t)
    plgpu.barrier_wait(w_barriers.at[t])
    part = jnp.sum(plgpu.load(w_smem.at[t], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                   * h[:, None], axis=0)                  # [BN]
    y = part if y is None else y + part
  y_gmem[s, 0, pl.ds(j * block_n, block_n)] = y


def _kernel(x_gmem, w_gmem, y_gmem, w_smem, x_smem, w_barriers, x_barriers, *, block_n, block_k,
            tiles, pdl):
  def inputs(s, rows):      # x's slice of this split, one TMA box per W tile
    for t in range(tiles):
      plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(s * rows + t * block_k, block_k)],
                              x_smem.at[:, pl.ds(t * block_k, block_k)], x_barriers.at[t])

    def h_tile(t):
      plgpu.barrier_wait(x_barriers.at[t])
      return _vector(x_smem.at[0, pl.ds(t * block_k, block_k)])
    return h_tile
  _gemv(w_gmem, y_gmem, w_smem, w_barriers, block_n=block_n, block_k=block_k, tiles=tiles,
        pdl=pdl, inputs=inputs)


def _norm_kernel(*refs, block_n, block_k, tiles, pdl, eps, multiplier, addends, chunk):
  """`gemv_norm_mgpu`'s program: the gain's chunks TMA-loaded with W's (a parameter), x's and the
  addends' after the wait; r = rnd(x + rnd(m · rnd(Σ_i a_i))) and mean(r²) over all of D in
  [BK] slices (program (0, 0) writes r), then h = rnd(r · rsqrt(mean(r²) + eps) · w) for the
  split's tiles. `chunk`: the TMA box of the whole-D inputs (≤ 256 columns, a multiple of
  BK)."""
  if addends:
    (x_gmem, add_gmem, gain_gmem, w_gmem, y_gmem, r_gmem, w_smem, x_smem, add_smem, gain_smem,
     w_barriers, gain_barriers, x_barriers, add_barriers) = refs
  else:
    (x_gmem, gain_gmem, w_gmem, y_gmem, r_gmem, w_smem, x_smem, gain_smem, w_barriers,
     gain_barriers, x_barriers) = refs
  D = x_gmem.shape[1]
  chunks = D // chunk
  f32, dt = jnp.float32, x_gmem.dtype
  for c in range(chunks):                                 # the gain: a parameter, early
    box = (slice(None), pl.ds(c * chunk, chunk))
    plgpu.copy_gmem_to_smem(gain_gmem.at[box], gain_smem.at[box], gain_barriers.at[c])

  def inputs(s, rows):
    for c in range(chunks):
      box = (slice(None), pl.ds(c * chunk, chunk))
      plgpu.copy_gmem_to_smem(x_gmem.at[box], x_smem.at[box], x_barriers.at[c])
      if addends:          # shared memory [chunks, S_a, 1, chunk]: each box contiguous
        plgpu.copy_gmem_to_smem(add_gmem.at[:, :, pl.ds(c * chunk, chunk)], add_smem.at[c],
                                add_barriers.at[c])
    for c in range(chunks):
      plgpu.barrier_wait(x_barriers.at[c])
      plgpu.barrier_wait(gain_barriers.at[c])
      if addends:
        plgpu.barrier_wait(add_barriers.at[c])

    def residual(k0):      # r on rows k0 … k0 + BK − 1, float32 (rounded to x's dtype)
      r = _vector(x_smem.at[0, pl.ds(k0, block_k)])
      if not addends:
        return r
      c, off = k0 // chunk, k0 % chunk                    # block_k divides chunk
      a = summed_partials(lambda i: _vector(add_smem.at[c, i, 0, pl.ds(off, block_k)]),
                          add_smem.shape[1], dt, multiplier)
      return (r + a).astype(dt).astype(f32)

    writer = (jax.lax.axis_index("j") == 0) & (s == 0)
    sum_sq = None
    for i in range(D // block_k):
      r = residual(i * block_k)
      part = jnp.sum(r * r)
      sum_sq = part if sum_sq is None else sum_sq + part

      @pl.when(writer)
      def _(r=r, i=i):
        r_gmem[0, pl.ds(i * block_k, block_k)] = r.astype(dt)
    inv_rms = jax.lax.rsqrt(sum_sq / D + eps)

    def h_tile(t):
      k0 = s * rows + t * block_k
      h = residual(k0) * inv_rms * _vector(gain_smem.at[0, pl.ds(k0, block_k)])
      return h.astype(w_gmem.dtype).astype(f32)
    return h_tile
  _gemv(w_gmem, y_gmem, w_smem, w_barriers, block_n=block_n, block_k=block_k, tiles=tiles,
        pdl=pdl, inputs=inputs)


def _launch(where, K, N, block_n, block_k, splits, min_programs, itemsize, extra_smem=0):
  """(K tile, splits, tiles per program) of a [K, N] product; ValueError naming the argument
  for tiles the kernel does not take or shared memory they would overflow."""
  for name, value, least in (("block_n", block_n, 64), ("block_k", block_k, 16)):
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 256 or (
        value & (value - 1)):
      raise ValueError(f"{where}: `{name}`={value!r}; expected a power of two in [{least}, 256] "
                       "(a warpgroup's tile; a TMA box takes ≤ 256 elements per dimension).")
  if N % block_n:
    raise ValueError(f"{where}: W has N={N} columns, not a multiple of `block_n`={block_n}; "
                     "expected N divisible by block_n (no masked tiles), e.g. W padded with zero "
                     "columns.")
  bk = block_k_for(K, block_k)
  if bk < 64:
    raise ValueError(f"{where}: K={K} gives K tiles of {bk} rows; expected K with a power-of-two "
                     "factor ≥ 64 (the WGMMA layout's rows).")
  tiles_total = K // bk
  S = splits or choose_splits(K, N, block_n, bk, min_programs)
  if S < 1 or tiles_total % S:
    raise ValueError(f"{where}: `splits`={S} does not divide the {tiles_total} K tiles of {bk}; "
                     "expected a divisor (or None).")
  tiles = tiles_total // S
  smem = tiles * bk * (block_n + 1) * itemsize + extra_smem      # W's tiles, x's split
  if smem > SMEM_BYTES:
    raise ValueError(f"{where}: {tiles} W tiles of [{bk}, {block_n}] per program and the inputs "
                     f"need {smem} bytes of shared memory (> {SMEM_BYTES}); expected more "
                     "`splits`, a smaller `block_n` or fewer addends.")
  return bk, S, tiles


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "min_programs",
                                             "pdl", "interpret"))
def gemv_mgpu(x_1xK, w_KxN, *, block_n: int = 128, block_k: int = 128, splits: int | None = None,
              min_programs: int = 528, pdl: bool = True, interpret: bool | None = None):
  """The split partials [S, 1, N] float32 of x @ W at batch 1 (x [1, K], W [K, N], one dtype).

  `block_n` columns and `block_k` rows per W tile (powers of two in [64, 256] and [16, 256] (TMA
  boxes); block_k lowered
  to the largest power of two dividing K, as `decode_gemv`); `splits`: K splits (None: the
  fewest giving ≥ `min_programs` programs, `decode_gemv.choose_splits`); `pdl`: launch with
  programmatic dependent launch (W's loads before `griddepcontrol.wait`). ValueError naming the
  argument for shapes the kernel does not take.
  """
  where = "gemv_mgpu"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if x_1xK.ndim != 2 or x_1xK.shape[0] != 1 or w_KxN.ndim != 2 or (
      w_KxN.shape[0] != x_1xK.shape[1]) or x_1xK.dtype != w_KxN.dtype:
    raise ValueError(f"{where}: x {x_1xK.shape} {x_1xK.dtype} and W {w_KxN.shape} "
                     f"{w_KxN.dtype}; expected x [1, K] and W [K, N] of one dtype (batch 1).")
  K, N = w_KxN.shape
  itemsize = jnp.dtype(w_KxN.dtype).itemsize
  bk, S, tiles = _launch(where, K, N, block_n, block_k, splits, min_programs, itemsize)
  call = plgpu.kernel(
      functools.partial(_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret),
      out_type=jax.ShapeDtypeStruct((S, 1, N), jnp.float32),
      grid=(N // block_n, S), grid_names=("j", "s"),
      scratch_types=[plgpu.SMEM((tiles, bk, block_n), w_KxN.dtype),
                     plgpu.SMEM((1, tiles * bk), x_1xK.dtype),
                     plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
                     plgpu.Barrier(num_arrivals=1, num_barriers=tiles)],
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="decode_gemv_mgpu")
  return call(x_1xK, w_KxN)


@functools.partial(jax.jit, static_argnames=("eps", "addend_multiplier", "block_n", "block_k",
                                             "splits", "min_programs", "pdl", "interpret"))
def gemv_norm_mgpu(x_1xD, w_DxN, gain_D, addends_SxD=None, *, eps: float,
                   addend_multiplier: float = 1.0, block_n: int = 128, block_k: int = 128,
                   splits: int | None = None, min_programs: int = 528, pdl: bool = True,
                   interpret: bool | None = None):
  """`decode_gemv.gemv_norm_pallas` (batch 1, sum_splits=False) as a Mosaic GPU kernel:
  (the split partials [S, 1, N] float32 of h @ W, r [1, D]) with r = x + rnd(m · Σ addends)
  the new residual stream (x's dtype; program (0, 0) writes it) and h = rnd(RMSNorm(r) · gain)
  (W's dtype), the same roundings. W's tiles and the gain (parameters) are TMA-loaded before
  griddepcontrol.wait, x and the addends [S_a, 1, D] float32 after it, in TMA boxes of
  gcd(D, 256) columns; tiles, splits and `pdl` as `gemv_mgpu`.
  """
  where = "gemv_norm_mgpu"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if x_1xD.ndim != 2 or x_1xD.shape[0] != 1 or w_DxN.ndim != 2 or (
      w_DxN.shape[0] != x_1xD.shape[1]) or x_1xD.dtype != w_DxN.dtype:
    raise ValueError(f"{where}: x {x_1xD.shape} {x_1xD.dtype} and W {w_DxN.shape} "
                     f"{w_DxN.dtype}; expected x [1, D] and W [D, N] of one dtype (batch 1).")
  D, N = w_DxN.shape
  if gain_D.shape != (D,):
    raise ValueError(f"{where}: `gain_D` {gain_D.shape}; expected the norm's gain [{D}].")
  if addends_SxD is not None and (addends_SxD.ndim != 3 or addends_SxD.shape[1:] != (1, D)
                                  or not 1 <= addends_SxD.shape[0] <= 256
                                  or addends_SxD.dtype != jnp.float32):
    raise ValueError(f"{where}: `addends_SxD` {addends_SxD.shape} {addends_SxD.dtype}; expected "
                     f"float32 [S_a, 1, {D}] with 1 ≤ S_a ≤ 256 (a GEMV's split partials), or "
                     "None.")
  itemsize = jnp.dtype(w_DxN.dtype).itemsize
  inputs_smem = D * (itemsize + jnp.dtype(gain_D.dtype).itemsize) + (
      0 if addends_SxD is None else addends_SxD.size * 4)
  bk, S, tiles = _launch(where, D, N, block_n, block_k, splits, min_programs, itemsize,
                         extra_smem=inputs_smem)
  # The inputs' TMA boxes: ≤ 256 columns; a multiple of the K tile, both being D's power-of-two
  # factor capped (at 256 and at block_k ≤ 256).
  chunk = math.gcd(D, 256)
  chunks = D // chunk
  addends = addends_SxD is not None
  scratch = [plgpu.SMEM((tiles, bk, block_n), w_DxN.dtype), plgpu.SMEM((1, D), x_1xD.dtype)]
  if addends:
    scratch.append(plgpu.SMEM((chunks,) + addends_SxD.shape[:2] + (chunk,), jnp.float32))
  scratch += [plgpu.SMEM((1, D), gain_D.dtype),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles)]
  scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=chunks)] * (3 if addends else 2)
  call = plgpu.kernel(
      functools.partial(_norm_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret, eps=float(eps),
                        multiplier=float(addend_multiplier), addends=addends, chunk=chunk),
      out_type=(jax.ShapeDtypeStruct((S, 1, N), jnp.float32),
                jax.ShapeDtypeStruct((1, D), x_1xD.dtype)),
      grid=(N // block_n, S), grid_names=("j", "s"),
      scratch_types=scratch,
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="decode_gemv_norm_mgpu")
  operands = (x_1xD,) + ((addends_SxD,) if addends else ()) + (gain_D.reshape(1, D), w_DxN)
  return call(*operands)
