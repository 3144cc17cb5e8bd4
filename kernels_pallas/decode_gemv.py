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
kernel, or to the consumer kernel (`summed_partials`: the next GEMV's prologue, the fused rule
kernel), or (`accumulator`: float32 zeros, e.g. made by `gemv_norm_pallas(..., zeros_out=N)`) is
made by the programs themselves, each adding its partial atomically (N a multiple of BN; the
order of the float32 additions varies from run to run on a GPU). `transposed=True` takes W as
[N, K] (a tied read-out, h Eᵀ, without a transpose). Columns past N (N need not divide by BN)
are masked. On CPU the kernel runs in interpret mode.

`gemv_norm_pallas` (batch 1) puts a pre-norm block's residual add and RMSNorm in front of the
product, so that no XLA kernel runs between two GEMVs. With the residual stream x [1, D] (dtype
dt), addends a_i [S_a, 1, D] (a previous GEMV's unsummed K-split partials, float32), their
multiplier m and the norm's gain w and eps, every program makes

    a = rnd(m · rnd(Σ_i a_i))          (Σ in float32, i = 0, 1, …; no m: a = rnd(Σ_i a_i))
    r = rnd(x + a)                                        the new residual stream
    h = rnd((r / sqrt(mean(r²) + eps)) · w)               RMSNorm, in float32
    y_s = Σ_{k ∈ K-split s} h[k] W[k, n]

(rnd: rounding to dt, where the unfused step rounds: the summed product, its multiplier, the
add, the norm's output), reading all of x and the a_i for mean(r²) (D elements: cheap beside a
[Ks, BN] tile of W) and its own K range again for h. Program (0, 0) alone writes r.

`gemv_gated_norm_pallas` (batch 1) puts the GDN mixer's gated output norm in front of W_o, so
that no XLA kernel runs between the rule's kernel and W_o's GEMV. With the rule's output o
[1, H·V] (float32), the gate g [1, H·V] (dt; none without the mixer's gate) and the norm's gain
w [V], shared by the H heads, and eps, every program makes, for each K tile of its split,

    o_dt = rnd(o)                                       as the step rounds the rule's output
    h[i·V + j] = rnd((o_dt[i·V + j] / sqrt(mean_j'(o_dt[i·V + j']²) + eps)) · w[j]
                     · SiLU(g[i·V + j]))                head i; no gate: no SiLU factor
    y_s = Σ_{k ∈ K-split s} h[k] W_o[k, n]

A K tile lies inside one head (V a multiple of the K tile): its head's mean(o_dt²) sums that
head's V values of o in [1, BK] tiles (cheap beside a [BK, BN] tile of W_o), once per program
where the whole split lies inside one head, else once per K tile.
"""
from __future__ import annotations

import functools
import math

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


def _tiling(where, K, N, block_n, block_k, splits, min_programs, num_stages, interpret):
  """(K tile, K splits, K per split) of a product with K rows of W and N columns; ValueError
  naming the setting that does not fit (`num_stages` too: a static argument, so a float or bool
  would hash into the jit cache and reach Triton)."""
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"{where}: `num_stages`={num_stages!r}; expected an int ≥ 1 (Triton's "
                     "software-pipelining depth of the K-tile loop).")
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


def _tile_at(start, size: int, multiple: int | None = None):
  """The slice of `size` elements from `start`, a traced int known to be a multiple of
  `multiple` (default: `size`; the hint lets Triton vectorise the load)."""
  return pl.ds(pl.multiple_of(start, size if multiple is None else multiple), size)


def _swiglu_tile(gate_ref, up_ref, ks, dtype):
  """[1, BK] float32: SiLU(g) · u of the K tile `ks`, g and u the sums of their split partials
  ([S_in, 1, Ks] blocks), each rounded to `dtype` as the unfused step's products and the
  product's input are."""
  f32 = jnp.float32
  rnd = lambda a: a.astype(dtype).astype(f32)
  g = sum(gate_ref[i, :, ks].astype(f32) for i in range(gate_ref.shape[0]))
  u = sum(up_ref[i, :, ks].astype(f32) for i in range(up_ref.shape[0]))
  return rnd(jax.nn.silu(rnd(g)) * rnd(u))


