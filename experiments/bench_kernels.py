"""Benchmark the gated delta rule kernels on one GPU: Pallas vs chunked-XLA vs fla, same inputs, one process.

For each shape (B, T, H, K, V) of issue 7: forward and forward+backward times (median of repeats after
warm-up, each call synchronised), relative error ‖x − ref‖/‖ref‖ of o and of every gradient against an
fp32 reference (impl="chunked" on fp32 copies of the inputs at HIGHEST matmul precision), and the
memory of forward+backward beyond its inputs (JAX: XLA's compiled temp + output bytes; fla: torch's
peak allocated minus what was allocated before the call). fla runs on the same device buffers through
DLPack. Writes JSON and a Markdown table.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_kernels.py --out=/tmp/bench.json

fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (its issue 640).
`--fla_lift_guard` (default on, as every run before 2026-12-06) lifts it for TIMING
(`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`; the errors columns show what it costs); with
Triton ≥ 3.7.1 carried in (docs/training.md) pass `--nofla_lift_guard`. The JSON records both.

Rows "fla" are fla's Triton kernels: the process sets FLA_FLASH_QLA=0 before fla is imported, since
fla 0.6 dispatches to FlashQLA by itself when `flash_qla` is installed (and caches that choice per
process). Rows "flash_qla" call `flash_qla.chunk_gated_delta_rule` directly (FlashQLA 0.1.3:
TileLang kernels for Hopper/Blackwell, K = V = 128 only; other shapes get its assertion as the row's
error). The Markdown gives each row's ratio to fla's and, where a FlashQLA row exists, to FlashQLA's.
"""
import datetime
import json
import os
import statistics
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.ops import gated_delta_rule
from kernels_pallas import GpuConfig

ISSUE_SHAPES = "8,2048,16,128,128;2,8192,16,128,128;8,2048,6,256,512;16,4096,16,128,128"

_SHAPES = flags.DEFINE_string("shapes", ISSUE_SHAPES, "Semicolon-separated B,T,H,K,V.")
_IMPLS = flags.DEFINE_string("impls", "pallas,chunked,fla", "Comma-separated: pallas (the default "
                             "GpuConfig), chunked, fla (its Triton kernels), flash_qla.")
_FLA_LIFT_GUARD = flags.DEFINE_bool("fla_lift_guard", True, "Lift fla's Hopper/Triton < 3.7.1 "
                                    "guard of its gated backward (timing only; off with Triton "
                                    "≥ 3.7.1 carried in).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of pallas/chunked.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_kernels_gpu.json", "JSON path (.md beside).")
_CONFIGS = flags.DEFINE_string("config_variants", "", "Extra pallas rows, one per kernels_pallas."
                               "GpuConfig: semicolon-separated field=value,... (unset fields keep "
                               "their defaults; e.g. 'grads_block_k=128,grads_key_num_warps=8;"
                               "walk_block_v=32').")
_CHECK_ERR = flags.DEFINE_bool("errors", True, "Compute errors against the fp32 reference.")
_PROFILE = flags.DEFINE_bool("profile_once", False, "After timing, run one more forward+backward of each "
                             "row between cudaProfilerStart/Stop, for `ncu --profile-from-start off` "
                             "(experiments/ncu_table.py turns its CSV into a per-kernel table).")
_STAGES = flags.DEFINE_bool("stages", False, "Also time each GPU kernel on its own (prep, forward "
                            "walk, output, dṼ^local, reverse walk, gradients), for the pallas "
                            "row and each --config_variants row.")

GRAD_NAMES = ("q", "k", "v", "g", "beta")
TORCH_IMPLS = ("fla", "flash_qla")


def make_inputs(B, T, H, K, V, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (B, T, H, K))).astype(jnp.bfloat16)
  k = unit(jax.random.normal(ks[1], (B, T, H, K))).astype(jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)))          # fla's benchmark decays
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  do = jax.random.normal(ks[5], (B, T, H, V)).astype(jnp.bfloat16)
  return (q, k, v, g, beta), do


def time_calls(fn, repeats, warmup):
  fn()
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), min(times)


