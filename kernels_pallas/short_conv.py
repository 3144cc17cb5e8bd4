"""The GDN mixer's short causal depthwise convolution with SiLU (`layers.ShortConv` in training) as
Pallas (Triton) kernels with a hand-written VJP: the backward makes dx and every tap's dw either in
two passes over dz (the default) or in one pass over x and dy.

For x [B, T, C], filters w [W, C] and segment ids seg [B, T] (packed documents; none: one
document), with tap i reading the input W − 1 − i steps back:

    z_t = Σ_{i<W} w_i ⊙ x_{t−(W−1)+i} · m_i(t),    y_t = SiLU(z_t)
    m_i(t) = [t − (W−1) + i ≥ 0] · [seg_{t−(W−1)+i} = seg_t]     (the second factor with seg only)

(inputs before t = 0 are zeros: the training call has no conv state.) With dz_t = dy_t ⊙ SiLU'(z_t),
SiLU'(z) = σ(z) (1 + z (1 − σ(z))), the backward is

    dx_s = Σ_{i<W} w_i ⊙ dz_{s+(W−1)−i} · m_i(s + (W−1) − i)
    dw_i = Σ_{b, t} x_{t−(W−1)+i} ⊙ dz_t · m_i(t)

all in float32; y and dx are rounded to x's dtype, dw to w's. The residuals are x, w and seg: z is
recomputed in the backward (W multiply-adds per tap from x, which dw reads anyway) rather than
saved, which would write and read back another [B, T, C] array.

Kernels (Triton has no register shifts, so each lag is a load at shifted rows; the W − 1 rows a
tile reads past its own edge come from L1/L2, the neighbouring tile having read them):
- `short_conv_fwd`, grid (B, ⌈T/BT⌉, ⌈C/BC⌉): z of a [BT, BC] tile from W loads of x at lags
  0 … W−1 (masked before t = 0 and across segments), then y.

The backward, `backward="two_pass"` (the default), is two kernels, each with a few [BT, BC] tiles
live (at most W + 2):
- `short_conv_bwd_dz`, grid (B, ⌈T/BT⌉, ⌈C/BC⌉): z of a tile as in the forward, then
  dz = dy ⊙ SiLU'(z), written to a [B, T, C] array in float32, so that the gradients are the
  one-pass backward's (bfloat16 would halve dz's bytes but round it).
- `short_conv_bwd_dxdw`, grid (B, G, ⌈C/BC⌉): a program walks `tiles` consecutive T tiles of its
  batch row and channel block in a loop. Per tile of rows s, dx_s adds w_{W−1−d} ⊙ dz_{s+d} from W
  loads of dz at rows s + d, d ∈ [0, W−1] (masked past T and across segments), and dw_i adds
  Σ_s x_{s−(W−1)+i} ⊙ dz_s from W loads of x at lags and the d = 0 tile of dz, accumulated over
  the loop in float32; each program writes its partial dw [W, BC] to [B·G, W, C], which XLA sums.
Traffic per element of [B, T, C] with 2-byte x and dy: pass 1 reads x and dy and writes dz (2 + 2
+ 4 bytes), pass 2 reads dz and x and writes dx (4 + 2 + 2): 16 bytes against the one pass's 6.

`backward="one_pass"`: one kernel that reads x and dy and writes dx (6 bytes per element). It was
measured far slower than its traffic, and slower than XLA's conv backward, on an H100
(experiments/NOTES_train.md holds the numbers); two_pass is the default until it is timed too.
- `short_conv_bwd`, grid (B, G, ⌈C/BC⌉), walking tiles as `short_conv_bwd_dxdw`. Per tile of rows
  s it loads x at rows s + m for the 2W − 1 lags m ∈ [−(W−1), W−1] and dy at rows s + d,
  d ∈ [0, W−1]; for each d it recomputes z and dz at the rows u = s + d (the outputs that read row
  s through tap W − 1 − d) and adds w_{W−1−d} ⊙ dz_u to dx_s. The d = 0 rows give dw's sums over
  the tile. Its live set, 2W − 1 x tiles, W dy tiles and the z, dz tiles (up to ~20 float32 tiles of
  32 registers a thread at BT 32, BC 128 and 4 warps), is over twice a thread's 255 registers:
  spills to local memory, the likeliest cause of its time.

Why G (`backward_groups`): a (B, C-block) grid alone has 96–192 programs at B 8, C 1536–3072 and
BC 128, fewer than an H100's 132 SMs hold at once (several programs each), so the T axis is split
into the fewest groups giving ≥ `min_programs` programs (1024 by default: several waves, so the
last one's tail is short). The partials then cost B·G·W·C·4 bytes twice, ~1.5–3% of the x, dy, dx
traffic, where one program per tile (no loop) would write B·⌈T/BT⌉·W·C floats.

Every ref is a whole array (memory space ANY), read and written through row and column index
arrays: rows clamped into [0, T) and masked, ragged T and C masked. Index arrays keep interpret
mode right, where a `pl.ds` with a negative start would be clamped (shifting the whole block).
Block sizes are powers of two (Triton ranges); W is any size ≥ 1 (the taps are a Python loop).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

GPU_BACKENDS = ("gpu", "cuda", "rocm")   # where the kernels compile; elsewhere they interpret
BACKWARDS = ("two_pass", "one_pass")     # the backward's kernels (module docstring)
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Launch:
  """The kernels' static settings (a nondiff argument of the custom VJP)."""
  block_t: int
  block_c: int
  num_warps: int
  min_programs: int
  interpret: bool
  backward: str = "two_pass"           # one of BACKWARDS


