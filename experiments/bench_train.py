"""One training step on one GPU: gdn-jax (the trainer's own jitted step) against fla's
GatedDeltaNetForCausalLM (PyTorch/Triton), same device, one process (issue 23).

(One script on purpose, as bench_decode.py: a GPU call runs one command, and both sides and the
profile must run in that one call within its time budget.)

    source experiments/device/setup.sh     # installs the carried wheels (.whl: fla-core and
                                           # flash-linear-attention 0.6.0, ml_collections, ...)
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 experiments/bench_train.py --configs=93m
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 experiments/bench_train.py --configs=512m
    python experiments/bench_train.py --configs=tiny --batch=2 --seq_len=32 --steps=2 --nofla  # CPU

Carry `.whl` (git-ignored) to the GPU machine: without fla-core, flash-linear-attention and torch
the fla rows carry the import error and the gdn-jax rows are still written. One config per call
keeps each call well inside 10 minutes (XLA compile, fla's Triton autotuning and torch.compile
are each tens of seconds to minutes). Both sides of 512m fit one 80 GB GPU; the rows record the
peaks (XLA's compiled sizes, torch's max_memory_allocated; measured ones in
experiments/NOTES_train.md). fla runs before gdn-jax in each config (`--fla_first`) because torch
gives its memory back (`empty_cache`) while XLA's allocator keeps what it took.

Per config (batch × seq_len tokens a step, bf16 compute, float32 parameters and AdamW state):

- gdn-jax: the step of `gdn_jax.train` built as `train()` builds it (`build_model`, `make_tx`,
  the (data, model) mesh on one device, `jit_steps`: `make_train_step` under the mesh, with the
  trainer's donation), compiled ahead of time (compile s), then `--warmup` steps and `--steps`
  timed steps, each waited for (block_until_ready); median step time. rule_impl "auto" = the
  Pallas kernels on GPU (`--rule_impls=auto,chunked` adds the XLA rule as a row;
  `--loss_chunk_sizes=0,4096` adds rows with the LM head and the loss fused over chunks of 4096
  tokens, ModelConfig.loss_chunk_size; `--fuse_projections=0,1` rows with the GDN input projections
  and the MLP's gate/up as one product each, ModelConfig.fuse_projections; `--conv_impls=xla,pallas`
  rows with the short conv of q, k, v in the Pallas kernels, ModelConfig.conv_impl;
  `--rule_kernel_configs=";walk_fwd_output=True"` rows with the rule's kernels set apart,
  ModelConfig.rule_kernel_config: the rows are the product of the five lists). "pipelined ms" is the mean of `--steps` more steps without waiting
  between them, as the trainer runs them.
- fla: `GatedDeltaNetForCausalLM` with the config bench_decode.FlaBench builds (same sizes),
  float32 parameters, `torch.autocast(bfloat16)`, `torch.optim.AdamW(fused=True)` with the
  trainer config's lr, betas, eps and weight decay; a step is loss = model(input_ids,
  labels=input_ids).loss (fla shifts the labels), backward, clip_grad_norm_ (`--fla_clip`, as the
  trainer clips), step, zero_grad; median of torch.cuda.synchronize'd steps; eager and
  `torch.compile(model)` (`--fla_modes`). compile s = the first step (Triton JIT and autotuning;
  with torch.compile also dynamo and inductor). fla 0.6.0 refuses its gated backward on Hopper with
  Triton < 3.7.1 (its issue 640: wrong gradients); by default the guard stays and the rows then
  carry fla's error, so a comparison needs Triton ≥ 3.7.1 carried beside fla (or FlashQLA), and
  the rows name the Triton version. `--fla_lift_guard` lifts it to time the (wrong) backward
  anyway; such rows are marked `guard_lifted` and are not a valid speed comparison.
- tokens/s = batch · seq_len / step s; MFU = gdn_jax.model.flops_per_token (forward + backward,
  the chunked rule included) × tokens / step s / the device's dense bf16 peak
  (`gdn_jax.train.peak_flops`; `--peak_tflops` overrides it), the same model FLOPs for both sides.
- A jax.profiler trace of `--profile_steps` gdn-jax steps (the first row of each conv impl, so
  `--conv_impls=pallas,xla` profiles both convs in one run), summarised as device ms per step by
  part of the model and by kernel kind. The training forward has no named scopes, so each
  kernel's part is read from the call stack XLA keeps for every HLO instruction (its stack frame
  tables): rule, in_proj (with the mixer's norm), conv_gates (the Pallas conv's kernels too),
  out_proj, mlp, head, loss, embed, each fwd / bwd (jvp / transpose in its op name), and the
  optimizer (clipping, the gradient norm, AdamW, the update); kinds are kernel-name patterns
  (Pallas/Triton kernels: the rule's and the conv's, gemm/cuBLAS matmuls, reductions/norms,
  elementwise fusions, copies). Summed by bench_decode.summarize_trace.

Writes bench_train_<device>[_<configs>].json and .md into --out_dir ($OUT if set, else
experiments/results/), rewritten after every row; a row that fails carries its error and the run
goes on; rows are skipped once --time_budget_s is spent.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import glob
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:         # run as a script: `experiments` and `configs` importable
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import bench_decode  # noqa: E402
from gdn_jax import sharding  # noqa: E402
from gdn_jax.model import flops_per_token, num_params  # noqa: E402
from gdn_jax.model_config import CONV_IMPLS  # noqa: E402
from gdn_jax.ops import IMPLS, default_impl  # noqa: E402
from gdn_jax.train import config as config_lib  # noqa: E402
from gdn_jax.train.loop import jit_steps  # noqa: E402
from gdn_jax.train.progress import peak_flops  # noqa: E402
from kernels_pallas import GpuConfig  # noqa: E402

# Model fields over configs/gpu.py's (the trainer's GPU config: μP, AdamW, clipping, bf16
# compute, float32 parameters, rule_impl "auto").
CONFIGS = {
    "93m": {},                                            # configs/gpu.py's model as it is
    "512m": bench_decode.CONFIGS["512m"],                 # fla flame's "340M" (issue 22)
    "tiny": dict(vocab_size=256, d_model=128, num_layers=1, num_heads=2, head_k_dim=64,
                 head_v_dim=64, mlp_hidden=256, chunk_size=16),       # CPU test: 0.25M
}
FLA_MODES = {"eager": "fla eager", "compile": "fla torch.compile"}


@dataclasses.dataclass
class Options:
  configs: tuple = ("93m", "512m")
  batch: int = 8
  seq_len: int = 2048
  steps: int = 10                      # timed steps (median reported)
  warmup: int = 3                      # steps after compile / the first step, not timed
  rule_impls: tuple = ("auto",)        # gdn-jax rows: the model's rule_impl
  loss_chunk_sizes: tuple = (0,)       # × the model's loss_chunk_size (0: logits, then the loss)
  fuse_projections: tuple = (False,)   # × the model's fuse_projections
  conv_impls: tuple = ("xla",)         # × the model's conv_impl
  rule_kernel_configs: tuple = ("",)   # × the model's rule_kernel_config ("": the defaults)
  fla: bool = True
  fla_modes: tuple = ("eager", "compile")
  fla_first: bool = True
  fla_clip: bool = True
  fla_fuse_cross_entropy: bool = True
  fla_lift_guard: bool = False
  profile: bool = True
  profile_steps: int = 2
  peak_tflops: float = 0.0             # 0: the trainer's table (gdn_jax.train.peak_flops)
  time_budget_s: float = 480.0
  out_dir: str = ""


def check_options(opts: Options):
  """ValueError naming the flag of the first bad value."""
  def require(cond, flag, value, expected):
    if not cond:
      raise ValueError(f"bench_train: --{flag}={value!r}; expected {expected}.")
  require(opts.configs and all(c in CONFIGS for c in opts.configs), "configs",
          ",".join(opts.configs), f"a comma-separated list of {sorted(CONFIGS)}")
  for flag in ("batch", "seq_len", "steps", "profile_steps"):
    v = getattr(opts, flag)
    require(isinstance(v, int) and v >= 1, flag, v, "an int ≥ 1")
  require(isinstance(opts.warmup, int) and opts.warmup >= 0, "warmup", opts.warmup, "an int ≥ 0")
  require(opts.rule_impls and all(i in IMPLS for i in opts.rule_impls), "rule_impls",
          ",".join(opts.rule_impls), f"a comma-separated list of {IMPLS}")
  require(opts.loss_chunk_sizes and all(isinstance(c, int) and c >= 0
                                        for c in opts.loss_chunk_sizes), "loss_chunk_sizes",
          ",".join(map(str, opts.loss_chunk_sizes)), "a comma-separated list of ints ≥ 0 (tokens "
          "per chunk of the fused head + loss; 0: off)")
  require(opts.fuse_projections and all(isinstance(b, bool) for b in opts.fuse_projections),
          "fuse_projections", ",".join(map(str, opts.fuse_projections)),
          "a comma-separated list of 0 / 1")
  require(opts.conv_impls and all(c in CONV_IMPLS for c in opts.conv_impls), "conv_impls",
          ",".join(map(str, opts.conv_impls)), f"a comma-separated list of {CONV_IMPLS}")
  for spec in opts.rule_kernel_configs:
    try:
      GpuConfig.parse(spec)
    except ValueError as e:
      require(False, "rule_kernel_configs", ";".join(opts.rule_kernel_configs),
              f"';'-separated GpuConfig specs ({e})")
  require(opts.rule_kernel_configs, "rule_kernel_configs", "",
          "at least one spec ('' = the defaults)")
  require(all(m in FLA_MODES for m in opts.fla_modes), "fla_modes", ",".join(opts.fla_modes),
          f"a comma-separated list of {tuple(FLA_MODES)} (empty: none)")
  require(opts.peak_tflops >= 0, "peak_tflops", opts.peak_tflops,
          "a float ≥ 0 (0: the trainer's table)")
  require(opts.time_budget_s > 0, "time_budget_s", opts.time_budget_s, "a float > 0")


def train_config(name: str, batch: int, seq_len: int, rule_impl: str = "auto"):
  """configs/gpu.py with the model fields of CONFIGS[name], the batch and the rule's impl."""
  from configs import gpu  # pylint: disable=import-outside-toplevel
  c = gpu.get_config()
  c.model.update(CONFIGS[name])
  c.model.rule_impl = rule_impl
  c.data.batch_size, c.data.seq_len = batch, seq_len
  config_lib.validate_config(c)
  return c


