"""kernels_pallas/decode_gemv_mgpu.py: the Mosaic GPU batch-1 GEMV in Mosaic GPU's interpreter
against float64 NumPy and the Triton GEMV's partials, its lowering for an H100 at the 512M
model's products, and its errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.decode_gemv import gemv_pallas
from kernels_pallas.decode_gemv_mgpu import gemv_mgpu
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
