"""kernels_pallas/decode_fused.py: the conv + SiLU + q/k L2 norm + rule kernel of one decode token
against the unfused step (`layers.short_conv_step`, the L2 norm, `layers.gated_delta_rule_step`)
and its lowering to one Triton call for an H100. (A model's generation with it:
tests/generate_test.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.layers import gated_delta_rule_step, short_conv_step
from kernels_pallas.decode_fused import (fused_block_v, gdn_decode_fused_pallas,
                                         gdn_decode_fused_ring_pallas, ring_from_state,
                                         state_from_ring, unsupported)
from tests.triton_export import TRITON_CALL, export_for_h100


def unfused(window, conv_w, g, beta, S, *, Hk, K, scale, eps):
  """The unfused step's math: conv of the window (its last input is this token), SiLU, L2 norms
  rounded to the window's dtype, then the fused-jnp rule."""
  B, W, C = window.shape
  f, new_conv = short_conv_step(window[:, -1], window[:, :-1], conv_w)
  l2 = lambda x: (x.astype(jnp.float32) * jax.lax.rsqrt(
      jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + eps)).astype(window.dtype)
  q = l2(f[:, :Hk * K].reshape(B, Hk, K))
  k = l2(f[:, Hk * K:2 * Hk * K].reshape(B, Hk, K))
  H, V = S.shape[1], S.shape[3]
  v = f[:, 2 * Hk * K:].reshape(B, H, V)
  return gated_delta_rule_step(q, k, v, g, beta, S, scale=scale), new_conv


def inputs(B, W, Hk, H, K, V, seed=0, dtype=jnp.float32, state_dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 5)
  C = 2 * Hk * K + H * V
  window = jax.random.normal(ks[0], (B, W, C)).astype(dtype)
  conv_w = (jax.random.normal(ks[1], (W, C)) / W ** 0.5).astype(dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[2], (B, H)))
  beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, H)))
  S = jax.random.normal(ks[4], (B, H, K, V)).astype(state_dtype)
  return window, conv_w, g, beta, S


@pytest.mark.parametrize("B, W, Hk, H, K, V, block_v", [
    (2, 4, 2, 4, 8, 16, None),     # GVA
    (1, 4, 1, 2, 16, 32, 8),       # several V blocks per head
    (2, 2, 3, 3, 16, 16, None)])
