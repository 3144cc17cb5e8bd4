"""experiments/bench_kernels.py's knob handling: a variant row must not leak into the next row."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_kernels  # pylint: disable=wrong-import-position
from kernels_pallas import gpu  # pylint: disable=wrong-import-position


def test_gpu_knobs_set_parse_and_restore():
  before = (gpu.GRADS_SPLIT, gpu.CHUNK_PARALLEL, gpu.GRADS_BLOCK_K)
  with bench_kernels.gpu_knobs("GRADS_SPLIT=True,CHUNK_PARALLEL=pallas,GRADS_BLOCK_K=32"):
    assert (gpu.GRADS_SPLIT, gpu.CHUNK_PARALLEL, gpu.GRADS_BLOCK_K) == (True, "pallas", 32)
  assert (gpu.GRADS_SPLIT, gpu.CHUNK_PARALLEL, gpu.GRADS_BLOCK_K) == before
  with bench_kernels.gpu_knobs("WALK_BWD_DO_TOKENS=False"):   # bool("False") would be True
    assert gpu.WALK_BWD_DO_TOKENS is False
  assert gpu.WALK_BWD_DO_TOKENS is True


def test_gpu_knobs_restore_after_an_error_and_name_unknown_knobs():
  before = gpu.GRADS_BLOCK_K
  with pytest.raises(RuntimeError):
    with bench_kernels.gpu_knobs("GRADS_BLOCK_K=16"):
      raise RuntimeError("a failing row")
  assert gpu.GRADS_BLOCK_K == before
  with pytest.raises(ValueError, match="no knob 'GRADS_BLOK_K'"):
    with bench_kernels.gpu_knobs("GRADS_BLOK_K=16"):
      pass
