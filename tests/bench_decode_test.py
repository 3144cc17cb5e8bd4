"""experiments/bench_decode.py: its tiny CPU path runs and writes JSON + Markdown; the profile
summary maps kernels to the decode step's named scopes."""
import contextlib
import json
import re
import types

import numpy as np
import pytest

from experiments import bench_decode


def test_tiny_run_writes_rows(tmp_path):
  opts = bench_decode.Options(config="tiny", batches=(2,), prompts=(8,), new_tokens=4,
                              variants=(), xla_flags_variants=(), fla=False, profile=False,
                              repeats=1, out_dir=str(tmp_path))
  res = bench_decode.run(opts, log=lambda *a: None)
  row, before = res["rows"]
  assert row["impl"] == "gdn-jax xla" and before["impl"] == "gdn-jax before #22"
  for r in (row, before):
    assert "error" not in r, r
    assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["deterministic"]
  assert row["first_tokens"] == before["first_tokens"]     # both greedy, same model
  assert row["floor_weights_state_ms"] > row["floor_weights_ms"] > 0
  stem = f"bench_decode_{bench_decode.device_slug(bench_decode.jax.devices()[0])}_tiny"
  assert json.loads((tmp_path / f"{stem}.json").read_text())["rows"][0]["batch"] == 2
  md = (tmp_path / f"{stem}.md").read_text()
  assert "| gdn-jax xla | 2 | 8 |" in md and "fla: not measured (--nofla)" in md
  assert "? parameters" not in md


def test_a_spent_budget_still_writes_the_first_row(tmp_path):
  """With the budget spent before any row (a cold compile on a device call), the first row still
  runs (its programs were compiled) and every later row is skipped, saying why."""
  opts = bench_decode.Options(config="tiny", batches=(2,), prompts=(8,), new_tokens=3,
                              variants=(), xla_flags_variants=(), fla=False, profile=False,
                              repeats=1, time_budget_s=0.0, out_dir=str(tmp_path))
  res = bench_decode.run(opts, log=lambda *a: None)
  assert [r["impl"] for r in res["rows"]] == ["gdn-jax xla"] and "error" not in res["rows"][0]
  assert any("before #22" in s and "time budget" in s for s in res["skipped"]), res["skipped"]
  assert res["setup_s"] >= 0


def test_trace_summary_groups_kernels_by_scope():
  hlo = '''
  %fusion.1 = f32[2] fusion(%p), kind=kLoop, metadata={op_name="jit(decode_program)/while/body/rule/mul"}
  ROOT %dot.2 = bf16[2,9] dot(%a, %b), metadata={op_name="jit(decode_program)/while/body/in_proj/dot_general"}
  %fusion.3 = f32[2] fusion(%q), metadata={op_name="jit(decode_program)/while/body/add"}
  '''
  scope_of = bench_decode.hlo_scopes(hlo)
  assert scope_of == {"fusion.1": "rule", "dot.2": "in_proj", "fusion.3": "other"}
  ev = lambda start, dur, op: types.SimpleNamespace(start_ns=start, duration_ns=dur,
                                                    name=f"kernel_{op}", stats=[("hlo_op", op)])
  line = types.SimpleNamespace(name="Stream #7", events=[ev(0, 4000, "dot.2"),
                                                         ev(5000, 2000, "fusion.1"),
                                                         ev(8000, 2000, "fusion.1")])
  data = types.SimpleNamespace(planes=[types.SimpleNamespace(name="/device:GPU:0", lines=[line]),
                                       types.SimpleNamespace(name="/host:CPU", lines=[])])
  s = bench_decode.summarize_trace(data, scope_of, steps=2, wall_s=1e-5)
  assert s["us_per_step_by_scope"] == {"rule": 2.0, "in_proj": 2.0}
  assert s["kernels_per_step"] == 1.5 and s["idle_gap_us_per_step"] == 1.0



