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
  if conv_w_WxC.shape != (W, C):
    raise ValueError(f"gdn_decode_fused_pallas: `conv_w` has shape {conv_w_WxC.shape}; expected "
                     f"{(W, C)} (the window's taps and channels).")
  if not interpret and (why := unsupported(W, K, V)) is not None:
    raise ValueError(f"gdn_decode_fused_pallas: {why}; use impl='pallas' or 'xla'.")
  G, BV = H // Hk, fused_block_v(Hk, K, V, block_v)
  v0, per_head = 2 * Hk * K // BV, V // BV          # v channels, in blocks of BV
  e_BxHxV = jnp.broadcast_to(jnp.exp(g_BxH.astype(jnp.float32))[..., None], (B, H, V))
  beta_BxHxV = jnp.broadcast_to(beta_BxH.astype(jnp.float32)[..., None], (B, H, V))
  q_win = pl.BlockSpec((None, W, K), lambda b, h, j: (b, 0, h // G))
  k_win = pl.BlockSpec((None, W, K), lambda b, h, j: (b, 0, Hk + h // G))
  v_win = pl.BlockSpec((None, W, BV), lambda b, h, j: (b, 0, v0 + h * per_head + j))
  q_w = pl.BlockSpec((W, K), lambda b, h, j: (0, h // G))
  k_w = pl.BlockSpec((W, K), lambda b, h, j: (0, Hk + h // G))
  v_w = pl.BlockSpec((W, BV), lambda b, h, j: (0, v0 + h * per_head + j))
  row_spec = pl.BlockSpec((None, None, BV), lambda b, h, j: (b, h, j))
  s_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), eps=float(qk_norm_eps),
                        dtype=window_BxWxC.dtype),
      grid=(B, H, V // BV),
      in_specs=[q_win, k_win, v_win, q_w, k_w, v_w, row_spec, row_spec, s_spec],
      out_specs=[row_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, V), jnp.float32),
                 jax.ShapeDtypeStruct(S_BxHxKxV.shape, S_BxHxKxV.dtype)],
      input_output_aliases={8: 1},
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
      name="gdn_decode_fused",
  )(window_BxWxC, window_BxWxC, window_BxWxC, conv_w_WxC, conv_w_WxC, conv_w_WxC, e_BxHxV,
    beta_BxHxV, S_BxHxKxV)
