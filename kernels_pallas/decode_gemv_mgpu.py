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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.decode_gemv import block_k_for, choose_splits

SMEM_BYTES = 200 * 1024    # of the H100's 227 KB per block: W's tiles and x's slice must fit


def _kernel(x_gmem, w_gmem, y_gmem, w_smem, x_smem, w_barriers, x_barriers, *, block_n, block_k,
            tiles, pdl):
  j, s = jax.lax.axis_index("j"), jax.lax.axis_index("s")
  rows = tiles * block_k                                  # this split's rows of W
  if pdl:
    plgpu.griddepcontrol_launch_dependents()
  for t in range(tiles):                                  # W first: no earlier kernel writes it
    plgpu.copy_gmem_to_smem(
        w_gmem.at[pl.ds(s * rows + t * block_k, block_k), pl.ds(j * block_n, block_n)],
        w_smem.at[t], w_barriers.at[t])
  if pdl:
    plgpu.griddepcontrol_wait()
  for t in range(tiles):                                  # TMA boxes: ≤ 256 per dimension
    plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(s * rows + t * block_k, block_k)],
                            x_smem.at[:, pl.ds(t * block_k, block_k)], x_barriers.at[t])
  y = None
  for t in range(tiles):
    plgpu.barrier_wait(x_barriers.at[t])
    plgpu.barrier_wait(w_barriers.at[t])
    w = plgpu.load(w_smem.at[t], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    x = plgpu.load(x_smem.at[0, pl.ds(t * block_k, block_k)],
                   layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
    part = jnp.sum(w * x[:, None], axis=0)                # [BN]
    y = part if y is None else y + part
  y_gmem[s, 0, pl.ds(j * block_n, block_n)] = y


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
  itemsize = jnp.dtype(w_KxN.dtype).itemsize
  smem = tiles * bk * block_n * itemsize + tiles * bk * itemsize
  if smem > SMEM_BYTES:
    raise ValueError(f"{where}: {tiles} W tiles of [{bk}, {block_n}] per program need {smem} "
                     f"bytes of shared memory (> {SMEM_BYTES}); expected more `splits` or a "
                     "smaller `block_n`.")
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
