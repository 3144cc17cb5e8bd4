"""kernels_pallas.decode_gemv: the decode step's batch ≤ 8 weight products as a Pallas GEMV,
against float64 NumPy (interpret mode on CPU), its Triton lowering for an H100, its errors, and
generate with `DecodeConfig(gemv=True)` against the XLA products."""
import dataclasses
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import layers
from kernels_pallas import config as config_module
from kernels_pallas import decode_gemv
from kernels_pallas.config import DecodeConfig
from kernels_pallas.decode_gemv import (gemv_gated_norm_pallas, gemv_norm_pallas, gemv_pallas,
                                        gemv_swiglu_pallas)
from tests.generate_test import DECODE_VARIANTS, make
from tests.triton_export import TRITON_CALL, export_for_h100, triton_launch


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
                                          ("gemv_num_stages", 0), ("gemv_num_stages", 2.0),
                                          ("gemv_swiglu", 1), ("gemv_norm", None),
                                          ("gemv_out_norm", 1), ("conv_ring", None)])
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


def _gemv_step_against_xla(monkeypatch, kernel, variant, batch, seed, model_changes=None,
                           o_multiplier=1.0, **config):
  """(the decode step's logits with DecodeConfig(gemv=True, gemv_block_n=16, **config), the XLA
  step's, the number of calls of decode_gemv.`kernel`). `model_changes`: ModelConfig fields set
  apart from the variant's; `o_multiplier`: the GDN mixers' W_o forward multiplier."""
  model = make(dataclasses.replace(DECODE_VARIANTS[variant], **(model_changes or {})), seed=seed)
  for block in model.blocks:
    if isinstance(block.mixer, layers.GatedDeltaNet):
      block.mixer.o_proj.multiplier = o_multiplier
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
  """layers.decode_dot hands DecodeConfig's GEMV tiles, program count, warps and stages to the
  kernel."""
  seen = {}

  def spy(x, w, **kw):
    seen.update(kw)
    return jnp.zeros((x.shape[0], w.shape[0] if kw["transposed"] else w.shape[1]), jnp.float32)

  monkeypatch.setattr(decode_gemv, "gemv_pallas", spy)
  config = DecodeConfig(gemv=True, gemv_block_n=32, gemv_block_k=256, gemv_min_programs=64,
                        gemv_num_warps=8, gemv_num_stages=3)
  layers.decode_dot(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((64, 16), jnp.bfloat16),
                    decode_config=config)
  assert seen == dict(transposed=False, block_n=32, block_k=256, min_programs=64, num_warps=8,
                      num_stages=3)


# The residual add and RMSNorm in the GEMV's prologue (gemv_norm_pallas, DecodeConfig.gemv_norm).

def _norm_operands(dtype, D, N, S_a, transposed, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (1, D)).astype(dtype)
  w = (jax.random.normal(keys[1], (N, D) if transposed else (D, N)) / 16).astype(dtype)
  gain = 1.0 + 0.5 * jax.random.normal(keys[2], (D,))                     # float32, as params
  addends = None if not S_a else jax.random.normal(keys[3], (S_a, 1, D))
  return x, w, gain, addends


def _unfused(x, w, gain, addends, multiplier, eps, transposed):
  """The XLA step's composition: the summed partials rounded, times the multiplier, the residual
  add, RMSNorm (layers.rms_normalize) rounded, then the product (float32)."""
  dt = x.dtype
  r = x
  if addends is not None:
    a = jnp.sum(addends, axis=0).astype(dt)
    r = x + (a if multiplier == 1.0 else a * jnp.asarray(multiplier, dt))
  h = (layers.rms_normalize(r, eps) * gain).astype(dt)
  y = jnp.dot(h.astype(jnp.float32), (w.T if transposed else w).astype(jnp.float32),
              precision=jax.lax.Precision.HIGHEST)
  return y, r


def _float64(x, w, gain, addends, multiplier, eps, transposed):
  """Float64 NumPy, rounding to x's dtype where the step rounds (the partials summed in order)."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  rnd = lambda a: f64(jnp.asarray(a, jnp.float32).astype(x.dtype))
  r = f64(x)
  if addends is not None:
    a = rnd(np.sum(f64(addends), axis=0))
    r = rnd(r + (a if multiplier == 1.0 else rnd(a * f64(jnp.asarray(multiplier, x.dtype)))))
  h = rnd(r / np.sqrt(np.mean(r * r) + eps) * f64(gain))
  return h @ (f64(w).T if transposed else f64(w)), r


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("S_a, multiplier, transposed, kw", [
    (0, 1.0, False, dict(splits=2)),                   # 2 K splits of 2 K tiles each
    (3, 1.0, False, dict(splits=4)),                   # addends; one K tile per program
    (16, 0.5, False, dict(splits=1)),                  # 4 K tiles in one program, a multiplier
    (2, 1.0, True, dict(splits=2, block_n=32)),        # a tied read-out's [N, D] layout
])
def test_norm_gemv_equals_the_unfused_step(dtype, S_a, multiplier, transposed, kw):
  """y = RMSNorm(x + m Σ addends) · w @ W and the residual r: r the XLA step's (bf16: exactly), y to
  float32 rounding (bf16: h may round the other way); both against float64 NumPy. D = 256 in
  K tiles of 64."""
  D, N, eps = 256, 200, 1e-6
  x, w, gain, addends = _norm_operands(dtype, D, N, S_a, transposed)
  y, r = gemv_norm_pallas(x, w, gain, addends, eps=eps, addend_multiplier=multiplier,
                          transposed=transposed, block_k=64, **kw)
  assert y.shape == (1, N) and y.dtype == jnp.float32 and r.shape == (1, D) and r.dtype == dtype
  y_xla, r_xla = _unfused(x, w, gain, addends, multiplier, eps, transposed)
  # r: XLA may sum the 16 partials pairwise; the kernel sums them in order (float32 rounding).
  np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(r_xla, np.float32), rtol=0,
                             atol=1e-6 if dtype == jnp.float32 else 0)
  xla_tol = 5e-5 if dtype == jnp.float32 else 1e-3     # mean(r²) summed in another order
  np.testing.assert_allclose(y, y_xla, rtol=xla_tol, atol=xla_tol)
  y64, r64 = _float64(x, w, gain, addends, multiplier, eps, transposed)
  tol_r = 1e-6 if dtype == jnp.float32 else 2 ** -8   # the addends summed in float64 here
  np.testing.assert_allclose(np.asarray(r, np.float32), r64, rtol=tol_r, atol=tol_r)
  tol = 5e-5 if dtype == jnp.float32 else 2e-2     # bf16: h may round the other way
  np.testing.assert_allclose(y, y64, rtol=tol, atol=tol)
  assert float(np.abs(y64).max()) > 1.0


def test_norm_gemv_returns_partials_for_the_next_kernel():
  """sum_splits=False: the K splits' partials [S, 1, N], which sum to the product."""
  x, w, gain, addends = _norm_operands(jnp.bfloat16, 256, 64, 2, False, seed=4)
  parts, r = gemv_norm_pallas(x, w, gain, addends, eps=1e-5, splits=4, block_k=64,
                              sum_splits=False)
  y, r_summed = gemv_norm_pallas(x, w, gain, addends, eps=1e-5, splits=4, block_k=64)
  assert parts.shape == (4, 1, 64)
  np.testing.assert_allclose(jnp.sum(parts, axis=0), y, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(r, np.float32), np.asarray(r_summed, np.float32))


