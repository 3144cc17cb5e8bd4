"""Shapes, dtypes and BlockSpecs shared by the chunk-parallel GPU kernels (prep, output, gradients).

Two layouts meet here: the token layout of the inputs and outputs, [B, Tp, H, ·] (Tp = N·C), read and
written in place through the index maps (no XLA transposes), and per-chunk tiles [B, H, N, C, ·] and
states [B, H, N, K, V] of what the kernels hand each other (A, W, U, Ṽ, dṼ^local, dṼ, h_r, dh_{r+1}).

Grid order: Triton launches grid axis 0 fastest (CUDA's x), so a grid whose programs share their
inputs puts the sharing axis first: the key gradients' K-blocks here, the walks' V-blocks in
`walks.py`. Launched side by side, they share those reads through L2 instead of each fetching them
from HBM in another wave (B16 T4096: fwd+bwd 8.93 → 8.47 ms, `_v8_k128`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas import chunk_math as cm


def op_dtype(dtype):
  """Stored intermediates (A, W, U, Ṽ, h_r, dṼ, dh): bf16 for bf16 inputs (as fla), else float32."""
  return dtype if cm.mm_dtype_for(dtype) is not None else jnp.float32


def per_chunk(v, C, *tail, dtype):
  """Shape of a per-chunk array [B, H, N, *tail] (N = Tp / C) for a chunk-parallel kernel's output."""
  B, Tp, H = v.shape[:3]
  return jax.ShapeDtypeStruct((B, H, Tp // C, *tail), dtype)


def compiler_params(num_warps: int, num_stages: int = 1):
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def column_blocks(width: int, block: int):
  """Static slices of `block` columns covering `width` (a kernel's unrolled column loop)."""
  BV = min(width, block)
  return [pl.ds(j * BV, BV) for j in range(width // BV)]


def zeros_if_none(reset_f, q):
  """The kernels always read a [B, Tp] float32 reset array (zeros: no packed documents)."""
  return jnp.zeros(q.shape[:2], jnp.float32) if reset_f is None else reset_f


class ChunkSpecs(NamedTuple):
  """BlockSpecs of a chunk-parallel kernel: one program per chunk n of value head h of batch row b."""
  qk: pl.BlockSpec       # q or k rows [C, K] in token layout, from q/k head h // G
  v: pl.BlockSpec        # v, O, dO or dv rows [C, V] in token layout
  gate: pl.BlockSpec     # g, β (or dg, dβ) [C]
  reset: pl.BlockSpec    # reset flags [C]
  tile_c: pl.BlockSpec   # a [C, C] tile of a per-chunk [B, H, N, C, C] array: A
  tile_k: pl.BlockSpec   # a [C, K] tile: W
  tile_v: pl.BlockSpec   # a [C, V] tile: U, Ṽ, dṼ^local, dṼ
  state: pl.BlockSpec    # the chunk's [K, V] state of a [B, H, N, K, V] array: h_r, dh_{r+1}
  dqk: pl.BlockSpec      # dq or dk rows [C, K] of value head h (summed over a q/k group afterwards)


def chunk_specs(q, v, C: int, *, k_split: bool = False) -> ChunkSpecs:
  """The `ChunkSpecs` of grid (B, H, N), or with `k_split` of grid (K/BK, B, H, N): the key
  gradients' K-blocks first (see the module docstring), every one reading the same blocks."""
  K, V, G = q.shape[3], v.shape[3], v.shape[2] // q.shape[2]

  def spec(block_shape, index_map):
    if k_split:
      return pl.BlockSpec(block_shape, lambda kb, b, h, n: index_map(b, h, n))
    return pl.BlockSpec(block_shape, index_map)

  tile = lambda d: spec((None, None, None, C, d), lambda b, h, n: (b, h, n, 0, 0))
  return ChunkSpecs(
      qk=spec((None, C, None, K), lambda b, h, n: (b, n, h // G, 0)),
      v=spec((None, C, None, V), lambda b, h, n: (b, n, h, 0)),
      gate=spec((None, C, None), lambda b, h, n: (b, n, h)),
      reset=spec((None, C), lambda b, h, n: (b, n)),
      tile_c=tile(C), tile_k=tile(K), tile_v=tile(V),
      state=spec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0)),
      dqk=spec((None, C, None, K), lambda b, h, n: (b, n, h, 0)))


def chunk_call(kernel, v, C: int, *, in_specs, out_specs, out_shape, name: str, num_warps: int,
               interpret: bool, k_blocks: int | None = None):
  """`pl.pallas_call` of a chunk-parallel kernel over grid (B, H, N), or (k_blocks, B, H, N)."""
  B, Tp, H = v.shape[:3]
  grid = (B, H, Tp // C) if k_blocks is None else (k_blocks, B, H, Tp // C)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=interpret,
                        compiler_params=compiler_params(num_warps), name=name)
