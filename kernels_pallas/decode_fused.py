"""One decode token of a GDN layer's recurrent part in one Pallas (Triton) kernel: the short conv
and SiLU of q, k, v, the L2 norm of q and k, and the rule's update (`decode_step.py`).

The unfused step runs these as several small XLA kernels per layer (the conv's taps, the SiLU,
two L2-norm reductions, the slices) around the rule's kernel; at batch 1 each costs a few µs while
the work is a few KB (experiments/NOTES_decode.md). Here a (batch, value head, V block) program
reads its q/k head's conv window [W, K] twice (q, k), its V block's window [W, BV], the filters,
and the state block S [K, BV]:

    q = l2(SiLU(Σ_i w_i ⊙ window_i)),  k likewise,  v = SiLU(Σ_i w_i ⊙ window_i)   (float32 sums,
                                            each rounded to the compute dtype as the unfused step)
    then the rule as `decode_step._kernel`:  δ = β (v − e^g Sᵀk),  S' = e^g S + k δᵀ,
                                             o = scale (e^g Sᵀq + (kᵀq) δ)

q and k are recomputed by each program of their head (K·W multiply-adds: less than reading S).
The window is the conv state with the new input appended, [B, W, C], C = q | k | v channels
(2·Hk·K + H·V), built by the caller, whose slice window[:, 1:] is the new conv state; W must be a
power of two (Triton blocks). e^g and β come in broadcast over V, as in `decode_step`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas.decode_gemv import summed_partials
from kernels_pallas.decode_step import default_block_v, rule_update
from kernels_pallas.decode_step import unsupported as rule_unsupported


def unsupported(W: int, K: int, V: int) -> str | None:
  """Why the compiled kernel cannot take conv width W and head dims K, V; None when it can."""
  if W < 1 or W & (W - 1):
    return f"conv width W={W}: Triton blocks need a power of two"
  return rule_unsupported(K, V)


def _conv_silu(win_ref, w_ref, dtype):
  """SiLU(Σ_i w_i ⊙ window_i) over the W taps in float32, rounded to `dtype` ([W, N] → [N])."""
  y = jnp.sum(win_ref[...].astype(jnp.float32) * w_ref[...].astype(jnp.float32), axis=0)
  return jax.nn.silu(y).astype(dtype)


def _l2(x, eps):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x) + eps)


def _kernel(qw_ref, kw_ref, vw_ref, qf_ref, kf_ref, vf_ref, e_ref, beta_ref, s_ref, o_ref,
            s_out_ref, *, scale, eps, dtype):
  f32 = jnp.float32
  q = _l2(_conv_silu(qw_ref, qf_ref, dtype), eps).astype(dtype).astype(f32)       # [K]
  k = _l2(_conv_silu(kw_ref, kf_ref, dtype), eps).astype(dtype).astype(f32)       # [K]
  v = _conv_silu(vw_ref, vf_ref, dtype).astype(f32)                               # [BV]
  S_new, o = rule_update(s_ref[...].astype(f32), q, k, v, e_ref[...], beta_ref[...], scale)
  s_out_ref[...] = S_new.astype(s_out_ref.dtype)
  o_ref[...] = o.astype(o_ref.dtype)


def fused_block_v(Hk: int, K: int, V: int, block_v: int | None = None) -> int:
  """The V block: `block_v` or `decode_step.default_block_v`'s, halved until it divides the q|k channels
  (2·Hk·K) that precede the v channels, so that every v block is a whole block of the window."""
  BV = min(V, block_v or default_block_v(K, V))
  while (2 * Hk * K) % BV:
    BV //= 2
  return BV


def _shared_launch(where, conv_w_WxC, *, W, Hk, K, H, V, block_v, interpret):
  """What both fused kernels share: the conv filters' and the platform's checks, and the grid's
  V block BV with the BlockSpecs of the filters (q, k, v), of the [B, H, V] rows and of the
  state. Returns (BV, G, v0, per_head, filter specs, row spec, state spec), v0 and per_head in
  blocks of BV (the v channels start at v0)."""
  C = 2 * Hk * K + H * V
  if conv_w_WxC.shape != (W, C):
    raise ValueError(f"{where}: `conv_w` has shape {conv_w_WxC.shape}; expected {(W, C)} (the "
                     "conv taps, the q | k | v channels).")
  if not interpret and (why := unsupported(W, K, V)) is not None:
    raise ValueError(f"{where}: {why}; use impl='pallas' or 'xla'.")
  G, BV = H // Hk, fused_block_v(Hk, K, V, block_v)
  v0, per_head = 2 * Hk * K // BV, V // BV
  filters = [pl.BlockSpec((W, K), lambda b, h, j: (0, h // G)),
             pl.BlockSpec((W, K), lambda b, h, j: (0, Hk + h // G)),
             pl.BlockSpec((W, BV), lambda b, h, j: (0, v0 + h * per_head + j))]
  row_spec = pl.BlockSpec((None, None, BV), lambda b, h, j: (b, h, j))
  s_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  return BV, G, v0, per_head, filters, row_spec, s_spec


@functools.partial(jax.jit, static_argnames=("num_heads", "head_k_dim", "scale", "qk_norm_eps",
                                             "block_v", "num_warps", "interpret"))
def gdn_decode_fused_pallas(window_BxWxC, conv_w_WxC, g_BxH, beta_BxH, S_BxHxKxV, *,
                            num_heads: int, head_k_dim: int, scale: float, qk_norm_eps: float,
                            block_v: int | None = None, num_warps: int = 4,
                            interpret: bool | None = None):
  """(o [B, H, V] float32, S' in S's dtype) of one token, from the conv window.

  window: [B, W, C] in the compute dtype (the conv state with this token's projected q | k | v
  appended), C = 2·Hk·K + H·V; conv_w: [W, C]; g, β: [B, H] (the decay's log and the rule's β);
  S: [B, H, K, V] (float32 or bfloat16). `num_heads` = Hk (q/k heads), `head_k_dim` = K; value
  head h reads q/k head h // (H / Hk). The same as `layers.short_conv_step`, the L2 norm with
  `qk_norm_eps` and `layers.gated_delta_rule_step` in turn (tests/decode_fused_test.py).
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  B, W, C = window_BxWxC.shape
  Hk, K = num_heads, head_k_dim
  H, V = S_BxHxKxV.shape[1], S_BxHxKxV.shape[3]
  if S_BxHxKxV.shape != (B, H, K, V) or C != 2 * Hk * K + H * V or H % Hk:
    raise ValueError(f"gdn_decode_fused_pallas: window {window_BxWxC.shape} and state "
                     f"{S_BxHxKxV.shape} do not fit num_heads={Hk}, head_k_dim={K}; expected "
                     "window [B, W, 2·Hk·K + H·V] and S [B, H, K, V] with H divisible by Hk.")
  BV, G, v0, per_head, filters, row_spec, s_spec = _shared_launch(
      "gdn_decode_fused_pallas", conv_w_WxC, W=W, Hk=Hk, K=K, H=H, V=V, block_v=block_v,
      interpret=interpret)
  e_BxHxV = jnp.broadcast_to(jnp.exp(g_BxH.astype(jnp.float32))[..., None], (B, H, V))
  beta_BxHxV = jnp.broadcast_to(beta_BxH.astype(jnp.float32)[..., None], (B, H, V))
  q_win = pl.BlockSpec((None, W, K), lambda b, h, j: (b, 0, h // G))
  k_win = pl.BlockSpec((None, W, K), lambda b, h, j: (b, 0, Hk + h // G))
  v_win = pl.BlockSpec((None, W, BV), lambda b, h, j: (b, 0, v0 + h * per_head + j))
  return pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), eps=float(qk_norm_eps),
                        dtype=window_BxWxC.dtype),
      grid=(B, H, V // BV),
      in_specs=[q_win, k_win, v_win, *filters, row_spec, row_spec, s_spec],
      out_specs=[row_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, V), jnp.float32),
                 jax.ShapeDtypeStruct(S_BxHxKxV.shape, S_BxHxKxV.dtype)],
      input_output_aliases={8: 1},
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      name="gdn_decode_fused",
  )(window_BxWxC, window_BxWxC, window_BxWxC, conv_w_WxC, conv_w_WxC, conv_w_WxC, e_BxHxV,
    beta_BxHxV, S_BxHxKxV)