def backward_groups(B: int, T: int, C: int, block_t: int, block_c: int,
                    min_programs: int) -> tuple[int, int]:
  """(G, tiles): the backward's groups of T tiles and the tiles each program walks, for the fewest
  groups that give ≥ `min_programs` programs B·G·⌈C/BC⌉ (at most one group per tile). The last
  group may have tiles past T (masked)."""
  num_tiles = pl.cdiv(T, block_t)
  wanted = min(num_tiles, pl.cdiv(min_programs, B * pl.cdiv(C, block_c)))
  tiles = pl.cdiv(num_tiles, wanted)
  return pl.cdiv(num_tiles, tiles), tiles


# ---- loads and masks shared by the kernels

def _load_tile(ref, b, rows, cols, mask):
  """ref[b, rows, cols] as a [BT, BC] tile, 0 where `mask` is False (rows clamped into the array:
  the masked rows may lie before or after it)."""
  shape = (rows.shape[0], cols.shape[0])
  r = jnp.broadcast_to(jnp.clip(rows, 0, ref.shape[1] - 1)[:, None], shape)
  c = jnp.broadcast_to(cols[None, :], shape)
  return plt.load(ref.at[b, r, c], mask=mask, other=0)


def _store_tile(ref, b, rows, cols, value, mask):
  shape = value.shape
  r = jnp.broadcast_to(rows[:, None], shape)
  c = jnp.broadcast_to(cols[None, :], shape)
  plt.store(ref.at[b, r, c], value, mask=mask)


def _load_taps(w_any, cols, col_ok):
  """The W filters of this channel block, each [BC] float32 (0 past C)."""
  return [plt.load(w_any.at[i, cols], mask=col_ok, other=0).astype(_F32)
          for i in range(w_any.shape[0])]


def _segments(seg_any, b, rows):
  """seg[b, rows] ([BT] int32, rows clamped into [0, T)); None without segment ids."""
  if seg_any is None:
    return None
  return plt.load(seg_any.at[b, jnp.clip(rows, 0, seg_any.shape[1] - 1)])


def _tap_counts(src, out, seg_src, seg_out, T):
  """[BT] bool: the tap of output row `out` that reads row `src` counts, m_i(out) (module
  docstring; `out` < T too, so rows past the sequence add nothing)."""
  ok = (src >= 0) & (out < T)
  return ok if seg_src is None else ok & (seg_src == seg_out)


def _preactivation(x_any, seg_any, w, b, t, cols, col_ok):
  """z_t of the rows t ([BT, BC] float32) from W loads of x at lags W − 1 − i, in the XLA path's
  order (float32 sums alike)."""
  T = x_any.shape[1]
  W = len(w)
  seg_t = _segments(seg_any, b, t)
  z = jnp.zeros((t.shape[0], cols.shape[0]), _F32)
  for i in range(W):
    src = t - (W - 1 - i)
    counts = _tap_counts(src, t, _segments(seg_any, b, src), seg_t, T)
    x_i = _load_tile(x_any, b, src, cols, counts[:, None] & col_ok[None, :])
    z = z + x_i.astype(_F32) * w[i][None, :]
  return z


def _silu_grad(z, dy):
  """dy ⊙ SiLU'(z) = dy σ(z) (1 + z (1 − σ(z)))."""
  sig = jax.nn.sigmoid(z)
  return dy * sig * (1.0 + z * (1.0 - sig))


# ---- kernels

