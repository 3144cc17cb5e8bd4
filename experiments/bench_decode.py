"""Decode speed on one GPU: gdn-jax (prefill + decode programs of gdn_jax.generate) against fla's
GatedDeltaNetForCausalLM (its recurrent kernels), same device, one process.

(One long script on purpose: a GPU call runs one command, and every row, the profile and the fla
side must run in that one call within its time budget.)

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

Writes bench_decode_<device>.json and .md into $OUT if set, else experiments/results/. All gdn-jax
programs are compiled first (the first row's alone, for a clean compile time; the others in
--compile_workers threads), then the rows run in priority order: gdn-jax at the first prompt, the
first two --variants, the other prompts, the other variants, the loop before issue 22
("before #22"), the profiles, fla, the --xla_flags_variants. A row is skipped once
--time_budget_s is spent; the results are rewritten after every row.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import threading
import time

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
  # First prompt only. IMPL@ROWS: generate(matmul_rows=ROWS); no "@": generate's default
  # (`default_matmul_rows()`: 8 on GPUs, 1 elsewhere), so "+nogemv@1" rows show XLA's unpadded
  # products (the GEMV takes batch 1 on GPUs by default, "+nogemv" gives XLA's padded GEMM).
  variants: tuple = ("pallas:float32", "pallas_fused:float32", "xla:bfloat16",
                     "pallas:bfloat16", "pallas_fused:bfloat16", "xla+nogemv@1:float32",
                     "pallas+nogemv@1:float32", "pallas_fused+nogemv:bfloat16",
                     "pallas_fused+noswiglu:bfloat16", "pallas_fused+nonorm:bfloat16",
                     "pallas_fused+noonorm:bfloat16", "pallas_fused+noring:bfloat16",
                     "pallas_fused+noinparts:bfloat16", "pallas_fused+nooatomic:bfloat16",
                     "pallas_fused+nodatomic:bfloat16",
                     "pallas_fused+nooatomic+nodatomic:bfloat16", "pallas_fused+mosaic:bfloat16")
  variant_batches: tuple = ()           # () = the smallest and the largest of `batches`
  # Rows in a subprocess with these XLA_FLAGS (batch 1, first prompt, the main impl), last.
  xla_flags_variants: tuple = ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",)
  baseline: bool = True                # the decode loop before issue 22, for a before/after
  fla: bool = True
  profile: bool = True
  compile_workers: int = 6
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


def init_on_host(config: ModelConfig) -> GatedDeltaNetLM:
  """The model initialised op by op on the host's CPU, then moved to the default device: one
  jitted init of the 512M model is a large program to compile on a cold GPU machine, where each op
  of the eager init compiles for the CPU in milliseconds (timings: experiments/NOTES_decode.md).
  The draws are the jitted init's (threefry; tests/bench_decode_test.py)."""
  with jax.default_device(jax.devices("cpu")[0]):
    graphdef, state = nnx.split(GatedDeltaNetLM(config, rngs=nnx.Rngs(0)))
  state = jax.device_put(state, jax.devices()[0])
  jax.block_until_ready(state)
  return nnx.merge(graphdef, state)


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
  """The compiled prefill / decode programs of one model, cached per shape; compiled ahead of the
  timed runs (`precompile`, several at once in threads: XLA compiles without the GIL)."""

  def __init__(self, model, new_tokens: int):
    self.model, self.new_tokens = model, new_tokens
    self.graphdef, self.state = nnx.split(model)
    self.prefill_graphdef = self.graphdef
    self.compiled = {}                # key → (executable, compile s, compiled alone?)
    self.errors = {}                  # key → why it did not compile
    self.prefill_fallback = None      # why the prefill left rule_impl "auto", if it did
    self.lock = threading.Lock()

  def inputs(self, batch, prompt_len):
    rng = np.random.default_rng(batch * 7919 + prompt_len)
    prompt = jnp.asarray(rng.integers(0, self.model.config.vocab_size, (batch, prompt_len)),
                         jnp.int32)
    return gen.pad_prompt(prompt, gen.bucket_length(prompt_len))

  @staticmethod
  def keys(batch, prompt_len, impl, state_dtype):
    """Program keys of a row: one float32-state prefill per (batch, bucket); a bf16 state is cast
    from it (`cast`); one decode program per (batch, impl, state dtype)."""
    return (("prefill", batch, gen.bucket_length(prompt_len)),
            ("decode", batch, impl, jnp.dtype(state_dtype).name))

  def _compile(self, key):
    kind, batch = key[:2]
    f32 = jnp.dtype(jnp.float32)
    tokens, segments = self.inputs(batch, key[2] if kind == "prefill" else 16)
    if kind == "prefill":
      lower = lambda graphdef: gen.prefill_program.lower(
          graphdef, self.state, tokens, segments, state_dtype=f32).compile()
      try:
        return lower(self.prefill_graphdef)
      except Exception as e:  # pylint: disable=broad-except
        if self.model.config.rule_impl == "chunked":
          raise
        # The prefill's Pallas chunk kernels are not what this benchmark measures: fall back
        # to the chunked XLA rule (same weights) and say so in the results.
        with self.lock:
          self.prefill_fallback = f"{type(e).__name__}: {str(e)[:300]}"
          chunked = dataclasses.replace(self.model.config, rule_impl="chunked")
          self.prefill_graphdef = nnx.split(nnx.eval_shape(
              lambda: GatedDeltaNetLM(chunked, rngs=nnx.Rngs(0))))[0]
        return lower(self.prefill_graphdef)
    impl, state_dtype = key[2], jnp.dtype(key[3])
    logits, cache = jax.eval_shape(
        functools.partial(cast, state_dtype=state_dtype),
        gen.prefill_program.eval_shape(self.graphdef, self.state, tokens, segments,
                                       state_dtype=f32))
    args = (self.graphdef, self.state, logits, cache, jax.random.key(0))
    if impl == "baseline":
      return baseline_decode_program.lower(*args, max_new_tokens=self.new_tokens).compile()
    impl, matmul_rows = split_impl(impl)
    impl, decode_config = split_launch(impl)
    return gen.decode_program.lower(*args, max_new_tokens=self.new_tokens, temperature=0.0,
                                    top_k=None, impl=impl, matmul_rows=matmul_rows,
                                    decode_config=decode_config).compile()

  def compile(self, key, alone: bool):
    if key in self.compiled or key in self.errors:
      return
    t0 = time.perf_counter()
    try:
      exe = self._compile(key)
    except Exception as e:  # pylint: disable=broad-except
      self.errors[key] = f"{type(e).__name__}: {str(e)[:600]}"
      return
    self.compiled[key] = (exe, time.perf_counter() - t0, alone)

  def precompile(self, keys, workers: int, timeout_s: float) -> list:
    """Compiles `keys` in `workers` threads; returns those not done after `timeout_s` (their
    threads go on in the background: XLA compiles cannot be interrupted)."""
    keys = [k for k in dict.fromkeys(keys) if k not in self.compiled and k not in self.errors]
    if not keys:
      return []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    futures = {pool.submit(self.compile, k, False): k for k in keys}
    _, pending = concurrent.futures.wait(futures, timeout=max(timeout_s, 1.0))
    pool.shutdown(wait=False, cancel_futures=True)
    return [futures[f] for f in pending]

  def run(self, batch, prompt_len, impl, state_dtype, repeats):
    key_p, key_d = self.keys(batch, prompt_len, impl, state_dtype)
    for key in (key_p, key_d):
      self.compile(key, alone=True)           # no-op when precompiled
      if key in self.errors:
        raise RuntimeError(f"{key[0]} did not compile: {self.errors[key]}")
    (prefill, c_p, alone_p), (decode, c_d, alone_d) = self.compiled[key_p], self.compiled[key_d]
    tokens, segments = self.inputs(batch, prompt_len)
    state_dtype = jnp.dtype(state_dtype)
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
            "compiled_alone": [alone_p, alone_d],
            "deterministic": all(np.array_equal(outs[0], o) for o in outs[1:]),
            "first_tokens": outs[-1][0, :8].tolist()}

  def profile(self, batch, prompt_len, impl, state_dtype) -> dict:
    """Device time per decode step by scope, from a jax.profiler trace of one decode call."""
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    key_p, key_d = self.keys(batch, prompt_len, impl, state_dtype)
    missing = [k for k in (key_p, key_d) if k not in self.compiled]
    if missing:   # not compiled within the budget, or failed: say which, do not raise
      return {"error": "program not compiled: " + "; ".join(
          f"{k} ({self.errors.get(k, 'not within the budget')[:200]})" for k in missing)}
    prefill, decode = self.compiled[key_p][0], self.compiled[key_d][0]
    scope_of = hlo_scopes(decode.as_text())
    tokens, segments = self.inputs(batch, prompt_len)
    logits, cache = jax.block_until_ready(
        cast(prefill(self.state, tokens, segments), state_dtype=jnp.dtype(state_dtype)))
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp):
        t0 = time.perf_counter()
        jax.block_until_ready(decode(self.state, logits, cache, jax.random.key(0)))
        wall = time.perf_counter() - t0
      files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
      if not files:
        return {"error": "no trace file written"}
      data = ProfileData.from_file(files[0])
    return summarize_trace(data, scope_of, steps=self.new_tokens - 1, wall_s=wall)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def baseline_decode_program(graphdef, state, logits_BxV, cache, rng, *, max_new_tokens):
  """The greedy decode loop as it was before issue 22, for a before/after on the same device: each
  step casts every weight as its Linear is called, six input projections and three conv steps per
  layer, and the rule as `gated_delta_rule(impl="recurrent")` on a length-1 sequence. Reads the
  modules' own (private) pieces, so a refactor of them may break this row only."""
  from gdn_jax.ops import gated_delta_rule  # pylint: disable=import-outside-toplevel
  del rng
  model = nnx.merge(graphdef, state)
  cache = [block.mixer.call_cache(c) for block, c in zip(model.blocks, cache)]

  def mixer_step(m, x_BxD, c):
    B, Hk, H, K, V = (x_BxD.shape[0], m.num_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim)
    (q, k, v), new = m._features(x_BxD, None, c, single_token=True)  # pylint: disable=protected-access
    beta, g = m._gates(x_BxD)  # pylint: disable=protected-access
    o, new["S"] = gated_delta_rule(
        q.reshape(B, 1, Hk, K), k.reshape(B, 1, Hk, K), v.reshape(B, 1, H, V), g[:, None],
        beta[:, None], scale=m.qk_scale, initial_state=c["S"], output_final_state=True,
        use_qk_l2norm=True, qk_norm_eps=m.qk_norm_eps, impl="recurrent")
    return m._output(o[:, 0], x_BxD), new  # pylint: disable=protected-access

  def step(carry, _):
    token_B, cache = carry
    x = model.embed(token_B)
    new_cache = []
    for block, c in zip(model.blocks, cache):
      y, c = mixer_step(block.mixer, block.mixer_norm(x), c)
      x = x + y
      x = x + block.mlp(block.mlp_norm(x))
      new_cache.append(c)
    logits = model._logits(x)  # pylint: disable=protected-access
    return (jnp.argmax(logits, -1).astype(jnp.int32), new_cache), token_B

  first_B = jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  (last_B, cache), tokens_NxB = jax.lax.scan(step, (first_B, cache), None,
                                             length=max_new_tokens - 1)
  return jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1), cache


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


