"""experiments/bench_train.py on CPU: the step it times is the trainer's (one step from the same
state gives the loss and update of gdn_jax.train's step called directly, and further steps lower
the loss alike); the JSON and Markdown carry the expected rows with consistent step time,
tokens/s and MFU; the fla rows run through a stand-in for torch; the profile's parts come from
the call stacks in the step's HLO."""
import contextlib
import functools
import json
import math
import time
import types

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import bench_train
from gdn_jax.model import flops_per_token
from gdn_jax.train import config as config_lib
from gdn_jax.train.step import make_train_step

B, T = 2, 32


class _Arr(np.ndarray):
  """A NumPy array with torch's `.cuda()`."""

  def cuda(self):
    return self


def _fake_torch(calls):
  """The parts of torch that FlaTrain.run touches, recording what it does."""
  rec = lambda name: (lambda *a, **k: calls.append((name, a, k)))

  class AdamW:
    def __init__(self, params, **kw):
      calls.append(("AdamW", len(params), kw))

    def step(self):
      calls.append(("step",))

    def zero_grad(self, set_to_none):
      calls.append(("zero_grad", set_to_none))

  def autocast(device, dtype):
    calls.append(("autocast", device, dtype))
    return contextlib.nullcontext()

  def compile_(model):
    calls.append(("compile",))
    return model

  gen = types.SimpleNamespace(manual_seed=lambda seed: gen)
  return types.SimpleNamespace(
      bfloat16="bf16", autocast=autocast, compile=compile_,
      optim=types.SimpleNamespace(AdamW=AdamW),
      nn=types.SimpleNamespace(utils=types.SimpleNamespace(
          clip_grad_norm_=lambda params, max_norm: calls.append(("clip", max_norm)))),
      Generator=lambda: gen,
      randint=lambda lo, hi, shape, generator: np.random.randint(lo, hi, shape).view(_Arr),
      cuda=types.SimpleNamespace(synchronize=rec("sync"), reset_peak_memory_stats=rec("reset"),
                                 max_memory_allocated=lambda: 3e9, empty_cache=rec("empty")))


class _FakeModel:
  """fla's model stand-in: a forward that takes ~2 ms and a loss with backward()."""

  def __init__(self, calls):
    self.calls = calls

  def parameters(self):
    return [types.SimpleNamespace(numel=lambda: 10), types.SimpleNamespace(numel=lambda: 5)]

  def __call__(self, input_ids, labels, use_cache):
    self.calls.append(("forward", input_ids.shape, labels is input_ids, use_cache))
    time.sleep(0.002)
    return types.SimpleNamespace(loss=_Loss(self.calls))


class _Loss:
  def __init__(self, calls):
    self.calls = calls

  def backward(self):
    self.calls.append(("backward",))

  def __float__(self):
    return 5.5