def _tile_program(x_any, w_any, seg_any, block_t, block_c):
  """What a tile-grid program (b, T tile, column block) starts from: (b, its rows t, its columns,
  the tile's mask [BT, BC] (inside T and C), the pre-activation z [BT, BC] float32)."""
  _, T, C = x_any.shape
  b = pl.program_id(0)
  t = pl.program_id(1) * block_t + jnp.arange(block_t)
  cols = pl.program_id(2) * block_c + jnp.arange(block_c)
  col_ok = cols < C
  z = _preactivation(x_any, seg_any, _load_taps(w_any, cols, col_ok), b, t, cols, col_ok)
  return b, t, cols, (t < T)[:, None] & col_ok[None, :], z


def _forward_kernel(x_any, w_any, *refs, block_t, block_c):
  """y = SiLU(Σ_i w_i ⊙ x at lag W − 1 − i) of one [BT, BC] tile."""
  seg_any, y_any = refs if len(refs) == 2 else (None, *refs)
  b, t, cols, inside, z = _tile_program(x_any, w_any, seg_any, block_t, block_c)
  _store_tile(y_any, b, t, cols, jax.nn.silu(z).astype(y_any.dtype), inside)


def _backward_dz_kernel(x_any, w_any, dy_any, *refs, block_t, block_c):
  """Two-pass backward, pass 1: dz = dy ⊙ SiLU'(z) of one [BT, BC] tile, z recomputed as in the
  forward."""
  seg_any, dz_any = refs if len(refs) == 2 else (None, *refs)
  b, t, cols, inside, z = _tile_program(x_any, w_any, seg_any, block_t, block_c)
  dy = _load_tile(dy_any, b, t, cols, inside).astype(_F32)
  _store_tile(dz_any, b, t, cols, _silu_grad(z, dy).astype(dz_any.dtype), inside)


def _walking_program(x_any, w_any, block_c):
  """What a walking-grid program (b, group, column block) of the backward starts from:
  (T, W, b, group, its columns, their mask, the taps [W, BC] float32)."""
  _, T, C = x_any.shape
  b, group = pl.program_id(0), pl.program_id(1)
  cols = pl.program_id(2) * block_c + jnp.arange(block_c)
  col_ok = cols < C
  return T, w_any.shape[0], b, group, cols, col_ok, _load_taps(w_any, cols, col_ok)


def _walk(tile, tiles, dw_any, b, group, cols, col_ok):
  """Runs `tile(k, dw) → dw` over the program's `tiles` tiles from dw = 0 (W taps of [BC] float32
  each) and stores the program's partial dw as row b · groups + group of dw_any [P, W, C]."""
  W = dw_any.shape[1]
  dw = jax.lax.fori_loop(0, tiles, tile, tuple(jnp.zeros(cols.shape, _F32) for _ in range(W)))
  program = b * pl.num_programs(1) + group
  for i in range(W):
    plt.store(dw_any.at[program, i, cols], dw[i], mask=col_ok)


def _backward_dxdw_kernel(x_any, w_any, dz_any, *refs, block_t, block_c, tiles):
  """Two-pass backward, pass 2: dx of `tiles` consecutive tiles from dz at rows s + d, and their
  partial dw from x at lags and dz_s (module docstring)."""
  seg_any, dx_any, dw_any = refs if len(refs) == 3 else (None, *refs)
  T, W, b, group, cols, col_ok, w = _walking_program(x_any, w_any, block_c)

  def tile(k, dw):
    s = (group * tiles + k) * block_t + jnp.arange(block_t)          # this tile's rows
    seg_s = _segments(seg_any, b, s)
    dx = jnp.zeros((block_t, block_c), _F32)
    for d in range(W):                 # the outputs u = s + d, which read s through tap W−1−d
      u = s + d
      counts = _tap_counts(s, u, seg_s, _segments(seg_any, b, u), T)   # m_{W−1−d}(u)
      dz_u = _load_tile(dz_any, b, u, cols, counts[:, None] & col_ok[None, :]).astype(_F32)
      dx = dx + dz_u * w[W - 1 - d][None, :]
      if d == 0:
        dz_s = dz_u                    # 0 past T
    _store_tile(dx_any, b, s, cols, dx.astype(dx_any.dtype), (s < T)[:, None] & col_ok[None, :])
    sums = []
    for i in range(W):                 # x_{s−(W−1)+i} · m_i(s)
      src = s - (W - 1 - i)
      counts = _tap_counts(src, s, _segments(seg_any, b, src), seg_s, T)
      x_i = _load_tile(x_any, b, src, cols, counts[:, None] & col_ok[None, :]).astype(_F32)
      sums.append(dw[i] + jnp.sum(x_i * dz_s, axis=0))
    return tuple(sums)

  _walk(tile, tiles, dw_any, b, group, cols, col_ok)


