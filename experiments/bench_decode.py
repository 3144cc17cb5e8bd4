"""Decode speed on one GPU: gdn-jax (prefill + decode programs of gdn_jax.generate) against fla's
GatedDeltaNetForCausalLM (its recurrent kernels), same device, one process.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_decode.py      # 512M, GPU
    python experiments/bench_decode.py --config=tiny --batches=1,2 --prompts=8,16 --new_tokens=4

Per (batch, prompt): the prefill (chunked rule) and the decode loop (greedy, `new_tokens` tokens,
`lax.scan` of the fused single-token step) are timed on their own, compile excluded (compiled
ahead of time; the compile time is reported beside). ms per token = decode time / (new_tokens − 1)
decode steps; tokens/s = batch × steps / decode time. The bandwidth floor of a step is the bytes
it must read (every weight but the embedding table, which is gathered; bf16) plus the decode
state read and written, over the device bandwidth measured here (a large device-to-device copy).

fla (torch, bf16, `fla-core` + `flash-linear-attention`; fused_recurrent for the decode steps):
"fla-loop" calls the model once per token with `past_key_values` (greedy argmax on the GPU),
"fla-hf" is HF `generate` (cache on, greedy); its ms per token is (generate − prefill) / steps.
fla rows use `--fla_new_tokens` (per-token times are steady after a few steps). If fla does not
import, the gdn-jax rows are still written and the JSON says why fla's are missing.

Also: a jax.profiler trace of one decode call at the smallest and largest batch, summarised as
device time per step by part of the step (the named scopes of the decode step: embed, in_proj
(with the mixer's norm), conv_gates, rule, out_proj, mlp (with the residuals and its norm), head,
sample), the kernels per step, the idle gap between kernels, and the top kernels.

Writes bench_decode_<device>.json and .md into $OUT if set, else experiments/results/. Rows run in
priority order (gdn-jax at the first prompt, its profiles, fla there, the first two --variants, the
other prompts, the other variants, the --xla_flags_variants) and a row is skipped once
--time_budget_s is spent; results are rewritten after every row.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax import generate as gen
from gdn_jax.model import GatedDeltaNetLM, ModelConfig, num_params

CONFIGS = {
    # fla's flame "340M" GatedDeltaNet (issue 22): 21 layers, 6 heads, K = 256, V = 512, bf16.
    "512m": dict(vocab_size=32000, d_model=1024, num_layers=21, num_heads=6, head_k_dim=256,
                 head_v_dim=512, mlp_hidden=2816, norm_eps=1e-6),
    "tiny": dict(vocab_size=256, d_model=64, num_layers=1, num_heads=2, head_k_dim=16,
                 head_v_dim=32, mlp_hidden=128),                 # CPU smoke test
}
SCOPES = ("embed", "in_proj", "conv_gates", "rule", "out_proj", "mlp", "head", "sample")


@dataclasses.dataclass
class Options:
  config: str = "512m"
  batches: tuple = (1, 8, 64)
  prompts: tuple = (128, 4096)
  new_tokens: int = 256
  fla_new_tokens: int = 32
  main: str = "xla:float32"            # impl:state_dtype of the rows at every (batch, prompt)
  variants: tuple = ("pallas:float32", "xla:bfloat16", "pallas:bfloat16")  # first prompt only
  variant_batches: tuple = ()           # () = the smallest and the largest of `batches`
  # Rows in a subprocess with these XLA_FLAGS (batch 1, first prompt, the main impl), last.
  xla_flags_variants: tuple = ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",)
  fla: bool = True
  profile: bool = True
  repeats: int = 2
  time_budget_s: float = 270.0
  out_dir: str = ""


def device_slug(device) -> str:
  kind = device.device_kind.lower()
  for name in ("h200", "h100", "a100", "l4", "v5e", "v5p", "v6e"):
    if name in kind.replace(" ", ""):
      return name
  return re.sub(r"[^a-z0-9]+", "_", kind).strip("_") or device.platform


def model_config(name: str) -> ModelConfig:
  return ModelConfig(**CONFIGS[name], dtype="bfloat16", param_dtype="bfloat16", rule_impl="auto")


def measure_bandwidth(nbytes: int, repeats: int = 10) -> float:
  """Device memory bandwidth (bytes/s) of a jitted copy: reads and writes `nbytes` each."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  copy(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    copy(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  del x
  return 2 * (nbytes // 4) * 4 / min(times)


def step_bytes(config: ModelConfig, batch: int, state_dtype) -> dict:
  """Bytes a decode step must move: weights read (the embedding table only gathered) and the
  decode state S read + written (the conv inputs are negligible)."""
  c = config
  weights = (num_params(c) - (0 if c.tie_embeddings else c.vocab_size * c.d_model)) * 2
  state = (c.num_layers * c.resolved_num_v_heads * c.head_k_dim * c.head_v_dim * batch
           * jnp.dtype(state_dtype).itemsize)
  return {"weights": weights, "state_rw": 2 * state}


# ----------------------------------------------------------------------------------------- gdn-jax


class GdnBench:
  """The compiled prefill / decode programs of one model, cached per shape."""

  def __init__(self, model):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    self.compiled = {}
    self.prefill_fallback = None      # why the prefill left rule_impl "auto", if it did

  def _compile_prefill(self, tokens, segments, state_dtype):
    lower = lambda graphdef: gen.prefill_program.lower(
        graphdef, self.state, tokens, segments, state_dtype=state_dtype).compile()
    try:
      return lower(self.graphdef)
    except Exception as e:  # pylint: disable=broad-except
      if self.model.config.rule_impl == "chunked":
        raise
      # The prefill's Pallas chunk kernels are not what this benchmark measures: fall back to
      # the chunked XLA rule (same weights) and say so in the results.
      self.prefill_fallback = f"{type(e).__name__}: {str(e)[:300]}"
      chunked = dataclasses.replace(self.model.config, rule_impl="chunked")
      self.graphdef = nnx.split(nnx.eval_shape(lambda: GatedDeltaNetLM(chunked,
                                                                      rngs=nnx.Rngs(0))))[0]
      self.compiled.clear()
      return lower(self.graphdef)

  def programs(self, batch, prompt_len, new_tokens, impl, state_dtype):
    """((prefill executable, its compile s), (decode executable, its compile s), inputs)."""
    rng = np.random.default_rng(batch * 7919 + prompt_len)
    prompt = jnp.asarray(rng.integers(0, self.model.config.vocab_size, (batch, prompt_len)),
                         jnp.int32)
    tokens, segments = gen.pad_prompt(prompt, gen.bucket_length(prompt_len))
    # One prefill program per shape, float32 state; a bf16 state is cast from it (`cast`).
    key_p = ("prefill", batch, tokens.shape[1])
    fresh_p = key_p not in self.compiled
    if fresh_p:
      t0 = time.perf_counter()
      exe = self._compile_prefill(tokens, segments, jnp.dtype(jnp.float32))
      self.compiled[key_p] = (exe, time.perf_counter() - t0)
    prefill, c_p = self.compiled[key_p]
    key_d = ("decode", batch, new_tokens, impl, state_dtype)
    fresh_d = key_d not in self.compiled
    if fresh_d:
      logits, cache = jax.eval_shape(functools.partial(cast, state_dtype=state_dtype),
                                     prefill.out_info)
      t0 = time.perf_counter()
      exe = gen.decode_program.lower(self.graphdef, self.state, logits, cache,
                                     jax.random.key(0), max_new_tokens=new_tokens,
                                     temperature=0.0, top_k=None, impl=impl).compile()
      self.compiled[key_d] = (exe, time.perf_counter() - t0)
    decode, c_d = self.compiled[key_d]
    # Compile times only where this call compiled (None: the program was reused).
    return ((prefill, c_p if fresh_p else None), (decode, c_d if fresh_d else None),
            (tokens, segments))

  def run(self, batch, prompt_len, new_tokens, impl, state_dtype, repeats):
    (prefill, c_p), (decode, c_d), (tokens, segments) = self.programs(
        batch, prompt_len, new_tokens, impl, state_dtype)
    t_pre, t_dec, outs = [], [], []
    for _ in range(repeats + 1):            # the first call warms up
      t0 = time.perf_counter()
      logits, cache = jax.block_until_ready(prefill(self.state, tokens, segments))
      t1 = time.perf_counter()
      logits, cache = jax.block_until_ready(cast((logits, cache), state_dtype=state_dtype))
      t1b = time.perf_counter()
      out, cache = jax.block_until_ready(decode(self.state, logits, cache, jax.random.key(0)))
      t2 = time.perf_counter()
      t_pre.append(t1 - t0)
      t_dec.append(t2 - t1b)
      outs.append(np.asarray(out))
      del cache
    return {"prefill_ms": 1e3 * min(t_pre[1:]), "decode_s": min(t_dec[1:]),
            "compile_prefill_s": c_p, "compile_decode_s": c_d,
            "deterministic": all(np.array_equal(outs[0], o) for o in outs[1:]),
            "first_tokens": outs[-1][0, :8].tolist()}

  def profile(self, batch, prompt_len, new_tokens, impl, state_dtype) -> dict:
    """Device time per decode step by scope, from a jax.profiler trace of one decode call."""
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    (prefill, _), (decode, _), (tokens, segments) = self.programs(
        batch, prompt_len, new_tokens, impl, state_dtype)
    scope_of = hlo_scopes(decode.as_text())
    logits, cache = jax.block_until_ready(
        cast(prefill(self.state, tokens, segments), state_dtype=state_dtype))
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp):
        t0 = time.perf_counter()
        jax.block_until_ready(decode(self.state, logits, cache, jax.random.key(0)))
        wall = time.perf_counter() - t0
      files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
      if not files:
        return {"error": "no trace file written"}
      data = ProfileData.from_file(files[0])
    return summarize_trace(data, scope_of, steps=new_tokens - 1, wall_s=wall)