def gdn_label(rule_impl: str, loss_chunk_size: int, fuse_projections: bool = False,
              conv_impl: str = "xla", rule_kernel_config: str = "") -> str:
  """A gdn-jax row's name: "gdn-jax" for the trainer's defaults, else what differs."""
  return ("gdn-jax" + ("" if rule_impl == "auto" else f" {rule_impl}")
          + (f" fused loss/{loss_chunk_size}" if loss_chunk_size else "")
          + (" fused proj" if fuse_projections else "")
          + ("" if conv_impl == "xla" else f" {conv_impl} conv")
          + (f" [{rule_kernel_config}]" if rule_kernel_config else ""))


def step_stats(row: dict, seconds: list, tokens: int, flops: float, peak: float | None) -> dict:
  """Median step time → step ms, tokens/s and MFU (model FLOPs per step / step s / peak)."""
  step_s = statistics.median(seconds)
  row.update(step_ms=1e3 * step_s, step_ms_min=1e3 * min(seconds),
             step_ms_all=[round(1e3 * s, 3) for s in seconds], tokens_per_s=tokens / step_s,
             model_flops_per_step=flops, mfu=flops / step_s / peak if peak else None)
  return row


# ----------------------------------------------------------------------------------------- gdn-jax


class GdnTrain:
  """The trainer's train step for one training config, built as `gdn_jax.train.train` builds it
  (same model, optimizer, step function, mesh and shardings, on one device), compiled ahead of
  time; `run` threads the parameters and optimizer state through the steps as the trainer does."""

  def __init__(self, config, device=None):
    self.config = config
    self.model_config = config_lib.model_config(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                              [device or jax.devices()[0]])
    t0 = time.perf_counter()
    model = config_lib.build_model(config)     # eager, as train() (jit rounds the init apart)
    tx = config_lib.make_tx(model, config)
    graphdef, params = nnx.split(model)
    param_sh = sharding.tree_shardings(params, mesh)
    self.params = jax.device_put(params, param_sh)
    opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, self.params), mesh)
    self.opt_state = jax.jit(tx.init, out_shardings=opt_sh)(self.params)
    self.train_step, _ = jit_steps(graphdef, tx, mesh, param_sh, opt_sh)
    jax.block_until_ready((self.params, self.opt_state))
    self.init_s = time.perf_counter() - t0
    self.graphdef, self.tx, self.mesh = graphdef, tx, mesh
    self.peak_lr = float(config.optimizer.lr)
    d = config.data
    rng = np.random.default_rng(0)
    self.tokens = sharding.global_batch(
        rng.integers(0, self.model_config.vocab_size, (d.batch_size, d.seq_len + 1),
                     dtype=np.int32), mesh)
    self.compiled = None

  def compile(self) -> float:
    t0 = time.perf_counter()
    self.compiled = self.train_step.lower(self.params, self.opt_state, self.tokens,
                                          self.peak_lr).compile()
    return time.perf_counter() - t0

  def memory(self) -> dict:
    """XLA's compiled sizes of the step, GB (None where this backend does not say)."""
    m = self.compiled.memory_analysis()
    if m is None:
      return {}
    names = ("argument", "output", "alias", "temp")
    return {f"{n}_GB": round(getattr(m, f"{n}_size_in_bytes") / 1e9, 3) for n in names
            if hasattr(m, f"{n}_size_in_bytes")}

  def run(self, steps: int, wait_each: bool = True) -> tuple[list, list]:
    """`steps` steps: (seconds of each, waited for; or one total when not `wait_each`), losses."""
    times, metrics = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
      self.params, self.opt_state, m = self.compiled(self.params, self.opt_state, self.tokens,
                                                     self.peak_lr)
      if wait_each:   # all outputs of one executable are ready together: wait for the metrics
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
      metrics.append(m)
    if not wait_each:
      jax.block_until_ready((metrics, self.params, self.opt_state))
      times.append(time.perf_counter() - t0)
    return times, [float(m["loss"]) for m in metrics]

  def profile(self, steps: int) -> dict:
    """Device time per step by part and by kernel kind, from a jax.profiler trace of `steps`."""
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    part_of, kind_of = train_scopes(self.compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp):
        t0 = time.perf_counter()
        self.run(steps, wait_each=False)
        wall = time.perf_counter() - t0
      files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
      if not files:
        return {"error": "no trace file written"}
      data = ProfileData.from_file(files[0])
    return profile_summary(data, part_of, kind_of, steps, wall)


