"""kernels_pallas.decode_gemv: the decode step's batch ≤ 8 weight products as a Pallas GEMV,
against float64 NumPy (interpret mode on CPU), its Triton lowering for an H100, its errors, and
generate with `DecodeConfig(gemv=True)` against the XLA products."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import layers
from kernels_pallas import decode_gemv
from kernels_pallas.config import DecodeConfig
from kernels_pallas.decode_gemv import gemv_pallas, gemv_swiglu_pallas
from tests.generate_test import DECODE_VARIANTS, make


def _operands(B, K, N, transposed, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, K), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (N, K) if transposed else (K, N), jnp.float32).astype(jnp.bfloat16)
  ref = np.asarray(x, np.float64) @ (np.asarray(w, np.float64).T if transposed
                                     else np.asarray(w, np.float64))
  return x, w, ref


@pytest.mark.parametrize("B, K, N, transposed, kw", [
    (1, 1024, 200, False, {}),                       # N not a multiple of the column block
    (3, 2816, 100, False, dict(block_n=32)),         # K = 11 · 256: K tile 128, several splits
    (8, 256, 77, True, {}),                          # a tied read-out's [N, K] layout
    (1, 512, 300, True, dict(splits=2)),
    (2, 96, 50, False, dict(block_k=64)),            # K tile lowered to 32 (96 = 3 · 32)
    (5, 128, 64, False, dict(splits=1, block_n=64)),
    (4, 512, 64, False, dict(splits=1)),             # the tensor-core loop over 4 K tiles
    (6, 384, 40, True, dict(splits=1)),              # … transposed, over 3 K tiles
    (1, 640, 72, False, dict(splits=1)),             # the B1 accumulator over 5 K tiles
])
def test_equals_the_float64_product(B, K, N, transposed, kw):
  x, w, ref = _operands(B, K, N, transposed)
  y = gemv_pallas(x, w, transposed=transposed, **kw)
  assert y.shape == (B, N) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4 * np.sqrt(K))


def test_every_split_contributes():
  """The K splits' partials are all summed: zeroing one split's rows of W changes y by exactly
  that split's share."""
  x, w, _ = _operands(1, 512, 64, False, seed=3)
  w_cut = w.at[128:256].set(0)
  y, y_cut = (np.asarray(gemv_pallas(x, m, splits=4, block_k=128), np.float64) for m in (w, w_cut))
  share = np.asarray(x[:, 128:256], np.float64) @ np.asarray(w[128:256], np.float64)
  np.testing.assert_allclose(y - y_cut, share, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("in_splits, splits", [(2, 3), (1, 1), (4, None)])
def test_swiglu_gemv_equals_the_unfused_mlp(dtype, in_splits, splits):
  """gemv_swiglu_pallas on gemv_pallas' unsummed partials == the unfused MLP step: the product,
  its rounding to the compute dtype, SiLU(gate) ⊙ up rounded, the second product (float64
  reference for the products). F = 384: 3 K tiles of 128, split 3 ways."""
  D, F, N = 256, 384, 200
  x = jax.random.normal(jax.random.key(0), (1, D)).astype(dtype)
  w_gu = (jax.random.normal(jax.random.key(1), (D, 2 * F)) / 16).astype(dtype)
  w_down = (jax.random.normal(jax.random.key(2), (F, N)) / 20).astype(dtype)
  parts = gemv_pallas(x, w_gu, splits=in_splits, block_k=64, sum_splits=False)   # 4 K tiles
  assert parts.shape == (in_splits, 1, 2 * F) and parts.dtype == jnp.float32
  y = gemv_swiglu_pallas(parts, w_down, splits=splits)
  f64 = lambda a: np.asarray(a, np.float64)
  gu = jnp.asarray(f64(x) @ f64(w_gu)).astype(dtype).astype(jnp.float32)
  h = (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(dtype)
  ref = f64(h) @ f64(w_down)
  assert y.shape == (1, N) and float(np.abs(ref).max()) > 0.5
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_swiglu_gemv_refuses_what_it_cannot_take():
  w = jnp.zeros((64, 32))
  for shape, match in (((3, 1, 128), "power of two"), ((1, 2, 128), "batch 1"),
                       ((1, 1, 100), r"2·F")):
    with pytest.raises(ValueError, match=match):
      gemv_swiglu_pallas(jnp.zeros(shape), w)


def test_choose_splits_reaches_the_program_count():
  assert decode_gemv.choose_splits(1024, 9228, 64, 128, 256) == 2     # 145 column blocks
  assert decode_gemv.choose_splits(2816, 1024, 64, 128, 256) == 22    # 22 K tiles, 16 blocks
  assert decode_gemv.choose_splits(1024, 32000, 64, 128, 256) == 1
  assert decode_gemv.block_k_for(2816, 512) == 256 and decode_gemv.block_k_for(96, 128) == 32


def test_lowers_to_one_triton_call_for_an_h100():
  """The kernel's Triton lowering (what a GPU compiles) succeeds for the 512M model's products,
  with the grid `choose_splits` gives."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  sds = jax.ShapeDtypeStruct
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  for B, K, N, transposed, grid in ((1, 1024, 9228, False, (145, 2)),
                                    (1, 2816, 1024, False, (16, 22)),
                                    (8, 1024, 32000, True, (500, 1))):
    fn = functools.partial(gemv_pallas, transposed=transposed, interpret=False)
    w = sds((N, K) if transposed else (K, N), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
          sds((B, K), jnp.bfloat16), w).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert tuple(int(v) for v in re.findall(r"grid_[xy] = (\d+)", text)) == grid
    assert re.findall(r"num_warps = (\d+)", text) == ["4"]
  # The 512M MLP's down product on the gate/up product's 4 partials (F = 2816: 11 K tiles of
  # 256 at block_k 512; 16 column blocks, split 11 ways).
  fn = functools.partial(gemv_swiglu_pallas, block_k=512, interpret=False)
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
        sds((4, 1, 2 * 2816), jnp.float32), sds((2816, 1024), jnp.bfloat16)).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert tuple(int(v) for v in re.findall(r"grid_[xy] = (\d+)", text)) == (16, 11)
  fn = functools.partial(gemv_pallas, interpret=False, num_warps=8)   # DecodeConfig.gemv_num_warps
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
        sds((2, 1024), jnp.bfloat16), sds((1024, 2048), jnp.bfloat16)).mlir_module()
  assert re.findall(r"num_warps = (\d+)", text) == ["8"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=(9, 64), w=(64, 32)), "batch 9"),
    (dict(x=(1, 64), w=(32, 32)), "K=64"),
    (dict(x=(1, 64), w=(64, 32), block_n=48), "block_n"),
    (dict(x=(1, 512), w=(512, 32), splits=3), "splits"),
])
def test_errors_name_the_argument(kwargs, match):
  x = jnp.zeros(kwargs.pop("x"), jnp.bfloat16)
  w = jnp.zeros(kwargs.pop("w"), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    gemv_pallas(x, w, **kwargs)


@pytest.mark.parametrize("field, value", [("gemv", 1), ("gemv_block_n", 48), ("gemv_block_k", 8),
                                          ("gemv_min_programs", 0), ("gemv_num_warps", 3),
                                          ("gemv_swiglu", 1), ("conv_ring", None)])
def test_decode_config_refuses_bad_gemv_settings(field, value):
  with pytest.raises(ValueError, match=field):
    DecodeConfig(**{field: value})


def test_the_gemv_is_used_at_batch_1_on_gpus_by_default():
  """DecodeConfig.gemv: None takes the GEMV only where it was measured faster (batch 1, GPUs);
  True at every batch it takes (≤ 8) on any backend; False never."""
  auto, on, off = DecodeConfig(), DecodeConfig(gemv=True), DecodeConfig(gemv=False)
  assert [auto.use_gemv(b, "gpu") for b in (1, 2, 8, 9)] == [True, False, False, False]
  assert not auto.use_gemv(1, "cpu") and not auto.use_gemv(1, "tpu")
  assert [on.use_gemv(b, "cpu") for b in (1, 8, 9)] == [True, True, False]
  assert not off.use_gemv(1, "gpu")
  assert not auto.use_gemv(1)   # these tests run on CPU
  # A contracted dim the compiled kernel cannot tile (no power-of-two factor ≥ 16) stays XLA's
  # by default; gemv=True passes it on (the kernel names the problem).
  assert auto.use_gemv(1, "gpu", contract_dim=1024) and auto.use_gemv(1, "gpu", contract_dim=2816)
  assert not auto.use_gemv(1, "gpu", contract_dim=100) and on.use_gemv(1, "gpu", contract_dim=100)


def test_decode_dot_takes_the_default_config_when_given_none(monkeypatch):
  """decode_config=None behaves as DecodeConfig(): the GEMV at batch 1 where `use_gemv` says so."""
  calls = []
  monkeypatch.setattr(DecodeConfig, "use_gemv", lambda self, batch, **_: batch == 1)
  monkeypatch.setattr(decode_gemv, "gemv_pallas",
                      lambda x, w, **kw: calls.append(x.shape) or jnp.zeros((x.shape[0], 16)))
  for batch in (1, 2):
    layers.decode_dot(jnp.ones((batch, 64)), jnp.ones((64, 16)))
  assert calls == [(1, 64)]


def _gemv_step_against_xla(monkeypatch, kernel, variant, batch, seed, **config):
  """(the decode step's logits with DecodeConfig(gemv=True, gemv_block_n=16, **config), the XLA
  step's, the number of calls of decode_gemv.`kernel`)."""
  model = make(DECODE_VARIANTS[variant], seed=seed)
  prompt = jax.random.randint(jax.random.key(seed), (batch, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  calls, real = [], getattr(decode_gemv, kernel)
  monkeypatch.setattr(decode_gemv, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
  gemv = model.decode_step(token, cache, impl="xla", decode_config=DecodeConfig(
      gemv=True, gemv_block_n=16, **config))[0]
  return gemv, model.decode_step(token, cache, impl="xla")[0], len(calls)


@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
def test_decode_step_with_the_gemv_equals_the_xla_products(monkeypatch, variant):
  """Every weight product of a decode step (in-projections, output, MLP, read-out; attention's
  too) through the GEMV: the same logits up to float32 rounding."""
  gemv, xla, calls = _gemv_step_against_xla(monkeypatch, "gemv_pallas", variant, 2, 11)
  np.testing.assert_allclose(gemv, xla, rtol=1e-5, atol=1e-5)
  per_layer = 2 + 2    # mixer in / out, MLP gate-up / down
  assert calls == per_layer * DECODE_VARIANTS[variant].num_layers + 1


@pytest.mark.parametrize("swiglu", [True, False])
def test_batch_1_decode_step_chains_the_mlp_gemvs(monkeypatch, swiglu):
  """At batch 1 with the GEMV, the MLP's down product reads the gate/up product's partials
  itself (DecodeConfig.gemv_swiglu; off: the XLA SiLU product between two GEMVs): once per
  layer, and the logits are the XLA step's."""
  fused, xla, calls = _gemv_step_against_xla(monkeypatch, "gemv_swiglu_pallas", "untied", 1, 13,
                                             gemv_swiglu=swiglu)
  np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)
  assert calls == (DECODE_VARIANTS["untied"].num_layers if swiglu else 0)


def test_generate_with_the_gemv_samples_the_xla_tokens():
  from gdn_jax import generate as gen
  model = make(seed=12)
  prompt = jax.random.randint(jax.random.key(12), (2, 6), 0, 64)
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(1))
  np.testing.assert_array_equal(
      gen.generate(model, prompt, 8, impl="pallas_fused",
                   decode_config=DecodeConfig(gemv=True, gemv_block_n=16), **kw),
      gen.generate(model, prompt, 8, impl="xla", **kw))


def test_decode_dot_passes_every_gemv_setting(monkeypatch):
  """layers.decode_dot hands DecodeConfig's GEMV tiles, program count and warps to the kernel."""
  seen = {}

  def spy(x, w, **kw):
    seen.update(kw)
    return jnp.zeros((x.shape[0], w.shape[0] if kw["transposed"] else w.shape[1]), jnp.float32)

  monkeypatch.setattr(decode_gemv, "gemv_pallas", spy)
  config = DecodeConfig(gemv=True, gemv_block_n=32, gemv_block_k=256, gemv_min_programs=64,
                        gemv_num_warps=8)
  layers.decode_dot(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 16), jnp.bfloat16),
                    decode_config=config)
  assert seen == dict(transposed=False, block_n=32, block_k=256, min_programs=64, num_warps=8)