def test_kernel_equals_the_unfused_step(B, W, Hk, H, K, V, block_v):
  args = inputs(B, W, Hk, H, K, V)
  o, S = gdn_decode_fused_pallas(*args, num_heads=Hk, head_k_dim=K, scale=K ** -0.5,
                                 qk_norm_eps=1e-6, block_v=block_v)
  (o_ref, S_ref), _ = unfused(*args, Hk=Hk, K=K, scale=K ** -0.5, eps=1e-6)
  assert o.shape == (B, H, V) and S.dtype == jnp.float32
  assert float(jnp.abs(o_ref).max()) > 0.1       # the comparison can see differences
  np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(S, S_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("B, W, Hk, H, K, V, block_v, dtype", [
    (2, 4, 2, 4, 8, 16, None, jnp.float32),     # GVA
    (1, 4, 1, 2, 16, 32, 8, jnp.float32),       # several V blocks per head
    (2, 2, 3, 3, 16, 16, None, jnp.bfloat16)])
def test_ring_kernel_equals_the_window_kernel_step_after_step(B, W, Hk, H, K, V, block_v, dtype):
  """Seven tokens (the ring wraps): the same outputs and states as the window kernel given the
  gates made in XLA as `GatedDeltaNet._gates` makes them, and the rings read back
  (`state_from_ring`) as the window's conv state. x holds q | k | v, 3 other columns, then W_a x
  and W_b x (H columns each), then one more: the kernel reads each where it is told."""
  C = 2 * Hk * K + H * V
  a_col, b_col = C + 3, C + 3 + H
  state, conv_w, _, _, S = inputs(B, W, Hk, H, K, V, seed=4, dtype=dtype)
  state = state[:, 1:]
  a_log = jnp.log(jnp.linspace(1.0, 16.0, H))
  dt_bias = jnp.linspace(-4.0, -2.0, H)
  rings, S_ring = ring_from_state(state, Hk, K), S
  kw = dict(num_heads=Hk, head_k_dim=K, scale=K ** -0.5, qk_norm_eps=1e-6, block_v=block_v)
  for t in range(7):
    x = jax.random.normal(jax.random.key(100 + t), (B, b_col + H + 1)).astype(dtype)
    beta = 2 * jax.nn.sigmoid(x[:, b_col:b_col + H].astype(jnp.float32))
    g = -jnp.exp(a_log) * jax.nn.softplus(x[:, a_col:a_col + H].astype(jnp.float32) + dt_bias)
    window = jnp.concatenate([state, x[:, None, :C]], axis=1)
    o, S = gdn_decode_fused_pallas(window, conv_w, g, beta, S, **kw)
    state = window[:, 1:]
    o_ring, S_ring, rings = gdn_decode_fused_ring_pallas(
        jnp.full((W,), t % W), rings, x, conv_w, a_log, dt_bias, S_ring,
        gate_columns=(a_col, b_col), beta_scale=2.0, **kw)
    np.testing.assert_allclose(o_ring, o, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S_ring.astype(jnp.float32), S.astype(jnp.float32), atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_array_equal(state_from_ring(rings, (t + 1) % W), state)
  assert float(jnp.abs(o).max()) > 0.01     # the comparison can see differences


def test_bf16_compute_and_state():
  """bf16 window and state: the kernel rounds the conv output and q, k as the unfused step does,
  so both agree to the state's one bf16 rounding."""
  args = inputs(2, 4, 2, 4, 16, 32, seed=3, dtype=jnp.bfloat16, state_dtype=jnp.bfloat16)
  o, S = gdn_decode_fused_pallas(*args, num_heads=2, head_k_dim=16, scale=0.25, qk_norm_eps=1e-6)
  (o_ref, S_ref), _ = unfused(*args, Hk=2, K=16, scale=0.25, eps=1e-6)
  assert S.dtype == jnp.bfloat16
  np.testing.assert_allclose(o, o_ref, atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(S, np.float32), np.asarray(S_ref, np.float32),
                             atol=2e-2, rtol=2 ** -7)


def test_block_v_divides_the_qk_channels():
  assert fused_block_v(6, 256, 512) == 32                 # the 512M config: decode_step's block
  assert fused_block_v(1, 8, 512, block_v=256) == 16      # 2·Hk·K = 16 channels before v
  assert unsupported(3, 16, 16) and unsupported(4, 16, 12) and unsupported(4, 16, 16) is None


@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_one_triton_call_for_h100(state_dtype):
  """What interpret mode cannot check (Triton's rules on blocks and ops); Triton IR → PTX needs a
  GPU (experiments/bench_decode.py runs it)."""
  sds = jax.ShapeDtypeStruct
  B, W, Hk, H, K, V = 2, 4, 3, 6, 256, 512         # the 512M config's heads, with GVA
  C = 2 * Hk * K + H * V
  args = (sds((B, W, C), jnp.bfloat16), sds((W, C), jnp.bfloat16), sds((B, H), jnp.float32),
          sds((B, H), jnp.float32), sds((B, H, K, V), state_dtype))
  fn = functools.partial(gdn_decode_fused_pallas, num_heads=Hk, head_k_dim=K, scale=K ** -0.5,
                         qk_norm_eps=1e-6, interpret=False)
  text = export_for_h100(fn, *args)
  assert text.count(TRITON_CALL) == 1
  assert "output_operand_alias" in text


def test_ring_kernel_lowers_to_one_triton_call_for_h100():
  """The ring kernel's Triton lowering for the 512M model's heads at batch 1: one call, the rings
  and the state updated in place."""
  sds = jax.ShapeDtypeStruct
  B, W, Hk, H, K, V = 1, 4, 6, 6, 256, 512
  C, bf16 = 2 * Hk * K + H * V, jnp.bfloat16
  rings = (sds((B, W, Hk * K), bf16), sds((B, W, Hk * K), bf16), sds((B, W, H * V), bf16))
  N = C + H * V + 2 * H                              # q | k | v | gate | a | b, as the model's
  args = (sds((W,), jnp.int32), rings, sds((B, N), bf16), sds((W, C), bf16),
          sds((H,), jnp.float32), sds((H,), jnp.float32), sds((B, H, K, V), bf16))
  fn = functools.partial(gdn_decode_fused_ring_pallas, num_heads=Hk, head_k_dim=K,
                         scale=K ** -0.5, qk_norm_eps=1e-6, gate_columns=(N - 2 * H, N - H),
                         interpret=False)
  text = export_for_h100(fn, *args)
  assert text.count(TRITON_CALL) == 1
  assert text.count("output_operand_alias<output_tuple_indices") == 4


def test_decode_config_sets_the_launch_of_both_kernels():
  """DecodeConfig's V block and warps reach the Triton calls (the grid's V axis, num_warps), as
  exported for an H100, for the step kernel and the fused one."""
  from kernels_pallas.config import DecodeConfig
  from kernels_pallas.decode_step import gated_delta_rule_step_pallas
  sds = jax.ShapeDtypeStruct
  B, W, Hk, H, K, V = 1, 4, 6, 6, 256, 512
  C = 2 * Hk * K + H * V
  step_args = (sds((B, Hk, K), jnp.bfloat16), sds((B, Hk, K), jnp.bfloat16),
               sds((B, H, V), jnp.bfloat16), sds((B, H), jnp.float32), sds((B, H), jnp.float32),
               sds((B, H, K, V), jnp.float32))
  fused_args = (sds((B, W, C), jnp.bfloat16), sds((W, C), jnp.bfloat16), sds((B, H), jnp.float32),
                sds((B, H), jnp.float32), sds((B, H, K, V), jnp.float32))
  for cfg, grid_v, warps in ((DecodeConfig(), 16, 4),
                             (DecodeConfig(block_v=16, num_warps=8), 32, 8)):
    kw = dict(block_v=cfg.block_v, num_warps=cfg.num_warps, interpret=False, scale=0.0625)
    texts = (export_for_h100(functools.partial(gated_delta_rule_step_pallas, **kw), *step_args),
             export_for_h100(functools.partial(gdn_decode_fused_pallas, num_heads=Hk,
                                               head_k_dim=K, qk_norm_eps=1e-6, **kw),
                             *fused_args))
    for text in texts:
      assert f"grid_z = {grid_v} : i32" in text and f"num_warps = {warps} : i32" in text


def test_errors_name_the_argument():
  args = inputs(1, 4, 1, 1, 16, 16)
  with pytest.raises(ValueError, match="num_heads=2"):
    gdn_decode_fused_pallas(*args, num_heads=2, head_k_dim=16, scale=1.0, qk_norm_eps=1e-6)
  with pytest.raises(ValueError, match="conv_w"):
    gdn_decode_fused_pallas(args[0], args[1][:2], *args[2:], num_heads=1, head_k_dim=16,
                            scale=1.0, qk_norm_eps=1e-6)
  with pytest.raises(ValueError, match="conv width W=3"):
    gdn_decode_fused_pallas(*inputs(1, 3, 1, 1, 16, 16), num_heads=1, head_k_dim=16, scale=1.0,
                            qk_norm_eps=1e-6, interpret=False)


def test_ring_kernel_errors_name_the_argument():
  window, conv_w, _, _, S = inputs(1, 4, 1, 1, 16, 16)
  rings = ring_from_state(window[:, 1:], 1, 16)
  x = jnp.concatenate([window[:, -1], jnp.zeros((1, 2))], axis=1)       # q | k | v | a | b
  a_log = dt_bias = jnp.zeros((1,))
  kw = dict(num_heads=1, head_k_dim=16, scale=1.0, qk_norm_eps=1e-6, gate_columns=(48, 49))
  pos = jnp.zeros((4,), jnp.int32)
  ring = functools.partial(gdn_decode_fused_ring_pallas, conv_w_WxC=conv_w, a_log_H=a_log,
                           dt_bias_H=dt_bias, S_BxHxKxV=S)
  ring(pos, rings, x, **kw)                                             # the valid call
  with pytest.raises(ValueError, match="num_heads=2"):
    ring(pos, rings, x, **{**kw, "num_heads": 2})
  with pytest.raises(ValueError, match=r"x \(1, 40\)"):          # fewer than the q | k | v channels
    ring(pos, rings, x[:, :40], **kw)
  with pytest.raises(ValueError, match="pos"):
    ring(pos[:3], rings, x, **kw)
  with pytest.raises(ValueError, match=r"gate_columns=\(47, 50\)"):    # inside q | k | v, past x
    ring(pos, rings, x, **{**kw, "gate_columns": (47, 50)})
  with pytest.raises(ValueError, match="A_log"):
    ring(pos, rings, x, **kw, a_log_H=jnp.zeros((2,)))
  with pytest.raises(ValueError, match="conv_w"):
    ring(pos, rings, x, **{**kw, "conv_w_WxC": conv_w[:2]})


def _split(x, parts, seed):
  """x [B, N] float32 as `parts` random float32 addends [parts, B, N] that sum to about x (the
  in-projection GEMV's split partials)."""
  noise = jax.random.normal(jax.random.key(seed), (parts - 1,) + x.shape)
  return jnp.concatenate([x[None] - jnp.sum(noise, axis=0, keepdims=True), noise], axis=0)


@pytest.mark.parametrize("parts, dtype, multipliers", [
    (8, jnp.bfloat16, (1.0,) * 5),
    (3, jnp.bfloat16, (0.5, 2.0, 0.25, 3.0, 0.75)),     # a count that is no power of two
    (1, jnp.float32, (1.0,) * 5),
    (4, jnp.float32, (0.5, 2.0, 0.25, 3.0, 0.75))])
def test_ring_kernel_sums_the_in_projection_partials(parts, dtype, multipliers):
  """DecodeConfig.gemv_in_partials: x given as split partials [S, B, N] float32 (and the q, k, v,
  W_a, W_b multipliers) gives what x summed by XLA, rounded to the compute dtype, times each
  column group's multiplier (rounded again; `layers.scale_columns`) gives: the same o, state and
  rings, bit for bit in bf16 (the partials' sum in one order; both round it the same way), to
  float32 rounding in float32. Two tokens, so the second reads the rings the first wrote."""
  B, W, Hk, H, K, V = 1, 4, 2, 4, 16, 32
  C = 2 * Hk * K + H * V
  N = C + H * V + 2 * H                      # q | k | v | gate | a | b, as the model's
  state, conv_w, _, _, S = inputs(B, W, Hk, H, K, V, seed=7, dtype=dtype)
  a_log, dt_bias = jnp.log(jnp.linspace(1.0, 16.0, H)), jnp.linspace(-4.0, -2.0, H)
  widths = (Hk * K, Hk * K, H * V, H * V, H, H)
  column_m = jnp.concatenate([jnp.full((w,), m, dtype) for w, m in
                              zip(widths, multipliers[:3] + (1.0,) + multipliers[3:])])
  kw = dict(num_heads=Hk, head_k_dim=K, scale=K ** -0.5, qk_norm_eps=1e-6,
            gate_columns=(N - 2 * H, N - H), beta_scale=2.0)
  summed = parted = (ring_from_state(state[:, 1:], Hk, K), S)
  for t in range(2):
    partials = _split(3 * jax.random.normal(jax.random.key(20 + t), (B, N)), parts, seed=t)
    x = jnp.sum(partials, axis=0).astype(dtype) * column_m           # XLA's sum, scale_columns
    pos = jnp.full((W,), t)
    o, S1, rings1 = gdn_decode_fused_ring_pallas(pos, summed[0], x, conv_w, a_log, dt_bias,
                                                 summed[1], **kw)
    o_p, S_p, rings_p = gdn_decode_fused_ring_pallas(pos, parted[0], partials, conv_w, a_log,
                                                     dt_bias, parted[1],
                                                     column_multipliers=multipliers, **kw)
    if dtype == jnp.bfloat16:
      np.testing.assert_array_equal(o_p, o)
      np.testing.assert_array_equal(S_p, S1)
    else:
      np.testing.assert_allclose(o_p, o, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(S_p, S1, rtol=1e-5, atol=1e-5)
    for r_p, r in zip(rings_p, rings1):
      np.testing.assert_allclose(np.asarray(r_p, np.float32), np.asarray(r, np.float32),
                                 rtol=1e-6, atol=1e-6)
    summed, parted = (rings1, S1), (rings_p, S_p)
  assert float(jnp.abs(o).max()) > 0.01
  # Without the multipliers the partials' path differs (the test sees them).
  if multipliers != (1.0,) * 5:
    o_wrong = gdn_decode_fused_ring_pallas(pos, parted[0], partials, conv_w, a_log, dt_bias,
                                           parted[1], **kw)[0]
    assert not np.allclose(o_wrong, o_p, rtol=1e-3, atol=1e-3)


def test_ring_kernel_with_partials_lowers_to_one_triton_call_for_h100():
  """The 512M model's in-projection partials at the default launch (8 splits of [1, 9228]
  float32) in place of x: one Triton call, the rings and the state in place."""
  sds = jax.ShapeDtypeStruct
  B, W, Hk, H, K, V = 1, 4, 6, 6, 256, 512
  C, bf16 = 2 * Hk * K + H * V, jnp.bfloat16
  N = C + H * V + 2 * H
  rings = (sds((B, W, Hk * K), bf16), sds((B, W, Hk * K), bf16), sds((B, W, H * V), bf16))
  for parts in (8, 3):
    args = (sds((W,), jnp.int32), rings, sds((parts, B, N), jnp.float32), sds((W, C), bf16),
            sds((H,), jnp.float32), sds((H,), jnp.float32), sds((B, H, K, V), bf16))
    fn = functools.partial(gdn_decode_fused_ring_pallas, num_heads=Hk, head_k_dim=K,
                           scale=K ** -0.5, qk_norm_eps=1e-6, gate_columns=(N - 2 * H, N - H),
                           column_multipliers=(1.0, 1.0, 0.5, 1.0, 1.0), interpret=False)
    text = export_for_h100(fn, *args)
    assert text.count(TRITON_CALL) == 1
    assert text.count("output_operand_alias<output_tuple_indices") == 4


def test_ring_kernel_partials_errors_name_the_argument():
  window, conv_w, _, _, S = inputs(1, 4, 1, 1, 16, 16)
  rings = ring_from_state(window[:, 1:], 1, 16)
  parts = jnp.zeros((2, 1, 50))                                         # q | k | v | a | b
  kw = dict(num_heads=1, head_k_dim=16, scale=1.0, qk_norm_eps=1e-6, gate_columns=(48, 49))
  ring = functools.partial(gdn_decode_fused_ring_pallas, jnp.zeros((4,), jnp.int32), rings,
                           conv_w_WxC=conv_w, a_log_H=jnp.zeros((1,)), dt_bias_H=jnp.zeros((1,)),
                           S_BxHxKxV=S, **kw)
  ring(parts)                                                           # the valid call
  with pytest.raises(ValueError, match="float32 split partials"):
    ring(parts.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"x \(2, 1, 1, 50\)"):
    ring(parts[:, None])
  with pytest.raises(ValueError, match=r"x \(2, 2, 50\)"):               # batch 2 ≠ the rings' 1
    ring(jnp.zeros((2, 2, 50)))
  with pytest.raises(ValueError, match="column_multipliers"):
    ring(parts, column_multipliers=(1.0, 1.0))