# ------------------------------------------------------------------- the profile's parts and kinds

KINDS = ("Pallas/Triton kernels", "matmul (gemm/cuBLAS)", "convolution",
         "reduction / norm", "gather / scatter", "copy / layout", "elementwise fusion", "other")
# Files whose code is the rule (a custom_vjp's backward is traced under the train step, not under
# gated_delta_rule: its frames are these files' functions).
RULE_FILES = ("/gdn_jax/ops/", "/kernels_pallas/")
CONV_FILE = "/kernels_pallas/short_conv.py"   # the Pallas conv (conv_impl "pallas"), not the rule


def _hlo_table(hlo_text: str, name: str) -> list[str]:
  m = re.search(rf"^{name}\n(.*?)(?:\n\s*\n|\Z)", hlo_text, re.M | re.S)
  return m.group(1).splitlines() if m else []


def stack_functions(hlo_text: str) -> dict[int, list[tuple[str, str]]]:
  """HLO stack frame id → its call stack as (file, function) pairs, innermost first, from the
  FileNames / FunctionNames / FileLocations / StackFrames tables XLA prints before the module.
  The printer writes parent_frame_id as the parent's id + 1 (a root has 1; 0 never appears); a
  table with a 0 is read in the plain convention (0 = no parent)."""
  names = {}
  for table in ("FileNames", "FunctionNames"):
    names[table] = {}
    for line in _hlo_table(hlo_text, table):
      n, _, s = line.strip().partition(" ")
      names[table][int(n)] = s.strip().strip('"')
  locs = {}
  for line in _hlo_table(hlo_text, "FileLocations"):
    fields = dict(re.findall(r"(\w+)=(\d+)", line))
    locs[int(line.split()[0])] = (names["FileNames"].get(int(fields.get("file_name_id", 0)), "?"),
                                  names["FunctionNames"].get(
                                      int(fields.get("function_name_id", 0)), "?"))
  frames = {}
  for line in _hlo_table(hlo_text, "StackFrames"):
    fields = dict(re.findall(r"(\w+)=(\d+)", line))
    frames[int(line.split()[0])] = (int(fields.get("file_location_id", 0)),
                                    int(fields.get("parent_frame_id", 0)))
  offset = 0 if any(p == 0 for _, p in frames.values()) else 1
  out = {}
  for fid in frames:
    stack, seen, f = [], set(), fid
    while f in frames and f not in seen:
      seen.add(f)
      loc, parent = frames[f]
      stack.append(locs.get(loc, ("?", "?")))
      f = parent - offset
    out[fid] = stack
  return out


