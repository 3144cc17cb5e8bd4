"""experiments/bench_kernels.py's config rows and experiments/ncu_table.py's parser."""
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_kernels  # pylint: disable=wrong-import-position
from kernels_pallas import GpuConfig  # pylint: disable=wrong-import-position


def test_config_variants_parse_into_values():
  """A row's settings are a GpuConfig value (nothing global to set or restore between rows)."""
  config = bench_kernels.parse_config("grads_block_k=32,walk_block_v=None,interpret=False")
  assert config == GpuConfig(grads_block_k=32, walk_block_v=None, interpret=False)
  assert config.interpret is False                        # not bool("False")
  assert bench_kernels.parse_config("") == GpuConfig()


def test_config_variants_name_unknown_fields_and_bad_values():
  with pytest.raises(ValueError, match=r"'grads_blok_k=16' is not field=value.*grads_block_k"):
    bench_kernels.parse_config("grads_blok_k=16")
  with pytest.raises(ValueError, match=r"`grads_block_k`=-16; expected a non-negative int"):
    bench_kernels.parse_config("grads_block_k=-16")


_NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python","h","gdn_prep","1","7","(128, 1, 1)","(16, 16, 64)","0","9.0","GPU Speed Of Light Throughput","Duration","ms","1.25"
"0","1","python","h","gdn_prep","1","7","(128, 1, 1)","(16, 16, 64)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","41.0"
"0","1","python","h","gdn_prep","1","7","(128, 1, 1)","(16, 16, 64)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","255"
"1","1","python","h","gdn_walk_fwd","1","7","(128, 1, 1)","(2, 16, 16)","0","9.0","GPU Speed Of Light Throughput","Duration","ns","750,000"
"1","1","python","h","gdn_walk_fwd","1","7","(128, 1, 1)","(2, 16, 16)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","59.3"
'''


def test_ncu_table_parses_units_and_thousands_separators():
  import ncu_table  # pylint: disable=import-outside-toplevel
  launches = ncu_table.parse(_NCU_CSV)
  assert [k["name"] for k in launches] == ["gdn_prep", "gdn_walk_fwd"]
  assert launches[0]["duration_us"] == pytest.approx(1250.0)     # ms → µs
  assert launches[1]["duration_us"] == pytest.approx(750.0)      # "750,000" ns → µs
  assert launches[0]["registers"] == 255 and launches[1]["dram_pct"] == pytest.approx(59.3)
  md = ncu_table.markdown(launches, "t")
  assert "2.000 ms of kernel time" in md and "| 62.5 |" in md   # 1250 of 2000 µs
  with pytest.raises(ValueError, match="--csv"):
    ncu_table.parse("==PROF== no kernels were profiled\n")


def _row(impl, fwd, fwd_bwd, shape=(8, 2048, 16, 128, 128), **extra):
  return dict(impl=impl, **dict(zip("BTHKV", shape)), fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, **extra)


def test_markdown_gives_ratios_to_fla_and_to_flashqla_of_the_same_shape():
  k256 = (8, 2048, 6, 256, 512)
  out = dict(device="H100", jax="0.11.2", triton="3.7.1", fla="0.6.0", flash_qla="0.1.3",
             fla_guard_lifted=False, chunk_size=64, repeats=20, rows=[
                 _row("pallas", 0.8, 2.0), _row("fla", 0.6, 2.5), _row("flash_qla", 0.3, 1.0),
                 _row("pallas", 1.4, 3.8, k256), _row("fla", 0.9, 3.4, k256),
                 dict(impl="flash_qla", **dict(zip("BTHKV", k256)),
                      error="AssertionError: FlashQLA requires K=128")])
  md = bench_kernels.markdown(out)
  assert "guard kept" in md and "flash_qla 0.1.3" in md
  assert "| 8,2048,16,128,128 | pallas | 0.800 | 2.000 | 1.33 | 0.80 | 2.67 | 2.00 |" in md
  assert "| 8,2048,6,256,512 | pallas | 1.400 | 3.800 | 1.56 | 1.12 | - | - |" in md
  assert "| 8,2048,6,256,512 | flash_qla | failed: AssertionError: FlashQLA requires K=128" in md


def test_torch_rule_calls_flashqla_directly_and_returns_its_output(monkeypatch):
  calls = []

  def chunk_gated_delta_rule(*x, scale):
    calls.append((x, scale))
    return "o", "final state"

  monkeypatch.setitem(sys.modules, "flash_qla",
                      types.SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule))
  rule = bench_kernels.torch_rule("flash_qla")
  assert rule(1, 2, 3, 4, 5, scale=0.25) == "o"
  assert calls == [((1, 2, 3, 4, 5), 0.25)]


_PLAIN_STAGES = ["fwd: state walk", "fwd: output", "bwd: dṼ_local", "bwd: reverse walk"]
_FUSED_STAGES = ["fwd: state walk + output", "fwd: state walk + output, not saving h_r, Ṽ",
                 "bwd: reverse walk + dṼ_local"]


@pytest.mark.parametrize("config,products,stages", [
    (GpuConfig(prep_block=16, walk_bwd_from_a=True), "A, W, U", _PLAIN_STAGES),
    (GpuConfig(walk_fwd_from_a=True, walk_bwd_from_a=True, walk_fwd_output=True,
               walk_bwd_dv_local=True), "A", _FUSED_STAGES)])
def test_stage_times_run_each_kernel_of_the_config_given(monkeypatch, config, products, stages):
  """`--stages` times every kernel alone for each pallas row: the config reaches the kernels,
  the prep's row names what it writes, and fused kernels have their own rows."""
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  seen = []
  prep = gpu.prep
  monkeypatch.setattr(gpu, "prep", lambda *a, config, **kw: seen.append(config) or prep(
      *a, config=config, **kw))
  inputs, do = bench_kernels.make_inputs(1, 64, 1, 16, 16)
  st = bench_kernels.stage_times(inputs, do, 32, repeats=1, warmup=0, config=config)
  assert list(st) == [f"fwd: prep ({products})", *stages, "bwd: gradients (key + WY)"]
  assert all(ms > 0 for ms in st.values()) and seen and all(c is config for c in seen)