@pytest.mark.parametrize("x, w, gain, addends, match", [
    ((2, 64), (64, 32), (64,), None, "batch 1"),
    ((1, 64), (32, 32), (64,), None, r"\[D, N\]"),
    ((1, 64), (64, 32), (32,), None, "gain_D"),
    ((1, 64), (64, 32), (64,), (2, 64), "addends_SxD"),
    ((1, 64), (64, 32), (64,), (2, 1, 32), "addends_SxD"),
])
def test_norm_gemv_errors_name_the_argument(x, w, gain, addends, match):
  zeros = lambda shape: None if shape is None else jnp.zeros(shape, jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    gemv_norm_pallas(zeros(x), zeros(w), zeros(gain), zeros(addends), eps=1e-6)


def test_norm_gemv_lowers_to_one_triton_call_for_an_h100():
  """The 512M model's three prologue GEMVs lower for an H100: the mixer's in-projection (no
  addends), the MLP's gate/up product on W_o's 16 split partials, the tied read-out."""
  sds = jax.ShapeDtypeStruct
  for N, S_a, transposed, grid in ((9228, 0, False, (145, 2, 1)), (5632, 16, False, (88, 4, 1)),
                                   (32000, 0, True, (500, 1, 1))):
    fn = functools.partial(gemv_norm_pallas, eps=1e-6, transposed=transposed, interpret=False,
                           sum_splits=False)
    args = [sds((1, 1024), jnp.bfloat16), sds((N, 1024) if transposed else (1024, N),
                                               jnp.bfloat16), sds((1024,), jnp.float32)]
    text = export_for_h100(fn, *args, *([sds((S_a, 1, 1024), jnp.float32)] if S_a else []))
    assert text.count(TRITON_CALL) == 1
    assert triton_launch(text, "decode_gemv_norm") == (grid, 2, 4)


def test_the_norm_gemv_is_used_at_batch_1_on_the_gemv_path_only():
  auto, on = DecodeConfig(gemv_norm=True), DecodeConfig(gemv=True, gemv_norm=True)
  assert DecodeConfig().use_gemv_norm(1, 1024, "gpu")           # the default (timed faster)
  assert auto.use_gemv_norm(1, 1024, "gpu") and not auto.use_gemv_norm(2, 1024, "gpu")
  assert not auto.use_gemv_norm(1, 1024, "cpu") and not auto.use_gemv_norm(1, 100, "gpu")
  assert on.use_gemv_norm(1, 32) and not on.use_gemv_norm(2, 32)
  assert not DecodeConfig(gemv_norm=False).use_gemv_norm(1, 1024, "gpu")
  assert not DecodeConfig(gemv=False).use_gemv_norm(1, 1024, "gpu")


def _random_gains(model, seed):
  """Norm gains away from their init of 1, so that a kernel dropping one changes the logits."""
  norms = [model.final_norm] + [n for b in model.blocks for n in (b.mixer_norm, b.mlp_norm)]
  for i, norm in enumerate(norms):
    norm.weight[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed + i), norm.weight.shape)
  return model


@pytest.mark.parametrize("variant, dtype, multipliers", [
    ("untied", "float32", False), ("tied", "bfloat16", True), ("hybrid", "bfloat16", False)])