def summed_partials(load, parts, dtype, multiplier=1.0):
  """A product's value from `load(i)`, float32: with `parts` (a GEMV's split partials, i <
  parts) rnd(rnd(Σ_i load(i)) · rnd(m)), Σ in float32 in the order i = 0, 1, …, rnd rounding to
  `dtype`, as the unfused step rounds the GEMV's sum (`decode_dot`) and its Linear's forward
  multiplier m (1: no product); with `parts` None, load(None) as it is (a value already summed
  and scaled)."""
  f32 = jnp.float32
  if parts is None:
    return load(None)
  rnd = lambda a: a.astype(dtype).astype(f32)
  y = load(0).astype(f32)
  for i in range(1, parts):
    y = y + load(i).astype(f32)
  y = rnd(y)
  return y if multiplier == 1.0 else rnd(y * rnd(jnp.asarray(multiplier, f32)))


def _residual_tile(x_ref, add_ref, ks, multiplier):
  """[1, BK] float32: r = rnd(x + rnd(m · rnd(Σ_i a_i))) on the K slice `ks` of x [1, D] and the
  addends a [S_a, 1, D] (None: r = x), rounded to x's dtype where the unfused step rounds."""
  f32 = jnp.float32
  r = x_ref[:, ks].astype(f32)
  if add_ref is None:
    return r
  a = summed_partials(lambda i: add_ref[i, :, ks], add_ref.shape[0], x_ref.dtype, multiplier)
  return (r + a).astype(x_ref.dtype).astype(f32)