def part_of_op(stack: list[tuple[str, str]], op_name: str) -> str:
  """The model part of an op from its call stack ((file, function) pairs), with fwd / bwd (jvp /
  transpose in its op name) for the model's parts. The function names are gdn_jax's (model.py,
  layers.py, loss.py, train/step.py); the parts are bench_decode's named scopes where they exist
  (the mixer's norm in in_proj, the residual add in mlp, the final norm in head)."""
  funcs = {fn for _, fn in stack}
  has = lambda *names: bool(funcs.intersection(names))
  if any(file.endswith(CONV_FILE) for file, _ in stack):
    part = "conv_gates"              # its custom_vjp backward's frames are short_conv.py's alone
  elif has("gated_delta_rule") or any(d in file for file, _ in stack for d in RULE_FILES):
    part = "rule"
  elif has("Attention.__call__"):
    part = "attention"
  elif has("cross_entropy") or any(file.endswith("loss.py") for file, _ in stack):
    part = "loss"                    # with loss_chunk_size > 0: the LM head's products too
  elif has("GatedDeltaNetLM._logits") or (has("GatedDeltaNetLM.loss")
                                          and not has("GatedDeltaNetLM._trunk")):
    part = "head"                    # the read-out, and the final norm of the fused loss path
  elif has("Embed.__call__"):
    part = "embed"
  elif has("Block._mlp"):
    part = "mlp"
  elif has("GatedDeltaNet._output"):
    part = "out_proj"
  elif has("Linear.__call__", "RMSNorm.__call__"):   # the Linears of _features / _gates, mixer_norm
    part = "in_proj"
  elif has("ShortConv.__call__", "GatedDeltaNet._gates", "GatedDeltaNet._features",
           "GatedDeltaNet.__call__"):
    part = "conv_gates"
  elif has("Block.__call__"):                        # the residual add x + mixer(x)
    part = "mlp"
  elif has("make_loss_fn.<locals>.loss_fn", "GatedDeltaNetLM.__call__", "GatedDeltaNetLM.loss"):
    part = "model other"
  elif has("make_train_step.<locals>.step"):
    return "optimizer"       # the gradient norm, clipping, AdamW, the update, the finite guard
  else:
    return "other"
  phase = "bwd" if "transpose(" in op_name else "fwd" if "jvp(" in op_name else ""
  return f"{part} {phase}".strip()


def kind_of_op(name: str, opcode: str, target: str, fusion_kind: str, op_name: str,
               called: str = "") -> str:
  """Kernel kind from the instruction's name, opcode, custom-call target, fusion kind and the
  computation it calls (not its operands' names: an elementwise fusion that reads a gemm's output
  is elementwise)."""
  if "pallas_call" in op_name or (opcode == "custom-call" and "triton" in target.lower()):
    return KINDS[0]
  if (opcode == "dot" or re.search(r" dot\(", called) or re.search(
      r"gemm|cublas|matmul|cudnn\$fusion", f"{name} {target} {fusion_kind}", re.I)):
    return KINDS[1]
  if opcode == "convolution" or "conv" in target.lower() or re.search(r" convolution\(", called):
    return KINDS[2]
  if "reduce" in name or opcode in ("reduce", "reduce-window", "all-reduce") or "softmax" in (
      fusion_kind + name):
    return KINDS[3]
  if re.search(r"scatter|gather", f"{name} {opcode}"):
    return KINDS[4]
  if re.search(r"copy|transpose|concatenate|slice|pad|bitcast|memcpy", f"{name} {opcode}", re.I):
    return KINDS[5]
  if opcode == "fusion":
    return KINDS[6]
  return KINDS[7]


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.M | re.S)


def train_scopes(hlo_text: str) -> tuple[dict, dict]:
  """HLO instruction name → (its model part, its kernel kind), for every instruction of the
  compiled step (bench_decode.summarize_trace maps each kernel event through its hlo_op). An
  instruction without a call stack (one XLA made, e.g. a wrapped broadcast) takes the part of the
  computation it calls: its root's, else its first instruction's that has one."""
  stacks = stack_functions(hlo_text)
  bodies = dict(_COMPUTATION.findall(hlo_text))
  part_of, kind_of, orphans = {}, {}, []
  search = lambda pattern, text: (re.search(pattern, text) or [None, ""])[1]
  for m in _INSTR.finditer(hlo_text):
    name, rest = m.groups()
    op_name = search(r'op_name="([^"]*)"', rest)
    frame = search(r"stack_frame_id=(\d+)", rest)
    called = bodies.get(search(r"calls=%?([\w.\-]+)", rest), "")
    kind_of[name] = kind_of_op(name, search(r" ([a-z][a-z0-9\-]*)\(", " " + rest),
                               search(r'custom_call_target="([^"]*)"', rest),
                               search(r'"kind":"([^"]*)"', rest), op_name, called)
    if frame:
      part_of[name] = part_of_op(stacks.get(int(frame), []), op_name)
    else:
      orphans.append((name, called))
  known = set(part_of)
  for name, called in orphans:
    inner = re.findall(r"^\s*(ROOT )?%?([\w.\-]+) = ", called, re.M)
    inner = [n for root, n in inner if root] + [n for root, n in inner if not root]
    part_of[name] = next((part_of[n] for n in inner if n in known), "other")
  return part_of, kind_of


def part_of_kernel(name: str) -> str:
  """A kernel's part when its HLO instruction was not found: the rule's Pallas kernels are
  named gdn_* (kernels_pallas/gpu), the conv's short_conv_* (kernels_pallas/short_conv.py),
  matmul libraries' by their own patterns."""
  if name.startswith("gdn_"):
    return "rule (kernel name)"
  if name.startswith("short_conv_"):  # its name says the phase: short_conv_fwd, short_conv_bwd*
    return "conv_gates " + name[len("short_conv_"):].split("_")[0]
  if re.search(r"nvjet|gemm|cublas|cutlass|xmma", name, re.I):
    return "matmul (unmatched)"
  return "other"


def kind_of_kernel(name: str) -> str:
  """A kernel's kind from its name alone (when its HLO instruction was not found)."""
  if name.startswith(("gdn_", "short_conv_")) or "triton" in name.lower():
    return KINDS[0]
  if re.search(r"nvjet|gemm|cublas|cutlass|xmma|dot", name, re.I):
    return KINDS[1]
  if "reduce" in name:
    return KINDS[3]
  if re.search(r"scatter|gather", name):
    return KINDS[4]
  if re.search(r"copy|transpose|concatenate|slice|pad|memcpy", name, re.I):
    return KINDS[5]
  if "fusion" in name:
    return KINDS[6]
  return KINDS[7]