def _hlo_key(name: str) -> str:
  """An HLO instruction's name as XLA's GPU backend names its kernel: '%fusion.81 = …' and
  'fusion.81' → 'fusion_81' (kernel names replace '.' and '-' by '_')."""
  return re.sub(r"[.\-]", "_", name.strip().lstrip("%").split(" ", 1)[0])


def _containing(intervals: list, starts: list, t: int) -> str | None:
  """The name of the (start, end, name) interval that contains t (sorted by start), or None."""
  i = bisect.bisect_right(starts, t) - 1
  return intervals[i][2] if i >= 0 and intervals[i][0] <= t < intervals[i][1] else None


def summarize_trace(data, scope_of: dict, steps: int, wall_s: float,
                    fallback=None) -> dict:
  """Kernel events of the device planes → per-step time by scope, gaps and every kernel.

  A kernel's HLO instruction is, in order: its `hlo_op` stat; the event of the plane's
  "XLA Ops" line whose interval holds the kernel's start; the kernel's own name (a fusion's
  kernel is named after it). Each is looked up as written, then as a kernel name ('.' → '_').
  Unmatched kernels take `fallback(kernel name)` (default: "matmul (unscoped)" for gemm-like
  names, else "other"). `matched_fraction` says how much of the busy time was looked up.
  """
  if fallback is None:
    fallback = lambda n: ("matmul (unscoped)" if re.search(r"dot|gemm|cublas|nvjet", n, re.I)
                          else "other")
  keyed = {_hlo_key(k): v for k, v in scope_of.items()}
  lookup = lambda op: None if op is None else scope_of.get(op, keyed.get(_hlo_key(op)))
  events, stat_names, how = [], set(), {"hlo_op": 0, "xla_ops_line": 0, "kernel_name": 0}
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    ops = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for line in plane.lines
                 if "XLA Ops" in line.name for e in line.events)
    starts = [o[0] for o in ops]
    for line in plane.lines:
      if "XLA Modules" in line.name or "Steps" in line.name or "XLA Ops" in line.name:
        continue
      for e in line.events:
        stats = dict(e.stats)
        stat_names.update(map(str, stats))
        scope = None
        for source, op in (("hlo_op", stats.get("hlo_op")),
                           ("xla_ops_line", _containing(ops, starts, e.start_ns)),
                           ("kernel_name", e.name)):
          scope = lookup(None if op is None else str(op))
          if scope is not None:
            how[source] += e.duration_ns
            break
        events.append((e.start_ns, e.duration_ns, e.name, scope))
  if not events:
    return {"error": "no device events in the trace (CPU?)", "wall_ms_per_step":
            1e3 * wall_s / max(steps, 1)}
  events.sort()
  busy = sum(d for _, d, _, _ in events)
  span = events[-1][0] + events[-1][1] - events[0][0]
  by_scope, by_kernel = {}, {}
  for _, dur, name, scope in events:
    scope = fallback(name) if scope is None else scope
    by_scope[scope] = by_scope.get(scope, 0.0) + dur
    k = by_kernel.setdefault(name[:80], [0, 0.0, scope])
    k[0] += 1
    k[1] += dur
  per_step = lambda ns: ns / 1e3 / max(steps, 1)
  kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])
  return {
      "steps": steps, "wall_ms_per_step": 1e3 * wall_s / max(steps, 1),
      "kernels_per_step": len(events) / max(steps, 1),
      "device_busy_us_per_step": per_step(busy), "device_span_us_per_step": per_step(span),
      "idle_gap_us_per_step": per_step(span - busy),
      "matched_fraction": {k: round(v / busy, 4) for k, v in how.items()},
      "event_stats": sorted(stat_names),
      "us_per_step_by_scope": {s: round(per_step(v), 2) for s, v in
                               sorted(by_scope.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": n, "calls_per_step": c / max(steps, 1),
                       "us_per_step": round(per_step(t), 2), "scope": s}
                      for n, (c, t, s) in kernels[:15]],
      "kernels": [[n, c / max(steps, 1), round(per_step(t), 2), s]
                  for n, (c, t, s) in kernels[:400]]}


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