def test_tiny_run_times_the_trainers_step(tmp_path):
  made, calls = [], []

  def gdn_factory(config, device):   # the benchmark's own GdnTrain, kept with its initial state
    g = bench_train.GdnTrain(config, device)
    made.append((g, g.params, g.opt_state))
    return g

  fla_factory = functools.partial(bench_train.FlaTrain.build, torch=_fake_torch(calls),
                                  model=_FakeModel(calls))
  opts = bench_train.Options(configs=("tiny",), batch=B, seq_len=T, steps=2, warmup=1,
                             profile_steps=1, peak_tflops=1.0, out_dir=str(tmp_path))
  res = bench_train.run(opts, log=lambda *a: None, fla_factory=fla_factory,
                        gdn_factory=gdn_factory)

  # Rows: fla first (--fla_first), then gdn-jax; every number consistent with the step time.
  assert [r["impl"] for r in res["rows"]] == ["fla eager", "fla torch.compile", "gdn-jax"]
  config = bench_train.train_config("tiny", B, T)
  flops = flops_per_token(config_lib.model_config(config), T) * B * T
  assert res["configs"]["tiny"]["model_flops_per_step"] == flops
  for r in res["rows"]:
    assert "error" not in r, r
    step_s = r["step_ms"] / 1e3
    assert step_s > 0 and len(r["step_ms_all"]) == 2 and r["compile_s"] > 0
    assert r["step_ms"] == pytest.approx(float(np.median(r["step_ms_all"])), abs=1e-3)
    assert r["tokens_per_s"] == pytest.approx(B * T / step_s)
    assert r["mfu"] == pytest.approx(flops / step_s / 1e12)
  gdn_row = res["rows"][2]
  for r in res["rows"]:
    assert r["gdn_jax_over_this"] == pytest.approx(gdn_row["step_ms"] / r["step_ms"])
  assert gdn_row["rule_impl_resolved"] == "chunked"           # "auto" on CPU
  assert gdn_row["pipelined_ms"] > 0 and math.isfinite(gdn_row["loss_step1"])
  assert "no device events" in res["profiles"]["tiny gdn-jax"]["error"]     # CPU: no kernels

  # fla: 1 + warmup + steps steps per mode, each forward (labels = inputs, no cache) → backward
  # → clip to the trainer's grad_clip → AdamW(fused) step → zero_grad; one torch.compile.
  forwards = [c for c in calls if c[0] == "forward"]
  assert len(forwards) == 2 * (1 + 1 + 2) and all(c[1:] == ((B, T), True, False)
                                                  for c in forwards)
  seq = [c[0] for c in calls if c[0] in ("forward", "backward", "clip", "step", "zero_grad")]
  assert seq == ["forward", "backward", "clip", "step", "zero_grad"] * 8
  o = config.optimizer
  assert [c[2] for c in calls if c[0] == "AdamW"] == [dict(
      lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay, fused=True)] * 2
  assert ("clip", o.grad_clip) in calls and ("autocast", "cuda", "bf16") in calls
  assert sum(c[0] == "compile" for c in calls) == 1
  assert res["rows"][0]["peak_memory_GB"] == 3.0 and res["rows"][0]["num_params"] == 15

  # Files: rewritten with every row.
  stem = f"bench_train_{bench_train.device_slug(jax.devices()[0])}_tiny"
  saved = json.loads((tmp_path / f"{stem}.json").read_text())
  assert [r["impl"] for r in saved["rows"]] == [r["impl"] for r in res["rows"]]
  assert saved["versions"]["jax"] == jax.__version__ and saved["device"] and saved["date"]
  md = (tmp_path / f"{stem}.md").read_text()
  assert f"| tiny | 0.2M | gdn-jax | {gdn_row['step_ms']:.2f} |" in md
  assert "| tiny | 0.2M | fla torch.compile |" in md

  # The timed step is the trainer's: same initial model as gdn_jax.train builds (eager), and one
  # step from that state gives the loss and update of make_train_step called directly.
  (g, params0, opt0), = made
  ref_model = config_lib.build_model(config)
  graphdef, ref_params = nnx.split(ref_model)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ref_params,
                                          params0)))
  tx = config_lib.make_tx(ref_model, config)
  ref_step = jax.jit(make_train_step(graphdef, tx))
  tokens, peak_lr = np.asarray(g.tokens), float(config.optimizer.lr)    # as train() passes it
  p_b, o_b, m_b = g.compiled(params0, opt0, g.tokens, g.peak_lr)
  p_r, o_r, m_r = ref_step(ref_params, jax.jit(tx.init)(ref_params), tokens, peak_lr)
  assert float(m_b["loss"]) == gdn_row["loss_step1"]
  assert float(m_b["loss"]) == pytest.approx(float(m_r["loss"]), rel=1e-6)
  delta = lambda p: jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                                                 p, params0))
  lr0 = float(config_lib.lr_schedule(config)(0))                    # the first step's LR
  moved = max(float(np.abs(d).max()) for d in delta(p_b))
  assert moved > 0.5 * lr0                                            # the step updated θ
  for d_b, d_r in zip(delta(p_b), delta(p_r)):
    np.testing.assert_allclose(d_b, d_r, atol=0.05 * lr0)
  # Further steps (a larger peak LR, an argument of the step) lower the loss as the trainer's do.
  losses_b, losses_r = [], []
  for _ in range(3):
    p_b, o_b, m_b = g.compiled(p_b, o_b, g.tokens, 1.0)
    p_r, o_r, m_r = ref_step(p_r, o_r, tokens, 1.0)
    losses_b.append(float(m_b["loss"]))
    losses_r.append(float(m_r["loss"]))
  np.testing.assert_allclose(losses_b, losses_r, rtol=2e-3)
  assert losses_b[-1] < losses_b[0] - 0.01

  # The profile's parts: every part of the model, fwd and bwd, and the optimizer, from the call
  # stacks of the compiled step's instructions.
  part_of, kind_of = bench_train.train_scopes(g.compiled.as_text())
  parts = set(part_of.values())
  for part in ("rule", "in_proj", "conv_gates", "out_proj", "mlp", "head", "loss"):
    assert {f"{part} fwd", f"{part} bwd"} <= parts, (part, parts)
  assert "embed fwd" in parts and "optimizer" in parts
  assert "matmul (gemm/cuBLAS)" in kind_of.values()