def profile_summary(data, part_of: dict, kind_of: dict, steps: int, wall_s: float) -> dict:
  """bench_decode.summarize_trace by part and by kind → ms per step, shares, phases."""
  by_part = bench_decode.summarize_trace(data, part_of, steps=steps, wall_s=wall_s,
                                         fallback=part_of_kernel)
  if "error" in by_part:
    return by_part
  by_kind = bench_decode.summarize_trace(data, kind_of, steps=steps, wall_s=wall_s,
                                         fallback=kind_of_kernel)
  busy_us = by_part["device_busy_us_per_step"]
  ms = lambda d: {k: round(v / 1e3, 4) for k, v in d.items()}
  phases = {}
  for part, us in by_part["us_per_step_by_scope"].items():
    phase = part.rsplit(" ", 1)[-1] if part.endswith((" fwd", " bwd")) else (
        "optimizer" if part == "optimizer" else "other")
    phases[phase] = phases.get(phase, 0.0) + us
  kinds = {k[0]: k[3] for k in by_kind["kernels"]}
  return {
      "steps": steps, "wall_ms_per_step": by_part["wall_ms_per_step"],
      "device_busy_ms_per_step": busy_us / 1e3,
      "device_span_ms_per_step": by_part["device_span_us_per_step"] / 1e3,
      "idle_gap_ms_per_step": by_part["idle_gap_us_per_step"] / 1e3,
      "kernels_per_step": by_part["kernels_per_step"],
      "matched_fraction": by_part["matched_fraction"], "event_stats": by_part["event_stats"],
      "ms_per_step_by_part": ms(by_part["us_per_step_by_scope"]),
      "ms_per_step_by_phase": ms(dict(sorted(phases.items(), key=lambda kv: -kv[1]))),
      "ms_per_step_by_kind": ms(by_kind["us_per_step_by_scope"]),
      "top_kernels": [{"name": k["name"], "calls_per_step": k["calls_per_step"],
                       "ms_per_step": k["us_per_step"] / 1e3, "part": k["scope"],
                       "kind": kinds.get(k["name"], "")} for k in by_part["top_kernels"]],
      "kernels": [[n, calls, round(us / 1e3, 4), part, kinds.get(n, "")]
                  for n, calls, us, part in by_part["kernels"]]}


# --------------------------------------------------------------------------------------------- fla


# torch.compile settings for fla's model (2026-12-06, H100, torch 2.11 with Triton 3.7.1): fla's
# layers read their int `layer_idx`, which dynamo treats as static, so each layer recompiled until
# the recompile limit (8) and the rest ran eager; then saving the AOT-autograd cache entry of the
# backward crashed the process (segmentation fault in autograd_cache._pickle_entry).
COMPILE_SETTINGS = (("_dynamo", "allow_unspec_int_on_nn_module", True),
                    ("_dynamo", "recompile_limit", 64),
                    ("_functorch", "enable_autograd_cache", False))


def compile_settings(torch) -> dict:
  """Applies COMPILE_SETTINGS where this torch has them; returns what was set."""
  done = {}
  for module, name, value in COMPILE_SETTINGS:
    config = getattr(getattr(torch, module, None), "config", None)
    if config is not None and hasattr(config, name):
      setattr(config, name, value)
      done[f"{module}.{name}"] = value
  return done


class FlaTrain:
  """One training step of fla's model: bf16 autocast, fused AdamW, optional clipping. `torch` and
  `model` are passed in (`build` makes the real ones; the CPU test passes stand-ins)."""

  def __init__(self, torch, model, *, vocab_size: int, lr: float, betas: tuple, eps: float,
               weight_decay: float, grad_clip: float):
    self.torch, self.model, self.vocab_size = torch, model, vocab_size
    self.adamw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
    self.grad_clip = grad_clip
    self.num_params = sum(p.numel() for p in model.parameters())

  @classmethod
  def build(cls, model_config, config, opts: Options, *, torch=None, model=None) -> "FlaTrain":
    """fla's model as bench_decode.FlaBench builds it (same sizes), in float32 for training, and
    AdamW with the trainer config's settings. `torch`, `model`: stand-ins (the CPU test)."""
    if torch is None:
      import torch  # pylint: disable=import-outside-toplevel
    if model is None:
      if opts.fla_lift_guard:   # timing only, as bench_kernels.py (fla issue 640)
        import fla.ops.common.chunk_o as chunk_o  # pylint: disable=import-outside-toplevel
        chunk_o.TRITON_ABOVE_3_7_1 = True
      model = bench_decode.FlaBench(model_config).model    # bench_decode's config, bf16, eval
      model = model.float().train()                        # float32 parameters for training
      model.config.use_cache = False
      model.config.fuse_cross_entropy = opts.fla_fuse_cross_entropy
    o = config.optimizer
    return cls(torch, model, vocab_size=model_config.vocab_size, lr=o.lr, betas=(o.b1, o.b2),
               eps=o.eps, weight_decay=o.weight_decay,
               grad_clip=o.grad_clip if opts.fla_clip else 0.0)

  def run(self, mode: str, batch: int, seq_len: int, steps: int,
          warmup: int) -> tuple[dict, list]:
    """(row fields, seconds of each timed step) of `steps` steps after the first and `warmup`."""
    torch = self.torch
    settings = compile_settings(torch) if mode == "compile" else {}
    model = torch.compile(self.model) if mode == "compile" else self.model
    params = list(self.model.parameters())
    opt = torch.optim.AdamW(params, **self.adamw)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=g).cuda()

    def step():
      with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
      loss.backward()
      if self.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss

    def timed():
      t0 = time.perf_counter()
      loss = step()
      torch.cuda.synchronize()
      return time.perf_counter() - t0, float(loss)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    first_s, loss1 = timed()            # Triton JIT + autotuning (+ dynamo, inductor)
    for _ in range(warmup):
      timed()
    times, losses = zip(*[timed() for _ in range(steps)])
    row = {"compile_s": first_s, "loss_step1": loss1, "loss_first": losses[0],
           "loss_last": losses[-1], "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9,
           "num_params": self.num_params, "grad_clip": self.grad_clip}
    if settings:
      row["compile_settings"] = settings
    return row, list(times)

  def close(self):
    """Gives the model's memory back to the device (torch.compile's caches hold it too)."""
    del self.model
    dynamo = getattr(self.torch, "_dynamo", None)
    if dynamo is not None:
      dynamo.reset()
    gc.collect()
    self.torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ driver


def device_slug(device) -> str:
  return bench_decode.device_slug(device)