def test_trace_summary_finds_instructions_by_kernel_name_and_xla_ops_line():
  """Without hlo_op stats (as jax 0.11's GPU traces): a fusion's kernel is named after its
  instruction ('.' → '_'); a library kernel (cuBLAS' nvjet_*) is found through the interval of
  the "XLA Ops" line around it; anything else takes the fallback."""
  scope_of = {"input_reduce_fusion.81": "rule", "custom-call.12": "mlp"}
  ev = lambda start, dur, name: types.SimpleNamespace(start_ns=start, duration_ns=dur, name=name,
                                                      stats=[("correlation_id", 1)])
  kernels = types.SimpleNamespace(name="Stream #7", events=[
      ev(0, 3000, "input_reduce_fusion_81"), ev(4000, 2000, "nvjet_sm90_tst_128x160"),
      ev(7000, 1000, "loop_add_fusion_3")])
  ops = types.SimpleNamespace(name="XLA Ops", events=[ev(3500, 3000, "custom-call.12")])
  data = types.SimpleNamespace(planes=[types.SimpleNamespace(name="/device:GPU:0",
                                                             lines=[kernels, ops])])
  s = bench_decode.summarize_trace(data, scope_of, steps=1, wall_s=1e-5,
                                   fallback=lambda n: "unmatched " + n[:4])
  assert s["us_per_step_by_scope"] == {"rule": 3.0, "mlp": 2.0, "unmatched loop": 1.0}
  assert s["matched_fraction"] == {"hlo_op": 0.0, "xla_ops_line": 0.3333, "kernel_name": 0.5}
  assert s["kernels"][0] == ["input_reduce_fusion_81", 1.0, 3.0, "rule"]
  assert s["event_stats"] == ["correlation_id"]
  # The default fallback keeps naming gemm-like kernels as matmuls.
  assert bench_decode.summarize_trace(data, {}, steps=1, wall_s=1e-5)["us_per_step_by_scope"] \
      == {"other": 4.0, "matmul (unscoped)": 2.0}

class _Arr(np.ndarray):
  """A NumPy array with torch's `.cuda()` (the fla path's only tensor method numpy lacks)."""

  def cuda(self):
    return self


def test_fla_rows_control_flow_with_a_fake_torch_model():
  """The fla code path on CPU with stand-ins for torch and the model (fla needs a GPU): the
  loop's calls, HF generate's arguments and the per-token arithmetic."""
  calls = []

  class Model:
    config = types.SimpleNamespace(vocab_size=11)

    def __call__(self, input_ids, use_cache, logits_to_keep, past_key_values=None):
      calls.append((input_ids.shape, past_key_values, use_cache, logits_to_keep))
      B = input_ids.shape[0]
      return types.SimpleNamespace(logits=np.zeros((B, 1, 11)).view(_Arr),
                                   past_key_values=f"cache{len(calls)}")

    def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample, use_cache,
                 pad_token_id):
      assert max_new_tokens == min_new_tokens and not do_sample and use_cache
      B, T = input_ids.shape
      return np.zeros((B, T + max_new_tokens), np.int64)

  torch = types.SimpleNamespace(
      inference_mode=contextlib.nullcontext, cuda=types.SimpleNamespace(synchronize=lambda: None),
      Generator=lambda: types.SimpleNamespace(manual_seed=lambda seed: None),
      randint=lambda lo, hi, shape, generator: np.random.randint(lo, hi, shape).view(_Arr))
  bench = object.__new__(bench_decode.FlaBench)
  bench.torch, bench.model = torch, Model()
  row = bench.run("fla-loop", 3, 5, 4, repeats=2)
  assert set(row) == {"prefill_ms", "decode_s"} and row["decode_s"] > 0
  # warm-up (4 tokens) + 2 timed calls: each one prompt call, then 3 steps on one token each
  assert [c[0] for c in calls] == [(3, 5), (3, 1), (3, 1), (3, 1)] * 3
  assert calls[1][1] == "cache1" and calls[2][1] == "cache2"     # the cache is threaded through
  row = bench.run("fla-hf", 3, 5, 4, repeats=1)
  assert row["generate_s"] > 0 and row["decode_s"] > 0


def test_rows_without_rows_spec_use_generates_default_padding():
  """"xla" means what `generate` does by default (8 padded rows on GPUs, 1 elsewhere); "@N" pins
  it. (The 2026-12-06 profile measured the unpadded step because "xla" meant 1.)"""
  assert bench_decode.split_impl("xla") == ("xla", bench_decode.gen.default_matmul_rows())
  assert bench_decode.split_impl("pallas@1") == ("pallas", 1)
  assert bench_decode.split_impl("xla@x") == ("xla", 0)
  assert any(v.startswith("xla+nogemv@1:") for v in bench_decode.Options().variants)


def test_profile_of_an_uncompiled_batch_says_so():
  """A batch whose programs did not compile within the budget gets an error entry, not a
  KeyError that loses the reason."""
  bench = types.SimpleNamespace(keys=bench_decode.GdnBench.keys, compiled={},
                                errors={("decode", 8, "xla", "float32"): "RuntimeError: boom"})
  out = bench_decode.GdnBench.profile(bench, 8, 128, "xla", "float32")
  assert "not compiled" in out["error"] and "boom" in out["error"], out


