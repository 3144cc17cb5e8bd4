"""Tests of the GPU Pallas kernels (`kernels_pallas.gpu`) on CPU.

* interpret mode against the float64 NumPy reference (forward, final state) and against autodiff of the
  independent recurrent implementation (every gradient), with GVA, h0, packed documents, T not a
  multiple of the chunk, for the default `GpuConfig` and one that splits every loop into blocks;
* the per-shape defaults of `GpuConfig.resolve`, and that a config keys the jit cache;
* the shared per-chunk math (`chunk_math`) against NumPy;
* lowering for an abstract H100: the kernels must lower to Triton IR (what interpret mode cannot
  check: Triton rejects value slicing, non-2-D dots, dims < 16 ...), with the config's warps, stages
  and grids. The last step, Triton IR → PTX, runs inside XLA's GPU compiler and needs a GPU;
  experiments/bench_kernels.py covers it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import gated_delta_rule
from kernels_pallas import GpuConfig, chunk_math, gpu
from tests.np_reference import gated_delta_rule_ref
from tests.triton_export import TRITON_CALL, export_for_h100, triton_launch


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


# V = 32 → two V-blocks in the walks, in the prep / output / dṼ^local loops and in the gradients'
# fori_loop over V; K = 32 → the key gradients split over two programs (partial sums of dg, dβ).
SMALL_BLOCKS = GpuConfig(walk_block_v=16, part_block_v=16, grads_block_v=16, grads_block_k=16)
# The prep's UT transform in 16×16 blocks (two row blocks at C = 32; one, the whole tile, at 16).
PREP_BLOCKS = GpuConfig(prep_block=16)
# The reverse walk from A and β instead of W (and, with 16-wide V blocks, two programs per head).
BWD_FROM_A = GpuConfig(walk_bwd_from_a=True, walk_block_v=16)
# Both walks from A: the prep writes A alone (blocked, so that path's with_w/with_u is run too).
A_ONLY = GpuConfig(walk_fwd_from_a=True, walk_bwd_from_a=True, walk_block_v=16, prep_block=16)
# The forward walk from A, the reverse walk from W: the prep writes A and W, no U.
FWD_FROM_A = GpuConfig(walk_fwd_from_a=True)
# The forward walk writes O (no output kernel), from A, in two V-blocks per head.
FWD_OUTPUT = GpuConfig(walk_fwd_output=True, walk_fwd_from_a=True, walk_block_v=16)
# Every walk fusion at once: the prep writes A alone, no output or dṼ^local kernel.
FUSED_WALKS = GpuConfig(walk_fwd_output=True, walk_fwd_from_a=True, walk_bwd_from_a=True,
                        walk_bwd_dv_local=True, walk_block_v=16)
# dṼ^local formed in the reverse walk from W.
BWD_DV_LOCAL = GpuConfig(walk_bwd_dv_local=True)


@pytest.mark.parametrize("config", [GpuConfig(), SMALL_BLOCKS, PREP_BLOCKS, BWD_FROM_A, A_ONLY,
                                    FWD_FROM_A, FWD_OUTPUT, FUSED_WALKS, BWD_DV_LOCAL],
                         ids=["default", "small_blocks", "prep_blocks", "bwd_from_a", "a_only",
                              "fwd_from_a", "fwd_output", "fused_walks", "bwd_dv_local"])
@pytest.mark.parametrize("B,T,Hk,H,K,V,C,segments,g_scale", CASES)
def test_pallas_matches_references(B, T, Hk, H, K, V, C, segments, g_scale, config):
  q, k, v, g, beta, h0 = _inputs(B, T, Hk, H, K, V, seed=T + C, g_scale=g_scale)
  seg = _segments(B, T) if segments else None

  def run(impl, *args):
    return gated_delta_rule(*args[:5], initial_state=args[5], output_final_state=True,
                            segment_ids=seg, chunk_size=C, impl=impl,
                            kernel_config=config if impl == "pallas" else None)

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


@pytest.mark.parametrize("b", [16, 32])
def test_the_blocked_prep_equals_the_whole_tile_prep(b):
  """`GpuConfig.prep_block`: A, W, U from b×b blocks (block forward substitution) equal the
  whole-tile masked doubling's, with documents starting inside a block and on a block boundary,
  under strong decay (C = 64: four or two row blocks)."""
  B, T, Hk, H, K, V, C = 1, 128, 1, 2, 32, 32, 64
  q, k, v, g, beta, _ = _inputs(B, T, Hk, H, K, V, seed=5, g_scale=3.0)
  reset = np.zeros((B, T), np.float32)
  reset[0, [20, 48, 80, 101]] = 1.0
  run = lambda config: gpu.prep(q, k, v, g, beta, jnp.asarray(reset), C=C, config=config)
  whole, blocked = run(GpuConfig()), run(GpuConfig(prep_block=b, part_block_v=16))
  for name, got, want in zip("AWU", blocked, whole):
    assert _rel(got, want) < 1e-5, (name, _rel(got, want))
  A = np.asarray(blocked[0])
  assert np.all(np.triu(A[..., :, :], 1) == 0) and np.all(np.diagonal(A, axis1=-2, axis2=-1) == 1)


@pytest.mark.parametrize("prep_block", [0, 16])
def test_the_prep_writes_only_what_the_walks_read(prep_block):
  """`walk_fwd_from_a` drops U, with `walk_bwd_from_a` W too; what is written is unchanged."""
  B, T, Hk, H, K, V, C = 1, 64, 1, 2, 32, 16, 32
  q, k, v, g, beta, _ = _inputs(B, T, Hk, H, K, V, seed=6)
  run = lambda **kw: gpu.prep(q, k, v, g, beta, jnp.zeros((B, T), jnp.float32), C=C,
                              config=GpuConfig(prep_block=prep_block, **kw))
  full = run()
  for kw, kept in ((dict(walk_fwd_from_a=True), "AW"), (dict(walk_bwd_from_a=True), "AWU"),
                   (dict(walk_fwd_from_a=True, walk_bwd_from_a=True), "A")):
    out = run(**kw)
    for name, got, want in zip("AWU", out, full):
      if name in kept:
        np.testing.assert_array_equal(got, want, err_msg=f"{kw} {name}")
      else:
        assert got is None, (kw, name)


def test_the_walk_forms_the_output_kernels_output():
  """`walk_fwd_output`: O from the walk equals the output kernel's O on the walk's h_r and Ṽ; with
  save=False the walk returns no h_r, Ṽ and the same O and final state (documents, two V-blocks)."""
  B, T, Hk, H, K, V, C = 1, 64, 1, 2, 32, 32, 16
  q, k, v, g, beta, h0 = _inputs(B, T, Hk, H, K, V, seed=8)
  reset = np.zeros((B, T), np.float32)
  reset[0, [9, 32]] = 1.0
  reset = jnp.asarray(reset)
  config = GpuConfig(walk_block_v=16)
  A, W, U = gpu.prep(q, k, v, g, beta, reset, C=C, config=config)
  plain = gpu.walk_forward(W, U, k, g, reset, h0, config=config)
  o_ref = gpu.output(q, k, v, g, reset, plain.states, plain.v_new, scale=0.3, C=C, config=config)
  fused = gpu.walk_forward(W, U, k, g, reset, h0, config=config, q=q, scale=0.3)
  infer = gpu.walk_forward(W, U, k, g, reset, h0, config=config, q=q, scale=0.3, save=False)
  assert plain.o is None and infer.v_new is None and infer.states is None
  assert _rel(fused.o, o_ref) < 1e-6
  for got in (fused, infer):
    np.testing.assert_array_equal(got.o, fused.o)
    np.testing.assert_array_equal(got.final, plain.final)
  np.testing.assert_array_equal(fused.states, plain.states)
  with pytest.raises(ValueError, match="save=False need q"):
    gpu.walk_forward(W, U, k, g, reset, h0, config=config, save=False)


# --- the config -------------------------------------------------------------------------------

def test_resolve_fills_the_per_shape_defaults():
  """Walk programs = B·H·V/BV: BV is halved (to 16 at least) while they are < walk_min_programs;
  K > 128 starts at BV 32, with 2 pipeline stages and 8 warps for the key gradients."""
  bv = lambda config, B, H, K, V: config.resolve(B, H, K, V).walk_block_v
  assert bv(GpuConfig(), 8, 16, 128, 128) == 64                   # 256 programs already
  assert bv(GpuConfig(), 2, 16, 128, 128) == 32                   # B2 H16: 32 → 128 programs
  wide = GpuConfig(walk_min_programs=256)
  assert bv(wide, 2, 16, 128, 128) == 16                          # ... → 256 programs
  assert bv(wide, 1, 1, 128, 128) == 16                           # never below 16
  assert bv(wide, 8, 6, 256, 512) == 32                           # K > 128 starts at 32
  assert bv(wide, 1, 1, 16, 8) == 8                               # never above V
  assert bv(GpuConfig(walk_min_programs=0), 2, 16, 128, 128) == 64
  assert bv(GpuConfig(walk_block_v=64), 1, 1, 128, 128) == 64     # an explicit value is kept
  assert bv(GpuConfig(walk_block_v=64), 1, 1, 128, 32) == 32      # ... capped at V
  large, small = GpuConfig().resolve(8, 6, 256, 512), GpuConfig().resolve(8, 16, 128, 128)
  assert (large.walk_num_stages, large.grads_key_num_warps) == (2, 8)
  assert (small.walk_num_stages, small.grads_key_num_warps) == (3, 4)
  assert small.interpret is True                                   # on CPU
  assert small.resolve(8, 16, 128, 128) == small                  # idempotent
  assert GpuConfig(walk_num_stages=4).resolve(8, 6, 256, 512).walk_num_stages == 4


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(grads_block_k=-1), r"`grads_block_k`=-1; expected a non-negative int\."),
    (dict(walk_block_v=32.0), r"`walk_block_v`=32.0; expected a non-negative int or None"),
    (dict(interpret="yes"), r"`interpret`='yes'; expected True, False or None"),
    (dict(prep_block=24), r"`prep_block`=24; expected 0 \(no blocks\) or a power of two ≥ 16"),
    (dict(prep_block=8), r"`prep_block`=8; expected 0"),
    (dict(walk_bwd_from_a=1), r"`walk_bwd_from_a`=1; expected True, False\.$"),
    (dict(walk_bwd_from_a=None), r"`walk_bwd_from_a`=None; expected True, False\.$"),
    (dict(walk_fwd_from_a="on"), r"`walk_fwd_from_a`='on'; expected True, False\.$"),
    (dict(walk_fwd_output=0), r"`walk_fwd_output`=0; expected True, False\.$"),
    (dict(walk_bwd_dv_local=None), r"`walk_bwd_dv_local`=None; expected True, False\.$"),
])
def test_config_errors_name_the_field(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    GpuConfig(**kwargs)


def test_kernel_config_is_checked():
  q, k, v, g, beta, _ = _inputs(1, 16, 1, 1, 16, 16, seed=2)
  with pytest.raises(ValueError, match=r"`kernel_config`=\{'grads_block_k': 16\}; expected a "
                                       r"kernels_pallas.GpuConfig"):
    gated_delta_rule(q, k, v, g, beta, chunk_size=16, impl="pallas",
                     kernel_config={"grads_block_k": 16})
  with pytest.raises(ValueError, match=r"`kernel_config`=GpuConfig.* with impl='chunked'"):
    gated_delta_rule(q, k, v, g, beta, chunk_size=16, impl="chunked", kernel_config=GpuConfig())


def test_another_config_compiles_other_kernels():
  """A config is a static argument of the jitted entry point: after a call with one, a call with
  another must compile anew, not reuse the first kernels (as module-global knobs did). Four K-blocks
  sum the key gradients' partial dg in another order than one block, so the bits differ."""
  q, k, v, g, beta, h0 = _inputs(1, 32, 1, 1, 64, 16, seed=11)
  w_o = np.random.default_rng(12).standard_normal((1, 32, 1, 16)).astype(np.float32)

  def dg(config):
    def loss(g):
      o, s = gpu.gated_delta_rule_gpu(q, k, v, g, beta, 0.125, h0, None, 16, config)
      return jnp.sum(o * w_o) + jnp.sum(jnp.sin(s))
    return np.asarray(jax.grad(loss)(jnp.asarray(g)))

  one, four = dg(GpuConfig(grads_block_k=64)), dg(GpuConfig(grads_block_k=16))
  assert not np.array_equal(one, four)
  assert _rel(one, four) < 1e-5
  assert np.array_equal(dg(GpuConfig(grads_block_k=64)), one)      # the cache serves it again