def versions() -> dict:
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  out = {"python": platform.python_version(), "jax": jax.__version__}
  for pkg in ("jaxlib", "flax", "optax", "torch", "triton", "fla-core", "flash-linear-attention"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def run(opts: Options, log=print, fla_factory=None, gdn_factory=None) -> dict:
  """Runs every row of `opts`; returns the results (also written as JSON and Markdown).
  `fla_factory(model_config, train_config, opts)` → FlaTrain (default FlaTrain.build) and
  `gdn_factory(train_config, device)` → GdnTrain (default GdnTrain): the CPU test's seams (a
  stand-in for torch; the step it timed)."""
  check_options(opts)
  start = time.perf_counter()
  device = jax.devices()[0]
  fla_factory = fla_factory or FlaTrain.build
  gdn_factory = gdn_factory or GdnTrain
  out_dir = pathlib.Path(opts.out_dir or os.environ.get("OUT") or
                         pathlib.Path(__file__).resolve().parent / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"bench_train_{device_slug(device)}" + (
      "" if tuple(opts.configs) == Options.configs else "_" + "_".join(opts.configs))
  peak = opts.peak_tflops * 1e12 or peak_flops(device, "bfloat16")
  res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "device": device.device_kind, "platform": device.platform, "versions": versions(),
         "peak_flops": peak, "options": dataclasses.asdict(opts), "configs": {}, "rows": [],
         "profiles": {}, "fla": {}, "skipped": [], "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR", "")}
  tokens = opts.batch * opts.seq_len

  def save():
    res["elapsed_s"] = time.perf_counter() - start
    add_ratios(res)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(res))

  def over_budget(what) -> bool:
    if time.perf_counter() - start > opts.time_budget_s:
      res["skipped"].append(f"{what}: time budget {opts.time_budget_s:.0f} s spent")
      log(f"skip {what} (time budget)")
      return True
    return False

  def base_row(name, impl):
    return {"config": name, "impl": impl, "batch": opts.batch, "seq_len": opts.seq_len,
            "steps": opts.steps, "warmup": opts.warmup}

  def finish(row, seconds, flops):
    step_stats(row, seconds, tokens, flops, peak)
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    log(f"{row['config']:5s} {row['impl']:18s} {row['step_ms']:9.2f} ms/step "
        f"{row['tokens_per_s']:10.0f} tok/s  MFU {mfu}  compile {row['compile_s']:.1f} s")

  def record(row, e):
    row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
    log(f"{row['config']} {row['impl']}: {row['error']}")

  def gdn_rows(name, config, flops):
    variants = [(impl, lc, fuse, conv, kc) for impl in opts.rule_impls
                for lc in opts.loss_chunk_sizes for fuse in opts.fuse_projections
                for conv in opts.conv_impls for kc in opts.rule_kernel_configs]
    profiled = set()                   # (conv impl, kernel config) whose first row was profiled
    for impl, lc, fuse, conv, kc in variants:
      label = gdn_label(impl, lc, fuse, conv, kc)
      if over_budget(f"{name} {label}"):
        continue
      row = base_row(name, label)
      gdn = None
      try:
        config.model.rule_impl = impl
        config.model.loss_chunk_size = lc
        config.model.fuse_projections = fuse
        config.model.conv_impl = conv
        config.model.rule_kernel_config = kc
        gdn = gdn_factory(config, device)
        mc = gdn.model_config
        row.update(rule_impl=impl, loss_chunk_size=lc, fuse_projections=fuse, conv_impl=conv,
                   rule_kernel_config=kc,
                   init_s=gdn.init_s, compile_s=gdn.compile(), memory=gdn.memory())
        if impl == "auto":
          row["rule_impl_resolved"] = default_impl(device.platform, mc.head_k_dim, mc.head_v_dim)
        _, (row["loss_step1"],) = gdn.run(1)
        gdn.run(opts.warmup)
        seconds, losses = gdn.run(opts.steps)
        row.update(loss_first=losses[0], loss_last=losses[-1])
        (total,), _ = gdn.run(opts.steps, wait_each=False)
        row["pipelined_ms"] = 1e3 * total / opts.steps
        finish(row, seconds, flops)
      except Exception as e:  # pylint: disable=broad-except
        record(row, e)
      res["rows"].append(row)
      save()
      if gdn is not None and gdn.compiled is not None and "error" not in row and opts.profile \
          and (conv, kc) not in profiled and not over_budget(f"{name} profile"):
        profiled.add((conv, kc))
        try:
          res["profiles"][f"{name} {label}"] = p = gdn.profile(opts.profile_steps)
          if "error" not in p:
            log(f"{name} profile: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                p["ms_per_step_by_part"].items()))
        except Exception as e:  # pylint: disable=broad-except
          res["profiles"][f"{name} {label}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        save()
      del gdn
      gc.collect()

  def fla_rows(name, config, flops):
    if not opts.fla:
      res["fla"][name] = {"error": "--nofla"}
      return
    if not opts.fla_modes or over_budget(f"{name} fla"):
      return
    fla = None
    try:
      config.model.rule_impl = "auto"
      fla = fla_factory(config_lib.model_config(config), config, opts)
      res["fla"][name] = {"num_params": fla.num_params, "guard_lifted": opts.fla_lift_guard}
    except Exception as e:  # pylint: disable=broad-except
      res["fla"][name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
      for mode in opts.fla_modes:
        row = base_row(name, FLA_MODES[mode])
        record(row, e)
        res["rows"].append(row)
      save()
      return
    for mode in opts.fla_modes:
      if over_budget(f"{name} {FLA_MODES[mode]}"):
        continue
      row = base_row(name, FLA_MODES[mode])
      try:
        extra, seconds = fla.run(mode, opts.batch, opts.seq_len, opts.steps, opts.warmup)
        row.update(extra)
        finish(row, seconds, flops)
      except Exception as e:  # pylint: disable=broad-except
        record(row, e)
      res["rows"].append(row)
      save()
    try:
      fla.close()
    except Exception:  # pylint: disable=broad-except
      pass

  for name in opts.configs:
    try:
      config = train_config(name, opts.batch, opts.seq_len)
    except Exception as e:  # pylint: disable=broad-except
      row = base_row(name, "gdn-jax")
      record(row, e)
      res["rows"].append(row)
      save()
      continue
    mc = config_lib.model_config(config)
    flops = flops_per_token(mc, opts.seq_len) * tokens
    res["configs"][name] = {"model": dataclasses.asdict(mc), "num_params": num_params(mc),
                            "flops_per_token": flops_per_token(mc, opts.seq_len),
                            "model_flops_per_step": flops,
                            "parametrization": config.parametrization,
                            "optimizer": config.optimizer.to_dict()}
    save()
    order = (fla_rows, gdn_rows) if opts.fla_first else (gdn_rows, fla_rows)
    for rows in order:
      rows(name, config, flops)
  save()
  log(markdown(res))
  log(f"wrote {out_dir / stem}.json/.md in {time.perf_counter() - start:.0f} s")
  return res


def add_ratios(res: dict):
  """Per row: gdn-jax's step time (its "auto" row, same config) / this row's."""
  for r in res["rows"]:
    gdn = next((g for g in res["rows"] if g["config"] == r["config"] and g["impl"] == "gdn-jax"
                and "step_ms" in g), None)
    if "step_ms" in r and gdn is not None:
      r["gdn_jax_over_this"] = gdn["step_ms"] / r["step_ms"]


def _f(v, spec) -> str:
  return "" if v is None else format(v, spec)


def markdown(res: dict) -> str:
  v = res["versions"]
  o = res["options"]
  peak = res["peak_flops"]
  out = [f"# Training step benchmark: {res['device']}", "",
         f"{res['date']}; " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) +
         (f"; XLA_FLAGS={res['xla_flags']}" if res["xla_flags"] else "") +
         (f"; JAX compilation cache {res['jax_compilation_cache_dir']} (compile s may be a "
          "cache hit)" if res["jax_compilation_cache_dir"] else ""), "",
         f"One training step of batch {o['batch']} × {o['seq_len']} tokens, bf16 compute, "
         "float32 parameters and AdamW state. gdn-jax: the trainer's jitted step (gdn_jax.train: "
         "μP AdamW, clipping, the non-finite guard); fla: GatedDeltaNetForCausalLM under bf16 "
         f"autocast, AdamW(fused=True){', clip_grad_norm_' if o['fla_clip'] else ''}"
         f"{', fused cross-entropy' if o['fla_fuse_cross_entropy'] else ''}. step ms = median of "
         f"{o['steps']} steps after {o['warmup']} warm-up steps, each synchronised. MFU = model "
         "FLOPs (gdn_jax.model.flops_per_token: 6 × matmul parameters + conv + the chunked rule, "
         "forward + backward) / step time / "
         + (f"{peak / 1e12:.0f} TFLOP/s dense bf16." if peak else "no peak known (n/a).")
         + " compile s: gdn-jax lower + compile; fla its first step (Triton JIT and autotuning, "
         "with torch.compile also dynamo and inductor). gdn-jax / row = gdn-jax's step time over "
         "the row's (< 1: gdn-jax is faster).", "",
         "| config | params | impl | step ms | tokens/s | MFU | compile s | pipelined ms | "
         "gdn-jax / row |", "|---|---|---|---|---|---|---|---|---|"]
  order = list(o["configs"])
  for r in sorted(res["rows"], key=lambda r: (order.index(r["config"]) if r["config"] in order
                                              else len(order), not r["impl"].startswith("gdn"))):
    params = res["configs"].get(r["config"], {}).get("num_params")
    p = "" if params is None else f"{params / 1e6:.1f}M"
    if "error" in r or "step_ms" not in r:
      err = r.get("error", "no result").replace("|", "/").replace("\n", " ")[:160]
      out.append(f"| {r['config']} | {p} | {r['impl']} | error: {err} | | | | | |")
      continue
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    out.append(f"| {r['config']} | {p} | {r['impl']} | {r['step_ms']:.2f} | "
               f"{r['tokens_per_s']:.0f} | {mfu} | {_f(r.get('compile_s'), '.1f')} | "
               f"{_f(r.get('pipelined_ms'), '.2f')} | {_f(r.get('gdn_jax_over_this'), '.2f')} |")
  for name, fla in res["fla"].items():
    out += ["", f"fla {name}: " + (fla["error"][:300] if "error" in fla else
            f"{fla['num_params']:,} parameters; its Hopper/Triton < 3.7.1 guard of the gated "
            f"backward {'lifted for timing (issue 640)' if fla['guard_lifted'] else 'kept'}.")]
  mem = [f"{r['config']} {r['impl']}: " + (
      f"XLA temp {r['memory'].get('temp_GB')} GB + arguments {r['memory'].get('argument_GB')} GB"
      if "memory" in r else f"peak allocated {r['peak_memory_GB']:.1f} GB")
         for r in res["rows"] if r.get("memory") or "peak_memory_GB" in r]
  if mem:
    out += ["", "Memory: " + "; ".join(mem) + "."]
  if res["skipped"]:
    out += ["", "Skipped: " + "; ".join(res["skipped"])]
  for name, p in res["profiles"].items():
    out += ["", f"## Where the gdn-jax step's time goes: {name}", ""]
    if "error" in p:
      out.append(f"error: {p['error']}")
      continue
    busy = p["device_busy_ms_per_step"]
    share = lambda ms: f"{100 * ms / busy:.1f}%" if busy else ""
    out += [f"From a jax.profiler trace of {p['steps']} steps (XLA runs op by op while "
            "profiling, so the wall time can exceed the timed rows'): wall "
            f"{p['wall_ms_per_step']:.2f} ms/step, device busy {busy:.2f}, idle gaps "
            f"{p['idle_gap_ms_per_step']:.2f}; {p['kernels_per_step']:.0f} kernels per step. "
            "Parts from each kernel's HLO call stack (fwd / bwd: jvp / transpose); kinds from "
            "kernel-name patterns; share of the device-busy time." + (
                "" if "matched_fraction" not in p else
                " Busy time whose HLO instruction was found, by how: " + ", ".join(
                    f"{k} {100 * v:.0f}%" for k, v in p["matched_fraction"].items())
                + "; the rest is named from the kernel's name alone."), "",
            "| part | ms/step | share |", "|---|---|---|"]
    out += [f"| {k} | {ms:.3f} | {share(ms)} |" for k, ms in p["ms_per_step_by_part"].items()]
    out += ["", "| phase | ms/step | share |", "|---|---|---|"]
    out += [f"| {k} | {ms:.3f} | {share(ms)} |" for k, ms in p["ms_per_step_by_phase"].items()]
    out += ["", "| kernel kind | ms/step | share |", "|---|---|---|"]
    out += [f"| {k} | {ms:.3f} | {share(ms)} |" for k, ms in p["ms_per_step_by_kind"].items()]
    out += ["", "| kernel | calls/step | ms/step | part | kind |", "|---|---|---|---|---|"]
    out += [f"| `{k['name']}` | {k['calls_per_step']:.1f} | {k['ms_per_step']:.3f} | "
            f"{k['part']} | {k['kind']} |" for k in p["top_kernels"]]
  return "\n".join(out) + "\n"


def options_from_flags(f) -> Options:
  """The Options of parsed absl flag values `f` (those `define_flags` defines)."""
  strs = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
  return Options(configs=strs(f.configs), batch=f.batch, seq_len=f.seq_len, steps=f.steps,
                 warmup=f.warmup, rule_impls=strs(f.rule_impls),
                 loss_chunk_sizes=tuple(int(x) for x in strs(f.loss_chunk_sizes)),
                 fuse_projections=tuple(bool(int(x)) for x in strs(f.fuse_projections)),
                 conv_impls=strs(f.conv_impls),
                 rule_kernel_configs=tuple(x.strip() for x in f.rule_kernel_configs.split(";")),
                 fla=f.fla,
                 fla_modes=strs(f.fla_modes), fla_first=f.fla_first, fla_clip=f.fla_clip,
                 fla_fuse_cross_entropy=f.fla_fuse_cross_entropy,
                 fla_lift_guard=f.fla_lift_guard, profile=f.profile,
                 profile_steps=f.profile_steps, peak_tflops=f.peak_tflops,
                 time_budget_s=f.time_budget_s, out_dir=f.out_dir)


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  run(options_from_flags(flags.FLAGS))


def define_flags(flag_values=None):
  """Defines the script's flags on `flag_values` (absl's global FLAGS when None; a test passes a
  fresh FlagValues)."""
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  fv = absl_flags.FLAGS if flag_values is None else flag_values
  flags = types.SimpleNamespace(**{  # the DEFINE_* below, each defining on fv
      name: functools.partial(getattr(absl_flags, name), flag_values=fv)
      for name in ("DEFINE_string", "DEFINE_integer", "DEFINE_bool", "DEFINE_float")})
  d = Options()
  flags.DEFINE_string("configs", ",".join(d.configs), "Comma-separated model configs, in order: "
                      f"{', '.join(CONFIGS)} (93m: configs/gpu.py; 512m: bench_decode's).")
  flags.DEFINE_integer("batch", d.batch, "Sequences per step.")
  flags.DEFINE_integer("seq_len", d.seq_len, "Tokens per sequence.")
  flags.DEFINE_integer("steps", d.steps, "Timed steps (the median is reported).")
  flags.DEFINE_integer("warmup", d.warmup, "Untimed steps after compiling and the first step.")
  flags.DEFINE_string("rule_impls", ",".join(d.rule_impls), "Comma-separated rule_impl of the "
                      f"gdn-jax rows, from {IMPLS} (auto: Pallas on one GPU).")
  flags.DEFINE_string("loss_chunk_sizes", ",".join(map(str, d.loss_chunk_sizes)),
                      "Comma-separated loss_chunk_size of the gdn-jax rows (× rule_impls): tokens "
                      "per chunk of the fused LM head + cross-entropy; 0 = logits, then the loss.")
  flags.DEFINE_string("fuse_projections", ",".join(str(int(b)) for b in d.fuse_projections),
                      "Comma-separated 0 / 1: the gdn-jax rows' ModelConfig.fuse_projections "
                      "(× rule_impls × loss_chunk_sizes; 1: the input projections as one "
                      "product).")
  flags.DEFINE_string("conv_impls", ",".join(d.conv_impls), "Comma-separated "
                      f"ModelConfig.conv_impl of the gdn-jax rows, from {CONV_IMPLS} (× the lists "
                      "above; pallas: the short conv in kernels_pallas/short_conv.py).")
  flags.DEFINE_string("rule_kernel_configs", ";".join(d.rule_kernel_configs), "Semicolon-"
                      "separated ModelConfig.rule_kernel_config of the gdn-jax rows (× the lists "
                      "above): 'field=value,...' of kernels_pallas.GpuConfig, '' = the defaults; "
                      "e.g. ';walk_fwd_output=True,walk_bwd_dv_local=True'.")
  flags.DEFINE_bool("fla", d.fla, "fla rows (needs torch, fla-core, flash-linear-attention).")
  flags.DEFINE_string("fla_modes", ",".join(d.fla_modes), "Comma-separated fla rows: eager, "
                      "compile (torch.compile(model)).")
  flags.DEFINE_bool("fla_first", d.fla_first, "Run a config's fla rows before its gdn-jax rows "
                    "(torch returns its memory; XLA keeps what it allocated).")
  flags.DEFINE_bool("fla_clip", d.fla_clip, "fla: clip_grad_norm_ to the trainer config's "
                    "grad_clip, as the gdn-jax step clips.")
  flags.DEFINE_bool("fla_fuse_cross_entropy", d.fla_fuse_cross_entropy, "fla: its fused "
                    "cross-entropy kernel (flame's default); off: torch's CrossEntropyLoss.")
  flags.DEFINE_bool("fla_lift_guard", d.fla_lift_guard, "fla: lift its Hopper/Triton < 3.7.1 "
                    "guard of the gated backward (issue 640: wrong gradients) and time it anyway; "
                    "such rows are no valid comparison (default off: carry Triton ≥ 3.7.1).")
  flags.DEFINE_bool("profile", d.profile, "jax.profiler breakdown of the first gdn-jax row of "
                    "each config and conv impl.")
  flags.DEFINE_integer("profile_steps", d.profile_steps, "Steps in the profiled trace.")
  flags.DEFINE_float("peak_tflops", d.peak_tflops, "Dense bf16 peak TFLOP/s for MFU; 0: the "
                     "trainer's table (gdn_jax.train.PEAK_FLOPS).")
  flags.DEFINE_float("time_budget_s", d.time_budget_s, "Skip rows once this much time is spent.")
  flags.DEFINE_string("out_dir", "", "Output folder (default: $OUT, else experiments/results).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