def _norm_prologue(x_ref, add_ref, gain_ref, r_ref, *, block_k, eps, multiplier, dtype):
  """The input tile function of `gemv_norm_pallas`'s program: k0 (the first row of a K tile of
  this program's split) ↦ h [1, BK] float32, h = rnd((r / sqrt(mean(r²) + eps)) · w) (rounded
  to `dtype`). mean(r²) sums all of r in [1, BK] tiles; program (0, 0) writes r to `r_ref` on
  the way."""
  f32 = jnp.float32
  D = x_ref.shape[1]
  tile = lambda i: _tile_at(i * block_k, block_k)
  writer = (pl.program_id(0) == 0) & (pl.program_id(1) == 0)

  def squares(i, acc):
    r = _residual_tile(x_ref, add_ref, tile(i), multiplier)

    @pl.when(writer)
    def _():
      r_ref[:, tile(i)] = r.astype(r_ref.dtype)
    return acc + r * r
  sum_sq = jnp.sum(jax.lax.fori_loop(0, D // block_k, squares, jnp.zeros((1, block_k), f32)),
                   axis=1, keepdims=True)                                  # [1, 1]
  inv_rms = jax.lax.rsqrt(sum_sq / D + eps)

  def h_tile(k0):
    ks = _tile_at(k0, block_k)
    r = _residual_tile(x_ref, add_ref, ks, multiplier)
    return ((r * inv_rms) * gain_ref[:, ks].astype(f32)).astype(dtype).astype(f32)
  return h_tile


def _gated_norm_prologue(o_ref, gate_ref, gain_ref, *, block_k, eps, gate_column, split_start,
                         split_rows, dtype, gate_parts=None, gate_multiplier=1.0):
  """The input tile function of `gemv_gated_norm_pallas`'s program: k0 (the first of BK rows of
  W_o, inside one head of V = gain's width) ↦ h [1, BK] float32,
  h = rnd((o_dt / sqrt(mean_head(o_dt²) + eps)) · w · SiLU(g)) with o_dt = rnd(o) (rounded to
  `dtype`; no SiLU factor without `gate_ref`). The gate is columns `gate_column` … of gate_ref,
  or with `gate_parts` of the sum of gate_ref's split partials [S, 1, N] (`summed_partials`,
  with its Linear's `gate_multiplier`).
  mean_head sums the head's V values of o in [1, BK] tiles: once, if the program's split
  (`split_rows` rows from `split_start`) lies inside one head, else per K tile."""
  f32 = jnp.float32
  V = gain_ref.shape[1]
  o_tile = lambda k0: o_ref[:, _tile_at(k0, block_k)].astype(dtype).astype(f32)        # o_dt

  def head_stats(k0):   # (the head's first row, 1 / sqrt(mean(o_dt²) + eps) [1, 1])
    head_start = pl.multiple_of(jax.lax.div(k0, V) * V, block_k)

    def squares(i, acc):
      o = o_tile(head_start + i * block_k)
      return acc + o * o
    sum_sq = jnp.sum(jax.lax.fori_loop(0, V // block_k, squares, jnp.zeros((1, block_k), f32)),
                     axis=1, keepdims=True)
    return head_start, jax.lax.rsqrt(sum_sq / V + eps)

  if V % split_rows == 0:   # the split lies inside one head: its stats once per program
    program_stats = head_stats(split_start)
    stats = lambda k0: program_stats
  else:
    stats = head_stats

  def h_tile(k0):
    head_start, inv_rms = stats(k0)
    h = (o_tile(k0) * inv_rms) * gain_ref[:, _tile_at(k0 - head_start, block_k)].astype(f32)
    if gate_ref is not None:
      cols = _tile_at(gate_column + k0, block_k, math.gcd(gate_column, block_k))
      gate = summed_partials(lambda i: gate_ref[:, cols] if i is None else gate_ref[i, :, cols],
                             gate_parts, dtype, gate_multiplier)
      h = h * jax.nn.silu(gate.astype(f32))
    return h.astype(dtype).astype(f32)
  return h_tile


def _kernel(*refs, n, block_n, block_k, tiles, transposed, swiglu_dtype=None, norm=None,
            gated_norm=None, accumulate=False, zeros_out=False):
  """x_ref: [R, Ks] (R = 1 or 16 padded rows), or (`swiglu_dtype`) gate and up partials
  [S_in, 1, Ks] each, or (`norm`: dict of eps and the addends' multiplier) x [1, D], the
  addends [S_a, 1, D] (if any) and the gain [1, D], or (`gated_norm`: dict of eps and the gate's
  first column, and with partials their count and the gate's multiplier) o [1, H·V], the gate
  [1, ≥ H·V] or its split partials [S, 1, ≥ H·V] (if any) and the gain [1, V]; w_ref: [BN, Ks]
  (`transposed`) or [Ks, BN]; y_ref: [R, BN]; with `norm` also r_ref [1, D]. The two norm
  prologues read their whole input and make the tiles of this program's split (`h_tile`).
  `accumulate`: the last input is the accumulator (the same memory as y_ref, its column block
  [1, BN]), into which the program adds y atomically instead of storing it; `zeros_out`: a last
  output [1, Z] that program (0, 0) fills with zeros (the next GEMV's accumulator)."""
  f32 = jnp.float32
  h_tile = None
  zeros_ref = None
  if zeros_out:
    *refs, zeros_ref = refs
  if accumulate:   # drop the accumulator's input ref: y_ref is the same buffer
    n_out = 2 if norm is not None else 1
    refs = refs[:-n_out - 1] + refs[-n_out:]
  split_start = pl.program_id(1) * (tiles * block_k)   # this split's first row of W
  if swiglu_dtype is not None:
    gate_ref, up_ref, w_ref, y_ref = refs
    rows = 1
  elif norm is not None:
    x_ref, *add_refs, gain_ref, w_ref, y_ref, r_ref = refs
    rows = 1
    h_tile = _norm_prologue(x_ref, add_refs[0] if add_refs else None, gain_ref, r_ref,
                            block_k=block_k, eps=norm["eps"], multiplier=norm["multiplier"],
                            dtype=w_ref.dtype)
  elif gated_norm is not None:
    o_ref, *gate_refs, gain_ref, w_ref, y_ref = refs
    rows = 1
    h_tile = _gated_norm_prologue(o_ref, gate_refs[0] if gate_refs else None, gain_ref,
                                  block_k=block_k, split_start=split_start,
                                  split_rows=tiles * block_k, dtype=w_ref.dtype, **gated_norm)
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
      if swiglu_dtype is not None:
        x = _swiglu_tile(gate_ref, up_ref, ks, swiglu_dtype)              # [1, BK]
      elif h_tile is not None:
        x = h_tile(split_start + i * block_k)
      else:
        x = x_ref[:, ks].astype(f32)
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
  if accumulate:   # the wrapper checked N % BN == 0: no mask
    plt.atomic_add(y_ref, (slice(None), slice(None)), y)
  else:
    plt.store(y_ref.at[:, :], y, mask=valid[None, :])
  if zeros_ref is not None:
    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
    def _():
      zeros_ref[...] = jnp.zeros(zeros_ref.shape, zeros_ref.dtype)


def _w_spec(transposed: bool, block_n: int, Ks: int):
  """W's tile of program (j, s): rows of split s, columns of block j ([Ks, BN]; [BN, Ks] for W
  stored [N, K])."""
  if transposed:
    return pl.BlockSpec((block_n, Ks), lambda j, s: (j, s))
  return pl.BlockSpec((Ks, block_n), lambda j, s: (s, j))


def _partials_spec(rows: int, block_n: int):
  """The output [S, rows, N] of split partials: program (j, s) writes [rows, BN] of split s."""
  return pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j))


