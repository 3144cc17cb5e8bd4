"""The batch-1 decode GEMVs of `decode_gemv.py` in Pallas Mosaic GPU (Hopper): W's tiles in
flight before the previous kernel has finished.

The Triton GEMV (`decode_gemv.py`) cannot start reading W until its prologue is done, and cannot
start at all until the kernel before it has finished: at batch 1 a step's GEMVs are short, and
the launch, the first loads' latency and the last wave's tail are a large part of each
(experiments/NOTES_decode.md has the measurements, and why loading W early in Triton did not
pay). Mosaic GPU can hold W's tiles in shared memory and can overlap kernels:

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

The kernels, each with its Triton twin's prologue and roundings: `gemv_mgpu` (x as given),
`gemv_norm_mgpu` (the residual add and RMSNorm; the gain is a parameter, loaded before the wait
too), `gemv_gated_norm_mgpu` (W_o's gated output norm) and `gemv_swiglu_mgpu` (the down product
on the gate/up partials). `DecodeConfig(gemv_backend="mosaic")` runs them in the decode step.

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


def _gemv(w_gmem, y_gmem, w_smem, w_barriers, *, block_n, block_k, tiles, pdl, inputs,
          params=None):
  """The program body all the kernels share: W's tiles TMA-loaded into shared memory first (no
  earlier kernel writes W), then `params(s, rows)` (the loads of other parameters, e.g. a
  norm's gain), then griddepcontrol.wait, then `inputs(s, rows)` (after the wait: it reads what
  the previous kernel wrote; returns h_tile(t) → the input's [BK] float32 for W tile t), and
  y_s[j] = Σ_t Σ_k h_t[k] W_t[k, n] written to the partials [S, 1, N]. `s`: the program's K
  split; `rows`: its rows of W."""
  j, s = jax.lax.axis_index("j"), jax.lax.axis_index("s")
  rows = tiles * block_k                                  # this split's rows of W
  if pdl:
    plgpu.griddepcontrol_launch_dependents()
  for t in range(tiles):
    plgpu.copy_gmem_to_smem(
        w_gmem.at[pl.ds(s * rows + t * block_k, block_k), pl.ds(j * block_n, block_n)],
        w_smem.at[t], w_barriers.at[t])
  if params is not None:
    params(s, rows)
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
  """`gemv_norm_mgpu`'s program: the gain's chunks TMA-loaded after W's (a parameter), x's and the
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

  def params(s, rows):      # the gain, all of D
    del s, rows
    for c in range(chunks):
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
        pdl=pdl, inputs=inputs, params=params)


def _check_x_w(where, x, w):
  """ValueError unless x is [1, K] and W [K, N] of one dtype (batch 1)."""
  if x.ndim != 2 or x.shape[0] != 1 or w.ndim != 2 or w.shape[0] != x.shape[1] or (
      x.dtype != w.dtype):
    raise ValueError(f"{where}: x {x.shape} {x.dtype} and W {w.shape} {w.dtype}; expected "
                     "x [1, K] and W [K, N] of one dtype (batch 1).")


def _call(kernel, *, out_type, N, block_n, S, scratch, interpret, name):
  """The Mosaic GPU call of a GEMV program over the grid (N / BN column blocks, S K splits);
  Mosaic GPU's interpreter with `interpret`."""
  return plgpu.kernel(kernel, out_type=out_type, grid=(N // block_n, S),
                      grid_names=("j", "s"), scratch_types=scratch,
                      interpret=plgpu.InterpretGPUParams() if interpret else None,
                      kernel_name=name)


def _launch(where, K, N, block_n, block_k, splits, min_programs, itemsize, extra_smem=0):
  """(K tile, splits, tiles per program) of a [K, N] product; ValueError naming the argument
  for tiles the kernel does not take or shared memory they would overflow (`extra_smem`: the
  inputs' bytes, or a function of (K tile, tiles per program) giving them)."""
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
  extra = extra_smem(bk, tiles) if callable(extra_smem) else extra_smem
  smem = tiles * bk * (block_n + 1) * itemsize + extra           # W's tiles, x's split, inputs
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
  _check_x_w(where, x_1xK, w_KxN)
  K, N = w_KxN.shape
  itemsize = jnp.dtype(w_KxN.dtype).itemsize
  bk, S, tiles = _launch(where, K, N, block_n, block_k, splits, min_programs, itemsize)
  call = _call(
      functools.partial(_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret),
      out_type=jax.ShapeDtypeStruct((S, 1, N), jnp.float32), N=N, block_n=block_n, S=S,
      scratch=[plgpu.SMEM((tiles, bk, block_n), w_KxN.dtype),
              plgpu.SMEM((1, tiles * bk), x_1xK.dtype),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles)],
      interpret=interpret, name="decode_gemv_mgpu")
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
  _check_x_w(where, x_1xD, w_DxN)
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
  call = _call(
      functools.partial(_norm_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret, eps=float(eps),
                        multiplier=float(addend_multiplier), addends=addends, chunk=chunk),
      out_type=(jax.ShapeDtypeStruct((S, 1, N), jnp.float32),
                jax.ShapeDtypeStruct((1, D), x_1xD.dtype)), N=N, block_n=block_n, S=S,
      scratch=scratch, interpret=interpret,
      name="decode_gemv_norm_mgpu")
  operands = (x_1xD,) + ((addends_SxD,) if addends else ()) + (gain_D.reshape(1, D), w_DxN)
  return call(*operands)