def recording_factory():
  """(made, factory): a `gdn_factory` for `bench_train.run` that keeps every GdnTrain it makes."""
  made = []

  def gdn_factory(config, device):
    made.append(bench_train.GdnTrain(config, device))
    return made[-1]

  return made, gdn_factory


def test_fused_loss_rows_time_the_same_training_and_profile_it_as_the_loss(tmp_path):
  """--loss_chunk_sizes=0,8 --fuse_projections=1: rows whose models fuse the projections, the
  second also the LM head with the loss; same first loss (bf16 compute: within bf16 error), and
  the fused loss's products count as the loss part."""
  made, gdn_factory = recording_factory()
  opts = bench_train.Options(configs=("tiny",), batch=B, seq_len=T, steps=1, warmup=0,
                             loss_chunk_sizes=(0, 8), fuse_projections=(True,), fla=False,
                             profile=False, out_dir=str(tmp_path))
  res = bench_train.run(opts, log=lambda *a: None, gdn_factory=gdn_factory)
  assert [r["impl"] for r in res["rows"]] == ["gdn-jax fused proj",
                                              "gdn-jax fused loss/8 fused proj"]
  assert [(g.model_config.loss_chunk_size, g.model_config.fuse_projections) for g in made] == [
      (0, True), (8, True)]
  plain, fused = res["rows"]
  assert "error" not in fused and fused["step_ms"] > 0
  assert fused["loss_chunk_size"] == 8 and fused["fuse_projections"]
  assert abs(fused["loss_step1"] - plain["loss_step1"]) < 2e-2
  parts = set(bench_train.train_scopes(made[1].compiled.as_text())[0].values())
  assert {"loss fwd", "loss bwd", "rule fwd", "rule bwd", "head fwd"} <= parts, parts


def test_conv_impl_rows_train_alike_and_profile_the_pallas_conv_as_the_conv(tmp_path):
  """--conv_impls=xla,pallas: a row per conv impl (the Pallas kernels interpreted on CPU), the
  same first loss (bf16 compute: within bf16 error), both profiled, and the Pallas conv's
  kernels (forward and its custom VJP's backward) counted as conv_gates, not as the rule."""
  made, gdn_factory = recording_factory()
  opts = bench_train.Options(configs=("tiny",), batch=B, seq_len=T, steps=1, warmup=0,
                             conv_impls=("xla", "pallas"), fla=False, profile_steps=1,
                             out_dir=str(tmp_path))
  res = bench_train.run(opts, log=lambda *a: None, gdn_factory=gdn_factory)
  assert [r["impl"] for r in res["rows"]] == ["gdn-jax", "gdn-jax pallas conv"]
  assert [g.model_config.conv_impl for g in made] == ["xla", "pallas"]
  xla, pallas = res["rows"]
  assert "error" not in pallas and pallas["step_ms"] > 0 and pallas["conv_impl"] == "pallas"
  assert xla["conv_impl"] == "xla"
  assert abs(pallas["loss_step1"] - xla["loss_step1"]) < 2e-2
  assert set(res["profiles"]) == {"tiny gdn-jax", "tiny gdn-jax pallas conv"}   # one per conv
  stacks = bench_train.stack_functions(made[1].compiled.as_text())
  part_of, _ = bench_train.train_scopes(made[1].compiled.as_text())
  parts = set(part_of.values())
  assert {"conv_gates fwd", "conv_gates bwd", "rule fwd", "rule bwd"} <= parts, parts
  conv_frames = [s for s in stacks.values()
                 if any(f.endswith(bench_train.CONV_FILE) for f, _ in s)]
  assert conv_frames                                      # the kernels' ops are in the step
  assert all(bench_train.part_of_op(s, "transpose(jvp())") == "conv_gates bwd"
             for s in conv_frames)