def test_xla_flags_rows_run_the_benchmark_as_a_module(tmp_path):
  """The XLA_FLAGS rows rerun this script in a subprocess, which must import gdn_jax from the
  repository (it failed on the GPU when run as a file from experiments/)."""
  opts = bench_decode.Options(config="tiny", batches=(1,), prompts=(8,), new_tokens=3,
                              variants=(), xla_flags_variants=(), fla=False, profile=False,
                              baseline=False, repeats=1)
  rows = bench_decode.flags_variant(opts, "--xla_cpu_use_thunk_runtime=true", 1, 8, tmp_path,
                                    log=lambda *a: None, timeout=300)
  assert len(rows) == 1 and "error" not in rows[0], rows
  assert rows[0]["impl"].endswith("[XLA_FLAGS --xla_cpu_use_thunk_runtime=true]")
  assert rows[0]["ms_per_token"] > 0


def test_xla_flags_rows_import_the_package_from_the_repository(tmp_path, monkeypatch):
  """Where gdn_jax is not installed (the GPU image), the subprocess finds it only as a module run
  from the repository root with it on PYTHONPATH: checked on the recorded call."""
  import pathlib
  import subprocess
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or
                      types.SimpleNamespace(returncode=1, stdout="", stderr="x"))
  monkeypatch.setenv("PYTHONPATH", "/elsewhere")
  bench_decode.flags_variant(bench_decode.Options(config="tiny"), "--f", 1, 8, tmp_path,
                             log=lambda *a: None, timeout=1)
  (cmd, kw), = calls
  root = pathlib.Path(kw["cwd"])
  assert cmd[1:3] == ["-m", "experiments.bench_decode"] and (root / "gdn_jax").is_dir()
  assert kw["env"]["PYTHONPATH"].split(":")[:2] == [str(root), "/elsewhere"]
  assert kw["env"]["XLA_FLAGS"].endswith("--f")


def test_variant_launch_settings_parse_into_a_decode_config():
  from kernels_pallas.config import DecodeConfig
  assert bench_decode.split_launch("pallas_fused+bv16+w8") == (
      "pallas_fused", DecodeConfig(block_v=16, num_warps=8))
  assert bench_decode.split_launch("pallas") == ("pallas", None)
  assert bench_decode.parse_variant("pallas+w8@8:bfloat16") == ("pallas+w8@8", "bfloat16")
  assert bench_decode.split_launch("xla+gemv+gbn32") == (
      "xla", DecodeConfig(gemv=True, gemv_block_n=32))
  assert bench_decode.split_launch("pallas_fused+gemv+gw8+gmp132") == (
      "pallas_fused", DecodeConfig(gemv=True, gemv_num_warps=8, gemv_min_programs=132))
  assert bench_decode.parse_variant("xla+gemv:float32") == ("xla+gemv", "float32")
  assert bench_decode.split_launch("pallas_fused+nogemv") == (
      "pallas_fused", DecodeConfig(gemv=False))
  assert bench_decode.split_launch("pallas_fused+noring+noswiglu") == (
      "pallas_fused", DecodeConfig(conv_ring=False, gemv_swiglu=False))
  assert bench_decode.split_launch("pallas_fused+nonorm") == (
      "pallas_fused", DecodeConfig(gemv_norm=False))
  assert bench_decode.split_launch("pallas_fused+norm") == (
      "pallas_fused", DecodeConfig(gemv_norm=True))
  assert bench_decode.split_launch("pallas_fused+gst3+gbn64") == (
      "pallas_fused", DecodeConfig(gemv_num_stages=3, gemv_block_n=64))
  assert bench_decode.split_launch("pallas_fused+onorm") == (
      "pallas_fused", DecodeConfig(gemv_out_norm=True))
  assert bench_decode.split_launch("pallas_fused+noonorm") == (
      "pallas_fused", DecodeConfig(gemv_out_norm=False))
  assert bench_decode.split_launch("pallas_fused+nonorm+onorm+out_proj.bk128") == (
      "pallas_fused", DecodeConfig(gemv_norm=False, gemv_out_norm=True,
                                   gemv_overrides="out_proj=bk128"))
  assert bench_decode.parse_variant("pallas_fused+onorm:bfloat16") == (
      "pallas_fused+onorm", "bfloat16")
  assert bench_decode.split_launch("pallas_fused+inparts+in_proj.bn64") == (
      "pallas_fused", DecodeConfig(gemv_in_partials=True, gemv_overrides="in_proj=bn64"))
  assert bench_decode.split_launch("pallas_fused+noinparts") == (
      "pallas_fused", DecodeConfig(gemv_in_partials=False))
  assert bench_decode.split_launch("pallas_fused+mosaic+inparts") == (
      "pallas_fused", DecodeConfig(gemv_backend="mosaic", gemv_in_partials=True))
  for bad in ("xla+bv16:float32", "pallas+bv:float32", "pallas+x4:float32",
              "pallas+bv12:float32", "pallas+w8+w4:float32", "xla+gemv+gemv:float32",
              "xla+gst0:float32", "xla+gst2+gst3:float32",
              "xla+gbn48:float32", "xla+gemv+nogemv:float32",
              "pallas_fused+noring+noring:float32", "pallas_fused+norm+nonorm:float32",
              "pallas_fused+onorm+noonorm:float32", "pallas_fused+onorm+onorm:float32",
              "pallas_fused+onorm4:float32", "pallas_fused+oonorm:float32",
              "pallas_fused+inparts+noinparts:float32", "pallas_fused+inpart:float32",
              "pallas_fused+mosaic+mosaic:float32"):
    with pytest.raises(ValueError, match="bench_decode"):
      bench_decode.parse_variant(bad)