def _swiglu_kernel(gate_gmem, up_gmem, w_gmem, y_gmem, w_smem, g_smem, u_smem, w_barriers,
                   g_barriers, u_barriers, *, block_n, block_k, tiles, pdl, F):
  """`gemv_swiglu_mgpu`'s program: per W tile, the gate's and the up product's split partials of
  its rows ([S_in, 1, BK] each, TMA-loaded after the wait), h = rnd(SiLU(rnd(Σ g)) · rnd(Σ u))
  (rnd: to W's dtype)."""
  f32, dt = jnp.float32, w_gmem.dtype
  parts = g_smem.shape[1]

  def inputs(s, rows):
    for t in range(tiles):
      k0 = s * rows + t * block_k
      plgpu.copy_gmem_to_smem(gate_gmem.at[:, :, pl.ds(k0, block_k)], g_smem.at[t],
                              g_barriers.at[t])
      plgpu.copy_gmem_to_smem(up_gmem.at[:, :, pl.ds(F + k0, block_k)], u_smem.at[t],
                              u_barriers.at[t])

    def h_tile(t):
      plgpu.barrier_wait(g_barriers.at[t])
      plgpu.barrier_wait(u_barriers.at[t])
      g = summed_partials(lambda i: _vector(g_smem.at[t, i, 0]), parts, dt)
      u = summed_partials(lambda i: _vector(u_smem.at[t, i, 0]), parts, dt)
      return (jax.nn.silu(g) * u).astype(dt).astype(f32)    # as decode_gemv._swiglu_tile
    return h_tile
  _gemv(w_gmem, y_gmem, w_smem, w_barriers, block_n=block_n, block_k=block_k, tiles=tiles,
        pdl=pdl, inputs=inputs)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "min_programs",
                                             "pdl", "interpret"))
def gemv_swiglu_mgpu(gate_up_SxBx2F, w_FxN, *, block_n: int = 128, block_k: int = 128,
                     splits: int | None = None, min_programs: int = 528, pdl: bool = True,
                     interpret: bool | None = None):
  """`decode_gemv.gemv_swiglu_pallas` as a Mosaic GPU kernel, returning the split partials
  [S, 1, N] float32 of (SiLU(g) ⊙ u) @ W_down, [g | u] = Σ_s gate_up[s] (the gate/up GEMV's
  partials [S_in, 1, 2F] float32, TMA-loaded after griddepcontrol.wait, each W tile's rows of
  both halves), with the Triton kernel's roundings. W [F, N]; tiles, splits and `pdl` as
  `gemv_mgpu`.
  """
  where = "gemv_swiglu_mgpu"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  S_in, B, F2 = gate_up_SxBx2F.shape
  F, N = w_FxN.shape
  if (B != 1 or F2 != 2 * F or not 1 <= S_in <= 256
      or gate_up_SxBx2F.dtype != jnp.float32):
    raise ValueError(f"{where}: gate_up {gate_up_SxBx2F.shape} {gate_up_SxBx2F.dtype} and W "
                     f"{w_FxN.shape}; expected float32 gate_up [S_in, 1, 2·F] (its split "
                     "partials, 1 ≤ S_in ≤ 256; batch 1) and W [F, N].")
  itemsize = jnp.dtype(w_FxN.dtype).itemsize
  bk, S, tiles = _launch(where, F, N, block_n, block_k, splits, min_programs, itemsize,
                         extra_smem=lambda bk, tiles: 2 * tiles * S_in * bk * 4)
  call = _call(
      functools.partial(_swiglu_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret, F=F),
      out_type=jax.ShapeDtypeStruct((S, 1, N), jnp.float32), N=N, block_n=block_n, S=S,
      scratch=[plgpu.SMEM((tiles, bk, block_n), w_FxN.dtype),
              plgpu.SMEM((tiles, S_in, 1, bk), jnp.float32),
              plgpu.SMEM((tiles, S_in, 1, bk), jnp.float32),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles)],
      interpret=interpret, name="decode_gemv_swiglu_mgpu")
  return call(gate_up_SxBx2F, gate_up_SxBx2F, w_FxN)


