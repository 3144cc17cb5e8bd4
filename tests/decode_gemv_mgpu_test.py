"""kernels_pallas/decode_gemv_mgpu.py: the Mosaic GPU batch-1 GEMV in Mosaic GPU's interpreter
against float64 NumPy and the Triton GEMV's partials, its lowering for an H100 at the 512M
model's products, and its errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.decode_gemv import gemv_pallas
from kernels_pallas.decode_gemv_mgpu import (gemv_gated_norm_mgpu, gemv_mgpu, gemv_norm_mgpu,
                                             gemv_swiglu_mgpu)
from tests.triton_export import export_for_h100

MOSAIC_CALL = "stablehlo.custom_call @mosaic_gpu"


def _operands(K, N, dtype, seed=0):
  x = jax.random.normal(jax.random.key(seed), (1, K)).astype(dtype)
  w = (jax.random.normal(jax.random.key(seed + 1), (K, N)) / 8).astype(dtype)
  return x, w


@pytest.mark.parametrize("K, N, dtype, launch, splits", [
    (512, 384, jnp.bfloat16, dict(), 4),                          # 1 K tile per program
    (512, 384, jnp.bfloat16, dict(splits=2), 2),                  # 2 tiles, in flight together
    (512, 384, jnp.bfloat16, dict(block_n=64, splits=1), 1),      # all 4 tiles in one program
    (384, 256, jnp.bfloat16, dict(block_k=256, splits=1), 1),     # block_k lowered to 128
    (256, 128, jnp.float32, dict(block_k=64, splits=2), 2),       # float32 weights
])
def test_gemv_equals_float64_and_the_triton_partials(K, N, dtype, launch, splits):
  """The partials [S, 1, N] of each K split: their sum is x @ W (float64 NumPy, to float32
  rounding of the bf16 products' sums), and each split's equals the Triton GEMV's with the same
  splits."""
  x, w = _operands(K, N, dtype)
  y = gemv_mgpu(x, w, **launch)
  assert y.shape == (splits, 1, N) and y.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(y).sum(axis=0), want, rtol=1e-5, atol=1e-5)
  assert float(np.abs(want).max()) > 1.0
  triton = gemv_pallas(x, w, sum_splits=False, splits=splits,
                       block_k=launch.get("block_k", 128))
  np.testing.assert_allclose(y, triton, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K, N, launch", [
    (1024, 5632, {}), (3072, 1024, {}), (2816, 1024, {}), (1024, 32000, {}),
    (1024, 1024, dict(splits=1, block_n=64)),         # 8 tiles (and x slices) per program
    (256, 512, dict(block_n=256, block_k=256, splits=1))])
def test_gemv_lowers_to_one_mosaic_call_for_an_h100(K, N, launch):
  """The 512M model's gate/up, W_o, down and read-out products at the defaults (128 × 128
  tiles, ≥ 528 programs), several tiles per program and the largest tiles, with and without
  programmatic dependent launch: one Mosaic GPU call each, and the PDL instructions change the
  kernel."""
  sds = jax.ShapeDtypeStruct
  args = (sds((1, K), jnp.bfloat16), sds((K, N), jnp.bfloat16))
  texts = [export_for_h100(functools.partial(gemv_mgpu, pdl=pdl, interpret=False, **launch),
                           *args) for pdl in (True, False)]
  for text in texts:
    assert text.count(MOSAIC_CALL) == 1
  assert texts[0] != texts[1]


@pytest.mark.parametrize("x, w, kw, match", [
    ((2, 256), (256, 128), {}, "batch 1"),
    ((1, 256), (128, 128), {}, "expected x"),
    ((1, 256), (256, 200), {}, "`block_n`=128"),               # 200 columns
    ((1, 256), (256, 256), dict(block_n=32), "block_n"),       # below a warpgroup's tile
    ((1, 512), (512, 512), dict(block_n=512), "block_n"),      # past a TMA box
    ((1, 96), (96, 128), {}, "K=96"),                          # K tiles of 32 rows
    ((1, 512), (512, 128), dict(splits=3), "splits"),
    ((1, 4096), (4096, 256), dict(splits=1, block_n=256), "shared memory"),
])
def test_errors_name_the_argument(x, w, kw, match):
  with pytest.raises(ValueError, match=match):
    gemv_mgpu(jnp.zeros(x, jnp.bfloat16), jnp.zeros(w, jnp.bfloat16), **kw)


# gemv_norm_mgpu: the residual add and RMSNorm in the prologue (gemv_norm_pallas's math).

@pytest.mark.parametrize("D, N, addends, multiplier, launch", [
    (512, 256, 0, 1.0, dict(splits=2)),
    (512, 256, 3, 0.5, dict(splits=4)),                  # 3 partials, W_o's multiplier
    (256, 384, 1, 1.0, dict(block_n=64, splits=1)),      # one summed addend (gemv_out_atomic)
    (320, 128, 2, 1.0, dict(splits=5)),                  # D = 320: boxes and tiles of 64
])
def test_norm_gemv_equals_the_triton_norm_gemv(D, N, addends, multiplier, launch):
  """Partials and the new stream r as gemv_norm_pallas makes them with the same splits (r bit
  for bit: the same roundings; y to float32 rounding), and y against float64 NumPy of the
  unfused composition (to bf16 rounding of h)."""
  from kernels_pallas.decode_gemv import gemv_norm_pallas
  x, w = _operands(D, N, jnp.bfloat16, seed=3)
  gain = 1.0 + 0.5 * jax.random.normal(jax.random.key(5), (D,))
  add = None if not addends else 2 * jax.random.normal(jax.random.key(6), (addends, 1, D))
  kw = dict(eps=1e-6, addend_multiplier=multiplier)
  y, r = gemv_norm_mgpu(x, w, gain, add, **kw, **launch)
  S = launch["splits"]
  assert y.shape == (S, 1, N) and y.dtype == jnp.float32 and r.shape == (1, D)
  y_t, r_t = gemv_norm_pallas(x, w, gain, add, **kw, splits=S, sum_splits=False,
                              block_n=launch.get("block_n", 128))
  np.testing.assert_array_equal(r, r_t)
  np.testing.assert_allclose(y, y_t, rtol=1e-5, atol=1e-5)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  r64 = f64(x) + (0 if add is None else multiplier * f64(add).sum(axis=0))
  h = r64 / np.sqrt(np.mean(r64 ** 2) + 1e-6) * f64(gain)
  np.testing.assert_allclose(np.asarray(y).sum(axis=0), h @ f64(w), rtol=2e-2, atol=2e-2)
  assert not np.isnan(np.asarray(r, np.float32)).any()       # program (0, 0) wrote all of r


@pytest.mark.parametrize("D, N, addends", [(1024, 9344, 0), (1024, 5632, 24), (1024, 32000, 0)])
def test_norm_gemv_lowers_to_one_mosaic_call_for_an_h100(D, N, addends):
  """The 512M model's in-projection (9228 columns padded to 9344), gate/up with W_o's 24
  partials, and the read-out, at the defaults."""
  sds = jax.ShapeDtypeStruct
  args = (sds((1, D), jnp.bfloat16), sds((D, N), jnp.bfloat16), sds((D,), jnp.float32))
  if addends:
    args += (sds((addends, 1, D), jnp.float32),)
  fn = lambda *a: gemv_norm_mgpu(*a, eps=1e-6, interpret=False)
  assert export_for_h100(fn, *args).count(MOSAIC_CALL) == 1


@pytest.mark.parametrize("gain, add, match", [
    ((256,), None, "gain_D"),
    ((512,), (2, 2, 512), "addends_SxD"),
    ((512,), (300, 1, 512), "addends_SxD"),
])
def test_norm_gemv_errors_name_the_argument(gain, add, match):
  x, w = jnp.zeros((1, 512), jnp.bfloat16), jnp.zeros((512, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    gemv_norm_mgpu(x, w, jnp.ones(gain), None if add is None else jnp.zeros(add), eps=1e-6)
  with pytest.raises(ValueError, match="K=96"):              # K tiles of 32 rows
    gemv_norm_mgpu(jnp.zeros((1, 96), jnp.bfloat16), jnp.zeros((96, 256), jnp.bfloat16),
                   jnp.ones((96,)), eps=1e-6)


# gemv_swiglu_mgpu and gemv_gated_norm_mgpu: the two other prologues of a GDN block's step.

@pytest.mark.parametrize("parts, launch", [(4, dict(splits=3)), (3, dict(splits=1, block_n=64))])
def test_swiglu_gemv_equals_the_triton_swiglu_gemv(parts, launch):
  """(SiLU(g) ⊙ u) @ W_down from the gate/up partials: bit for bit the Triton kernel's sum (the
  same roundings; 3 partials, which the Triton kernel does not take, padded there with a zero
  partial, which changes no sum)."""
  from kernels_pallas.decode_gemv import gemv_swiglu_pallas
  F, N = 384, 256
  gu = jax.random.normal(jax.random.key(11), (parts, 1, 2 * F))
  w = (jax.random.normal(jax.random.key(12), (F, N)) / 8).astype(jnp.bfloat16)
  y = gemv_swiglu_mgpu(gu, w, **launch)
  assert y.shape == (launch["splits"], 1, N) and y.dtype == jnp.float32
  padded = gu if parts & (parts - 1) == 0 else jnp.concatenate(
      [gu, jnp.zeros((4 - parts, 1, 2 * F))])
  y_t = gemv_swiglu_pallas(padded, w, splits=launch["splits"], block_n=launch.get("block_n", 128))
  np.testing.assert_allclose(np.asarray(y).sum(axis=0), y_t, rtol=1e-6, atol=1e-6)
  assert float(np.abs(np.asarray(y_t)).max()) > 1.0


@pytest.mark.parametrize("gate_kind", ["none", "array", "partials"])
@pytest.mark.parametrize("launch", [dict(splits=3), dict(splits=1, block_n=64, block_k=64)])
def test_gated_norm_gemv_equals_the_triton_gated_norm_gemv(gate_kind, launch):
  """W_o's product of the gated output norm (3 heads of V = 128 at scales 10⁻² … 10², so a
  wrong head's statistics show), with no gate, the gate as an array from column 8, or as 3 split
  partials with the gate Linear's multiplier: the Triton kernel's partials' sum to float32
  rounding (the same h)."""
  from kernels_pallas.decode_gemv import gemv_gated_norm_pallas
  H, V, N = 3, 128, 256
  o = jax.random.normal(jax.random.key(13), (1, H * V)) * jnp.repeat(
      jnp.logspace(-2, 2, H), V)[None]
  w = (jax.random.normal(jax.random.key(14), (H * V, N)) / 16).astype(jnp.bfloat16)
  gain = 1 + 0.5 * jax.random.normal(jax.random.key(15), (V,))
  gate, kw = {"none": (None, {}),
              "array": ((2 * jax.random.normal(jax.random.key(16), (1, H * V + 16))).astype(
                  jnp.bfloat16), dict(gate_column=8)),
              "partials": (jax.random.normal(jax.random.key(17), (3, 1, H * V + 16)),
                           dict(gate_column=8, gate_multiplier=0.5))}[gate_kind]
  y = gemv_gated_norm_mgpu(o, gate, w, gain, eps=1e-6, head_dim=V, **kw, **launch)
  triton_launch = dict(launch, block_n=launch.get("block_n", 128))
  y_t = gemv_gated_norm_pallas(o, gate, w, gain, eps=1e-6, head_dim=V, sum_splits=False, **kw,
                               **triton_launch)
  np.testing.assert_allclose(np.asarray(y).sum(axis=0), np.asarray(y_t).sum(axis=0),
                             rtol=1e-5, atol=1e-5)
  assert float(np.abs(np.asarray(y_t).sum(axis=0)).max()) > 0.5


def test_swiglu_and_gated_norm_gemvs_lower_for_an_h100():
  """The 512M model's down product (8 gate/up partials) and W_o with the gate as the padded
  in-projection's output, as its 8 partials, and without a gate: one Mosaic GPU call each."""
  sds, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  text = export_for_h100(functools.partial(gemv_swiglu_mgpu, interpret=False),
                         sds((8, 1, 5632), f32), sds((2816, 1024), bf16))
  assert text.count(MOSAIC_CALL) == 1
  o, w, gain = sds((1, 3072), f32), sds((3072, 1024), bf16), sds((512,), f32)
  for gate in (sds((1, 9344), bf16), sds((8, 1, 9344), f32)):
    fn = lambda o, g, w, gain: gemv_gated_norm_mgpu(o, g, w, gain, eps=1e-6, head_dim=512,
                                                    gate_column=6144, interpret=False)
    assert export_for_h100(fn, o, gate, w, gain).count(MOSAIC_CALL) == 1
  fn = lambda o, w, gain: gemv_gated_norm_mgpu(o, None, w, gain, eps=1e-6, head_dim=512,
                                               interpret=False)
  assert export_for_h100(fn, o, w, gain).count(MOSAIC_CALL) == 1