def test_rule_kernel_config_rows_train_alike(tmp_path):
  """--rule_kernel_configs=';walk_fwd_output=True,...': a row per GpuConfig spec of the rule's
  Pallas kernels (interpreted on CPU), labelled with it, the same first loss."""
  made, gdn_factory = recording_factory()
  spec = "walk_fwd_output=True,walk_bwd_dv_local=True"
  opts = bench_train.Options(configs=("tiny",), batch=B, seq_len=T, steps=1, warmup=0,
                             rule_impls=("pallas",), rule_kernel_configs=("", spec), fla=False,
                             profile=False, out_dir=str(tmp_path))
  res = bench_train.run(opts, log=lambda *a: None, gdn_factory=gdn_factory)
  assert [r["impl"] for r in res["rows"]] == ["gdn-jax pallas", f"gdn-jax pallas [{spec}]"]
  assert [g.model_config.rule_kernel_config for g in made] == ["", spec]
  plain, fused = res["rows"]
  assert "error" not in fused and fused["rule_kernel_config"] == spec
  assert abs(fused["loss_step1"] - plain["loss_step1"]) < 2e-2


def test_flags_parse_into_options():
  """The GPU A/B's command line: --conv_impls=pallas,xla gives both rows' conv impls, in order."""
  from absl import flags
  fv = flags.FlagValues()
  bench_train.define_flags(fv)
  fv(["bench_train", "--configs=512m", "--conv_impls=pallas,xla", "--nofla"])
  opts = bench_train.options_from_flags(fv)
  assert opts.configs == ("512m",) and opts.conv_impls == ("pallas", "xla") and not opts.fla
  assert opts.profile and opts.fuse_projections == (False,) and opts.rule_kernel_configs == ("",)
  bench_train.check_options(opts)
  fv.unparse_flags()
  fv(["bench_train", "--rule_kernel_configs=;walk_fwd_output=True,walk_block_v=64"])
  assert bench_train.options_from_flags(fv).rule_kernel_configs == (
      "", "walk_fwd_output=True,walk_block_v=64")
  fv.unparse_flags()
  fv(["bench_train"])
  assert bench_train.options_from_flags(fv) == bench_train.Options()   # the defaults agree


def test_gdn_label_names_what_differs_from_the_defaults():
  assert bench_train.gdn_label("auto", 0) == "gdn-jax"
  assert bench_train.gdn_label("auto", 0, False, "xla") == "gdn-jax"
  assert bench_train.gdn_label("chunked", 8, True, "pallas") == (
      "gdn-jax chunked fused loss/8 fused proj pallas conv")
  assert bench_train.gdn_label("auto", 0, False, "xla", "walk_fwd_output=True") == (
      "gdn-jax [walk_fwd_output=True]")