def _output(where, S, rows, N, block_n, accumulator, in_specs, operands):
  """(out spec, out shape, input_output_aliases) of a product: its split partials [S, rows, N]
  float32, or with `accumulator` (float32 zeros [1, N]; batch 1) their sum [1, N], added into it
  atomically by the programs: the accumulator is appended to `in_specs` and `operands` with the
  block of program (j, s), its column block j, and aliased to the output. ValueError naming
  `accumulator` if its shape does not fit or N is not a multiple of `block_n`."""
  if accumulator is None:
    return _partials_spec(rows, block_n), jax.ShapeDtypeStruct((S, rows, N), jnp.float32), {}
  if accumulator.shape != (1, N) or accumulator.dtype != jnp.float32 or N % block_n:
    raise ValueError(f"{where}: `accumulator` {accumulator.shape} {accumulator.dtype} with "
                     f"block_n={block_n}; expected float32 zeros [1, {N}] (the product's "
                     "columns) and N a multiple of block_n (atomic adds take no mask), or None.")
  spec = pl.BlockSpec((1, block_n), lambda j, s: (0, j))
  in_specs.append(spec)
  operands.append(accumulator)
  return spec, jax.ShapeDtypeStruct((1, N), jnp.float32), {len(operands) - 1: 0}


def split_sum(y_SxRxN):
  """Σ_s of the split partials (float32; one split: as it is)."""
  return y_SxRxN[0] if y_SxRxN.shape[0] == 1 else jnp.sum(y_SxRxN, axis=0)


@functools.partial(jax.jit, static_argnames=("transposed", "block_n", "block_k", "splits",
                                             "min_programs", "num_warps", "num_stages",
                                             "sum_splits", "interpret"))