@functools.partial(jax.jit, static_argnames="state_dtype")
def cast(logits_cache, *, state_dtype):
  """(logits, cache) with the caches' states S in `state_dtype`."""
  logits, cache = logits_cache
  return logits, [{**c, "S": c["S"].astype(state_dtype)} for c in cache]


def hlo_scopes(hlo_text: str) -> dict:
  """HLO instruction name → the step part (named scope) its op_name metadata mentions."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text, re.M):
    name, op_name = m.groups()
    parts = op_name.split("/")
    out[name] = next((s for s in SCOPES if s in parts), "other")
  return out


def summarize_trace(data, scope_of: dict, steps: int, wall_s: float) -> dict:
  """Kernel events of the device planes → per-step time by scope, gaps and the top kernels."""
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if "XLA Modules" in line.name or "Steps" in line.name or "XLA Ops" in line.name:
        continue
      for e in line.events:
        stats = dict(e.stats)
        events.append((e.start_ns, e.duration_ns, e.name, str(stats.get("hlo_op", e.name))))
  if not events:
    return {"error": "no device events in the trace (CPU?)", "wall_ms_per_step":
            1e3 * wall_s / max(steps, 1)}
  events.sort()
  busy = sum(d for _, d, _, _ in events)
  span = events[-1][0] + events[-1][1] - events[0][0]
  by_scope, by_kernel = {}, {}
  for _, dur, name, op in events:
    scope = scope_of.get(op)
    if scope is None:   # an instruction without op_name metadata
      scope = "matmul (unscoped)" if re.search(r"dot|gemm|cublas", op + name, re.I) else "other"
    by_scope[scope] = by_scope.get(scope, 0.0) + dur
    k = by_kernel.setdefault(name[:80], [0, 0.0, scope])
    k[0] += 1
    k[1] += dur
  per_step = lambda ns: ns / 1e3 / max(steps, 1)
  top = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:15]
  return {
      "steps": steps, "wall_ms_per_step": 1e3 * wall_s / max(steps, 1),
      "kernels_per_step": len(events) / max(steps, 1),
      "device_busy_us_per_step": per_step(busy), "device_span_us_per_step": per_step(span),
      "idle_gap_us_per_step": per_step(span - busy),
      "us_per_step_by_scope": {s: round(per_step(v), 2) for s, v in
                               sorted(by_scope.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": n, "calls_per_step": c / max(steps, 1),
                       "us_per_step": round(per_step(t), 2), "scope": s}
                      for n, (c, t, s) in top]}


# --------------------------------------------------------------------------------------------- fla


class FlaBench:
  """fla's GatedDeltaNetForCausalLM with the same sizes, random bf16 weights, on cuda."""

  def __init__(self, config: ModelConfig):
    import torch  # pylint: disable=import-outside-toplevel
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # pylint: disable=import-outside-toplevel
    c = config
    self.torch = torch
    cfg = GatedDeltaNetConfig(
        hidden_size=c.d_model, num_hidden_layers=c.num_layers, num_heads=c.num_heads,
        head_dim=c.head_k_dim, expand_v=c.head_v_dim / c.head_k_dim,
        num_v_heads=c.num_v_heads, intermediate_size=c.resolved_mlp_hidden,
        vocab_size=c.vocab_size, conv_size=c.conv_size, use_gate=c.use_gate,
        use_short_conv=c.use_short_conv, norm_eps=c.norm_eps, fuse_cross_entropy=False,
        tie_word_embeddings=c.tie_embeddings, use_cache=True)
    torch.manual_seed(0)
    self.model = GatedDeltaNetForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def _prompt(self, batch, prompt_len):
    g = self.torch.Generator().manual_seed(batch * 7919 + prompt_len)
    return self.torch.randint(0, self.model.config.vocab_size, (batch, prompt_len),
                              generator=g).cuda()

  def loop(self, prompt, new_tokens):
    """(prefill s, decode s): one model call per token with past_key_values, greedy."""
    torch = self.torch
    with torch.inference_mode():
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      out = self.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
      cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
      torch.cuda.synchronize()
      t1 = time.perf_counter()
      for _ in range(new_tokens - 1):
        out = self.model(input_ids=token[:, None], past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
      torch.cuda.synchronize()
      return t1 - t0, time.perf_counter() - t1

  def hf_generate(self, prompt, new_tokens):
    torch = self.torch
    with torch.inference_mode():
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      out = self.model.generate(input_ids=prompt, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=0)
      torch.cuda.synchronize()
      assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
      return time.perf_counter() - t0

  def run(self, mode, batch, prompt_len, new_tokens, repeats):
    prompt = self._prompt(batch, prompt_len)
    self.loop(prompt, 4)                    # warm-up: Triton compiles / autotunes
    pre, dec = zip(*[self.loop(prompt, new_tokens) for _ in range(repeats)])
    row = {"prefill_ms": 1e3 * min(pre), "decode_s": min(dec)}
    if mode == "fla-hf":
      self.hf_generate(prompt, 4)
      total = min(self.hf_generate(prompt, new_tokens) for _ in range(repeats))
      row["decode_s"] = max(total - min(pre), 1e-9)
      row["generate_s"] = total
    return row


# ------------------------------------------------------------------------------------------ driver


def parse_variant(spec: str) -> tuple[str, str]:
  impl, _, dtype = spec.partition(":")
  if impl not in gen.IMPLS or dtype not in ("float32", "bfloat16"):
    raise ValueError(f"bench_decode: variant {spec!r}; expected IMPL:STATE_DTYPE with IMPL in "
                     f"{gen.IMPLS} and STATE_DTYPE float32 or bfloat16.")
  return impl, dtype


def finish_row(row: dict, config: ModelConfig, bandwidth: float):
  steps = row["new_tokens"] - 1
  ms_tok = 1e3 * row["decode_s"] / steps
  b = step_bytes(config, row["batch"], row.get("state_dtype") or "float32")
  floor_w = 1e3 * b["weights"] / bandwidth
  floor_ws = 1e3 * (b["weights"] + b["state_rw"]) / bandwidth
  row.update(ms_per_token=ms_tok, tokens_per_s=row["batch"] * steps / row["decode_s"],
             floor_weights_ms=floor_w, floor_weights_state_ms=floor_ws,
             ratio_to_weights_floor=ms_tok / floor_w, ratio_to_floor=ms_tok / floor_ws)
  return row


def run(opts: Options, log=print) -> dict:
  start = time.perf_counter()
  device = jax.devices()[0]
  config = model_config(opts.config)
  out_dir = pathlib.Path(opts.out_dir or os.environ.get("OUT") or
                         pathlib.Path(__file__).resolve().parent / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"bench_decode_{device_slug(device)}" + ("" if opts.config == "512m" else
                                                   f"_{opts.config}")
  bw_bytes = (1 << 30) if device.platform != "cpu" else (1 << 24)
  bandwidth = measure_bandwidth(bw_bytes)
  log(f"{device.device_kind}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
  res = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
         "config": dataclasses.asdict(config), "num_params": num_params(config),
         "bandwidth_GBps": bandwidth / 1e9, "bandwidth_copy_bytes": bw_bytes,
         "options": dataclasses.asdict(opts), "rows": [], "skipped": [], "profiles": {},
         "fla": None, "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def save():
    res["elapsed_s"] = time.perf_counter() - start
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(res))

  def over_budget(what):
    if time.perf_counter() - start > opts.time_budget_s:
      res["skipped"].append(f"{what}: time budget {opts.time_budget_s:.0f} s spent")
      log(f"skip {what} (time budget)")
      return True
    return False

  # One compiled init (eager init would compile every op of it on its own).
  model = nnx.jit(lambda: GatedDeltaNetLM(config, rngs=nnx.Rngs(0)))()
  jax.block_until_ready(nnx.state(model))
  gdn = GdnBench(model)
  impl, sd = parse_variant(opts.main)

  def gdn_row(batch, prompt_len, impl, sd):
    name = f"gdn-jax {impl}" + ("" if sd == "float32" else f" state {sd}")
    if over_budget(f"{name} B{batch} P{prompt_len}"):
      return
    row = {"impl": name, "batch": batch, "prompt": prompt_len, "new_tokens": opts.new_tokens,
           "state_dtype": sd}
    try:
      row.update(gdn.run(batch, prompt_len, opts.new_tokens, impl, jnp.dtype(sd),
                         opts.repeats))
      res["prefill_fallback"] = gdn.prefill_fallback
      finish_row(row, config, bandwidth)
      log(f"{name:28s} B{batch:<3d} P{prompt_len:<5d} {row['ms_per_token']:8.3f} ms/token "
          f"{row['tokens_per_s']:10.0f} tok/s  x{row['ratio_to_floor']:.2f} floor  "
          f"(compile s: {_fmt(row['compile_prefill_s'])} / {_fmt(row['compile_decode_s'])})")
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      log(f"{name} B{batch} P{prompt_len}: {row['error']}")
      traceback.print_exc()
    res["rows"].append(row)
    save()

  fla = None
  if opts.fla:
    try:
      fla = FlaBench(config)
      import fla as fla_pkg  # pylint: disable=import-outside-toplevel
      res["fla"] = {"version": getattr(fla_pkg, "__version__", "?"), "num_params": fla.num_params}
    except Exception as e:  # pylint: disable=broad-except
      res["fla"] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
      log(f"fla rows missing: {res['fla']['error']}")
  else:
    res["fla"] = {"error": "--nofla"}

  def fla_rows(prompt_len, modes):
    for batch in opts.batches:
      for mode in modes:
        if fla is None or over_budget(f"{mode} B{batch} P{prompt_len}"):
          continue
        row = {"impl": mode, "batch": batch, "prompt": prompt_len,
               "new_tokens": opts.fla_new_tokens, "state_dtype": "float32"}
        try:
          row.update(fla.run(mode, batch, prompt_len, opts.fla_new_tokens, opts.repeats))
          finish_row(row, config, bandwidth)
          log(f"{mode:28s} B{batch:<3d} P{prompt_len:<5d} {row['ms_per_token']:8.3f} ms/token "
              f"{row['tokens_per_s']:10.0f} tok/s")
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
          log(f"{mode} B{batch} P{prompt_len}: {row['error']}")
        res["rows"].append(row)
        save()

  # Priority order: each later group is what a spent budget drops first.
  first, *rest = opts.prompts
  small, large = min(opts.batches), max(opts.batches)
  by_size = sorted(opts.batches, key=lambda b: (b not in (small, large), b))    # 1, 64, 8
  variants = [parse_variant(v) for v in opts.variants]
  variant_batches = opts.variant_batches or sorted({small, large})
  for batch in by_size:
    gdn_row(batch, first, impl, sd)
  if opts.profile:
    for batch in sorted({small, large}):
      if over_budget(f"profile B{batch}"):
        continue
      try:
        res["profiles"][f"B{batch}"] = gdn.profile(batch, first, opts.new_tokens, impl,
                                                   jnp.dtype(sd))
      except Exception as e:  # pylint: disable=broad-except
        res["profiles"][f"B{batch}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
      save()
  fla_rows(first, ("fla-loop", "fla-hf"))
  for v_impl, v_sd in variants[:2]:            # the Pallas step, the bf16 state
    for batch in variant_batches:
      gdn_row(batch, first, v_impl, v_sd)
  for prompt_len in rest:
    for batch in by_size:
      gdn_row(batch, prompt_len, impl, sd)
    fla_rows(prompt_len, ("fla-loop",))        # HF generate's steps are the loop's steps
  for v_impl, v_sd in variants[2:]:
    for batch in variant_batches:
      gdn_row(batch, first, v_impl, v_sd)
  for xla_flags in opts.xla_flags_variants if device.platform == "gpu" else ():
    left = opts.time_budget_s - (time.perf_counter() - start)
    if left < 60:
      res["skipped"].append(f"XLA_FLAGS={xla_flags}: {left:.0f} s of the budget left")
      continue
    res["rows"] += flags_variant(opts, xla_flags, small, first, out_dir, log,
                                 timeout=left + 30)
    save()
  save()
  log(table(res))
  log(f"wrote {out_dir / stem}.json/.md in {time.perf_counter() - start:.0f} s")
  return res


def flags_variant(opts: Options, xla_flags: str, batch: int, prompt_len: int, out_dir, log,
                  timeout: float):
  """The main gdn-jax row at one shape, in a subprocess whose XLA_FLAGS add `xla_flags` (XLA reads
  them once per process). A flag this XLA does not know fails that row only."""
  import subprocess  # pylint: disable=import-outside-toplevel
  sub = pathlib.Path(out_dir) / ("xla_flags_" + re.sub(r"[^a-zA-Z0-9]+", "_", xla_flags)[:60])
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
  cmd = [sys.executable, __file__, f"--config={opts.config}", f"--batches={batch}",
         f"--prompts={prompt_len}", f"--new_tokens={opts.new_tokens}", f"--main={opts.main}",
         "--variants=", "--xla_flags_variants=", "--nofla", "--noprofile",
         f"--repeats={opts.repeats}", f"--out_dir={sub}"]
  base = {"impl": f"gdn-jax {opts.main} [XLA_FLAGS {xla_flags}]", "batch": batch,
          "prompt": prompt_len, "new_tokens": opts.new_tokens}
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    files = sorted(sub.glob("bench_decode_*.json"))
    if proc.returncode or not files:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      return [{**base, "error": f"exit {proc.returncode}: {' | '.join(tail)[:500]}"}]
    rows = json.loads(files[-1].read_text())["rows"]
    for row in rows:
      row["impl"] = base["impl"]
      log(f"{row['impl']} B{batch}: {row.get('ms_per_token', row.get('error'))}")
    return rows
  except Exception as e:  # pylint: disable=broad-except
    return [{**base, "error": f"{type(e).__name__}: {str(e)[:400]}"}]


def _fmt(seconds) -> str:
  return "reused" if seconds is None else f"{seconds:.1f}"


def table(res) -> str:
  lines = [f"{'impl':30s} {'B':>3s} {'prompt':>6s} {'prefill ms':>10s} {'ms/token':>9s} "
           f"{'tok/s':>9s} {'floor ms':>8s} {'x floor':>7s} {'compile s':>9s}"]
  for r in res["rows"]:
    if "error" in r:
      lines.append(f"{r['impl']:30s} {r['batch']:3d} {r['prompt']:6d}  error: "
                   f"{r['error'][:70]}")
      continue
    comp = r.get("compile_decode_s")
    lines.append(f"{r['impl']:30s} {r['batch']:3d} {r['prompt']:6d} {r['prefill_ms']:10.2f} "
                 f"{r['ms_per_token']:9.3f} {r['tokens_per_s']:9.0f} "
                 f"{r['floor_weights_state_ms']:8.3f} {r['ratio_to_floor']:7.2f} "
                 f"{'' if comp is None else f'{comp:9.1f}'}")
  return "\n".join(lines)


def markdown(res) -> str:
  c = res["config"]
  out = [f"# Decode benchmark: {res['device']}", "",
         f"Config: d_model {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, "
         f"K={c['head_k_dim']}, V={c['head_v_dim']}, MLP {c['mlp_hidden']}, vocab "
         f"{c['vocab_size']}, bf16 parameters and compute; {res['num_params'] / 1e6:.1f}M "
         f"parameters. Greedy. jax {res['jax']}. Copy bandwidth measured "
         f"{res['bandwidth_GBps']:.0f} GB/s.", "",
         "ms/token = decode time / decode steps (compile excluded); floor = (weights read per "
         "step + decode state read and written) / measured bandwidth; weights-only floor in the "
         "JSON.", "",
         "| impl | batch | prompt | prefill ms | ms/token | tokens/s | floor ms (weights) | "
         "floor ms (+state) | × floor | compile s (prefill / decode) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r:
      out.append(f"| {r['impl']} | {r['batch']} | {r['prompt']} | error: "
                 f"{r['error'][:120].replace('|', '/')} | | | | | | |")
      continue
    comp = (f"{_fmt(r['compile_prefill_s'])} / {_fmt(r['compile_decode_s'])}"
            if "compile_decode_s" in r else "")
    out.append(f"| {r['impl']} | {r['batch']} | {r['prompt']} | {r['prefill_ms']:.2f} | "
               f"{r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
               f"{r['floor_weights_ms']:.3f} | {r['floor_weights_state_ms']:.3f} | "
               f"{r['ratio_to_floor']:.2f} | {comp} |")
  fla = res.get("fla") or {}
  if res.get("prefill_fallback"):
    out += ["", "The prefill ran the chunked XLA rule: rule_impl 'auto' failed with "
            f"{res['prefill_fallback'][:200]}"]
  out += ["", f"fla: {fla.get('error') or 'fla ' + str(fla.get('version'))} "
          f"({fla.get('num_params', '?')} parameters)" if fla else "fla: not run"]
  if res["skipped"]:
    out += ["", "Skipped: " + "; ".join(res["skipped"])]
  for name, p in res["profiles"].items():
    out += ["", f"## Profile of one decode step, {name} (µs per step)", "",
            "From a jax.profiler trace of one decode call (XLA runs op by op while profiling, "
            "without command buffers, so the wall time can exceed the timed rows'); parts are "
            "the named scopes of the decode step."]
    if "error" in p:
      out.append(f"error: {p['error']}")
      continue
    out.append(f"wall {1e3 * p['wall_ms_per_step']:.1f} µs/step; device busy "
               f"{p['device_busy_us_per_step']:.1f}, span {p['device_span_us_per_step']:.1f}, "
               f"idle gaps {p['idle_gap_us_per_step']:.1f}; {p['kernels_per_step']:.0f} "
               "kernels per step.")
    out += ["", "| part | µs/step |", "|---|---|"]
    out += [f"| {s} | {v:.1f} |" for s, v in p["us_per_step_by_scope"].items()]
    out += ["", "| kernel | calls/step | µs/step | part |", "|---|---|---|---|"]
    out += [f"| `{k['name']}` | {k['calls_per_step']:.1f} | {k['us_per_step']:.1f} | "
            f"{k['scope']} |" for k in p["top_kernels"]]
  return "\n".join(out) + "\n"


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  ints = lambda s: tuple(int(x) for x in s.split(",") if x)
  strs = lambda s: tuple(x for x in s.split(",") if x)
  opts = Options(config=f.config, batches=ints(f.batches), prompts=ints(f.prompts),
                 new_tokens=f.new_tokens, fla_new_tokens=f.fla_new_tokens, main=f.main,
                 variants=strs(f.variants), variant_batches=ints(f.variant_batches),
                 xla_flags_variants=tuple(x for x in f.xla_flags_variants.split(";") if x),
                 fla=f.fla,
                 profile=f.profile, repeats=f.repeats, time_budget_s=f.time_budget_s,
                 out_dir=f.out_dir)
  run(opts)


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = Options()
  flags.DEFINE_enum("config", d.config, sorted(CONFIGS), "Model sizes.")
  flags.DEFINE_string("batches", "1,8,64", "Comma-separated batch sizes.")
  flags.DEFINE_string("prompts", "128,4096", "Comma-separated prompt lengths (first: variants).")
  flags.DEFINE_integer("new_tokens", d.new_tokens, "Tokens generated per gdn-jax call.")
  flags.DEFINE_integer("fla_new_tokens", d.fla_new_tokens, "Tokens generated per fla call.")
  flags.DEFINE_string("main", d.main, "IMPL:STATE_DTYPE of the gdn-jax rows at every shape.")
  flags.DEFINE_string("variants", ",".join(d.variants), "More IMPL:STATE_DTYPE rows, at the "
                      "first prompt and --variant_batches, after everything else.")
  flags.DEFINE_string("variant_batches", "", "Batches of the variant rows (default: the "
                      "smallest and largest of --batches).")
  flags.DEFINE_string("xla_flags_variants", ";".join(d.xla_flags_variants), "Semicolon-separated "
                      "XLA_FLAGS sets: a batch-1 main row in a subprocess for each (GPU only).")
  flags.DEFINE_bool("fla", d.fla, "fla rows (needs fla-core, flash-linear-attention, torch).")
  flags.DEFINE_bool("profile", d.profile, "jax.profiler breakdown of one decode call.")
  flags.DEFINE_integer("repeats", d.repeats, "Timed calls after a warm-up (best reported).")
  flags.DEFINE_float("time_budget_s", d.time_budget_s, "Skip rows once this much time is spent.")
  flags.DEFINE_string("out_dir", "", "Output folder (default: $OUT, else experiments/results).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