# ---- The conv state as a ring (no window built per step) ----
#
# The kernel above needs the window [state, x] built by XLA (a concatenation) and the new conv
# state cut from it (a slice): two small kernels per layer and token. A ring avoids both: the conv
# state of each of q, k, v is kept as W rows [B, W, N] where row r holds the input of the step
# ≡ r (mod W), and `pos` is the row that holds the oldest input, which this token's input
# replaces. The window's input i < W − 1 is then row (pos + 1 + i) mod W and input W − 1 is x:
#
#     conv = Σ_r w_{tap(r)} ⊙ ring_r + w_{W−1} ⊙ x,   tap(r) = (r − pos − 1) mod W,
#
# with tap(pos) = W − 1 left out (row pos is the input the window has just dropped). The kernel
# writes x into row pos in place (input/output aliasing); no program reads row pos, so the
# programs that share a q/k head may write it in any order (they write the same values).


def _ring_conv_silu(ring_ref, x, w_ref, pos, dtype):
  """(SiLU(conv) [N] rounded to `dtype`, the ring block with x in row `pos`) of one token's
  input x [N]."""
  f32 = jnp.float32
  W = ring_ref.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (W,), 0)
  tap = ((rows + (W - 1) - pos) & (W - 1))[:, None]             # W is a power of two
  ring = ring_ref[...]
  w_of_row = jnp.zeros(ring.shape, f32)
  for i in range(W - 1):
    w_of_row = w_of_row + jnp.where(tap == i, w_ref[i, :].astype(f32)[None, :], 0.0)
  y = (jnp.sum(w_of_row * ring.astype(f32), axis=0)
       + w_ref[W - 1, :].astype(f32) * x.astype(f32))
  new_ring = jnp.where((rows == pos)[:, None], x.astype(ring.dtype)[None, :], ring)
  return jax.nn.silu(y).astype(dtype), new_ring