def gemv_pallas(x_BxK, w, *, transposed: bool = False, block_n: int = 64, block_k: int = 128,
                splits: int | None = None, min_programs: int = 256, num_warps: int = 4,
                num_stages: int = 2, sum_splits: bool = True, accumulator=None,
                interpret: bool | None = None):
  """x @ W (W [K, N]) or x @ Wᵀ (`transposed`, W [N, K]) in float32, for B ≤ `MAX_ROWS` rows.

  `block_n` columns and `block_k` rows of W per tile (powers of two; block_k is lowered to the
  largest power of two dividing K); `splits`: K splits (None: the fewest giving ≥ `min_programs`
  programs, `choose_splits`). `num_warps` warps per program; `num_stages`: Triton's
  software-pipelining depth of the K-tile loop (1: each tile loaded when it is summed; 2: the next
  one loads meanwhile; an int ≥ 1). `sum_splits=False` returns the splits' partial products
  [S, B, N] unsummed (`gemv_swiglu_pallas` sums them as it reads them). `accumulator` (batch
  1): a float32 [1, N] of zeros (e.g. `gemv_norm_pallas(..., zeros_out=N)`'s) into which every
  program adds its partial atomically; returns that sum [1, N] float32, its order of additions
  varying from run to run on a GPU (`sum_splits` is then moot; N a multiple of `block_n`).
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
  bk, S, Ks = _tiling("gemv_pallas", K, N, block_n, block_k, splits, min_programs, num_stages,
                       interpret)
  R = 1 if B == 1 else DOT_ROWS
  x = x_BxK if R == B else jnp.pad(x_BxK, ((0, R - B), (0, 0)))
  if accumulator is not None and B != 1:
    raise ValueError(f"gemv_pallas: `accumulator` with batch {B}; expected batch 1.")
  in_specs = [pl.BlockSpec((R, Ks), lambda j, s: (0, s)), _w_spec(transposed, block_n, Ks)]
  operands = [x.astype(w.dtype), w]
  out_spec, out_shape, aliases = _output("gemv_pallas", S, R, N, block_n, accumulator, in_specs,
                                         operands)
  y = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=transposed, accumulate=accumulator is not None),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="decode_gemv",
  )(*operands)
  if accumulator is not None:
    return y
  return split_sum(y)[:B] if sum_splits else y[:, :B]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "min_programs",
                                             "num_warps", "num_stages", "interpret"))
def gemv_swiglu_pallas(gate_up_SxBx2F, w_FxN, *, block_n: int = 64, block_k: int = 128,
                       splits: int | None = None, min_programs: int = 256, num_warps: int = 4,
                       num_stages: int = 2, accumulator=None, interpret: bool | None = None):
  """(SiLU(g) ⊙ u) @ W_down in float32 at batch 1, where [g | u] = Σ_s gate_up[s] (the MLP's
  gate and up products, e.g. `gemv_pallas(..., sum_splits=False)`'s partials [S_in, 1, 2F]):
  the split sum, SiLU and product are made as the tiles are read, so no kernel runs between the
  two products. g, u and the SiLU product are rounded to W's dtype, as the unfused step's are.
  S_in must be a power of two (Triton blocks); W: [F, N]. The tiles, splits, warps, stages and
  `accumulator` as `gemv_pallas`.
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
                      num_stages, interpret)
  in_specs = [pl.BlockSpec((S_in, 1, Ks), lambda j, s: (0, 0, s)),
              pl.BlockSpec((S_in, 1, Ks), lambda j, s: (0, 0, S + s)),
              _w_spec(False, block_n, Ks)]
  operands = [gate_up_SxBx2F, gate_up_SxBx2F, w_FxN]
  out_spec, out_shape, aliases = _output("gemv_swiglu_pallas", S, 1, N, block_n, accumulator,
                                         in_specs, operands)
  y = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=False, swiglu_dtype=w_FxN.dtype,
                        accumulate=accumulator is not None),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="decode_gemv_swiglu",
  )(*operands)
  return y if accumulator is not None else split_sum(y)


@functools.partial(jax.jit, static_argnames=("eps", "addend_multiplier", "transposed", "block_n",
                                             "block_k", "splits", "min_programs", "num_warps",
                                             "num_stages", "sum_splits", "zeros_out",
                                             "interpret"))