# --- shared chunk math ------------------------------------------------------------------------

@pytest.mark.parametrize("C", [16, 64])
def test_unit_lower_inverse_matches_numpy(C):
  rng = np.random.default_rng(C)
  L = np.tril(rng.standard_normal((C, C)), -1).astype(np.float32) * 0.3
  with jax.default_matmul_precision("highest"):
    A = jax.jit(lambda x: chunk_math.unit_lower_inverse(x, masks=True))(jnp.asarray(L))
  np.testing.assert_allclose(A, np.linalg.inv(np.eye(C) + L.astype(np.float64)), rtol=0, atol=2e-4)


def test_cumsum_and_last_match_numpy():
  x = np.random.default_rng(0).standard_normal(32).astype(np.float32)
  np.testing.assert_allclose(chunk_math.inclusive_cumsum(jnp.asarray(x), 32), np.cumsum(x),
                             rtol=1e-5, atol=1e-5)
  assert float(chunk_math.last(jnp.asarray(x), 32)) == x[-1]


def test_mm_dtype_narrows_only_bfloat16():
  assert chunk_math.mm_dtype_for(jnp.bfloat16) == jnp.bfloat16
  for dtype in (jnp.float32, jnp.float16):   # fp16's range would not hold fp32 intermediates
    assert chunk_math.mm_dtype_for(dtype) is None