def _backward_kernel(x_any, w_any, dy_any, *refs, block_t, block_c, tiles):
  """One-pass backward: dx of `tiles` consecutive tiles and their partial dw (module
  docstring)."""
  seg_any, dx_any, dw_any = refs if len(refs) == 3 else (None, *refs)
  T, W, b, group, cols, col_ok, w = _walking_program(x_any, w_any, block_c)
  lags = range(-(W - 1), W)

  def tile(k, dw):
    s = (group * tiles + k) * block_t + jnp.arange(block_t)          # this tile's rows
    x_at = {m: _load_tile(x_any, b, s + m, cols, ((s + m >= 0) & (s + m < T))[:, None]
                          & col_ok[None, :]) for m in lags}          # x_{s+m}
    seg_at = {m: _segments(seg_any, b, s + m) for m in lags}
    dx = jnp.zeros((block_t, block_c), _F32)
    for d in range(W):                 # the outputs u = s + d, which read s through tap W−1−d
      u = s + d
      taps = []                        # x_{u−(W−1)+i} · m_i(u): lag m = d − (W−1) + i
      for i in range(W):
        m = d - (W - 1) + i
        counts = _tap_counts(s + m, u, seg_at[m], seg_at[d], T)
        taps.append(jnp.where(counts[:, None], x_at[m].astype(_F32), 0.0))
      z = sum((taps[i] * w[i][None, :] for i in range(1, W)), taps[0] * w[0][None, :])
      dy = _load_tile(dy_any, b, u, cols, (u < T)[:, None] & col_ok[None, :]).astype(_F32)
      dz = _silu_grad(z, dy)                                         # dy ⊙ SiLU'(z) at u
      counts = _tap_counts(s, u, seg_at[0], seg_at[d], T)
      dx = dx + jnp.where(counts[:, None], dz, 0.0) * w[W - 1 - d][None, :]
      if d == 0:
        dw = tuple(dw[i] + jnp.sum(taps[i] * dz, axis=0) for i in range(W))
    _store_tile(dx_any, b, s, cols, dx.astype(dx_any.dtype), (s < T)[:, None] & col_ok[None, :])
    return dw

  _walk(tile, tiles, dw_any, b, group, cols, col_ok)


# ---- calls and the custom VJP

_WHOLE = pl.BlockSpec(memory_space=pl.ANY)


def _tile_call(kernel, name, x, w, seg, more, out_dtype, launch: _Launch):
  """A kernel over the grid of [BT, BC] tiles (B, ⌈T/BT⌉, ⌈C/BC⌉), every operand whole: x, w,
  the arrays `more` ([B, T, C] each), the segment ids if any; one [B, T, C] output."""
  B, T, C = x.shape
  BT, BC = launch.block_t, launch.block_c
  operands = [x, w, *more] + ([] if seg is None else [seg])
  return pl.pallas_call(
      functools.partial(kernel, block_t=BT, block_c=BC),
      grid=(B, pl.cdiv(T, BT), pl.cdiv(C, BC)),
      in_specs=[_WHOLE] * len(operands),
      out_specs=_WHOLE,
      out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
      interpret=launch.interpret,
      compiler_params=plt.CompilerParams(num_warps=launch.num_warps, num_stages=1),
      name=name,
  )(*operands)


def _walking_call(kernel, name, x, w, seg, grad, launch: _Launch):
  """(dx, dw) from a kernel whose (B, G, ⌈C/BC⌉) programs walk `tiles` T tiles each
  (`backward_groups`), reading x, w, `grad` ([B, T, C]: dy or dz) and the segment ids if any, and
  writing dx and a partial dw [B·G, W, C] float32 per program, summed here."""
  B, T, C = x.shape
  W = w.shape[0]
  BT, BC = launch.block_t, launch.block_c
  G, tiles = backward_groups(B, T, C, BT, BC, launch.min_programs)
  operands = [x, w, grad] + ([] if seg is None else [seg])
  dx, dw_parts = pl.pallas_call(
      functools.partial(kernel, block_t=BT, block_c=BC, tiles=tiles),
      grid=(B, G, pl.cdiv(C, BC)),
      in_specs=[_WHOLE] * len(operands),
      out_specs=[_WHOLE, _WHOLE],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((B * G, W, C), _F32)],
      interpret=launch.interpret,
      compiler_params=plt.CompilerParams(num_warps=launch.num_warps, num_stages=1),
      name=name,
  )(*operands)
  return dx, jnp.sum(dw_parts, axis=0).astype(w.dtype)


def _forward(x, w, seg, launch: _Launch):
  """y [B, T, C] in x's dtype."""
  return _tile_call(_forward_kernel, "short_conv_fwd", x, w, seg, [], x.dtype, launch)