def _gated_norm_kernel(*refs, block_n, block_k, tiles, pdl, eps, V, gate_column, gate_parts,
                       gate_multiplier, gated, chunk):
  """`gemv_gated_norm_mgpu`'s program: per W tile (inside one head), the head's o (TMA, after
  the wait) for mean(rnd(o)²), the tile's gain columns (with W's: a parameter) and gate
  columns (or their split partials; after the wait), then h as `decode_gemv`'s gated norm."""
  if gated:
    (o_gmem, gate_gmem, gain_gmem, w_gmem, y_gmem, w_smem, o_smem, gate_smem, gain_smem,
     w_barriers, o_barriers, gate_barriers, gain_barriers) = refs
  else:
    (o_gmem, gain_gmem, w_gmem, y_gmem, w_smem, o_smem, gain_smem, w_barriers, o_barriers,
     gain_barriers) = refs
  f32, dt = jnp.float32, w_gmem.dtype
  rnd = lambda a: a.astype(dt).astype(f32)

  def first_rows(s, rows, t):   # (tile t's first row of W_o, the first row of its head)
    k0 = s * rows + t * block_k
    return k0, k0 // V * V

  def params(s, rows):          # the gain's columns of each tile
    for t in range(tiles):
      k0, head = first_rows(s, rows, t)
      plgpu.copy_gmem_to_smem(gain_gmem.at[:, pl.ds(k0 - head, block_k)], gain_smem.at[t],
                              gain_barriers.at[t])

  def inputs(s, rows):
    for t in range(tiles):
      k0, head = first_rows(s, rows, t)
      for c in range(V // chunk):
        plgpu.copy_gmem_to_smem(o_gmem.at[:, pl.ds(head + c * chunk, chunk)],
                                o_smem.at[t, :, pl.ds(c * chunk, chunk)], o_barriers.at[t])
      if gated:
        cols = pl.ds(gate_column + k0, block_k)
        src = gate_gmem.at[:, :, cols] if gate_parts else gate_gmem.at[:, cols]
        plgpu.copy_gmem_to_smem(src, gate_smem.at[t], gate_barriers.at[t])

    def h_tile(t):
      k0, head = first_rows(s, rows, t)
      plgpu.barrier_wait(o_barriers.at[t])
      sum_sq = None
      for i in range(V // block_k):
        o = rnd(_vector(o_smem.at[t, 0, pl.ds(i * block_k, block_k)]))
        part = jnp.sum(o * o)
        sum_sq = part if sum_sq is None else sum_sq + part
      inv_rms = jax.lax.rsqrt(sum_sq / V + eps)
      o = rnd(_vector(o_smem.at[t, 0, pl.ds(k0 - head, block_k)]))
      plgpu.barrier_wait(gain_barriers.at[t])
      h = o * inv_rms * _vector(gain_smem.at[t, 0])
      if gated:
        plgpu.barrier_wait(gate_barriers.at[t])
        if gate_parts:
          gate = summed_partials(lambda i: _vector(gate_smem.at[t, i, 0]), gate_parts, dt,
                                 gate_multiplier)
        else:
          gate = _vector(gate_smem.at[t, 0])
        h = h * jax.nn.silu(gate)
      return rnd(h)
    return h_tile
  _gemv(w_gmem, y_gmem, w_smem, w_barriers, block_n=block_n, block_k=block_k, tiles=tiles,
        pdl=pdl, inputs=inputs, params=params)


@functools.partial(jax.jit, static_argnames=("eps", "head_dim", "gate_column", "gate_multiplier",
                                             "block_n", "block_k", "splits", "min_programs",
                                             "pdl", "interpret"))
def gemv_gated_norm_mgpu(o_1xHV, gate_1xHV, w, gain_V, *, eps: float, head_dim: int,
                         gate_column: int = 0, gate_multiplier: float = 1.0, block_n: int = 128,
                         block_k: int = 128, splits: int | None = None, min_programs: int = 528,
                         pdl: bool = True, interpret: bool | None = None):
  """`decode_gemv.gemv_gated_norm_pallas` (sum_splits=False) as a Mosaic GPU kernel: the split
  partials [S, 1, N] float32 of h @ W_o, h the GDN mixer's gated output norm of the rule's
  output o [1, H·V] float32 (per head: rnd(o) / sqrt(mean(rnd(o)²) + eps) · w · SiLU(g), rounded
  to W_o's dtype), the gate g the columns `gate_column` … of `gate_1xHV` [1, ≥ H·V] (W_o's
  dtype) or of its split partials [S_g, 1, ≥ H·V] float32 (summed with `gate_multiplier` as
  `decode_gemv.summed_partials`), or None (no gate). Every K tile lies inside one head (V =
  `head_dim` a multiple of the K tile); the gate's columns must start on 16 bytes (TMA).
  Tiles, splits and `pdl` as `gemv_mgpu`.
  """
  where = "gemv_gated_norm_mgpu"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if o_1xHV.ndim != 2 or o_1xHV.shape[0] != 1 or o_1xHV.dtype != jnp.float32:
    raise ValueError(f"{where}: `o_1xHV` {o_1xHV.shape} {o_1xHV.dtype}; expected float32 "
                     "[1, H·V] (the rule's output; batch 1).")
  HV = o_1xHV.shape[1]
  if w.ndim != 2 or w.shape[0] != HV:
    raise ValueError(f"{where}: `w` {w.shape}; expected W_o [H·V, N] with H·V = {HV} rows.")
  N = w.shape[1]
  V = head_dim
  if isinstance(V, bool) or not isinstance(V, int) or V < 1 or HV % V:
    raise ValueError(f"{where}: `head_dim`={V!r}; expected the value head dim, dividing {HV}.")
  if gain_V.shape != (V,):
    raise ValueError(f"{where}: `gain_V` {gain_V.shape}; expected the norm's gain [{V}].")
  gate_parts = None if gate_1xHV is None or gate_1xHV.ndim != 3 else gate_1xHV.shape[0]
  if gate_1xHV is not None:
    itemsize = jnp.dtype(gate_1xHV.dtype).itemsize
    if (gate_1xHV.ndim not in (2, 3) or gate_1xHV.shape[-2] != 1
        or gate_1xHV.shape[-1] < gate_column + HV or (gate_column * itemsize) % 16
        or (gate_parts is not None and (gate_1xHV.dtype != jnp.float32 or gate_parts > 256))
        or (gate_parts is None and gate_1xHV.dtype != w.dtype)):
      raise ValueError(f"{where}: `gate_1xHV` {gate_1xHV.shape} {gate_1xHV.dtype} with "
                       f"`gate_column`={gate_column}; expected [1, ≥ {gate_column + HV}] in "
                       f"W_o's dtype {w.dtype}, or its float32 split partials [S_g ≤ 256, 1, "
                       f"≥ {gate_column + HV}], with the gate's first column on 16 bytes; or "
                       "None.")
  itemsize = jnp.dtype(w.dtype).itemsize
  gate_bytes = lambda bk, tiles: 0 if gate_1xHV is None else tiles * bk * (
      4 * gate_parts if gate_parts else itemsize)
  bk, S, tiles = _launch(
      where, HV, N, block_n, block_k, splits, min_programs, itemsize,
      extra_smem=lambda bk, tiles: tiles * (4 * V + bk * jnp.dtype(gain_V.dtype).itemsize)
      + gate_bytes(bk, tiles))
  if V % bk:
    raise ValueError(f"{where}: K tiles of {bk} rows do not divide `head_dim` V={V} (a K tile "
                     f"must lie inside one head); expected block_k ≤ {V & -V}.")
  chunk = math.gcd(V, 256)
  gated = gate_1xHV is not None
  scratch = [plgpu.SMEM((tiles, bk, block_n), w.dtype), plgpu.SMEM((tiles, 1, V), jnp.float32)]
  if gated:
    scratch.append(plgpu.SMEM((tiles, gate_parts, 1, bk) if gate_parts else (tiles, 1, bk),
                              gate_1xHV.dtype))
  scratch += [plgpu.SMEM((tiles, 1, bk), gain_V.dtype),
              plgpu.Barrier(num_arrivals=1, num_barriers=tiles),
              plgpu.Barrier(num_arrivals=V // chunk, num_barriers=tiles)]
  scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=tiles)] * (2 if gated else 1)
  call = _call(
      functools.partial(_gated_norm_kernel, block_n=block_n, block_k=bk, tiles=tiles,
                        pdl=pdl and not interpret, eps=float(eps), V=V, gate_column=gate_column,
                        gate_parts=gate_parts, gate_multiplier=float(gate_multiplier),
                        gated=gated, chunk=chunk),
      out_type=jax.ShapeDtypeStruct((S, 1, N), jnp.float32), N=N, block_n=block_n, S=S,
      scratch=scratch, interpret=interpret,
      name="decode_gemv_gated_norm_mgpu")
  operands = (o_1xHV,) + ((gate_1xHV,) if gated else ()) + (gain_V.reshape(1, V), w)
  return call(*operands)