def test_batch_1_step_with_norm_gemvs_equals_the_unfused_step(monkeypatch, variant, dtype,
                                                              multipliers):
  """At batch 1 on the GEMV path, DecodeConfig.gemv_norm makes each GDN block's two norms and the
  mixer's residual add in the GEMVs (2 per GDN layer, 1 for the read-out), with the logits of
  gemv_norm=False to float32 rounding (bf16: a few bf16 roundings). `multipliers`: W_o's in the
  prologue; the gate/up multipliers send the MLP to the unchained path."""
  model = _random_gains(make(dataclasses.replace(DECODE_VARIANTS[variant], dtype=dtype), seed=21),
                        seed=5)
  if multipliers:
    for block in model.blocks:
      block.mixer.o_proj.multiplier, block.mlp.gate_proj.multiplier = 0.5, 2.0
  prompt = jax.random.randint(jax.random.key(21), (1, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  calls, real = [], decode_gemv.gemv_norm_pallas
  monkeypatch.setattr(decode_gemv, "gemv_norm_pallas",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  step = lambda **kw: model.decode_step(token, cache, impl="pallas_fused", decode_config=(
      DecodeConfig(gemv=True, gemv_block_n=16, **kw)))[0]
  fused = step(gemv_norm=True)
  assert len(calls) == 2 * model.config.layer_kinds.count("G") + 1
  unfused = step(gemv_norm=False)
  assert len(calls) == 2 * model.config.layer_kinds.count("G") + 1
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(fused, unfused, rtol=tol, atol=tol)
  assert float(np.abs(np.asarray(unfused)).max()) > 0.5


def test_generate_with_norm_gemvs_samples_the_unfused_tokens():
  """generate at batch 1 (bf16, the fused rule kernel, conv rings): the same 8 sampled tokens
  with and without DecodeConfig.gemv_norm."""
  from gdn_jax import generate as gen
  model = _random_gains(make(dataclasses.replace(DECODE_VARIANTS["untied"], dtype="bfloat16"),
                             seed=22), seed=9)
  prompt = jax.random.randint(jax.random.key(22), (1, 6), 0, 64)
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(2), impl="pallas_fused")
  run = lambda norm: gen.generate(model, prompt, 8, decode_config=DecodeConfig(
      gemv=True, gemv_block_n=16, gemv_norm=norm), **kw)
  np.testing.assert_array_equal(run(True), run(False))


# Triton's pipelining depth (`num_stages`, swept by experiments/bench_decode_kernels.py).

def _three_gemvs(num_stages):
  """The three GEMV kernels at `num_stages` (None: their default) on small operands with several
  K tiles per program (the loop the stages pipeline)."""
  stages = {} if num_stages is None else dict(num_stages=num_stages)
  x, w, _ = _operands(1, 512, 96, False, seed=7)
  parts = gemv_pallas(x, w, splits=2, block_k=64, sum_splits=False, **stages)
  down = (jax.random.normal(jax.random.key(8), (48, 40)) / 8).astype(jnp.bfloat16)
  gain = 1.0 + 0.5 * jax.random.normal(jax.random.key(9), (512,))
  return (gemv_pallas(x, w, block_k=64, **stages), parts,
          gemv_swiglu_pallas(parts, down, block_k=16, splits=1, **stages),
          gemv_norm_pallas(x, w, gain, eps=1e-6, block_k=64, splits=2, **stages)[0])


@pytest.mark.parametrize("num_stages", [1, 3, 4])
def test_num_stages_leaves_every_gemv_result_unchanged(num_stages):
  """num_stages only schedules the loads: each kernel's result equals the default's (2), bit for
  bit (interpret mode)."""
  for y, y_default in zip(_three_gemvs(num_stages), _three_gemvs(None)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_default))


@pytest.mark.parametrize("num_stages", [0, -1, 2.0, True, None])
def test_num_stages_must_be_a_positive_int(num_stages):
  x, w = jnp.zeros((1, 64), jnp.bfloat16), jnp.zeros((64, 32), jnp.bfloat16)
  for call in (lambda: gemv_pallas(x, w, num_stages=num_stages),
               lambda: gemv_swiglu_pallas(jnp.zeros((1, 1, 128)), w, num_stages=num_stages),
               lambda: gemv_norm_pallas(x, w, jnp.ones((64,)), eps=1e-6,
                                        num_stages=num_stages)):
    with pytest.raises(ValueError, match="num_stages"):
      call()


def test_num_stages_reaches_the_triton_launch():
  """Interpret mode ignores the stages: the H100 lowering carries them (default 2)."""
  sds = jax.ShapeDtypeStruct
  x, w = sds((1, 1024), jnp.bfloat16), sds((1024, 512), jnp.bfloat16)
  for stages in (None, 1, 3):
    kw = {} if stages is None else dict(num_stages=stages)
    text = export_for_h100(functools.partial(gemv_pallas, interpret=False, **kw), x, w)
    assert triton_launch(text, "decode_gemv")[1] == (stages or 2)
    text = export_for_h100(functools.partial(gemv_norm_pallas, eps=1e-6, interpret=False, **kw),
                           x, w, sds((1024,), jnp.float32))
    assert triton_launch(text, "decode_gemv_norm")[1] == (stages or 2)
  text = export_for_h100(functools.partial(gemv_swiglu_pallas, interpret=False, num_stages=3),
                         sds((2, 1, 2 * 512), jnp.float32), sds((512, 256), jnp.bfloat16))
  assert triton_launch(text, "decode_gemv_swiglu")[1] == 3


# Per-product GEMV settings (DecodeConfig.gemv_overrides, gemv_launch_for).

def test_gemv_overrides_parse_into_per_product_settings():
  parse = config_module.parse_gemv_overrides
  assert parse("") == {} and parse("  ") == {}
  assert parse("out_proj=bn32,mp128;mlp_out=st3,w8") == {
      "out_proj": dict(block_n=32, min_programs=128), "mlp_out": dict(num_stages=3, num_warps=8)}
  assert parse(" in_proj = bk64 , w1 ; head=bn16,bk256,mp1,w16,st1") == {
      "in_proj": dict(block_k=64, num_warps=1),
      "head": dict(block_n=16, block_k=256, min_programs=1, num_warps=16, num_stages=1)}
  assert parse("mlp_in=mp0528") == {"mlp_in": dict(min_programs=528)}
  assert set(parse(";".join(f"{p}=st4" for p in config_module.GEMV_PRODUCTS))) == set(
      config_module.GEMV_PRODUCTS)
  config = DecodeConfig(gemv_overrides="out_proj=bn32")   # a str field: still hashable
  assert hash(config) == hash(DecodeConfig(gemv_overrides="out_proj=bn32"))
  assert config != DecodeConfig()


@pytest.mark.parametrize("spec, bad_part", [
    ("out_proj", "'out_proj' is not PRODUCT=SETTINGS"),           # malformed: no '='
    ("out_proj=", "'out_proj=' is not PRODUCT=SETTINGS"),          # no settings
    ("=bn32", "'=bn32' is not PRODUCT=SETTINGS"),                  # no product
    ("out_proj=bn32;", "empty entry"),                             # a stray ';'
    ("out_proj=bn32,", "'' (of out_proj) is not KEY then"),        # a stray ','
    ("out_proj=bn", "'bn' (of out_proj) is not KEY then"),         # no value
    ("out_proj=bn-32", "'bn-32' (of out_proj) is not KEY then"),
    ("out_proj=32", "'32' (of out_proj) is not KEY then"),
    ("attn=bn32", "'attn' is not a GEMV product"),                 # unknown product
    ("o_proj=bn32", "'o_proj' is not a GEMV product"),
    ("head=xx4", "unknown key 'xx'"),                              # unknown key
    ("head=bn32;head=st3", "'head' is repeated"),                  # repeated product
    ("head=bn32,st3,bn64", "repeats the key 'bn'"),                # repeated key
    ("head=bn48", "block_n=48, which must be a power of two"),     # non-power-of-two tiles
    ("head=bn8", "block_n=8, which must be a power of two ≥ 16"),
    ("head=bk96", "block_k=96, which must be a power of two"),
    ("head=w3", "num_warps=3, which must be 1, 2, 4, 8 or 16"),    # bad warps
    ("head=w32", "num_warps=32"),
    ("head=st0", "num_stages=0, which must be an int ≥ 1"),        # st < 1
    ("head=mp0", "min_programs=0, which must be an int ≥ 1"),      # mp < 1
    (3, "expected 'PRODUCT=KEYN"),                                 # not a str
])
def test_gemv_overrides_refuse_bad_specs(spec, bad_part):
  """Each kind of bad spec: a ValueError naming `gemv_overrides`, the bad part and the form."""
  with pytest.raises(ValueError, match="`gemv_overrides`") as e:
    DecodeConfig(gemv_overrides=spec)
  assert bad_part in str(e.value) and "expected 'PRODUCT=KEYN[,KEYN…][;PRODUCT=…]'" in str(e.value)


def test_gemv_launch_for_puts_a_products_overrides_over_the_global_launch():
  config = DecodeConfig(gemv_block_n=64, gemv_num_warps=8,
                        gemv_overrides="out_proj=bn32,mp128;head=st3,w2")
  assert config.gemv_launch == dict(block_n=64, block_k=128, min_programs=528, num_warps=8,
                                    num_stages=2)
  assert config.gemv_launch_for("out_proj") == dict(block_n=32, block_k=128, min_programs=128,
                                                    num_warps=8, num_stages=2)
  assert config.gemv_launch_for("head") == dict(block_n=64, block_k=128, min_programs=528,
                                                num_warps=2, num_stages=3)
  for product in ("in_proj", "mlp_in", "mlp_out"):
    assert config.gemv_launch_for(product) == config.gemv_launch
  assert DecodeConfig().gemv_launch_for("head") == DecodeConfig().gemv_launch
  with pytest.raises(ValueError, match="product 'attn'; expected one of in_proj, out_proj"):
    config.gemv_launch_for("attn")


def test_decode_dot_launches_its_products_settings(monkeypatch):
  """layers.decode_dot(product=…) takes that product's settings; None the global ones."""
  seen = []
  monkeypatch.setattr(decode_gemv, "gemv_pallas", lambda x, w, **kw: seen.append(kw) or jnp.zeros(
      (x.shape[0], w.shape[1]), jnp.float32))
  config = DecodeConfig(gemv=True, gemv_block_n=32, gemv_overrides="mlp_out=bn64,bk16,st3")
  x, w = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((64, 16), jnp.bfloat16)
  layers.decode_dot(x, w, decode_config=config, product="mlp_out")
  layers.decode_dot(x, w, decode_config=config, product="head")
  layers.decode_dot(x, w, decode_config=config)
  assert [(kw["block_n"], kw["block_k"], kw["num_stages"]) for kw in seen] == [
      (64, 16, 3), (32, 128, 2), (32, 128, 2)]
  with pytest.raises(ValueError, match="gemv_launch_for"):
    layers.decode_dot(x, w, decode_config=config, product="mlp")


def _product_weights(model, weights):
  """{id(weight array): product name} for every weight product of `decode_step(weights=…)`
  (an attention mixer's projections are in_proj and out_proj, as a GDN mixer's)."""
  names = {id(weights['head']): "head"}
  for block, w in zip(model.blocks, weights['blocks']):
    names[id(w['mixer']['in'])] = "in_proj"          # a GDN or an attention mixer's
    names[id(w['mixer']['o'])] = "out_proj"
    names[id(w['gate_up'])], names[id(w['down'])] = "mlp_in", "mlp_out"
  return names


@pytest.mark.parametrize("variant", ["untied", "hybrid"])
def test_each_product_of_a_decode_step_gets_its_own_gemv_settings(monkeypatch, variant):
  """One batch-1 decode step with in_proj, out_proj and head overrides: the in-projections
  launch with 4 stages and the output projections with block_n 32 (an attention mixer's too), the
  read-out with block_n 64 and 3 stages, every other product with the global 16 and 2."""
  model = make(DECODE_VARIANTS[variant], seed=31)
  prompt = jax.random.randint(jax.random.key(31), (1, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  weights = model.decode_weights()
  names, launches = _product_weights(model, weights), []
  for kernel in ("gemv_pallas", "gemv_norm_pallas", "gemv_swiglu_pallas"):
    real = getattr(decode_gemv, kernel)

    def spy(*args, real=real, **kw):
      launches.append((names[id(args[1])], kw["block_n"], kw["num_stages"]))
      return real(*args, **kw)

    monkeypatch.setattr(decode_gemv, kernel, spy)
  config = DecodeConfig(gemv=True, gemv_block_n=16,
                        gemv_overrides="in_proj=st4;out_proj=bn32;head=bn64,st3")
  model.decode_step(jnp.argmax(logits[:, 0], -1), cache, weights, impl="xla",
                    decode_config=config)
  kinds = model.config.layer_kinds
  expected = {"in_proj": (16, 4), "out_proj": (32, 2), "mlp_in": (16, 2), "mlp_out": (16, 2),
              "head": (64, 3)}
  assert sorted(launches) == sorted(
      [(p, *expected[p]) for p in ("in_proj", "out_proj", "mlp_in", "mlp_out")] * len(kinds)
      + [("head", 64, 3)])
  assert "A" in kinds or variant == "untied"


# Settings that split every product differently: W_o (K = H·V = 48: 3 K tiles of 16) into 3
# partials for the gate/up prologue, gate/up (K = 32) into 2 for the chained down product, down
# (K = F = 48) into 3, other tiles, warps and stages per product.
PER_PRODUCT = ("in_proj=bn32,bk16,mp64,w2;out_proj=bk16,mp1000,st1;mlp_in=bn64,bk16,mp1000,w8;"
               "mlp_out=bk16,mp1000,st3;head=bn32,bk16,mp8,w1")


@pytest.mark.parametrize("variant, batch", [("untied", 1), ("tied", 1), ("hybrid", 1),
                                            ("untied", 2)])
def test_decode_step_with_per_product_settings_equals_the_xla_step(monkeypatch, variant, batch):
  """Per-product tiles, splits, warps and stages (PER_PRODUCT): the XLA step's logits to float32
  rounding; at batch 1 the gate/up prologue reads W_o's 3 partials and the down product the
  gate/up's 2 (the atomic sums off: they would hand on one sum each)."""
  addend_counts, real_norm = [], decode_gemv.gemv_norm_pallas
  monkeypatch.setattr(decode_gemv, "gemv_norm_pallas", lambda *a, **k: addend_counts.append(
      None if a[3] is None else a[3].shape[0]) or real_norm(*a, **k))
  parts_counts, real_swiglu = [], decode_gemv.gemv_swiglu_pallas
  monkeypatch.setattr(decode_gemv, "gemv_swiglu_pallas", lambda *a, **k: parts_counts.append(
      a[0].shape[0]) or real_swiglu(*a, **k))
  gemv, xla, _ = _gemv_step_against_xla(monkeypatch, "gemv_pallas", variant, batch, 17,
                                        gemv_overrides=PER_PRODUCT, gemv_out_atomic=False,
                                        gemv_down_atomic=False)
  np.testing.assert_allclose(gemv, xla, rtol=1e-5, atol=1e-5)
  kinds = DECODE_VARIANTS[variant].layer_kinds
  if batch == 1:
    assert sorted(addend_counts, key=str) == sorted(
        [None] * (kinds.count("G") + 1) + [3] * kinds.count("G"), key=str)
    assert parts_counts == [2] * len(kinds)
  else:
    assert addend_counts == [] and parts_counts == []


@pytest.mark.parametrize("D, parts_in", [(48, 1), (64, 4)])
def test_chained_mlp_sums_a_non_power_of_two_partial_count_first(monkeypatch, D, parts_in):
  """mlp_in settings that split the gate/up product into 3 partials (D = 48: 3 K tiles of 16):
  the chained down kernel takes a power of two of them, so XLA sums the 3 into 1 first; 4
  partials (D = 64) go in as they are. Either way the unchained MLP's result."""
  F, N = 48, 40
  x = jax.random.normal(jax.random.key(0), (1, D))
  w_gu = jax.random.normal(jax.random.key(1), (D, 2 * F)) / 4
  w_down = jax.random.normal(jax.random.key(2), (F, N)) / 4
  linears = [types.SimpleNamespace(multiplier=1.0)] * 2
  seen, real = [], decode_gemv.gemv_swiglu_pallas
  monkeypatch.setattr(decode_gemv, "gemv_swiglu_pallas",
                      lambda parts, w, **kw: seen.append(parts.shape[0]) or real(parts, w, **kw))
  mlp = lambda **kw: layers.decode_swiglu(x, w_gu, w_down, linears, decode_config=DecodeConfig(
      gemv=True, gemv_block_n=16, gemv_overrides="mlp_in=bk16,mp1000", **kw))
  chained, unchained = mlp(), mlp(gemv_swiglu=False)
  assert seen == [parts_in]
  assert float(np.abs(np.asarray(unchained)).max()) > 0.5
  np.testing.assert_allclose(chained, unchained, rtol=1e-5, atol=1e-5)


# The GDN mixer's gated output norm in W_o's GEMV prologue (gemv_gated_norm_pallas,
# DecodeConfig.gemv_out_norm).

def _out_norm_operands(dtype, H, V, N, gate_width=None, seed=0):
  """o [1, H·V] float32 (the heads at scales 10⁻² … 10²: a norm over the wrong head's values
  shows), a gate [1, gate_width] in `dtype` (None: no gate), W_o [H·V, N] and the gain [V]
  (float32, as params)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  scales = jnp.repeat(jnp.logspace(-2, 2, H), V)[None]
  o = jax.random.normal(keys[0], (1, H * V)) * scales
  gate = None if gate_width is None else (
      2 * jax.random.normal(keys[1], (1, gate_width))).astype(dtype)
  w = (jax.random.normal(keys[2], (H * V, N)) / 16).astype(dtype)
  gain = 1.0 + 0.5 * jax.random.normal(keys[3], (V,))
  return o, gate, w, gain


def _unfused_out_norm(o, gate, w, gain, eps, V, gate_column=0, **launch):
  """The XLA step's composition: GatedRMSNorm of rnd(o) and the gate (layers), rounded to W_o's
  dtype, then gemv_pallas with `launch`. Returns (h [1, H·V], y [1, N] or its partials)."""
  dt, HV = w.dtype, o.shape[1]
  norm = layers.GatedRMSNorm(V, eps=eps, dtype=dt, param_dtype=jnp.float32)
  norm.weight[...] = gain
  g = None if gate is None else gate[:, gate_column:gate_column + HV].reshape(1, HV // V, V)
  h = norm(o.astype(dt).reshape(1, HV // V, V), g).reshape(1, HV)
  return h, gemv_pallas(h, w, **launch)


def _out_norm_float64(o, gate, w, gain, eps, V, gate_column=0):
  """Float64 NumPy, rounding to W_o's dtype where the step rounds (o before the norm, h)."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  rnd = lambda a: f64(jnp.asarray(a, jnp.float32).astype(w.dtype))
  HV = o.shape[1]
  o_dt = rnd(o).reshape(HV // V, V)
  h = o_dt / np.sqrt(np.mean(o_dt * o_dt, axis=1, keepdims=True) + eps) * f64(gain)
  if gate is not None:
    g = f64(gate)[0, gate_column:gate_column + HV].reshape(HV // V, V)
    h = h * g / (1 + np.exp(-g))
  return rnd(h.reshape(1, HV)) @ f64(w)


# H = 3 heads of V = 64: each case's K tiles and splits (Ks rows per program).
GATED_NORM_CASES = [
    (True, 0, dict(block_k=16, splits=12)),     # one K tile per program, 4 per head
    (True, 0, dict(block_k=64, splits=3)),      # a split is a head: its stats once per program
    (True, 0, dict(block_k=16, splits=2)),      # Ks = 96 crosses a head: stats per K tile
    (True, 40, dict(block_k=32, splits=1)),     # all 6 K tiles in one program; a wider gate
    (False, 0, dict(block_k=32, splits=3)),     # no gate
    (True, 8, dict(block_k=16, splits=4, block_n=16)),   # gate columns not on a K-tile boundary
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated, gate_column, launch", GATED_NORM_CASES)
def test_gated_norm_gemv_equals_the_norm_then_the_product(dtype, gated, gate_column, launch):
  """y = GatedRMSNorm(rnd(o), g) @ W_o: the XLA composition with the same tiles (float32: to
  float32 rounding; bf16: h to one bf16 ulp, see the next test, so y nearly bit for bit), and
  float64 NumPy (bf16: h may round the other way)."""
  H, V, N, eps = 3, 64, 40, 1e-6
  o, gate, w, gain = _out_norm_operands(dtype, H, V, N, gate_column + H * V + 8 if gated
                                        else None)
  y = gemv_gated_norm_pallas(o, gate, w, gain, eps=eps, head_dim=V, gate_column=gate_column,
                             **launch)
  assert y.shape == (1, N) and y.dtype == jnp.float32
  _, y_xla = _unfused_out_norm(o, gate, w, gain, eps, V, gate_column, **launch)
  np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5 if dtype == jnp.float32 else 1e-3)
  y64 = _out_norm_float64(o, gate, w, gain, eps, V, gate_column)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(y, y64, rtol=tol, atol=tol)
  assert float(np.abs(y64).max()) > 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_norm_prologue_rounds_as_the_unfused_norm(dtype, gated):
  """h itself (W_o = I: y = h exactly) against the composition's GatedRMSNorm output, H = 6
  heads over 10⁻² … 10², 10 draws. The kernel sums each head's mean(o_dt²) in another order
  than XLA's mean (and on a GPU, rsqrt and exp are Triton's, not XLA's), so its float32 h may
  differ by a few float32 ulps; rounded to bf16 that is the same value except where h lies that
  close to a rounding midpoint: one bf16 ulp at most, and rarely (none in these draws in
  interpret mode on CPU; ≤ 1% allowed). A missing rounding of o or h, or a wrong head's mean,
  changes far more. float32: to 4 float32 ulps."""
  H, V = 6, 64
  eye = jnp.eye(H * V, dtype=dtype)
  differing = total = 0
  for seed in range(10):
    o, gate, _, gain = _out_norm_operands(dtype, H, V, 8, H * V if gated else None, seed=seed)
    h = gemv_gated_norm_pallas(o, gate, eye, gain, eps=1e-6, head_dim=V, block_k=16, splits=4)
    h_xla, _ = _unfused_out_norm(o, gate, eye, gain, 1e-6, V)
    h, h_xla = np.asarray(h, np.float32), np.asarray(h_xla, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_array_max_ulp(h, h_xla, maxulp=4)
      continue
    bits = lambda a: a.view(np.int32).astype(np.int64) >> 16            # bf16 bit patterns
    assert np.all(np.abs(bits(h) - bits(h_xla)) <= 1) and np.all(np.sign(h) == np.sign(h_xla))
    differing, total = differing + int(np.sum(h != h_xla)), total + h.size
  assert differing <= 0.01 * total


def test_gated_norm_gemv_returns_partials_for_the_next_kernel():
  """sum_splits=False: the K splits' partials [S, 1, N], which sum to the product."""
  o, gate, w, gain = _out_norm_operands(jnp.bfloat16, 2, 32, 48, 64, seed=4)
  kw = dict(eps=1e-5, head_dim=32, block_k=16, splits=4)
  parts = gemv_gated_norm_pallas(o, gate, w, gain, sum_splits=False, **kw)
  assert parts.shape == (4, 1, 48) and parts.dtype == jnp.float32
  np.testing.assert_allclose(jnp.sum(parts, axis=0), gemv_gated_norm_pallas(o, gate, w, gain, **kw),
                             rtol=1e-6, atol=1e-6)
  _, parts_xla = _unfused_out_norm(o, gate, w, gain, 1e-5, 32, block_k=16, splits=4,
                                   sum_splits=False)
  np.testing.assert_allclose(parts, parts_xla, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("parts, multiplier", [(8, 1.0), (3, 0.5)])
def test_gated_norm_gemv_sums_the_gate_partials(dtype, parts, multiplier):
  """DecodeConfig.gemv_in_partials: the gate given as the in-projection GEMV's split partials
  [S, 1, N] float32 (and the gate Linear's multiplier) gives what the gate summed by XLA, rounded
  to W_o's dtype and times the rounded multiplier (`layers.scale_columns`) gives: the same y to
  float32 rounding (the same h: the partials' sum rounds as XLA's)."""
  H, V, N, column = 3, 64, 40, 8
  o, gate, w, gain = _out_norm_operands(dtype, H, V, N, column + H * V + 8, seed=5)
  noise = jax.random.normal(jax.random.key(6), (parts - 1, 1, gate.shape[1]))
  partials = jnp.concatenate([gate.astype(jnp.float32)[None] - jnp.sum(noise, 0, keepdims=True),
                              noise], axis=0)
  summed = jnp.sum(partials, axis=0).astype(dtype) * jnp.asarray(multiplier, dtype)
  kw = dict(eps=1e-6, head_dim=V, gate_column=column, block_k=16, splits=4)
  y = gemv_gated_norm_pallas(o, partials, w, gain, gate_multiplier=multiplier, **kw)
  y_summed = gemv_gated_norm_pallas(o, summed, w, gain, **kw)
  np.testing.assert_allclose(y, y_summed, rtol=1e-5, atol=1e-5)
  assert float(np.abs(np.asarray(y_summed)).max()) > 0.5
  if multiplier != 1.0:      # the multiplier is applied (the comparison would see it missing)
    y_without = gemv_gated_norm_pallas(o, partials, w, gain, **kw)
    assert not np.allclose(y_without, y_summed, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("o, gate, w, gain, kw, match", [
    ((2, 64), None, (64, 32), (32,), {}, "o_1xHV"),                           # batch 2
    ((1, 64), None, (48, 32), (32,), {}, r"`w` \(48, 32\)"),
    ((1, 64), None, (64, 32), (32,), dict(head_dim=24), "head_dim"),          # 24 ∤ 64
    ((1, 64), None, (64, 32), (16,), {}, "gain_V"),
    ((1, 64), (1, 60), (64, 32), (32,), {}, "gate_1xHV"),                     # too narrow
    ((1, 64), (1, 80), (64, 32), (32,), dict(gate_column=20), "gate_1xHV"),
    ((1, 64), (2, 64), (64, 32), (32,), {}, "gate_1xHV"),
    ((1, 64), None, (64, 32), (32,), dict(gate_column=-1), "gate_column"),
    ((1, 96), None, (96, 32), (48,), dict(head_dim=48, block_k=32), "block_k"),  # tile 32 ∤ 48
    ((1, 64), None, (64, 32), (32,), dict(block_k=64), "block_k"),            # tile 64 > V
    ((1, 64), None, (64, 32), (32,), dict(num_stages=0), "num_stages"),
    ((1, 64), None, (64, 32), (32,), dict(splits=3), "splits"),
    ((1, 64), (2, 2, 64), (64, 32), (32,), {}, "gate_1xHV"),               # partials of batch 2
    ((1, 64), (2, 1, 64), (64, 32), (32,), {}, "float32 split partials"),  # bf16 partials
])
def test_gated_norm_gemv_errors_name_the_argument(o, gate, w, gain, kw, match):
  zeros = lambda shape: None if shape is None else jnp.zeros(shape, jnp.bfloat16)
  kw = dict(dict(head_dim=32), **kw)
  with pytest.raises(ValueError, match=match):
    gemv_gated_norm_pallas(zeros(o), zeros(gate), zeros(w), zeros(gain), eps=1e-6, **kw)


def test_gated_norm_gemv_lowers_to_one_triton_call_for_an_h100():
  """The 512M model's W_o (o [1, 3072], V = 512, W_o [3072, 1024]) lowers for an H100 with the
  DecodeConfig defaults (128-column tiles, ≥ 528 programs: one K tile each), the gate given as a
  [1, 3072] slice, as the in-projection's whole output [1, 9228] from column 6144 or as its 8
  split partials [8, 1, 9228] (DecodeConfig.gemv_in_partials); without
  the gate, in 4 splits that cross heads (stats per K tile)."""
  sds = jax.ShapeDtypeStruct
  o, w, gain = sds((1, 3072), jnp.float32), sds((3072, 1024), jnp.bfloat16), sds((512,),
                                                                                  jnp.float32)
  launch = DecodeConfig().gemv_launch_for("out_proj")
  for gate, column, kw, grid in ((sds((1, 3072), jnp.bfloat16), 0, launch, (8, 24, 1)),
                                 (sds((1, 9228), jnp.bfloat16), 6144, launch, (8, 24, 1)),
                                 (sds((8, 1, 9228), jnp.float32), 6144, launch, (8, 24, 1)),
                                 (None, 0, dict(splits=4), (16, 4, 1))):
    fn = functools.partial(gemv_gated_norm_pallas, eps=1e-6, head_dim=512, gate_column=column,
                           sum_splits=False, interpret=False, **kw)
    if gate is None:
      text = export_for_h100(lambda o, w, gain, fn=fn: fn(o, None, w, gain), o, w, gain)
    else:
      text = export_for_h100(fn, o, gate, w, gain)
    assert text.count(TRITON_CALL) == 1
    assert triton_launch(text, "decode_gemv_gated_norm") == (grid, 2, 4)


def test_the_gated_norm_gemv_is_used_at_batch_1_on_the_gemv_path():
  on, gpu = DecodeConfig(gemv=True, gemv_out_norm=True), DecodeConfig(gemv_out_norm=True)
  assert DecodeConfig().use_gemv_out_norm(1, 3072, "gpu")       # the default (timed faster)
  assert not DecodeConfig(gemv_out_norm=False).use_gemv_out_norm(1, 3072, "gpu")
  assert gpu.use_gemv_out_norm(1, 3072, "gpu") and not gpu.use_gemv_out_norm(2, 3072, "gpu")
  assert not gpu.use_gemv_out_norm(1, 3072, "cpu") and not gpu.use_gemv_out_norm(1, 100, "gpu")
  assert on.use_gemv_out_norm(1, 48) and not on.use_gemv_out_norm(2, 48)
  assert not DecodeConfig(gemv=False, gemv_out_norm=True).use_gemv_out_norm(1, 3072, "gpu")


# V = 32 (H·V = 128): out_proj's K tile 16 (one per program, inside a head) or 32 in 2 splits of
# 2 heads (stats per K tile); the test model's V = 12 or the default tile 128 > V: the unfused
# norm.
V32 = dict(head_v_dim=32)
# (variant, model changes, GEMV overrides, calls per GDN layer, W_o's multiplier)
OUT_NORM_STEPS = [
    ("untied", V32, "out_proj=bk16", 1, 1.0),
    ("tied", V32, "out_proj=bk32,mp4", 1, 0.5),
    ("hybrid", V32, "out_proj=bk16", 1, 1.0),
    ("untied", dict(head_v_dim=32, use_gate=False), "out_proj=bk16", 1, 0.5),
    ("untied", V32, "", 0, 1.0),                        # K tile 128 > V = 32
    ("untied", {}, "out_proj=bk16", 0, 0.5),            # V = 12: no K tile lies inside a head
]


@pytest.mark.parametrize("variant, model_changes, overrides, per_layer, o_multiplier",
                         OUT_NORM_STEPS)
@pytest.mark.parametrize("gemv_norm", [True, False])
def test_batch_1_step_with_the_out_norm_gemv_equals_the_xla_step(
    monkeypatch, variant, model_changes, overrides, per_layer, o_multiplier, gemv_norm):
  """DecodeConfig.gemv_out_norm: W_o's GEMV makes the gated output norm once per GDN layer where
  V is a multiple of out_proj's K tile (else 0 calls: the unfused norm), summed (gemv_norm off)
  or as partials for the gate/up prologue (on), with W_o's multiplier as before: the XLA step's
  logits to float32 rounding; gemv_out_norm=False never calls it."""
  kinds = dataclasses.replace(DECODE_VARIANTS[variant], **model_changes).layer_kinds
  for out_norm in (True, False):
    fused, xla, calls = _gemv_step_against_xla(
        monkeypatch, "gemv_gated_norm_pallas", variant, 1, 23, model_changes, o_multiplier,
        gemv_norm=gemv_norm, gemv_out_norm=out_norm, gemv_overrides=overrides)
    np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)
    assert calls == (per_layer * kinds.count("G") if out_norm else 0)
  assert float(np.abs(np.asarray(xla)).max()) > 0.5


def test_generate_with_the_out_norm_gemv_samples_the_xla_tokens(monkeypatch):
  """generate at batch 1 (the fused rule kernel, conv rings, the norms in the GEMV prologues):
  the same 8 sampled tokens as impl "xla"; the gated-norm GEMV was traced in."""
  from gdn_jax import generate as gen
  model = make(dataclasses.replace(DECODE_VARIANTS["untied"], **V32), seed=24)
  prompt = jax.random.randint(jax.random.key(24), (1, 6), 0, 64)
  calls, real = [], decode_gemv.gemv_gated_norm_pallas
  monkeypatch.setattr(decode_gemv, "gemv_gated_norm_pallas",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(3))
  config = DecodeConfig(gemv=True, gemv_block_n=16, gemv_out_norm=True,
                        gemv_overrides="out_proj=bk16")
  np.testing.assert_array_equal(
      gen.generate(model, prompt, 8, impl="pallas_fused", decode_config=config, **kw),
      gen.generate(model, prompt, 8, impl="xla", **kw))
  assert calls


def _bf16_tokens_on_and_off(seed, rng_seed, overrides, *switches):
  """generate's 8 sampled tokens (bf16 model, batch 1, impl "pallas_fused", the GEMV in
  interpret mode) with the DecodeConfig `switches` all on, and all off. `overrides`: the
  gemv_overrides, distinct per test (generate caches its programs by config)."""
  from gdn_jax import generate as gen
  model = make(dataclasses.replace(DECODE_VARIANTS["untied"], dtype="bfloat16", **V32),
               seed=seed)
  prompt = jax.random.randint(jax.random.key(seed), (1, 6), 0, 64)
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(rng_seed), impl="pallas_fused")
  run = lambda on: gen.generate(model, prompt, 8, decode_config=DecodeConfig(
      gemv=True, gemv_block_n=16, gemv_overrides=overrides, **{name: on for name in switches}),
                                **kw)
  return run(True), run(False)


def test_generate_bf16_with_the_out_norm_gemv_samples_the_unfused_tokens():
  """bf16, batch 1: the same 8 sampled tokens with and without DecodeConfig.gemv_out_norm."""
  np.testing.assert_array_equal(*_bf16_tokens_on_and_off(25, 4, "out_proj=bk16",
                                                         "gemv_out_norm"))


# The in-projection's split partials summed by their consumers (DecodeConfig.gemv_in_partials):
# the ring kernel (q | k | v, W_a x, W_b x) and W_o's gated-norm prologue (the gate).

def _ring_step(model, token, cache, config):
  """The batch-1 decode step's logits with impl "pallas_fused" on conv rings (as `generate`'s
  loop runs it), launched with `config`."""
  from gdn_jax import generate as gen
  W = model.config.conv_size
  rings = [dict(c, ring_pos=jnp.zeros((W,), jnp.int32)) if 'ring_q' in c else c
           for c in gen.conv_rings(model, cache)]
  return model.decode_step(token, rings, impl="pallas_fused", decode_config=config)[0]


# (variant, model changes, in-projection multipliers q, k, v, gate, a, b, DecodeConfig changes,
# ring kernels given partials per GDN layer)
IN_PARTS_STEPS = [
    ("untied", V32, (1.0,) * 6, {}, 1),
    ("untied", V32, (0.5, 2.0, 0.25, 3.0, 0.75, 1.5), {}, 1),       # every multiplier applied
    ("untied", V32, (0.5, 2.0, 0.25, 3.0, 0.75, 1.5), dict(gemv_norm=False), 1),   # gemv_pallas
    ("hybrid", V32, (1.0,) * 6, {}, 1),
    ("tied", dict(head_v_dim=32, use_gate=False), (0.5, 1.0, 2.0, None, 1.0, 0.5), {}, 1),
    ("untied", V32, (1.0,) * 6, dict(gemv_out_norm=False), 0),   # the gate needs the sum: XLA's
    ("untied", {}, (1.0,) * 6, {}, 0),        # V = 12: the unfused output norm, XLA's sum
]


@pytest.mark.parametrize("variant, model_changes, multipliers, changes, per_layer", IN_PARTS_STEPS)
def test_batch_1_ring_step_with_in_projection_partials_equals_the_summed_step(
    monkeypatch, variant, model_changes, multipliers, changes, per_layer):
  """The logits of a batch-1 step with gemv_in_partials equal those with XLA's sum, to float32
  rounding; the ring kernel got the partials [S, 1, N] once per GDN layer where the consumers
  can take them (the gate's consumer is W_o's prologue: without it, XLA sums)."""
  from kernels_pallas import decode_fused
  cfg = dataclasses.replace(DECODE_VARIANTS[variant], **model_changes)
  model = make(cfg, seed=41)
  for block in model.blocks:
    if isinstance(block.mixer, layers.GatedDeltaNet):
      for proj, m in zip(block.mixer._in_projs(), [m for m in multipliers if m is not None]):
        proj.multiplier = m
  prompt = jax.random.randint(jax.random.key(41), (1, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  ndims, real = [], decode_fused.gdn_decode_fused_ring_pallas
  monkeypatch.setattr(decode_fused, "gdn_decode_fused_ring_pallas",
                      lambda pos, rings, x, *a, **k: ndims.append(x.ndim) or real(pos, rings, x,
                                                                                  *a, **k))
  config = lambda on: DecodeConfig(gemv=True, gemv_block_n=16, gemv_in_partials=on,
                                   gemv_overrides="out_proj=bk16", **changes)
  parted = _ring_step(model, token, cache, config(True))
  assert ndims.count(3) == per_layer * cfg.layer_kinds.count("G")
  summed = _ring_step(model, token, cache, config(False))
  assert ndims.count(3) == per_layer * cfg.layer_kinds.count("G")    # none more with it off
  np.testing.assert_allclose(parted, summed, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(summed, model.decode_step(token, cache, impl="xla")[0],
                             rtol=1e-4, atol=1e-4)
  assert float(np.abs(np.asarray(summed)).max()) > 0.5


def test_generate_bf16_with_in_projection_partials_samples_the_summed_tokens():
  """bf16, batch 1, generate's loop: the same 8 sampled tokens with and without
  DecodeConfig.gemv_in_partials."""
  np.testing.assert_array_equal(*_bf16_tokens_on_and_off(42, 5, "out_proj=bk16,mp3",
                                                         "gemv_in_partials"))


def test_in_partials_is_a_bool():
  assert DecodeConfig().gemv_in_partials       # the default since it was timed faster
  with pytest.raises(ValueError, match="gemv_in_partials"):
    DecodeConfig(gemv_in_partials=1)


# W_o's partials summed by atomic adds into zeros the in-projection's GEMV makes
# (DecodeConfig.gemv_out_atomic; decode_gemv's `accumulator` and `zeros_out`).

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemvs_accumulate_their_partials_atomically(dtype):
  """`accumulator`: gemv_pallas and gemv_gated_norm_pallas add every split's partial into the
  given zeros: the partials' sum, to float32 rounding (in interpret mode the programs run in
  order; on a GPU the order varies). `zeros_out`: gemv_norm_pallas returns zeros made by its
  program (0, 0) (interpret mode fills unwritten outputs with NaN, so a missing write shows)."""
  x = jax.random.normal(jax.random.key(50), (1, 64)).astype(dtype)
  w = (jax.random.normal(jax.random.key(51), (64, 48)) / 8).astype(dtype)
  launch = dict(block_n=16, block_k=16, splits=4)
  parts = gemv_pallas(x, w, sum_splits=False, **launch)
  zeros = jnp.zeros((1, 48), jnp.float32)
  summed = gemv_pallas(x, w, accumulator=zeros, **launch)
  assert summed.shape == (1, 48) and summed.dtype == jnp.float32
  np.testing.assert_allclose(summed, jnp.sum(parts, axis=0), rtol=1e-6, atol=1e-6)
  assert float(np.abs(np.asarray(summed)).max()) > 0.5
  o, gate, w_o, gain = _out_norm_operands(dtype, 3, 64, 48, 3 * 64, seed=52)
  kw = dict(eps=1e-6, head_dim=64, **launch)
  np.testing.assert_allclose(
      gemv_gated_norm_pallas(o, gate, w_o, gain, accumulator=zeros, **kw),
      jnp.sum(gemv_gated_norm_pallas(o, gate, w_o, gain, sum_splits=False, **kw), axis=0),
      rtol=1e-6, atol=1e-6)
  y, r, made = gemv_norm_pallas(x, w, jnp.ones((64,)), eps=1e-6, zeros_out=40, **launch)
  assert made.shape == (1, 40) and made.dtype == jnp.float32
  np.testing.assert_array_equal(made, 0.0)
  y2, r2 = gemv_norm_pallas(x, w, jnp.ones((64,)), eps=1e-6, **launch)
  np.testing.assert_array_equal(y, y2)
  np.testing.assert_array_equal(r, r2)


@pytest.mark.parametrize("call, match", [
    (lambda x, w, z: gemv_pallas(x, w, accumulator=z[:, :32]), "accumulator"),
    (lambda x, w, z: gemv_pallas(x, w, accumulator=z.astype(jnp.bfloat16)), "accumulator"),
    (lambda x, w, z: gemv_pallas(x, w[:, :40], accumulator=z[:, :40], block_n=16),
     "block_n=16"),                                                       # 16 ∤ 40
    (lambda x, w, z: gemv_pallas(jnp.concatenate([x, x]), w, accumulator=z), "batch 2"),
    (lambda x, w, z: gemv_norm_pallas(x, w, jnp.ones((64,)), eps=1e-6, zeros_out=-1),
     "zeros_out"),
])
def test_accumulator_errors_name_the_argument(call, match):
  x, w = jnp.ones((1, 64)), jnp.ones((64, 48))
  with pytest.raises(ValueError, match=match):
    call(x, w, jnp.zeros((1, 48), jnp.float32))


def test_atomic_w_o_lowers_for_an_h100():
  """The 512M model's in-projection with a zeroed [1, 1024] output and W_o's gated-norm GEMV
  adding into it: one Triton call each, W_o's output aliased to the zeros."""
  sds = jax.ShapeDtypeStruct
  bf16, f32 = jnp.bfloat16, jnp.float32
  cfg = DecodeConfig()

  def step(x, w_in, gain, o, w_o, gain_v):
    y, _, zeros = gemv_norm_pallas(x, w_in, gain, eps=1e-6, sum_splits=False, zeros_out=1024,
                                   interpret=False, **cfg.gemv_launch_for("in_proj"))
    return gemv_gated_norm_pallas(o, y, w_o, gain_v, eps=1e-6, head_dim=512, gate_column=6144,
                                  accumulator=zeros, interpret=False,
                                  **cfg.gemv_launch_for("out_proj"))
  text = export_for_h100(step, sds((1, 1024), bf16), sds((1024, 9228), bf16), sds((1024,), f32),
                         sds((1, 3072), f32), sds((3072, 1024), bf16), sds((512,), f32))
  assert text.count(TRITON_CALL) == 2
  assert "output_operand_alias" in text
  assert triton_launch(text, "decode_gemv_gated_norm") == ((8, 24, 1), 2, 4)


# (variant, model changes, GEMV overrides, W_o multiplier, accumulating W_o GEMVs per GDN layer)
OUT_ATOMIC_STEPS = [
    ("untied", V32, "out_proj=bk16", 0.5, 1),          # the gated norm in W_o's prologue
    ("untied", {}, "", 1.0, 1),                        # V = 12: gemv_pallas after XLA's norm
    ("hybrid", V32, "out_proj=bk16", 1.0, 1),
    ("tied", V32, "out_proj=bk16,bn64", 1.0, 0),       # D = 32 is no multiple of 64: partials
]


@pytest.mark.parametrize("variant, model_changes, overrides, o_multiplier, per_layer",
                         OUT_ATOMIC_STEPS)
def test_batch_1_step_with_atomic_w_o_equals_the_partials_step(
    monkeypatch, variant, model_changes, overrides, o_multiplier, per_layer):
  """DecodeConfig.gemv_out_atomic (with the norms in the prologues): the XLA step's logits to
  float32 rounding; W_o's GEMV accumulated once per GDN layer where D is a multiple of its
  block_n, and the gate/up prologue got one addend."""
  kinds = dataclasses.replace(DECODE_VARIANTS[variant], **model_changes).layer_kinds
  seen = []
  for kernel in ("gemv_pallas", "gemv_gated_norm_pallas"):
    real = getattr(decode_gemv, kernel)
    monkeypatch.setattr(decode_gemv, kernel, functools.partial(
        lambda *a, real=real, **k: seen.append(k.get("accumulator") is not None)
        or real(*a, **k)))
  atomic, xla, _ = _gemv_step_against_xla(
      monkeypatch, "gemv_norm_pallas", variant, 1, 43, model_changes, o_multiplier,
      gemv_out_atomic=True, gemv_overrides=overrides)
  np.testing.assert_allclose(atomic, xla, rtol=1e-5, atol=1e-5)
  assert sum(seen) == per_layer * kinds.count("G")
  assert float(np.abs(np.asarray(xla)).max()) > 0.5


def test_generate_bf16_with_atomic_w_o_samples_the_partials_tokens():
  """bf16, batch 1, generate's loop (in interpret mode, the atomic adds run in one order): the
  same 8 sampled tokens with and without DecodeConfig.gemv_out_atomic."""
  np.testing.assert_array_equal(*_bf16_tokens_on_and_off(44, 6, "out_proj=bk16,mp5",
                                                         "gemv_out_atomic"))


# The down product's partials summed atomically and the block's output added in the next GEMV's
# prologue (DecodeConfig.gemv_down_atomic; model.Block.step_deferred).

@pytest.mark.parametrize("variant, model_changes, overrides, deferring", [
    ("untied", V32, "out_proj=bk16", 2),                 # both blocks defer: the head adds
    ("tied", {}, "", 2),
    ("hybrid", V32, "out_proj=bk16", 1),                 # G defers, A adds it first (XLA)
    ("untied", V32, "out_proj=bk16;mlp_out=bn64", 0),    # D = 32 is no multiple of 64
])
def test_batch_1_step_with_deferred_block_outputs_equals_the_xla_step(
    monkeypatch, variant, model_changes, overrides, deferring):
  """DecodeConfig.gemv_down_atomic (with gemv_out_atomic or without): the XLA step's logits to
  float32 rounding, and bit for bit the logits of the step without it (interpret mode adds in
  one order); the down GEMV accumulated in each deferring block; the down multiplier applied
  where the output is added (0.5 here)."""
  from kernels_pallas import decode_gemv as dg
  model = make(dataclasses.replace(DECODE_VARIANTS[variant], **model_changes), seed=46)
  for block in model.blocks:
    block.mlp.down_proj.multiplier = 0.5
  prompt = jax.random.randint(jax.random.key(46), (1, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  accumulating, real = [], dg.gemv_swiglu_pallas
  monkeypatch.setattr(dg, "gemv_swiglu_pallas", lambda *a, **k: accumulating.append(
      k.get("accumulator") is not None) or real(*a, **k))
  step = lambda **kw: model.decode_step(token, cache, impl="xla", decode_config=DecodeConfig(
      gemv=True, gemv_block_n=16, gemv_overrides=overrides, **kw))[0]
  for out_atomic in (False, True):
    accumulating.clear()
    deferred = step(gemv_down_atomic=True, gemv_out_atomic=out_atomic)
    assert sum(accumulating) == deferring
    np.testing.assert_array_equal(deferred, step(gemv_down_atomic=False,
                                                 gemv_out_atomic=out_atomic))
  xla = model.decode_step(token, cache, impl="xla")[0]
  np.testing.assert_allclose(deferred, xla, rtol=1e-5, atol=1e-5)
  assert float(np.abs(np.asarray(xla)).max()) > 0.5


def test_generate_bf16_with_deferred_block_outputs_samples_the_same_tokens():
  """bf16, batch 1, generate's loop with every batch-1 option on (in-projection partials, atomic
  W_o and down sums, deferred outputs): the same 8 sampled tokens as with them off."""
  np.testing.assert_array_equal(*_bf16_tokens_on_and_off(
      47, 7, "out_proj=bk16,mp7", "gemv_in_partials", "gemv_out_atomic", "gemv_down_atomic"))


def test_resolve_pending_rounds_as_the_unfused_step():
  """x + rnd(m · rnd(a)) in x's dtype: against the unfused composition (scale_columns)."""
  from gdn_jax.model import resolve_pending
  x = jax.random.normal(jax.random.key(48), (1, 32)).astype(jnp.bfloat16)
  a = 3 * jax.random.normal(jax.random.key(49), (1, 1, 32))
  lin = types.SimpleNamespace(multiplier=0.3, kernel=jnp.zeros((4, 32)))
  np.testing.assert_array_equal(resolve_pending(x, (a, 0.3)),
                                x + layers.scale_columns(a[0].astype(jnp.bfloat16), [lin]))
  np.testing.assert_array_equal(resolve_pending(x, (a, 1.0)), x + a[0].astype(jnp.bfloat16))