def _backward(x, w, seg, dy, launch: _Launch):
  """(dx, dw) by `launch.backward`'s kernels."""
  if launch.backward == "one_pass":
    return _walking_call(_backward_kernel, "short_conv_bwd", x, w, seg, dy, launch)
  dz = _tile_call(_backward_dz_kernel, "short_conv_bwd_dz", x, w, seg, [dy], _F32, launch)
  return _walking_call(_backward_dxdw_kernel, "short_conv_bwd_dxdw", x, w, seg, dz, launch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_silu(x, w, seg, launch):
  return _forward(x, w, seg, launch)


def _conv_silu_fwd(x, w, seg, launch):
  return _forward(x, w, seg, launch), (x, w, seg)


def _conv_silu_bwd(launch, residuals, dy):
  x, w, seg = residuals
  dx, dw = _backward(x, w, seg, dy.astype(x.dtype), launch)
  return dx, dw, None


_conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


def _is_power_of_two(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


def _check(x, w, seg, block_t, block_c, num_warps, min_programs, backward):
  """ValueError naming the first argument that does not fit, and what would."""
  where = "short_conv_silu"
  if x.ndim != 3 or 0 in x.shape:
    raise ValueError(f"{where}: `x` has shape {tuple(x.shape)}; expected [B, T, C] with B, T, C "
                     "≥ 1 (batch, time, channels).")
  if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] != x.shape[2]:
    raise ValueError(f"{where}: `w` has shape {tuple(w.shape)}; expected [W, C] = [W ≥ 1, "
                     f"{x.shape[2]}] (the conv's W taps for each of x's C channels).")
  for name, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{where}: `{name}` has dtype {a.dtype}; expected a float dtype (bfloat16, "
                       "float16 or float32).")
  if seg is not None:
    if seg.shape != x.shape[:2] or not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"{where}: `segment_ids` has shape {tuple(seg.shape)} and dtype "
                       f"{seg.dtype}; expected integers of shape [B, T] = {tuple(x.shape[:2])} "
                       "(one document id per token), or None.")
  for name, value in (("block_t", block_t), ("block_c", block_c)):
    if not _is_power_of_two(value):
      raise ValueError(f"{where}: `{name}`={value!r}; expected a power of two (Triton blocks), "
                       "e.g. 32 or 128.")
  if num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"{where}: `num_warps`={num_warps!r}; expected 1, 2, 4, 8 or 16.")
  if isinstance(min_programs, bool) or not isinstance(min_programs, int) or min_programs < 1:
    raise ValueError(f"{where}: `min_programs`={min_programs!r}; expected an int ≥ 1 (the "
                     "backward's fewest programs, e.g. a few per SM).")
  if not isinstance(backward, str) or backward not in BACKWARDS:
    raise ValueError(f"{where}: `backward`={backward!r}; expected one of {BACKWARDS} (the "
                     "backward's kernels: two passes over a float32 dz, or one pass).")


@functools.partial(jax.jit, static_argnames=("block_t", "block_c", "num_warps", "min_programs",
                                             "backward", "interpret"))
def short_conv_silu(x_BxTxC, w_WxC, segment_ids_BxT=None, *, block_t: int = 32,
                    block_c: int = 128, num_warps: int = 4, min_programs: int = 1024,
                    backward: str = "two_pass", interpret: bool | None = None):
  """y = SiLU(causal depthwise conv(x, w)) [B, T, C] in x's dtype, differentiable in x and w
  (module docstring), with zeros before t = 0 and no tap across a change of `segment_ids`.

  x: [B, T, C] float; w: [W, C] (used in float32; dw comes back in w's dtype); segment_ids:
  [B, T] ints or None. `block_t` × `block_c`: the tile of both kernels (powers of two; T and C
  need not divide by them); `num_warps`: warps per program; `min_programs`: the backward's
  fewest programs (`backward_groups`); `backward`: its kernels, "two_pass" (dz, then dx and dw)
  or "one_pass" (BACKWARDS, module docstring). `interpret`: None runs the Pallas interpreter off
  GPUs.
  """
  _check(x_BxTxC, w_WxC, segment_ids_BxT, block_t, block_c, num_warps, min_programs, backward)
  if interpret is None:
    interpret = jax.default_backend() not in GPU_BACKENDS
  seg = None if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
  launch = _Launch(block_t=block_t, block_c=block_c, num_warps=num_warps,
                   min_programs=min_programs, interpret=bool(interpret), backward=backward)
  return _conv_silu(x_BxTxC, w_WxC, seg, launch)