def profile_once(call):
  """With --profile_once: a warm call, then one call between cudaProfilerStart/Stop (through torch's
  cudart), so that under `ncu --profile-from-start off` only its kernels are profiled. `call` must
  wait for its results."""
  if not _PROFILE.value:
    return
  import torch  # pylint: disable=import-outside-toplevel
  call()
  torch.cuda.cudart().cudaProfilerStart()
  try:
    call()
  finally:
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def parse_config(spec: str) -> GpuConfig:
  """A GpuConfig from "field=value,..." (`GpuConfig.parse`), the error naming the flag."""
  try:
    return GpuConfig.parse(spec)
  except ValueError as e:
    raise ValueError(f"--config_variants: {e}") from None


def jax_fns(impl, C, config=None):
  def fwd(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, chunk_size=C, impl=impl, kernel_config=config)[0]

  def fwd_bwd(q, k, v, g, beta, do):
    o, vjp = jax.vjp(fwd, q, k, v, g, beta)
    return o, vjp(do.astype(o.dtype))

  return jax.jit(fwd), jax.jit(fwd_bwd)


def bench_jax(impl, inputs, do, C, repeats, warmup, config=None):
  fwd, fwd_bwd = jax_fns(impl, C, config)
  res = {}
  res["fwd_ms"], res["fwd_min_ms"] = time_calls(
      lambda: jax.block_until_ready(fwd(*inputs)), repeats, warmup)
  res["fwd_bwd_ms"], res["fwd_bwd_min_ms"] = time_calls(
      lambda: jax.block_until_ready(fwd_bwd(*inputs, do)), repeats, warmup)
  profile_once(lambda: jax.block_until_ready(fwd_bwd(*inputs, do)))
  mem = fwd_bwd.lower(*inputs, do).compile().memory_analysis()
  if mem is not None:
    res["fwd_bwd_extra_bytes"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
  o, grads = fwd_bwd(*inputs, do)
  return res, o, grads


def torch_rule(impl: str, lift_guard: bool = True):
  """rule(q, k, v, g, beta, scale) → o for a torch row: fla's Triton kernels or FlashQLA's."""
  if impl == "flash_qla":
    import flash_qla  # pylint: disable=import-outside-toplevel
    return lambda *x, scale: flash_qla.chunk_gated_delta_rule(*x, scale=scale)[0]
  import fla.ops.common.chunk_o as chunk_o  # pylint: disable=import-outside-toplevel
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=import-outside-toplevel
  if lift_guard:
    chunk_o.TRITON_ABOVE_3_7_1 = True     # timing only: lift the Hopper/Triton<3.7.1 guard
  return lambda *x, scale: chunk_gated_delta_rule(*x, scale=scale)[0]


def bench_torch(rule, inputs, do, repeats, warmup):
  """Times `rule` (torch_rule) on the JAX inputs through DLPack, as bench_jax times a JAX impl."""
  import torch  # pylint: disable=import-outside-toplevel
  t_in = [torch.from_dlpack(x) for x in inputs]
  t_do = torch.from_dlpack(do)
  K = t_in[0].shape[-1]

  def fwd():
    with torch.no_grad():
      return rule(*t_in, scale=K ** -0.5)

  leaves = [x.detach().clone().requires_grad_(True) for x in t_in]

  def fwd_bwd():
    for x in leaves:
      x.grad = None
    o = rule(*leaves, scale=K ** -0.5)
    o.backward(t_do)
    return o

  def sync(f):
    def run():
      out = f()
      torch.cuda.synchronize()
      return out
    return run

  res = {}
  res["fwd_ms"], res["fwd_min_ms"] = time_calls(sync(fwd), repeats, warmup)
  res["fwd_bwd_ms"], res["fwd_bwd_min_ms"] = time_calls(sync(fwd_bwd), repeats, warmup)
  profile_once(sync(fwd_bwd))
  torch.cuda.synchronize()
  for x in leaves:
    x.grad = None
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  o = fwd_bwd()
  torch.cuda.synchronize()
  res["fwd_bwd_extra_bytes"] = int(torch.cuda.max_memory_allocated() - base)
  to_np = lambda t: t.detach().float().cpu().numpy()
  return res, to_np(o), [to_np(x.grad) for x in leaves]


def stage_times(inputs, do, C, repeats, warmup, config=None):
  """Median ms of each GPU kernel (`kernels_pallas.gpu`'s stages, `config` or the default), each
  jitted alone on precomputed inputs (T a multiple of C, no packed documents): where fwd+bwd time
  goes."""
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  q, k, v, g, beta = inputs
  B, T, H, K = q.shape
  scale, config = K ** -0.5, config or GpuConfig()
  h0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
  reset = jnp.zeros((B, T), jnp.float32)
  prep = jax.jit(lambda *x: gpu.prep(*x, reset, C=C, config=config))
  fused = dict(q=q, scale=scale, o_dtype=v.dtype) if config.walk_fwd_output else {}
  walk_fwd = jax.jit(lambda W, U, k, g, beta: gpu.walk_forward(W, U, k, g, reset, h0,
                                                               config=config, beta=beta, **fused))
  output = jax.jit(lambda q, k, v, g, hs, v_new: gpu.output(q, k, v, g, reset, hs, v_new,
                                                            scale=scale, C=C, config=config))
  dv_local = jax.jit(lambda q, k, v, g, do: gpu.dv_local(q, k, v, g, reset, do, scale=scale, C=C,
                                                         config=config))
  walk_bwd = jax.jit(lambda tiles, k, q, g, do, dvl, beta: gpu.walk_backward(
      tiles, k, q, g, reset, do, dvl, h0, scale=scale, config=config, beta=beta))
  grads = jax.jit(lambda q, k, v, g, beta, do, A, hs, v_new, dhs, dv_new: gpu.grads(
      q, k, v, g, beta, reset, A, hs, v_new, do, dhs, dv_new, scale=scale, C=C, config=config))
  A, W, U = prep(*inputs)
  walk_fwd_in = (A, v, k, g, beta) if config.walk_fwd_from_a else (W, U, k, g, None)
  v_new, _, hs, _ = walk_fwd(*walk_fwd_in)
  dvl = None if config.walk_bwd_dv_local else dv_local(q, k, v, g, do)
  walk_in = (A, k, q, g, do, dvl, beta) if config.walk_bwd_from_a else (W, k, q, g, do, dvl, None)
  _, dhs, dv_new = walk_bwd(*walk_in)
  products = "A" + ", W" * config.prep_writes_w + ", U" * config.prep_writes_u
  calls = {f"fwd: prep ({products})": lambda: prep(*inputs)}
  if config.walk_fwd_output:    # the walk writes O; without the backward it skips h_r and Ṽ
    infer = jax.jit(lambda W, U, k, g, beta: gpu.walk_forward(
        W, U, k, g, reset, h0, config=config, beta=beta, save=False, **fused))
    calls["fwd: state walk + output"] = lambda: walk_fwd(*walk_fwd_in)
    calls["fwd: state walk + output, not saving h_r, Ṽ"] = lambda: infer(*walk_fwd_in)
  else:
    calls["fwd: state walk"] = lambda: walk_fwd(*walk_fwd_in)
    calls["fwd: output"] = lambda: output(q, k, v, g, hs, v_new)
  if not config.walk_bwd_dv_local:     # else the reverse walk forms dṼ^local itself
    calls["bwd: dṼ_local"] = lambda: dv_local(q, k, v, g, do)
  calls["bwd: reverse walk" + " + dṼ_local" * config.walk_bwd_dv_local] = (
      lambda: walk_bwd(*walk_in))
  calls["bwd: gradients (key + WY)"] = lambda: grads(q, k, v, g, beta, do, A, hs, v_new, dhs,
                                                     dv_new)
  return {name: time_calls(lambda f=f: jax.block_until_ready(f()), repeats, warmup)[0]
          for name, f in calls.items()}


def reference(inputs, do, C):
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in inputs]
    _, fwd_bwd = jax_fns("chunked", C)
    o, grads = fwd_bwd(*f32, do.astype(jnp.float32))
    return np.asarray(o), [np.asarray(x) for x in grads]