def _gates(x_any, a_log_any, dt_bias_any, *, a_col, b_col, beta_scale, parts=None, dtype=None,
           multipliers=(1.0, 1.0)):
  """(e^g, β) of this program's value head h, each [1] float32, from its columns of x:
  g = −exp(A_log_h) softplus(x[a_col + h] + dt_bias_h), β = beta_scale · σ(x[b_col + h])
  (`GatedDeltaNet._gates`). The refs are whole arrays (memory space ANY): a head's gate
  columns are not a block of x. With `parts`, x is [parts, B, N] split partials and W_a x, W_b x
  are summed (`decode_gemv.summed_partials`, with their Linears' `multipliers`)."""
  f32 = jnp.float32
  b, h = pl.program_id(0), pl.program_id(1)

  def column(col, multiplier):
    load = lambda i: (x_any[b, pl.ds(col + h, 1)] if i is None
                      else x_any[i, b, pl.ds(col + h, 1)])
    return summed_partials(load, parts, dtype, multiplier).astype(f32)
  a = column(a_col, multipliers[0])
  g = -jnp.exp(a_log_any[pl.ds(h, 1)].astype(f32)) * jax.nn.softplus(
      a + dt_bias_any[pl.ds(h, 1)].astype(f32))
  beta = jax.nn.sigmoid(column(b_col, multipliers[1])) * beta_scale
  return jnp.exp(g), beta


def _ring_kernel(pos_ref, rq_ref, rk_ref, rv_ref, xq_ref, xk_ref, xv_ref, qf_ref, kf_ref, vf_ref,
                 x_any, a_log_any, dt_bias_any, s_ref, o_ref, s_out_ref, rq_out_ref, rk_out_ref,
                 rv_out_ref, *, scale, eps, dtype, a_col, b_col, beta_scale, parts, multipliers):
  f32 = jnp.float32
  m_q, m_k, m_v, m_a, m_b = multipliers
  e, beta = _gates(x_any, a_log_any, dt_bias_any, a_col=a_col, b_col=b_col,
                   beta_scale=beta_scale, parts=parts, dtype=dtype, multipliers=(m_a, m_b))
  pos = pos_ref[...]                                                              # [W], all equal
  # This token's q | k | v inputs: the blocks as given, or their split partials summed.
  x_of = lambda ref, m: summed_partials(lambda i: ref[...] if i is None else ref[i, :], parts,
                                        dtype, m)
  q, rq = _ring_conv_silu(rq_ref, x_of(xq_ref, m_q), qf_ref, pos, dtype)
  k, rk = _ring_conv_silu(rk_ref, x_of(xk_ref, m_k), kf_ref, pos, dtype)
  v, rv = _ring_conv_silu(rv_ref, x_of(xv_ref, m_v), vf_ref, pos, dtype)
  q = _l2(q, eps).astype(dtype).astype(f32)
  k = _l2(k, eps).astype(dtype).astype(f32)
  S_new, o = rule_update(s_ref[...].astype(f32), q, k, v.astype(f32), e, beta, scale)
  s_out_ref[...] = S_new.astype(s_out_ref.dtype)
  o_ref[...] = o.astype(o_ref.dtype)
  rq_out_ref[...] = rq
  rk_out_ref[...] = rk
  rv_out_ref[...] = rv


