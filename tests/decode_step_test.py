"""The single-token rule update: the fused jnp step and its Pallas kernel against the NumPy
recurrence (float64), GVA, bf16 state storage, and the kernel's lowering to Triton for an H100."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.layers import gated_delta_rule_step
from kernels_pallas.decode_step import gated_delta_rule_step_pallas
from tests.np_reference import gated_delta_rule_ref


def inputs(B, Hk, H, K, V, seed=0, state_dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(jax.random.normal(ks[0], (B, Hk, K))), unit(jax.random.normal(ks[1], (B, Hk, K)))
  v = jax.random.normal(ks[2], (B, H, V))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, H)))
  beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, H)))     # negative eigenvalues too
  S = jax.random.normal(ks[5], (B, H, K, V)).astype(state_dtype)
  return q, k, v, g, beta, S


def reference(q, k, v, g, beta, S, scale):
  """One token of the float64 NumPy recurrence (q/k broadcast to the value heads)."""
  G = v.shape[1] // q.shape[1]
  f64 = lambda x: np.asarray(x, np.float64)
  rep = lambda x: np.repeat(f64(x), G, axis=1)[:, None]
  o, S_new = gated_delta_rule_ref(rep(q), rep(k), f64(v)[:, None], f64(g)[:, None],
                                  f64(beta)[:, None], scale=scale, initial_state=f64(S))
  return o[:, 0], S_new


@pytest.mark.parametrize("step", ["xla", "pallas"])
@pytest.mark.parametrize("B, Hk, H, K, V", [(2, 2, 4, 8, 12), (1, 1, 1, 32, 64),
                                            (2, 1, 2, 64, 128)])
def test_step_matches_the_recurrence(step, B, Hk, H, K, V):
  fn = gated_delta_rule_step if step == "xla" else gated_delta_rule_step_pallas
  args = inputs(B, Hk, H, K, V)
  o, S = fn(*args, scale=K ** -0.5)
  o_ref, S_ref = reference(*args, K ** -0.5)
  assert o.shape == (B, H, V) and o.dtype == jnp.float32 and S.dtype == jnp.float32
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)


def test_bf16_state_is_read_and_written_in_bf16_with_float32_math():
  args = inputs(2, 2, 4, 32, 64, seed=1, state_dtype=jnp.bfloat16)
  o_x, S_x = gated_delta_rule_step(*args, scale=0.2)
  o_p, S_p = gated_delta_rule_step_pallas(*args, scale=0.2)
  o_ref, S_ref = reference(*args, 0.2)        # from the same bf16 state, in float64
  assert S_x.dtype == S_p.dtype == jnp.bfloat16
  np.testing.assert_allclose(o_x, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(o_p, o_ref, atol=1e-5, rtol=1e-5)
  for S in (S_x, S_p):   # one bf16 rounding of the new state
    np.testing.assert_allclose(np.asarray(S, np.float64), S_ref, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_one_triton_call_for_h100(state_dtype):
  """What interpret mode cannot check (Triton's rules on blocks and ops); the last step, Triton IR
  → PTX, needs a GPU (experiments/bench_decode.py runs it)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  sds = jax.ShapeDtypeStruct
  B, Hk, H, K, V = 2, 3, 6, 256, 512             # the 512M config's heads, with GVA
  args = (sds((B, Hk, K), jnp.bfloat16), sds((B, Hk, K), jnp.bfloat16),
          sds((B, H, V), jnp.bfloat16), sds((B, H), jnp.float32), sds((B, H), jnp.float32),
          sds((B, H, K, V), state_dtype))
  fn = functools.partial(gated_delta_rule_step_pallas, scale=K ** -0.5, interpret=False)
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
  text = exported.mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert "output_operand_alias" in text        # S' written into S's buffer


def test_kernel_rejects_shapes_triton_cannot_take():
  with pytest.raises(ValueError, match="head dim V=12"):
    gated_delta_rule_step_pallas(*inputs(1, 1, 1, 16, 12), scale=0.25, interpret=False)