def split_impl(impl: str) -> tuple[str, int]:
  """"xla@8" → ("xla", 8): the rule's impl and generate's `matmul_rows` (no "@": generate's
  default, `default_matmul_rows()`; a ROWS that is not an int ≥ 1 gives 0, which `parse_variant`
  refuses)."""
  base, _, rows = impl.partition("@")
  if not rows:
    return base, gen.default_matmul_rows()
  return base, int(rows) if rows.isdigit() else 0


# The DecodeConfig switches of a variant: +NAME sets the field on, +noNAME off.
SWITCHES = {"gemv": "gemv", "ring": "conv_ring", "swiglu": "gemv_swiglu", "norm": "gemv_norm",
            "onorm": "gemv_out_norm", "inparts": "gemv_in_partials",
            "oatomic": "gemv_out_atomic", "datomic": "gemv_down_atomic"}


def split_launch(impl: str):
  """"pallas_fused+bv16+w8" → ("pallas_fused", DecodeConfig(block_v=16, num_warps=8)): the Pallas
  step kernels' launch settings, and "+gemv" (with "+gbnN", "+gbkN": its column and K tiles;
  "+gwN": its warps; "+gmpN": its least program count; "+gstN": its pipelining stages) the Pallas
  GEMV for the weight products at batch ≤ 8, "+nogemv" XLA's products at every batch, "+noswiglu"
  an XLA SiLU product between the MLP's two GEMVs, "+norm" the RMSNorms and the mixer's residual
  add made in the batch-1 GEMVs' prologues (the default; "+nonorm": XLA's kernels between them;
  DecodeConfig.gemv_norm), "+onorm" the GDN mixer's gated output norm made in W_o's batch-1 GEMV
  prologue (the default; "+noonorm": XLA's norm kernel before it; DecodeConfig.gemv_out_norm),
  "+inparts" the in-projection's batch-1 GEMV partials summed by their consumers (the ring kernel,
  W_o's prologue; "+noinparts": by XLA; DecodeConfig.gemv_in_partials), "+oatomic" W_o's batch-1
  partials added atomically for the gate/up prologue ("+nooatomic": re-read there;
  DecodeConfig.gemv_out_atomic), "+mosaic" the batch-1 GEMVs as Mosaic GPU kernels with
  programmatic dependent launch (DecodeConfig.gemv_backend), "+datomic" the down product's likewise, added to the stream in
  the next GEMV's prologue ("+nodatomic": XLA's sum and add; DecodeConfig.gemv_down_atomic),
  "+noring" the fused kernel on a window built per step instead of conv rings (no "+": None,
  the defaults: the GEMV at batch 1 on GPUs with the chained MLP, rings).
  "+PRODUCT.KEYN[.KEYN…]" sets one GEMV product's launch apart (DecodeConfig.gemv_overrides;
  PRODUCT in_proj, out_proj, mlp_in, mlp_out or head; KEY bn, bk, mp, w or st: block_n, block_k,
  min_programs, num_warps, num_stages), several products allowed, each once:
  "pallas_fused+out_proj.bn32.mp128+mlp_out.st3" → DecodeConfig(gemv_overrides=
  "out_proj=bn32,mp128;mlp_out=st3") (':', '+', '@' and ',' are taken by the variant grammar).
  ValueError on a bad part."""
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  base, *parts = impl.split("+")
  if not parts:
    return base, None
  kw, overrides = {}, []
  for part in parts:
    if "." in part:   # +PRODUCT.KEYN[.KEYN…]: DecodeConfig validates the product, keys, values
      product, *settings = part.split(".")
      if not re.fullmatch(r"[a-z_]+", product) or not all(
          re.fullmatch(r"[a-z]+[0-9]+", setting) for setting in settings):
        raise ValueError(f"bench_decode: GEMV product setting {part!r} in {impl!r}; expected "
                         "+PRODUCT.KEYN[.KEYN…] with PRODUCT in_proj, out_proj, mlp_in, mlp_out "
                         "or head and KEY bn, bk, mp, w or st (e.g. +out_proj.bn32.mp128).")
      overrides.append(f"{product}={','.join(settings)}")
      continue
    if part == "mosaic" and "gemv_backend" not in kw:   # the Mosaic GPU GEMVs at batch 1
      kw["gemv_backend"] = "mosaic"
      continue
    switch = part if part in SWITCHES else part[2:] if part.startswith("no") else None
    if switch in SWITCHES and SWITCHES[switch] not in kw:   # +NAME on, +noNAME off
      kw[SWITCHES[switch]] = part == switch
      continue
    key = {"bv": "block_v", "w": "num_warps", "gbn": "gemv_block_n", "gbk": "gemv_block_k",
           "gw": "gemv_num_warps", "gmp": "gemv_min_programs",
           "gst": "gemv_num_stages"}.get(part.rstrip("0123456789"))
    digits = part[len(part.rstrip("0123456789")):]
    if key is None or not digits or key in kw:
      raise ValueError(f"bench_decode: launch setting {part!r} in {impl!r}; expected +bvN "
                       "(V block), +wN (warps), +gemv or +nogemv, +noswiglu, +norm or +nonorm, "
                       "+onorm or +noonorm, +inparts or +noinparts, +oatomic or +nooatomic, "
                       "+datomic or +nodatomic, +mosaic, +noring, "
                       "+gbnN, +gbkN (GEMV tiles), +gwN (GEMV warps), +gmpN (GEMV programs), "
                       "+gstN (GEMV stages), +PRODUCT.KEYN[.KEYN…] (one GEMV product's "
                       "settings, e.g. +out_proj.bn32.mp128), "
                       "each at most once.")
    kw[key] = int(digits)
  if overrides:
    kw["gemv_overrides"] = ";".join(overrides)
  return base, DecodeConfig(**kw)