_HLO = '''FileNames
1 "/w/gdn_jax/train/step.py"
2 "/w/gdn_jax/model.py"
3 "/w/gdn_jax/ops/chunked.py"

FunctionNames
1 "make_train_step.<locals>.step"
2 "make_loss_fn.<locals>.loss_fn"
3 "Block._mlp"
4 "_chunked_tiles_bwd"

FileLocations
1 {file_name_id=1 function_name_id=1 line=39 end_line=39 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=27 end_line=27 column=1 end_column=2}
3 {file_name_id=2 function_name_id=3 line=50 end_line=50 column=1 end_column=2}
4 {file_name_id=3 function_name_id=4 line=90 end_line=90 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=2}

HloModule jit_step

%fused_computation.1 (param_0: bf16[8,8]) -> bf16[8,8] {
  %param_0 = bf16[8,8]{1,0} parameter(0)
  ROOT %dot.9 = bf16[8,8]{1,0} dot(%param_0, %param_0), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=3}
}

%wrapped_computation (param_0.1: bf16[8,8]) -> bf16[8,8] {
  %param_0.1 = bf16[8,8]{1,0} parameter(0)
  ROOT %negate.2 = bf16[8,8]{1,0} negate(%param_0.1), metadata={op_name="jit(step)/jvp()/neg" stack_frame_id=3}
}

ENTRY %main (p: bf16[8,8]) -> bf16[8,8] {
  %p = bf16[8,8]{1,0} parameter(0)
  %gemm_fusion.1 = bf16[8,8]{1,0} fusion(%p), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=3}
  %wrapped_negate = bf16[8,8]{1,0} fusion(%gemm_fusion.1), kind=kLoop, calls=%wrapped_computation
  %custom-call.3 = bf16[8,8]{1,0} custom-call(%wrapped_negate), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(jvp())/pallas_call" stack_frame_id=4}
  ROOT %input_reduce_fusion.4 = bf16[8,8]{1,0} fusion(%custom-call.3), kind=kInput, metadata={op_name="jit(step)/sqrt" stack_frame_id=1}
}
'''


def test_profile_parts_kinds_and_phases_from_a_trace():
  """Stack frames (the printer's parent id + 1) → parts; a kernel trace → ms per step."""
  stacks = bench_train.stack_functions(_HLO)
  assert [f for _, f in stacks[3]] == ["Block._mlp", "make_loss_fn.<locals>.loss_fn",
                                       "make_train_step.<locals>.step"]
  assert [f for _, f in stacks[4]] == ["_chunked_tiles_bwd", "make_train_step.<locals>.step"]
  part_of, kind_of = bench_train.train_scopes(_HLO)
  assert part_of["gemm_fusion.1"] == "mlp fwd" and kind_of["gemm_fusion.1"].startswith("matmul")
  assert part_of["wrapped_negate"] == "mlp fwd"          # no stack: its computation's root's
  assert kind_of["wrapped_negate"] == "elementwise fusion"
  assert part_of["custom-call.3"] == "rule bwd"           # a custom_vjp backward in gdn_jax/ops
  assert kind_of["custom-call.3"] == "Pallas/Triton kernels"
  assert part_of["input_reduce_fusion.4"] == "optimizer"
  ev = lambda start, dur, op: types.SimpleNamespace(start_ns=start, duration_ns=dur,
                                                    name=f"k_{op}", stats=[("hlo_op", op)])
  line = types.SimpleNamespace(name="Stream #7", events=[
      ev(0, 4e6, "gemm_fusion.1"), ev(4e6, 1e6, "wrapped_negate"), ev(5e6, 8e6, "custom-call.3"),
      ev(14e6, 2e6, "input_reduce_fusion.4"), ev(16e6, 4e6, "gemm_fusion.1")])
  data = types.SimpleNamespace(planes=[types.SimpleNamespace(name="/device:GPU:0", lines=[line])])
  p = bench_train.profile_summary(data, part_of, kind_of, steps=2, wall_s=0.02)
  assert p["ms_per_step_by_part"] == {"mlp fwd": 4.5, "rule bwd": 4.0, "optimizer": 1.0}
  assert p["ms_per_step_by_phase"] == {"fwd": 4.5, "bwd": 4.0, "optimizer": 1.0}
  assert p["ms_per_step_by_kind"] == {"matmul (gemm/cuBLAS)": 4.0,
                                      "Pallas/Triton kernels": 4.0,
                                      "reduction / norm": 1.0, "elementwise fusion": 0.5}
  assert p["device_busy_ms_per_step"] == 9.5 and p["idle_gap_ms_per_step"] == 0.5
  res = {"date": "d", "device": "H100", "versions": {"jax": "x"}, "xla_flags": "",
         "jax_compilation_cache_dir": "", "peak_flops": 1e15, "options":
         bench_train.dataclasses.asdict(bench_train.Options()), "configs": {}, "rows": [],
         "fla": {}, "skipped": [], "profiles": {"93m gdn-jax": p}}
  md = bench_train.markdown(res)
  assert "| rule bwd | 4.000 | 42.1% |" in md
  assert "| `k_custom-call.3` | 0.5 | 4.000 | rule bwd | Pallas/Triton kernels |" in md