# --- lowering to Triton for an abstract H100 --------------------------------------------------

def _export_for_h100(config, with_grad, dtype, K, V):
  """The exported StableHLO text of the forward (or forward+backward) for an abstract H100."""
  B, T, Hk, H, C = 1, 200, 1, 2, 64                     # GVA, ragged T: the real layout
  sds = jax.ShapeDtypeStruct
  args = (sds((B, T, Hk, K), dtype), sds((B, T, Hk, K), dtype),
          sds((B, T, H, V), dtype), sds((B, T, H), jnp.float32),
          sds((B, T, H), jnp.float32), sds((B, H, K, V), jnp.float32), sds((B, T), jnp.bool_))

  def fwd(q, k, v, g, beta, h0, reset):
    return gpu.gated_delta_rule_gpu(q, k, v, g, beta, K ** -0.5, h0, reset, C, config)

  def loss(*a):
    o, s = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)) if with_grad else fwd
  return export_for_h100(fn, *args)


COMPILED = GpuConfig(interpret=False)


@pytest.mark.parametrize("config,with_grad,kernels,dtype,K,V", [
    (COMPILED, False, 3, jnp.bfloat16, 128, 128),   # prep + fwd walk + output
    (COMPILED, True, 6, jnp.bfloat16, 128, 128),    # prep, fwd walk, dṼ^local, bwd walk, key + WY
                                                    # gradients (K split in two); output is dead
    (COMPILED, True, 6, jnp.float32, 32, 32),       # the models' head dims, fp32 training
    (COMPILED, True, 6, jnp.bfloat16, 256, 512),    # K > 128; the gradients' V loop
    (GpuConfig(interpret=False, grads_block_k=128), True, 6, jnp.bfloat16, 128, 128),  # no K split
    (GpuConfig(interpret=False, prep_block=16), False, 3, jnp.bfloat16, 128, 128),  # blocked prep
    (GpuConfig(interpret=False, prep_block=32), True, 6, jnp.bfloat16, 256, 512),
    (GpuConfig(interpret=False, walk_bwd_from_a=True, walk_block_v=64, walk_num_warps=8), True, 6,
     jnp.bfloat16, 256, 512),                     # the reverse walk from A
    (GpuConfig(interpret=False, walk_fwd_from_a=True), False, 3, jnp.bfloat16, 128, 128),
    (GpuConfig(interpret=False, walk_fwd_from_a=True, walk_bwd_from_a=True), True, 6,
     jnp.bfloat16, 256, 512),                     # both walks from A: the prep writes A alone
    (GpuConfig(interpret=False, walk_fwd_from_a=True, walk_bwd_from_a=True, prep_block=16), True,
     6, jnp.bfloat16, 128, 128),
    (GpuConfig(interpret=False, walk_fwd_output=True), False, 2, jnp.bfloat16, 128, 128),  # no
    (GpuConfig(interpret=False, walk_fwd_output=True, walk_fwd_from_a=True), True, 6,      # output
     jnp.bfloat16, 256, 512),                                                              # kernel
    (GpuConfig(interpret=False, walk_bwd_dv_local=True), True, 5, jnp.bfloat16, 128, 128),
    (GpuConfig(interpret=False, walk_fwd_output=True, walk_fwd_from_a=True, walk_bwd_from_a=True,
               walk_bwd_dv_local=True), True, 5, jnp.bfloat16, 256, 512),  # prep, 2 walks, grads
    (GpuConfig(interpret=False, walk_block_v=16, part_block_v=16, grads_block_v=16,
               grads_block_k=16), True, 6, jnp.float32, 32, 32)])