def parse_variant(spec: str) -> tuple[str, str]:
  impl, _, dtype = spec.partition(":")
  base, rows = split_impl(impl)
  try:
    base, launch = split_launch(base)
  except ValueError as e:
    raise ValueError(f"bench_decode: variant {spec!r}: {e}") from None
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  step = lambda c: (c.block_v, c.num_warps)      # the step kernels' settings (+gemv: any impl)
  step_launch = launch is not None and step(launch) != step(DecodeConfig())
  if (base not in gen.IMPLS or dtype not in ("float32", "bfloat16") or rows < 1
      or (step_launch and not base.startswith("pallas"))):
    raise ValueError(f"bench_decode: variant {spec!r}; expected "
                     "IMPL[+bvN][+wN][+gemv|+nogemv][+noswiglu][+norm|+nonorm][+onorm|+noonorm]"
                     "[+inparts|+noinparts][+oatomic|+nooatomic][+datomic|+nodatomic]"
                     "[+mosaic][+noring]"
                     "[+gbnN][+gbkN][+gwN][+gmpN][+gstN][+PRODUCT.KEYN[.KEYN…]…][@ROWS]:"
                     "STATE_DTYPE "
                     f"with IMPL in {gen.IMPLS} (launch settings +bvN, +wN for the pallas ones "
                     "only; +gemv, +nogemv for any), ROWS an int ≥ 1 (generate's matmul_rows) "
                     "and STATE_DTYPE float32 or bfloat16.")
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

  model = init_on_host(config)
  gdn = GdnBench(model, opts.new_tokens)
  main_impl, main_sd = parse_variant(opts.main)
  first, *rest = opts.prompts
  small, large = min(opts.batches), max(opts.batches)
  by_size = sorted(opts.batches, key=lambda b: (b not in (small, large), b))    # 1, 64, 8
  variant_batches = opts.variant_batches or sorted({small, large})
  # The gdn-jax rows in priority order (impl, state dtype, batch, prompt).
  plan = [(main_impl, main_sd, b, first) for b in by_size]
  plan += [(*parse_variant(v), b, first) for v in opts.variants[:2] for b in variant_batches]
  plan += [(main_impl, main_sd, b, p) for p in rest for b in by_size]
  plan += [(*parse_variant(v), b, first) for v in opts.variants[2:] for b in variant_batches]
  if opts.baseline:
    plan += [("baseline", "float32", b, first) for b in sorted({small, large})]

  def row_name(impl, sd):
    if impl == "baseline":
      return "gdn-jax before #22"
    return f"gdn-jax {impl}" + ("" if sd == "float32" else f" state {sd}")

  # Compile: the first row's programs alone (clean compile times), then all others at once.
  t0 = time.perf_counter()
  res["setup_s"] = t0 - start       # bandwidth probe and the model's compiled init
  log(f"set-up (bandwidth, model init) {res['setup_s']:.0f} s")
  for key in gdn.keys(*plan[0][2:], *plan[0][:2]) if plan else ():
    gdn.compile(key, alone=True)
  keys = [k for impl, sd, b, p in plan for k in gdn.keys(b, p, impl, sd)]
  left = opts.time_budget_s * 0.6 - (time.perf_counter() - start)
  pending = gdn.precompile(keys, opts.compile_workers, left)
  res["compile_phase_s"] = time.perf_counter() - t0
  res["compile_pending"] = [str(k) for k in pending]
  log(f"compiled {len(gdn.compiled)} programs in {res['compile_phase_s']:.0f} s "
      f"({len(gdn.errors)} failed, {len(pending)} unfinished)")
  save()

  def gdn_row(impl, sd, batch, prompt_len):
    name = row_name(impl, sd)
    # A run that writes no row is a wasted device call: the first gdn-jax row runs whenever its
    # programs compiled, budget or not (its decode loop takes seconds; the compile was the cost).
    if res["rows"] and over_budget(f"{name} B{batch} P{prompt_len}"):
      return
    row = {"impl": name, "batch": batch, "prompt": prompt_len, "new_tokens": opts.new_tokens,
           "state_dtype": sd}
    if impl != "baseline":
      row["matmul_rows"] = split_impl(impl)[1]
    if any(k not in gdn.compiled and k not in gdn.errors
           for k in gdn.keys(batch, prompt_len, impl, sd)):
      res["skipped"].append(f"{name} B{batch} P{prompt_len}: not compiled within the budget")
      return
    try:
      row.update(gdn.run(batch, prompt_len, impl, sd, opts.repeats))
      res["prefill_fallback"] = gdn.prefill_fallback
      finish_row(row, config, bandwidth)
      log(f"{name:28s} B{batch:<3d} P{prompt_len:<5d} {row['ms_per_token']:8.3f} ms/token "
          f"{row['tokens_per_s']:10.0f} tok/s  x{row['ratio_to_floor']:.2f} floor  "
          f"(compile s: {_fmt(row['compile_prefill_s'])} / {_fmt(row['compile_decode_s'])})")
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      log(f"{name} B{batch} P{prompt_len}: {row['error']}")
    res["rows"].append(row)
    save()

  for spec in plan:
    gdn_row(*spec)
  if opts.profile:
    for batch in sorted({small, large}):
      if over_budget(f"profile B{batch}"):
        continue
      try:
        res["profiles"][f"B{batch}"] = gdn.profile(batch, first, main_impl, main_sd)
      except Exception as e:  # pylint: disable=broad-except
        res["profiles"][f"B{batch}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
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
  save()
  fla_plan = [(m, b, first) for b in by_size for m in ("fla-loop", "fla-hf")]
  fla_plan += [("fla-loop", b, p) for p in rest for b in by_size]   # HF's steps = the loop's
  for mode, batch, prompt_len in fla_plan if fla is not None else ():
    if over_budget(f"{mode} B{batch} P{prompt_len}"):
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
  log("\n".join(summary(res)))
  log(f"wrote {out_dir / stem}.json/.md in {time.perf_counter() - start:.0f} s")
  return res


def flags_variant(opts: Options, xla_flags: str, batch: int, prompt_len: int, out_dir, log,
                  timeout: float):
  """The main gdn-jax row at one shape, in a subprocess whose XLA_FLAGS add `xla_flags` (XLA reads
  them once per process). A flag this XLA does not know fails that row only."""
  import subprocess  # pylint: disable=import-outside-toplevel
  sub = pathlib.Path(out_dir) / ("xla_flags_" + re.sub(r"[^a-zA-Z0-9]+", "_", xla_flags)[:60])
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
  root = pathlib.Path(__file__).resolve().parents[1]   # run as a module from the repository
  env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), env.get("PYTHONPATH")) if x)
  cmd = [sys.executable, "-m", "experiments.bench_decode", f"--config={opts.config}", f"--batches={batch}",
         f"--prompts={prompt_len}", f"--new_tokens={opts.new_tokens}", f"--main={opts.main}",
         "--variants=", "--xla_flags_variants=", "--nofla", "--noprofile", "--nobaseline",
         f"--repeats={opts.repeats}", f"--out_dir={sub}"]
  base = {"impl": f"gdn-jax {opts.main} [XLA_FLAGS {xla_flags}]", "batch": batch,
          "prompt": prompt_len, "new_tokens": opts.new_tokens}
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=root)
    files = sorted(sub.glob("bench_decode_*.json"))
    if proc.returncode or not files:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]   # the exception last
      return [{**base, "error": f"exit {proc.returncode}: {' | '.join(tail[::-1])[:500]}"}]
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