def gemv_norm_pallas(x_1xD, w, gain_D, addends_SxD=None, *, eps: float,
                     addend_multiplier: float = 1.0, transposed: bool = False, block_n: int = 64,
                     block_k: int = 128, splits: int | None = None, min_programs: int = 256,
                     num_warps: int = 4, num_stages: int = 2, sum_splits: bool = True,
                     zeros_out: int = 0, interpret: bool | None = None):
  """(h @ W in float32, r) at batch 1, where r = x + rnd(m · Σ_i addends[i]) is the new residual
  stream (x's dtype) and h = RMSNorm(r) · gain (W's dtype): the residual add and the norm of a
  pre-norm block made in the GEMV's prologue (module docstring). `addends_SxD` [S_a, 1, D]: e.g.
  `gemv_pallas(..., sum_splits=False)`'s partials (None: r = x); `addend_multiplier` m: their
  Linear's forward multiplier. W [D, N] (or [N, D], `transposed`); tiles, splits, warps,
  stages and `sum_splits` as `gemv_pallas`. Returns (y [1, N] or its partials [S, 1, N], r [1, D]),
  and with `zeros_out` Z > 0 a third output, float32 zeros [1, Z] written by program (0, 0): a
  later GEMV's `accumulator`, made here so that no XLA kernel makes it.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  B, D = x_1xD.shape
  N, Kw = (w.shape if transposed else w.shape[::-1])
  if B != 1 or Kw != D:
    raise ValueError(f"gemv_norm_pallas: x {x_1xD.shape} and `w` {w.shape} "
                     f"({'[N, D]' if transposed else '[D, N]'}); expected x [1, D] (batch 1) "
                     "with D the rows (columns if transposed) of w.")
  if gain_D.shape != (D,):
    raise ValueError(f"gemv_norm_pallas: `gain_D` {gain_D.shape}; expected the norm's gain "
                     f"[{D}] (x's width).")
  if addends_SxD is not None and (addends_SxD.ndim != 3 or addends_SxD.shape[1:] != (1, D)
                                  or addends_SxD.shape[0] < 1):
    raise ValueError(f"gemv_norm_pallas: `addends_SxD` {addends_SxD.shape}; expected [S_a, 1, "
                     f"{D}] with S_a ≥ 1 (a GEMV's split partials), or None.")
  if isinstance(zeros_out, bool) or not isinstance(zeros_out, int) or zeros_out < 0:
    raise ValueError(f"gemv_norm_pallas: `zeros_out`={zeros_out!r}; expected an int ≥ 0 (the "
                     "width of a zeroed accumulator to return; 0: none).")
  bk, S, Ks = _tiling("gemv_norm_pallas", D, N, block_n, block_k, splits, min_programs,
                      num_stages, interpret)
  whole = lambda j, s: (0, 0)
  in_specs = [pl.BlockSpec((1, D), whole)]                                 # x, whole
  operands = [x_1xD]
  if addends_SxD is not None:
    in_specs.append(pl.BlockSpec(addends_SxD.shape, lambda j, s: (0, 0, 0)))   # addends, whole
    operands.append(addends_SxD)
  in_specs += [pl.BlockSpec((1, D), whole),                                 # gain, whole
               _w_spec(transposed, block_n, Ks)]
  operands += [gain_D.reshape(1, D), w]
  norm = dict(eps=float(eps), multiplier=float(addend_multiplier))
  out_specs = [_partials_spec(1, block_n),                                  # y's partials
               pl.BlockSpec((1, D), whole)]                                 # r (program (0, 0))
  out_shape = [jax.ShapeDtypeStruct((S, 1, N), jnp.float32),
               jax.ShapeDtypeStruct((1, D), x_1xD.dtype)]
  if zeros_out:                                                             # (program (0, 0))
    out_specs.append(pl.BlockSpec((1, zeros_out), whole))
    out_shape.append(jax.ShapeDtypeStruct((1, zeros_out), jnp.float32))
  y, r, *zeros = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=transposed, norm=norm, zeros_out=bool(zeros_out)),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="decode_gemv_norm",
  )(*operands)
  return ((split_sum(y) if sum_splits else y), r, *zeros)


@functools.partial(jax.jit, static_argnames=("eps", "head_dim", "gate_column", "gate_multiplier",
                                             "block_n", "block_k", "splits", "min_programs",
                                             "num_warps", "num_stages", "sum_splits",
                                             "interpret"))
def gemv_gated_norm_pallas(o_1xHV, gate_1xHV, w, gain_V, *, eps: float, head_dim: int,
                           gate_column: int = 0, gate_multiplier: float = 1.0,
                           block_n: int = 64, block_k: int = 128,
                           splits: int | None = None, min_programs: int = 256,
                           num_warps: int = 4, num_stages: int = 2, sum_splits: bool = True,
                           accumulator=None, interpret: bool | None = None):
  """h @ W_o in float32 at batch 1, where h is the GDN mixer's gated output norm of the rule's
  output o (module docstring), made in the GEMV's prologue: with o_dt = rnd(o) and V = head_dim,

      h[i·V + j] = rnd((o_dt[i·V + j] / sqrt(mean_j'(o_dt[i·V + j']²) + eps)) · w[j]
                       · SiLU(g[i·V + j]))                         (head i, 0 ≤ j < V)

  in float32, rnd rounding to W_o's dtype (where the unfused step rounds: the rule's output
  before the norm, the norm's output), as `GatedRMSNorm(o.astype(dt), g)` then the product.
  o_1xHV: [1, H·V] (float32, the rule's output; batch 1); gate_1xHV: the gate g as columns
  `gate_column` … `gate_column` + H·V of a [1, ≥ H·V] array (e.g. the in-projection's whole
  output, so that no slice of it is made), or that array's split partials [S, 1, ≥ H·V] float32
  (the in-projection GEMV's, `sum_splits=False`: each program sums the S partials of its gate
  columns and makes rnd(rnd(Σ_s g_s) · rnd(m)), m = `gate_multiplier`, the gate Linear's forward
  multiplier, as the unfused step rounds the GEMV's sum and `layers.scale_columns`; no XLA
  kernel sums them), or None (no gate: h = rnd(RMSNorm_V(o_dt) · w));
  w: W_o [H·V, N]; gain_V: w [V], shared by the heads. Each K tile lies inside one head: V must
  be a multiple of the K tile (`block_k` lowered to the largest power of two dividing H·V).
  Tiles, splits, warps, stages, `sum_splits` and `accumulator` as `gemv_pallas`. Returns y
  [1, N] or its split partials [S, 1, N] (float32).
  """
  where = "gemv_gated_norm_pallas"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if o_1xHV.ndim != 2 or o_1xHV.shape[0] != 1:
    raise ValueError(f"{where}: `o_1xHV` {o_1xHV.shape}; expected [1, H·V] (batch 1: the rule's "
                     "output with its heads side by side).")
  HV = o_1xHV.shape[1]
  if w.ndim != 2 or w.shape[0] != HV:
    raise ValueError(f"{where}: `w` {w.shape}; expected W_o [H·V, N] with H·V = {HV} rows "
                     "(o's width).")
  N = w.shape[1]
  if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1 or HV % head_dim:
    raise ValueError(f"{where}: `head_dim`={head_dim!r}; expected the value head dim V, an int "
                     f"≥ 1 dividing o's width {HV}.")
  if gain_V.shape != (head_dim,):
    raise ValueError(f"{where}: `gain_V` {gain_V.shape}; expected the norm's gain [{head_dim}] "
                     "(head_dim: shared by the heads).")
  if isinstance(gate_column, bool) or not isinstance(gate_column, int) or gate_column < 0:
    raise ValueError(f"{where}: `gate_column`={gate_column!r}; expected an int ≥ 0 (the gate's "
                     "first column in `gate_1xHV`).")
  gate_parts = None if gate_1xHV is None or gate_1xHV.ndim != 3 else gate_1xHV.shape[0]
  if gate_1xHV is not None and (gate_1xHV.ndim not in (2, 3) or gate_1xHV.shape[-2] != 1
                                or gate_1xHV.shape[-1] < gate_column + HV
                                or (gate_parts is not None and gate_1xHV.dtype != jnp.float32)):
    raise ValueError(f"{where}: `gate_1xHV` {gate_1xHV.shape} {gate_1xHV.dtype} with "
                     f"`gate_column`={gate_column}; expected [1, ≥ {gate_column + HV}] (the "
                     f"gate's {HV} columns from gate_column), its float32 split partials [S, 1, "
                     f"≥ {gate_column + HV}], or None (no gate).")
  bk, S, Ks = _tiling(where, HV, N, block_n, block_k, splits, min_programs, num_stages,
                      interpret)
  if head_dim % bk:
    raise ValueError(f"{where}: `block_k`={block_k} gives K tiles of {bk} rows, which do not "
                     f"divide `head_dim` V={head_dim} (a K tile must lie inside one head); "
                     "expected block_k ≤ V's largest power-of-two factor "
                     f"{head_dim & -head_dim}, or the unfused norm and product.")
  whole = lambda j, s: (0, 0)
  in_specs = [pl.BlockSpec((1, HV), whole)]                                # o, whole
  operands = [o_1xHV]
  if gate_1xHV is not None:
    in_specs.append(pl.BlockSpec(gate_1xHV.shape, lambda j, s: (0,) * gate_1xHV.ndim))  # whole
    operands.append(gate_1xHV)
  in_specs += [pl.BlockSpec((1, head_dim), whole),                          # gain, whole
               _w_spec(False, block_n, Ks)]
  operands += [gain_V.reshape(1, head_dim), w]
  out_spec, out_shape, aliases = _output(where, S, 1, N, block_n, accumulator, in_specs,
                                         operands)
  y = pl.pallas_call(
      functools.partial(_kernel, n=N, block_n=block_n, block_k=bk, tiles=Ks // bk,
                        transposed=False,
                        gated_norm=dict(eps=float(eps), gate_column=gate_column,
                                        gate_parts=gate_parts,
                                        gate_multiplier=float(gate_multiplier)),
                        accumulate=accumulator is not None),
      grid=(pl.cdiv(N, block_n), S),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      name="decode_gemv_gated_norm",
  )(*operands)
  if accumulator is not None:
    return y
  return split_sum(y) if sum_splits else y