@functools.partial(jax.jit, static_argnames=("num_heads", "head_k_dim", "scale", "qk_norm_eps",
                                             "gate_columns", "beta_scale", "column_multipliers",
                                             "block_v", "num_warps", "interpret"))
def gdn_decode_fused_ring_pallas(pos_W, rings, x_BxN, conv_w_WxC, a_log_H, dt_bias_H, S_BxHxKxV,
                                 *, num_heads: int, head_k_dim: int, scale: float,
                                 qk_norm_eps: float, gate_columns: tuple[int, int],
                                 beta_scale: float = 1.0,
                                 column_multipliers: tuple[float, ...] = (1.0,) * 5,
                                 block_v: int | None = None, num_warps: int = 4,
                                 interpret: bool | None = None):
  """(o [B, H, V] float32, S', (ring_q', ring_k', ring_v')) of one token, from the conv rings.

  pos_W: int32 [W], every entry the ring row that this token's input replaces; rings: (ring_q,
  ring_k, ring_v), [B, W, Hk·K], [B, W, Hk·K], [B, W, H·V] in the compute dtype (`ring_from_state`
  makes them); x: [B, N], this token's projections: its first C = 2·Hk·K + H·V columns are
  q | k | v, and the columns a_col + h, b_col + h (`gate_columns` = (a_col, b_col)) are W_a x and
  W_b x of value head h, from which the kernel makes the gates:
      g = −exp(A_log) softplus(W_a x + dt_bias),  β = beta_scale · σ(W_b x)
  (a_log, dt_bias: [H]); conv_w, S as `gdn_decode_fused_pallas`. The same as that kernel on the
  window [state, x] with those gates (tests/decode_fused_test.py); the rings and S are updated in
  place.

  x may instead be the in-projection GEMV's split partials [S, B, N] float32
  (`decode_gemv.gemv_norm_pallas(..., sum_splits=False)`), so that no XLA kernel sums them
  between the two kernels: each program sums the S partials of the columns it reads and makes
  rnd(rnd(Σ_s x_s) · rnd(m)) per column group, rnd rounding to the rings' dtype and m the
  group's Linear multiplier, `column_multipliers` = (m_q, m_k, m_v, m_a, m_b) (1: no product),
  as the unfused step rounds the GEMV's sum and `layers.scale_columns`. (Given summed x, the
  caller has applied the multipliers.)
  """
  where = "gdn_decode_fused_ring_pallas"
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  ring_q, ring_k, ring_v = rings
  B, W, _ = ring_q.shape
  Hk, K = num_heads, head_k_dim
  H, V = S_BxHxKxV.shape[1], S_BxHxKxV.shape[3]
  C = 2 * Hk * K + H * V
  parts = x_BxN.shape[0] if x_BxN.ndim == 3 else None
  if x_BxN.ndim not in (2, 3) or (parts is not None and x_BxN.dtype != jnp.float32):
    raise ValueError(f"{where}: x {x_BxN.shape} {x_BxN.dtype}; expected this token's "
                     "projections [B, N], or the in-projection GEMV's float32 split partials "
                     "[S, B, N].")
  Bx, N = x_BxN.shape[-2:]
  if (ring_q.shape != (B, W, Hk * K) or ring_k.shape != ring_q.shape
      or ring_v.shape != (B, W, H * V) or S_BxHxKxV.shape != (B, H, K, V) or H % Hk
      or Bx != B or N < C or pos_W.shape != (W,)
      or a_log_H.shape != (H,) or dt_bias_H.shape != (H,)
      or not all(C <= col and col + H <= N for col in gate_columns)):
    raise ValueError(f"{where}: rings {ring_q.shape}, {ring_k.shape}, "
                     f"{ring_v.shape}, x {x_BxN.shape}, pos {pos_W.shape} and state "
                     f"{S_BxHxKxV.shape}, A_log {a_log_H.shape}, dt_bias {dt_bias_H.shape} and "
                     f"gate_columns={gate_columns} do not fit num_heads={Hk}, head_k_dim={K}; "
                     "expected rings [B, W, Hk·K] (q, k) and [B, W, H·V] (v), x [B, N ≥ "
                     "2·Hk·K + H·V] (or [S, B, N]), pos [W], S [B, H, K, V], A_log and dt_bias "
                     "[H], and gate columns past q | k | v with H columns each inside x.")
  if len(column_multipliers) != 5:
    raise ValueError(f"{where}: `column_multipliers`={column_multipliers!r}; expected 5 floats "
                     "(the q, k, v, W_a, W_b Linears' forward multipliers).")
  BV, G, v0, per_head, filters, row_spec, s_spec = _shared_launch(
      where, conv_w_WxC, W=W, Hk=Hk, K=K, H=H, V=V, block_v=block_v, interpret=interpret)
  whole = pl.BlockSpec(memory_space=pl.ANY)
  pos_spec = pl.BlockSpec((W,), lambda b, h, j: (0,))
  qk_ring = pl.BlockSpec((None, W, K), lambda b, h, j: (b, 0, h // G))
  v_ring = pl.BlockSpec((None, W, BV), lambda b, h, j: (b, 0, h * per_head + j))
  if parts is None:   # x's column blocks: q, k of the program's q/k head; its v block
    x_block = lambda width, col: pl.BlockSpec((None, width), lambda b, h, j: (b, col(h, j)))
  else:               # the same columns of every partial
    x_block = lambda width, col: pl.BlockSpec((parts, None, width),
                                              lambda b, h, j: (0, b, col(h, j)))
  x_q = x_block(K, lambda h, j: h // G)
  x_k = x_block(K, lambda h, j: Hk + h // G)
  x_v = x_block(BV, lambda h, j: v0 + h * per_head + j)
  o, S, rq, rk, rv = pl.pallas_call(
      functools.partial(_ring_kernel, scale=float(scale), eps=float(qk_norm_eps),
                        dtype=ring_q.dtype, a_col=int(gate_columns[0]),
                        b_col=int(gate_columns[1]), beta_scale=float(beta_scale), parts=parts,
                        multipliers=tuple(float(m) for m in column_multipliers)),
      grid=(B, H, V // BV),
      in_specs=[pos_spec, qk_ring, qk_ring, v_ring, x_q, x_k, x_v, *filters, whole, whole,
                whole, s_spec],
      out_specs=[row_spec, s_spec, qk_ring, qk_ring, v_ring],
      out_shape=[jax.ShapeDtypeStruct((B, H, V), jnp.float32),
                 jax.ShapeDtypeStruct(S_BxHxKxV.shape, S_BxHxKxV.dtype),
                 *(jax.ShapeDtypeStruct(r.shape, r.dtype) for r in rings)],
      input_output_aliases={13: 1, 1: 2, 2: 3, 3: 4},
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      name="gdn_decode_fused_ring",
  )(pos_W.astype(jnp.int32), ring_q, ring_k, ring_v, x_BxN, x_BxN, x_BxN, conv_w_WxC,
    conv_w_WxC, conv_w_WxC, x_BxN, a_log_H, dt_bias_H, S_BxHxKxV)
  return o, S, (rq, rk, rv)


def ring_from_state(conv_BxWm1xC, Hk: int, K: int):
  """The rings (q, k, v) of a conv state [B, W − 1, C] (oldest input first), for pos = 0: row 0
  is free, rows 1 … W − 1 hold the state."""
  ring = jnp.pad(conv_BxWm1xC, ((0, 0), (1, 0), (0, 0)))
  return ring[..., :Hk * K], ring[..., Hk * K:2 * Hk * K], ring[..., 2 * Hk * K:]


def state_from_ring(rings, pos):
  """The conv state [B, W − 1, C] (oldest input first) of rings whose next token replaces row
  `pos` (an int or a traced int32 scalar): rows (pos + 1 + i) mod W, i < W − 1."""
  ring = jnp.concatenate(rings, axis=-1)
  W = ring.shape[1]
  return jnp.take(ring, (pos + 1 + jnp.arange(W - 1)) % W, axis=1)
