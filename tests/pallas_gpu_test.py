"""Tests of the GPU Pallas kernels (`kernels_pallas.gpu`) on CPU.

* interpret mode against the float64 NumPy reference (forward, final state) and against autodiff of the
  independent recurrent implementation (every gradient), with GVA, h0, packed documents, T not a
  multiple of the chunk;
* the shared per-chunk math (`chunk_math`) against NumPy;
* lowering for an abstract H100: the kernels must lower to Triton IR (what interpret mode cannot
  check: Triton rejects value slicing, non-2-D dots, dims < 16 ...). The last step, Triton IR → PTX,
  runs inside XLA's GPU compiler and needs a GPU; experiments/bench_kernels.py covers it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import gated_delta_rule
from kernels_pallas import chunk_math, gpu
from tests.np_reference import gated_delta_rule_ref


def _inputs(B, T, Hk, H, K, V, seed, g_scale=1.0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, Hk, K)).astype(np.float32)
  k = rng.standard_normal((B, T, Hk, K))
  k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
  v = rng.standard_normal((B, T, H, V)).astype(np.float32)
  g = (-g_scale * rng.uniform(0.01, 1.0, (B, T, H))).astype(np.float32)
  beta = rng.uniform(0.1, 0.9, (B, T, H)).astype(np.float32)
  h0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
  return q, k, v, g, beta, h0


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


# (B, T, Hk, H, K, V, chunk, segments, g_scale): GVA + docs + ragged T; plain; strong decay.
CASES = [
    (2, 45, 1, 2, 16, 32, 16, True, 1.0),
    (1, 64, 2, 2, 32, 16, 32, False, 1.0),
    (1, 40, 1, 1, 16, 16, 16, True, 20.0),
]


def _segments(B, T):
  seg = np.zeros((B, T), np.int32)
  seg[0, T // 2:] = 1                   # a document boundary inside a chunk
  if B > 1:
    seg[1, 16:] = 1                     # ... exactly on a chunk boundary (C = 16)
    seg[1, T - 5:] = 2
  return seg


@pytest.mark.parametrize("schedule", ["walks", "walks+pallas_parts", "walks+pallas_parts+split",
                                      "fused"])
@pytest.mark.parametrize("B,T,Hk,H,K,V,C,segments,g_scale", CASES)
def test_pallas_matches_references(monkeypatch, B, T, Hk, H, K, V, C, segments, g_scale, schedule):
  monkeypatch.setattr(gpu, "SCHEDULE", schedule.split("+")[0])
  monkeypatch.setattr(gpu, "CHUNK_PARALLEL", "pallas" if "pallas_parts" in schedule
                      else "auto" if "auto" in schedule else "xla")
  monkeypatch.setattr(gpu, "GRADS_SPLIT", schedule.endswith("+split"))
  monkeypatch.setattr(gpu, "BWD_BLOCK_V", 16)   # V = 32 → two V-blocks: exercises the partial sums
  monkeypatch.setattr(gpu, "BLOCK_V", 16)       # ... and two V-blocks in the walks
  monkeypatch.setattr(gpu, "PART_BLOCK_V", 16)  # ... and in the chunk-parallel kernels' V loops
  monkeypatch.setattr(gpu, "GRADS_BLOCK_V", 16)
  monkeypatch.setattr(gpu, "GRADS_BLOCK_K", 16)  # K = 32 → K split over two programs
  q, k, v, g, beta, h0 = _inputs(B, T, Hk, H, K, V, seed=T + C, g_scale=g_scale)
  seg = _segments(B, T) if segments else None

  def run(impl, *args):
    o, s = gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                            segment_ids=seg, chunk_size=C, impl=impl)
    return o, s

  o, s = jax.jit(lambda *a: run("pallas", *a))(q, k, v, g, beta, h0)
  o_ref, s_ref = gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
  assert _rel(o, o_ref) < 1e-5
  assert _rel(s, s_ref) < 1e-5

  w_o = np.random.default_rng(1).standard_normal(o_ref.shape).astype(np.float32)

  def loss(impl, *args):  # weights the output and the final state so every path gets a cotangent
    o, s = run(impl, *args)
    return jnp.sum(o * w_o) + jnp.sum(jnp.sin(s))

  grads = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=range(6)))(q, k, v, g, beta, h0)
  grads_ref = jax.jit(jax.grad(lambda *a: loss("recurrent", *a), argnums=range(6)))(
      q, k, v, g, beta, h0)
  for name, got, want in zip(("q", "k", "v", "g", "beta", "h0"), grads, grads_ref):
    assert np.all(np.isfinite(got)), name
    assert _rel(got, want) < 1e-4, (name, _rel(got, want))


def test_pallas_bf16_inputs_close_to_float32():
  q, k, v, g, beta, h0 = _inputs(1, 64, 1, 1, 16, 16, seed=3)
  o_ref, _ = gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0)
  to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  o, _ = gated_delta_rule(to_bf16(q), to_bf16(k), to_bf16(v), g, beta, initial_state=h0,
                          chunk_size=16, impl="pallas")
  assert o.dtype == jnp.bfloat16
  assert _rel(np.asarray(o, np.float32), o_ref) < 2e-2


@pytest.mark.parametrize("C", [16, 64])
def test_unit_lower_inverse_matches_numpy(C):
  rng = np.random.default_rng(C)
  L = np.tril(rng.standard_normal((C, C)), -1).astype(np.float32) * 0.3
  with jax.default_matmul_precision("highest"):
    A = jax.jit(lambda x: chunk_math.unit_lower_inverse(x, C))(jnp.asarray(L))
  np.testing.assert_allclose(A, np.linalg.inv(np.eye(C) + L.astype(np.float64)), rtol=0, atol=2e-4)


def test_cumsum_and_last_match_numpy():
  x = np.random.default_rng(0).standard_normal(32).astype(np.float32)
  np.testing.assert_allclose(chunk_math.inclusive_cumsum(jnp.asarray(x), 32), np.cumsum(x),
                             rtol=1e-5, atol=1e-5)
  assert float(chunk_math.last(jnp.asarray(x), 32)) == x[-1]


def _abstract_h100_mesh():
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)


@pytest.mark.parametrize("schedule,with_grad,kernels,dtype,K,V", [
    ("walks", False, 1, jnp.bfloat16, 128, 128),    # fwd walk
    ("walks", True, 2, jnp.bfloat16, 128, 128),     # + bwd walk
    ("walks", True, 2, jnp.float32, 32, 32),        # the models' head dims, fp32 training
    ("walks", True, 2, jnp.bfloat16, 256, 512),     # several V-blocks, K > 128
    ("walks+pallas_parts", False, 3, jnp.bfloat16, 128, 128),  # prep + fwd walk + output
    ("walks+pallas_parts", True, 5, jnp.bfloat16, 128, 128),   # - output (dead) + dṼ^local, bwd walk, grads
    ("walks+pallas_parts", True, 5, jnp.float32, 32, 32),
    ("walks+pallas_parts", True, 5, jnp.bfloat16, 256, 512),
    ("walks+pallas_parts+ksplit", True, 5, jnp.bfloat16, 128, 128),
    ("walks+pallas_parts+split", True, 6, jnp.bfloat16, 128, 128),   # GRADS_SPLIT: two kernels
    ("walks+pallas_parts+split+ksplit", True, 6, jnp.bfloat16, 128, 128),
    ("walks+pallas_parts+split", True, 6, jnp.float32, 32, 32),
    ("walks+pallas_parts+split", True, 6, jnp.bfloat16, 256, 512),
    ("walks+auto+split", True, 6, jnp.bfloat16, 128, 128),   # auto: Pallas parts ...
    ("walks+auto+split", True, 6, jnp.bfloat16, 256, 512),   # ... at every head size
    ("walks+xla+split", True, 2, jnp.bfloat16, 256, 512),    # the XLA parts: only the two walks
    ("fused", False, 1, jnp.bfloat16, 128, 128),    # fwd
    ("fused", True, 3, jnp.bfloat16, 128, 128)])    # + bwd walk + bwd chunks
def test_kernels_lower_to_triton_for_h100(monkeypatch, schedule, with_grad, kernels, dtype, K, V):
  monkeypatch.setattr(gpu, "_interpret", lambda: False)
  if schedule.endswith("+ksplit"):    # the gradients kernel with K split over two programs
    monkeypatch.setattr(gpu, "GRADS_BLOCK_K", K // 2)
  monkeypatch.setattr(gpu, "GRADS_SPLIT", "+split" in schedule)
  monkeypatch.setattr(gpu, "SCHEDULE", schedule.split("+")[0])
  monkeypatch.setattr(gpu, "CHUNK_PARALLEL", "pallas" if "pallas_parts" in schedule
                      else "auto" if "auto" in schedule else "xla")
  B, T, Hk, H, C = 1, 200, 1, 2, 64                     # GVA, ragged T: the real layout
  sds = jax.ShapeDtypeStruct
  args = (sds((B, T, Hk, K), dtype), sds((B, T, Hk, K), dtype),
          sds((B, T, H, V), dtype), sds((B, T, H), jnp.float32),
          sds((B, T, H), jnp.float32), sds((B, H, K, V), jnp.float32), sds((B, T), jnp.bool_))

  def fwd(q, k, v, g, beta, h0, reset):
    return gpu.gated_delta_rule_gpu(q, k, v, g, beta, K ** -0.5, h0, reset, C)

  def loss(*a):
    o, s = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)) if with_grad else fwd
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  with jax.sharding.use_abstract_mesh(_abstract_h100_mesh()):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
  text = exported.mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == kernels


def test_xla_chunk_parallel_backward_matches_recurrent(monkeypatch):
  """The fallback backward (XLA autodiff of the vmapped chunk math, used for K or V > 128)."""
  monkeypatch.setattr(gpu, "PALLAS_CHUNK_BWD", False)
  seg = np.zeros((1, 24), np.int32)
  seg[0, 10:] = 1
  _assert_grads_match_recurrent(_inputs(1, 24, 1, 2, 16, 16, seed=7), seg)


def _assert_grads_match_recurrent(inputs, seg=None, chunk_size=16):
  """All six gradients of a nonlinear loss of (o, final state): pallas against recurrent autodiff."""
  def loss(impl, *args):
    o, s = gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                            segment_ids=seg, chunk_size=chunk_size, impl=impl)
    return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)

  grads = jax.jit(jax.grad(lambda *a: loss("pallas", *a), argnums=range(6)))(*inputs)
  grads_ref = jax.jit(jax.grad(lambda *a: loss("recurrent", *a), argnums=range(6)))(*inputs)
  for name, got, want in zip(("q", "k", "v", "g", "beta", "h0"), grads, grads_ref):
    assert _rel(got, want) < 1e-4, (name, _rel(got, want))


def test_walk_block_v_keeps_enough_programs(monkeypatch):
  """Walk programs = B·H·V/BV: BV is halved (to 16 at least) while they are < WALK_MIN_PROGRAMS."""
  monkeypatch.setattr(gpu, "WALK_MIN_PROGRAMS", 256)
  assert gpu._block_v(128, 128, heads=8 * 16) == 64        # 256 programs already
  assert gpu._block_v(128, 128, heads=2 * 16) == 16        # B2 H16: 32 → 128 → 256 programs
  assert gpu._block_v(128, 128, heads=1) == 16             # never below 16
  assert gpu._block_v(512, 256, heads=8 * 6) == 32         # K > 128 starts at 32
  assert gpu._block_v(8, 8, heads=1) == 8                  # never above V
  assert gpu._block_v(128, 128) == 64                      # no head count: the fixed BLOCK_V
  monkeypatch.setattr(gpu, "WALK_MIN_PROGRAMS", 0)
  assert gpu._block_v(128, 128, heads=2 * 16) == 64


def test_row_major_grid_order_and_unrolled_v_blocks_give_the_same_result(monkeypatch):
  """The non-default knobs are the same math: SIBLINGS_FIRST=False (grid (B, H, ·) instead of the
  sharing axis first: the index maps and the K-block program id follow the grid order either way)
  and GRADS_V_LOOP=False (the gradients kernels' V-blocks unrolled instead of a fori_loop)."""
  monkeypatch.setattr(gpu, "SIBLINGS_FIRST", False)
  monkeypatch.setattr(gpu, "GRADS_V_LOOP", False)
  monkeypatch.setattr(gpu, "GRADS_BLOCK_V", 16)   # V = 32: two unrolled V-blocks
  monkeypatch.setattr(gpu, "CHUNK_PARALLEL", "pallas")
  monkeypatch.setattr(gpu, "BLOCK_V", 16)         # two V-blocks in the walks
  monkeypatch.setattr(gpu, "GRADS_BLOCK_K", 16)   # two K-blocks in the key gradients
  _assert_grads_match_recurrent(_inputs(1, 48, 1, 2, 32, 32, seed=5))