def test_compile_settings_apply_where_torch_has_them():
  dynamo = types.SimpleNamespace(config=types.SimpleNamespace(recompile_limit=8,
                                                              allow_unspec_int_on_nn_module=False))
  torch = types.SimpleNamespace(_dynamo=dynamo)          # no _functorch: that one is skipped
  done = bench_train.compile_settings(torch)
  assert done == {"_dynamo.allow_unspec_int_on_nn_module": True, "_dynamo.recompile_limit": 64}
  assert dynamo.config.recompile_limit == 64 and dynamo.config.allow_unspec_int_on_nn_module

@pytest.mark.parametrize("name, part, kind", [
    ("gdn_walk_bwd", "rule (kernel name)", "Pallas/Triton kernels"),
    ("short_conv_bwd", "conv_gates bwd", "Pallas/Triton kernels"),
    ("short_conv_bwd_dz", "conv_gates bwd", "Pallas/Triton kernels"),
    ("short_conv_bwd_dxdw__1", "conv_gates bwd", "Pallas/Triton kernels"),
    ("short_conv_fwd", "conv_gates fwd", "Pallas/Triton kernels"),
    ("nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NNT", "matmul (unmatched)", "matmul (gemm/cuBLAS)"),
    ("input_add_reduce_fusion_1", "other", "reduction / norm"),
    ("loop_multiply_fusion_23", "other", "elementwise fusion"),
    ("copy_transpose_fusion_2", "other", "copy / layout")])
def test_unmatched_kernels_are_named_from_their_kernel_names(name, part, kind):
  """The H100 trace of 2026-12-06 matched no kernel to its instruction (no hlo_op stat):
  every kernel then still gets a part and a kind from its own name."""
  assert bench_train.part_of_kernel(name) == part
  assert bench_train.kind_of_kernel(name) == kind

@pytest.mark.parametrize("field, value, flag", [
    ("configs", ("93m", "1b"), "--configs"), ("batch", 0, "--batch"), ("seq_len", -1, "--seq_len"),
    ("steps", 0, "--steps"), ("warmup", -1, "--warmup"), ("rule_impls", ("fast",), "--rule_impls"),
    ("fla_modes", ("jit",), "--fla_modes"), ("loss_chunk_sizes", (0, -8), "--loss_chunk_sizes"),
    ("fuse_projections", (1,), "--fuse_projections"), ("conv_impls", ("triton",), "--conv_impls"),
    ("conv_impls", (), "--conv_impls"), ("peak_tflops", -1.0, "--peak_tflops"),
    ("time_budget_s", 0.0, "--time_budget_s"),
    ("rule_kernel_configs", ("", "walk_fwd_ouput=True"), "--rule_kernel_configs"),
    ("rule_kernel_configs", (), "--rule_kernel_configs")])
def test_bad_options_name_the_flag(field, value, flag):
  opts = bench_train.dataclasses.replace(bench_train.Options(), **{field: value})
  with pytest.raises(ValueError, match=flag):
    bench_train.check_options(opts)