def test_swiglu_and_gated_norm_errors_name_the_argument():
  w = jnp.zeros((256, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="gate_up"):
    gemv_swiglu_mgpu(jnp.zeros((2, 1, 256)), w)                  # 2F ≠ 512
  with pytest.raises(ValueError, match="gate_up"):
    gemv_swiglu_mgpu(jnp.zeros((2, 1, 512), jnp.bfloat16), w)    # partials in bf16
  o, gain = jnp.zeros((1, 256)), jnp.ones((128,))
  with pytest.raises(ValueError, match="gate_column"):           # 3 bf16 columns: not 16 bytes
    gemv_gated_norm_mgpu(o, jnp.zeros((1, 300), jnp.bfloat16), w, gain, eps=1e-6,
                         head_dim=128, gate_column=3)
  with pytest.raises(ValueError, match="head_dim"):
    gemv_gated_norm_mgpu(o, None, w, jnp.ones((64,)), eps=1e-6, head_dim=64, block_k=128)
  with pytest.raises(ValueError, match="o_1xHV"):
    gemv_gated_norm_mgpu(o.astype(jnp.bfloat16), None, w, gain, eps=1e-6, head_dim=128)


# DecodeConfig.gemv_backend="mosaic": the batch-1 step's GEMVs as the Mosaic GPU kernels.

def _mosaic_model(dtype="float32", seed=51, **changes):
  """A model whose products the Mosaic GPU kernels take (≥ 64 columns and K-tile rows):
  d 128, 2 heads of K = V = 64, SwiGLU 128, vocab 128, 2 blocks."""
  import dataclasses
  from tests.generate_test import make
  from tests.model_test import CFG
  return make(dataclasses.replace(CFG, d_model=128, num_heads=2, num_v_heads=2, head_k_dim=64,
                                  head_v_dim=64, mlp_hidden=128, vocab_size=128, dtype=dtype,
                                  **changes), seed=seed)


MOSAIC_KERNELS = ("gemv_norm_mgpu", "gemv_gated_norm_mgpu", "gemv_swiglu_mgpu", "gemv_mgpu")


@pytest.mark.parametrize("changes, in_parts, per_step", [
    ({}, False, dict(gemv_norm_mgpu=5, gemv_gated_norm_mgpu=2, gemv_swiglu_mgpu=2)),
    ({}, True, dict(gemv_norm_mgpu=5, gemv_gated_norm_mgpu=2, gemv_swiglu_mgpu=2)),
    (dict(layer_pattern="GA"), False,      # the attention block's: its MLP's down product only
     dict(gemv_norm_mgpu=3, gemv_gated_norm_mgpu=1, gemv_swiglu_mgpu=2)),
])
def test_mosaic_backend_step_equals_the_triton_step(monkeypatch, changes, in_parts, per_step):
  """A batch-1 decode step (the fused ring kernel on conv rings) with gemv_backend="mosaic":
  the Triton step's logits to float32 rounding; the in-projection (its columns padded), W_o
  with the gated norm, gate/up, down and the read-out ran in Mosaic GPU kernels (interpreter)."""
  from gdn_jax import generate as gen
  from kernels_pallas import decode_gemv_mgpu
  from kernels_pallas.config import DecodeConfig
  model = _mosaic_model(**changes)
  prompt = jax.random.randint(jax.random.key(52), (1, 5), 0, 128)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  W = model.config.conv_size
  rings = [dict(c, ring_pos=jnp.zeros((W,), jnp.int32)) if 'ring_q' in c else c
           for c in gen.conv_rings(model, cache)]
  calls = []
  for name in MOSAIC_KERNELS:
    real = getattr(decode_gemv_mgpu, name)
    monkeypatch.setattr(decode_gemv_mgpu, name, functools.partial(
        lambda *a, name=name, real=real, **k: calls.append(name) or real(*a, **k)))
  config = lambda backend: DecodeConfig(gemv=True, gemv_block_n=64, gemv_backend=backend,
                                        gemv_in_partials=in_parts, gemv_overrides="out_proj=bk64")
  step = lambda backend: model.decode_step(token, rings, impl="pallas_fused",
                                           decode_config=config(backend))[0]
  mosaic = step("mosaic")
  assert {n: calls.count(n) for n in set(calls)} == per_step
  calls.clear()
  triton = step("triton")
  assert not calls
  np.testing.assert_allclose(mosaic, triton, rtol=1e-5, atol=1e-5)
  assert float(np.abs(np.asarray(triton)).max()) > 0.5


def test_generate_bf16_with_the_mosaic_backend_samples_the_triton_tokens():
  """bf16, batch 1, generate's loop: the same 6 sampled tokens with the Mosaic GPU GEMVs as with
  the Triton ones."""
  from gdn_jax import generate as gen
  from kernels_pallas.config import DecodeConfig
  model = _mosaic_model(dtype="bfloat16", seed=53)
  prompt = jax.random.randint(jax.random.key(53), (1, 4), 0, 128)
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(8), impl="pallas_fused")
  run = lambda backend: gen.generate(model, prompt, 6, decode_config=DecodeConfig(
      gemv=True, gemv_block_n=64, gemv_backend=backend, gemv_overrides="out_proj=bk64,mp9"),
                                     **kw)
  np.testing.assert_array_equal(run("mosaic"), run("triton"))


def test_mosaic_backend_is_checked():
  from kernels_pallas.config import DecodeConfig
  with pytest.raises(ValueError, match="gemv_backend"):
    DecodeConfig(gemv_backend="cutlass")
  assert DecodeConfig(gemv_backend="mosaic").gemv_out_atomic      # defaults on, not applied