def summary(res) -> list[str]:
  """Per (batch, prompt): the main gdn-jax row against the fastest fla row and the loop before
  issue 22, in ms per token."""
  ok = [r for r in res["rows"] if "error" not in r]
  main = "gdn-jax " + res["options"]["main"].replace(":float32", "").replace(":", " state ")
  out = ["", "| batch | prompt | gdn-jax ms/token | × floor | tokens/s | best fla ms/token "
         "| fla / gdn-jax | before #22 ms/token |", "|---|---|---|---|---|---|---|---|"]
  for r in [r for r in ok if r["impl"] == main]:
    same = lambda name: [x for x in ok if x["batch"] == r["batch"] and x["prompt"] == r["prompt"]
                         and x["impl"].startswith(name)]
    fla = min((x["ms_per_token"] for x in same("fla")), default=None)
    before = next((x["ms_per_token"] for x in same("gdn-jax before")), None)
    f = lambda v, spec=".3f": "" if v is None else format(v, spec)
    out.append(f"| {r['batch']} | {r['prompt']} | {r['ms_per_token']:.3f} | "
               f"{r['ratio_to_floor']:.2f} | {r['tokens_per_s']:.0f} | {f(fla)} | "
               f"{f(fla and fla / r['ms_per_token'], '.1f')} | {f(before)} |")
  return out if len(out) > 2 else []