def test_kernels_lower_to_triton_for_h100(config, with_grad, kernels, dtype, K, V):
  assert _export_for_h100(config, with_grad, dtype, K, V).count(TRITON_CALL) == kernels


def test_config_fields_reach_the_launches():
  """Warps, stages and grids in the lowered module follow the config and its per-shape rules."""
  default = _export_for_h100(COMPILED, True, jnp.bfloat16, 256, 512)
  # K > 128: 2 stages; BV 16 (B·H 2)
  assert triton_launch(default, "gdn_walk_bwd") == ((32, 1, 2), 2, 4)
  key_grid, _, key_warps = triton_launch(default, "gdn_grads_key")
  assert key_grid[0] == 4 and key_warps == 8                       # K/BK = 4 blocks first; 8 warps
  tuned = GpuConfig(interpret=False, walk_block_v=64, walk_num_stages=1, walk_num_warps=8,
                    part_num_warps=8, dv_local_num_warps=2, grads_key_num_warps=2,
                    grads_wy_num_warps=8)
  text = _export_for_h100(tuned, True, jnp.bfloat16, 256, 512)
  assert triton_launch(text, "gdn_walk_fwd") == ((8, 1, 2), 1, 8)  # V/BV = 512/64, B, H
  assert triton_launch(text, "gdn_walk_bwd") == ((8, 1, 2), 1, 8)
  for name, warps in (("gdn_prep", 8), ("gdn_dv_local", 2), ("gdn_grads_key", 2),
                      ("gdn_grads_wy", 8)):
    assert triton_launch(text, name)[1:] == (1, warps), name