def test_variant_gemv_product_parts_parse_into_gemv_overrides():
  """+PRODUCT.KEYN[.KEYN…] (several products, each once) → DecodeConfig.gemv_overrides, in the
  order given; bad ones raise a ValueError naming the variant and the form."""
  from kernels_pallas.config import DecodeConfig
  assert bench_decode.split_launch("pallas_fused+out_proj.bn32.mp128") == (
      "pallas_fused", DecodeConfig(gemv_overrides="out_proj=bn32,mp128"))
  assert bench_decode.split_launch("xla+gemv+out_proj.bn32+mlp_out.st3.w8+gbn64") == (
      "xla", DecodeConfig(gemv=True, gemv_block_n=64,
                          gemv_overrides="out_proj=bn32;mlp_out=st3,w8"))
  _, config = bench_decode.split_launch("pallas_fused+head.bn64.st3+in_proj.bk64+mlp_in.mp256")
  assert config.gemv_launch_for("head")["num_stages"] == 3
  assert config.gemv_launch_for("in_proj")["block_k"] == 64
  assert config.gemv_launch_for("mlp_in")["min_programs"] == 256
  assert bench_decode.parse_variant("pallas_fused+out_proj.bn32+mlp_out.st3@8:bfloat16") == (
      "pallas_fused+out_proj.bn32+mlp_out.st3@8", "bfloat16")
  for bad, match in (
      ("xla+out_proj:float32", "out_proj"),                       # no settings
      ("xla+out_proj.:float32", r"\+PRODUCT\.KEYN"),             # an empty setting
      ("xla+out_proj.bn:float32", r"\+PRODUCT\.KEYN"),           # no value
      ("xla+out_proj.bn32..st3:float32", r"\+PRODUCT\.KEYN"),
      ("xla+out_proj=bn32:float32", "out_proj=bn32"),             # the config's own form
      ("xla+attn.bn32:float32", "'attn' is not a GEMV product"),
      ("xla+out_proj.xx32:float32", "unknown key 'xx'"),
      ("xla+out_proj.bn48:float32", "power of two"),
      ("xla+out_proj.w3:float32", "num_warps=3"),
      ("xla+out_proj.st0:float32", "num_stages=0"),
      ("xla+out_proj.bn32.bn64:float32", "repeats the key 'bn'"),
      ("xla+out_proj.bn32+out_proj.st3:float32", "'out_proj' is repeated")):
    with pytest.raises(ValueError, match="bench_decode") as e:
      bench_decode.parse_variant(bad)
    assert re.search(match, str(e.value)), (bad, str(e.value))


def test_the_host_init_draws_the_jitted_inits_parameters():
  """`init_on_host` (eager on the CPU, then moved) gives the parameters of one jitted init."""
  import jax
  from flax import nnx
  from gdn_jax.model import GatedDeltaNetLM
  config = bench_decode.model_config("tiny")
  host = nnx.state(bench_decode.init_on_host(config), nnx.Param)
  jitted = nnx.state(nnx.jit(lambda: GatedDeltaNetLM(config, rngs=nnx.Rngs(0)))(), nnx.Param)
  leaves = jax.tree.leaves(host)
  assert len(leaves) == len(jax.tree.leaves(jitted)) > 10
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(b, np.float32), rtol=0, atol=0),
               host, jitted)