def markdown(res) -> str:
  c = res["config"]
  out = [f"# Decode benchmark: {res['device']}", "",
         f"Config: d_model {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, "
         f"K={c['head_k_dim']}, V={c['head_v_dim']}, MLP {c['mlp_hidden']}, vocab "
         f"{c['vocab_size']}, bf16 parameters and compute; {res['num_params'] / 1e6:.1f}M "
         f"parameters. Greedy. jax {res['jax']}. Copy bandwidth measured "
         f"{res['bandwidth_GBps']:.0f} GB/s.", "",
         "ms/token = decode time / decode steps (compile excluded); floor = (weights read per "
         "step + decode state read and written) / measured bandwidth. Compile s marked * were "
         f"compiled {res['options']['compile_workers']} at a time (wall time under contention; "
         f"all programs: {res.get('compile_phase_s', 0):.0f} s).", "",
         "| impl | batch | prompt | prefill ms | ms/token | tokens/s | floor ms (weights) | "
         "floor ms (+state) | × floor | compile s (prefill / decode) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    if "error" in r:
      out.append(f"| {r['impl']} | {r['batch']} | {r['prompt']} | error: "
                 f"{r['error'][:120].replace('|', '/')} | | | | | | |")
      continue
    alone = r.get("compiled_alone", [True, True])
    comp = (f"{_fmt(r['compile_prefill_s'])}{'' if alone[0] else '*'} / "
            f"{_fmt(r['compile_decode_s'])}{'' if alone[1] else '*'}"
            if "compile_decode_s" in r else "")
    out.append(f"| {r['impl']} | {r['batch']} | {r['prompt']} | {r['prefill_ms']:.2f} | "
               f"{r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
               f"{r['floor_weights_ms']:.3f} | {r['floor_weights_state_ms']:.3f} | "
               f"{r['ratio_to_floor']:.2f} | {comp} |")
  out += summary(res)
  fla = res.get("fla") or {}
  if res.get("prefill_fallback"):
    out += ["", "The prefill ran the chunked XLA rule: rule_impl 'auto' failed with "
            f"{res['prefill_fallback'][:200]}"]
  if not fla:
    out += ["", "fla: not run"]
  elif fla.get("error"):
    out += ["", f"fla: not measured ({fla['error']})"]
  else:
    out += ["", f"fla: fla {fla.get('version')} ({fla.get('num_params', '?')} parameters)"]
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
                 baseline=f.baseline, fla=f.fla, profile=f.profile,
                 compile_workers=f.compile_workers, repeats=f.repeats,
                 time_budget_s=f.time_budget_s, out_dir=f.out_dir)
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
  flags.DEFINE_bool("baseline", d.baseline, "Rows of the decode loop before issue 22.")
  flags.DEFINE_bool("fla", d.fla, "fla rows (needs fla-core, flash-linear-attention, torch).")
  flags.DEFINE_integer("compile_workers", d.compile_workers, "Programs compiled at once.")
  flags.DEFINE_bool("profile", d.profile, "jax.profiler breakdown of one decode call.")
  flags.DEFINE_integer("repeats", d.repeats, "Timed calls after a warm-up (best reported).")
  flags.DEFINE_float("time_budget_s", d.time_budget_s, "Skip rows once this much time is spent.")
  flags.DEFINE_string("out_dir", "", "Output folder (default: $OUT, else experiments/results).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