def main(argv):
  del argv
  os.environ["FLA_FLASH_QLA"] = "0"    # rows "fla" = fla's Triton path (module docstring)
  C = _CHUNK.value
  impls = _IMPLS.value.split(",")
  rows, stages = [], []
  for shape_str in _SHAPES.value.split(";"):
    B, T, H, K, V = map(int, shape_str.split(","))
    inputs, do = make_inputs(B, T, H, K, V)
    ref = reference(inputs, do, C) if _CHECK_ERR.value else None
    variants = [(impl, None, impl) for impl in impls] + [
        ("pallas", parse_config(spec), spec) for spec in _CONFIGS.value.split(";") if spec]
    for impl, config, label in variants:
      row = dict(impl=label, B=B, T=T, H=H, K=K, V=V)
      try:
        bench_row(row, impl, config, inputs, do, ref, C)
      except Exception as e:  # keep the other rows: one failing impl must not lose the run
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
      print(json.dumps(row), flush=True)
      rows.append(row)
    for impl, config, label in variants if _STAGES.value else ():
      if impl != "pallas":
        continue
      try:
        st = stage_times(inputs, do, C, _REPEATS.value, _WARMUP.value, config)
        stages.append(dict(config=label, B=B, T=T, H=H, K=K, V=V, stages_ms=st))
        print(json.dumps(stages[-1]), flush=True)
      except Exception:  # keep the timed rows
        traceback.print_exc()
    del inputs, do, ref
  write_results(rows, stages, C)


def bench_row(row, impl, config, inputs, do, ref, C):
  """Times one row into `row`: `impl`, with the `GpuConfig` `config` for "pallas" (None: the
  defaults); adds the errors against `ref` when given."""
  if impl in TORCH_IMPLS:
    rule = torch_rule(impl, _FLA_LIFT_GUARD.value)
    res, o, grads = bench_torch(rule, inputs, do, _REPEATS.value, _WARMUP.value)
  else:
    res, o, grads = bench_jax(impl, inputs, do, C, _REPEATS.value, _WARMUP.value, config)
  row.update(res)
  if ref is not None:
    row["err_o"] = rel_err(o, ref[0])
    for name, gx, gr in zip(GRAD_NAMES, grads, ref[1]):
      row[f"err_d{name}"] = rel_err(gx, gr)


def markdown(out: dict) -> str:
  """The results table: per row its times, ratios to fla's (Triton) and FlashQLA's rows of the
  same shape (from this run only), memory and errors; then the per-kernel stage times."""
  rows = out["rows"]
  md = [f"{out['device']}, jax {out['jax']}, triton {out.get('triton')}, fla {out.get('fla')} "
        f"(guard {'lifted' if out.get('fla_guard_lifted', True) else 'kept'}), flash_qla "
        f"{out.get('flash_qla')}, C={out['chunk_size']}, median of {out['repeats']} (ms); memory = "
        "fwd+bwd bytes beyond inputs (MiB); ratio = time / that row's time at the same shape", "",
        "| B,T,H,K,V | impl | fwd ms | fwd+bwd ms | fwd / fla | fwd+bwd / fla | "
        "fwd / FlashQLA | fwd+bwd / FlashQLA | mem MiB | err o | max err grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]

  def anchor(row, impl):
    return next((r for r in rows if r["impl"] == impl and "fwd_ms" in r
                 and all(r[x] == row[x] for x in "BTHKV")), None)

  for row in rows:
    shape = ",".join(str(row[x]) for x in "BTHKV")
    if "error" in row:
      md.append(f"| {shape} | {row['impl']} | failed: {row['error'][:80]} | | | | | | | | |")
      continue
    ratio = lambda base, key: f"{row[key] / base[key]:.2f}" if base else "-"
    fla, qla = anchor(row, "fla"), anchor(row, "flash_qla")
    gerr = max((row.get(f"err_d{n}", float('nan')) for n in GRAD_NAMES), default=float('nan'))
    md.append(f"| {shape} | {row['impl']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
              f"{ratio(fla, 'fwd_ms')} | {ratio(fla, 'fwd_bwd_ms')} | {ratio(qla, 'fwd_ms')} | "
              f"{ratio(qla, 'fwd_bwd_ms')} | {row.get('fwd_bwd_extra_bytes', 0) / 2**20:.0f} | "
              f"{row.get('err_o', float('nan')):.1e} | {gerr:.1e} |")
  for st in out.get("walks_stages", []):
    md += ["", f"kernels at {st['B']},{st['T']},{st['H']},{st['K']},{st['V']}, "
           f"{st.get('config', 'pallas')} (each jitted alone, ms):",
           ""] + [f"- {name}: {ms:.3f}" for name, ms in st["stages_ms"].items()]
  return "\n".join(md) + "\n"


def write_results(rows, stages, C):
  """JSON (with device, versions, date) and a Markdown table beside it."""
  versions = {}
  for name in ("torch", "triton", "fla", "flash_qla", "tilelang"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except
      versions[name] = None
  out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
             device=str(jax.devices()[0].device_kind), jax=jax.__version__, **versions, chunk_size=C,
             repeats=_REPEATS.value, fla_guard_lifted=_FLA_LIFT_GUARD.value,
             fla_flash_qla_env=os.environ.get("FLA_FLASH_QLA"), rows=rows, walks_stages=stages)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  md = markdown(out)
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)
