"""Benchmark the gated delta rule kernels on one GPU: Pallas vs chunked-XLA vs fla, same inputs, one process.

For each shape (B, T, H, K, V) of issue 7: forward and forward+backward times (median of repeats after
warm-up, each call synchronised), relative error ‖x − ref‖/‖ref‖ of o and of every gradient against an
fp32 reference (impl="chunked" on fp32 copies of the inputs at HIGHEST matmul precision), and the
memory of forward+backward beyond its inputs (JAX: XLA's compiled temp + output bytes; fla: torch's
peak allocated minus what was allocated before the call). fla runs on the same device buffers through
DLPack. Writes JSON and a Markdown table.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_kernels.py --out=/tmp/bench.json

fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (its issue 640); for TIMING only
the guard is lifted (`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`); its errors are reported too.
"""
import contextlib
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

ISSUE_SHAPES = "8,2048,16,128,128;2,8192,16,128,128;8,2048,6,256,512;16,4096,16,128,128"

_SHAPES = flags.DEFINE_string("shapes", ISSUE_SHAPES, "Semicolon-separated B,T,H,K,V.")
_IMPLS = flags.DEFINE_string("impls", "pallas,chunked,fla", "Comma-separated: pallas (default schedule), "
                             "pallas-walks, pallas-walks+pallas_parts, pallas-fused (one schedule of "
                             "kernels_pallas.gpu), chunked, fla.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of pallas/chunked.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_kernels_gpu.json", "JSON path (.md beside).")
_VARIANTS = flags.DEFINE_string("pallas_variants", "", "Extra pallas rows: semicolon-separated "
                                "BLOCK_V,NUM_WARPS[,BWD_NUM_WARPS[,BWD_BLOCK_V]] (e.g. '128,4;64,8,4,32').")
_KNOBS = flags.DEFINE_string("knob_variants", "", "Extra pallas rows, each setting kernels_pallas.gpu "
                             "knobs (defaults restored after each): semicolon-separated NAME=VALUE,... "
                             "(e.g. 'CHUNK_PARALLEL=pallas,PART_NUM_WARPS=8;WALK_NUM_STAGES=2').")
_CHECK_ERR = flags.DEFINE_bool("errors", True, "Compute errors against the fp32 reference.")
_PROFILE = flags.DEFINE_bool("profile_once", False, "After timing, run one more forward+backward of each "
                             "row between cudaProfilerStart/Stop, for `ncu --profile-from-start off` "
                             "(experiments/ncu_table.py turns its CSV into a per-kernel table).")
_STAGES = flags.DEFINE_bool("stages", False, "Also time each stage of the 'walks' schedule on its own "
                            "(XLA operators, forward walk, output, backward locals, backward walk, grads).")

GRAD_NAMES = ("q", "k", "v", "g", "beta")


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


def jax_fns(impl, C):
  def fwd(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, chunk_size=C, impl=impl)[0]

  def fwd_bwd(q, k, v, g, beta, do):
    o, vjp = jax.vjp(fwd, q, k, v, g, beta)
    return o, vjp(do.astype(o.dtype))

  return jax.jit(fwd), jax.jit(fwd_bwd)


def bench_jax(impl, inputs, do, C, repeats, warmup):
  fwd, fwd_bwd = jax_fns(impl, C)
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


def bench_fla(inputs, do, repeats, warmup):
  import torch
  import fla.ops.common.chunk_o as chunk_o
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  chunk_o.TRITON_ABOVE_3_7_1 = True          # timing only: lift the Hopper/Triton<3.7.1 guard
  t_in = [torch.from_dlpack(x) for x in inputs]
  t_do = torch.from_dlpack(do)
  K = t_in[0].shape[-1]

  def fwd():
    with torch.no_grad():
      return chunk_gated_delta_rule(*t_in, scale=K ** -0.5)[0]

  leaves = [x.detach().clone().requires_grad_(True) for x in t_in]

  def fwd_bwd():
    for x in leaves:
      x.grad = None
    o = chunk_gated_delta_rule(*leaves, scale=K ** -0.5)[0]
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


def walks_stage_times(inputs, do, C, repeats, warmup):
  """Median ms of each stage of kernels_pallas.gpu's "walks" schedule, each jitted on its own with
  its inputs precomputed (T a multiple of C, no packed documents): where fwd+bwd time goes."""
  from gdn_jax.ops import chunked as xc  # pylint: disable=import-outside-toplevel
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  q, k, v, g, beta = inputs
  B, T, H, K = q.shape
  V, N, scale, mm = v.shape[-1], T // C, K ** -0.5, gpu._mm_dtype(q.dtype)
  state_dtype = q.dtype if mm is not None else jnp.float32
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  reset = jnp.zeros((B, T), jnp.float32)

  @jax.jit
  def operators(q, k, v, g, beta):
    (qt, kt, vt, gt, bt), seg = gpu._walks_tiles(q, k, v, g, beta, None, C)
    ops = xc.chunk_ops(qt, kt, vt, gt, bt, seg, mm)
    return (qt, kt, vt, bt), ops, ops.W.astype(k.dtype)

  walk_fwd = jax.jit(lambda W, U, k, g: gpu._walk_forward(W, U, k, g, reset, h0, mm_dtype=mm,
                                                          state_dtype=state_dtype))
  output = jax.jit(lambda qt, ops, hs, v_new: scale * (
      ops.decay_in[..., None] * xc.mm('...ck,...kv->...cv', qt, hs, mm)
      + xc.mm('...ij,...jv->...iv', ops.QK * ops.Gamma, v_new, mm)))
  bwd_local = jax.jit(lambda ops, do: (lambda do_t: (do_t, scale * xc.mm(
      '...ij,...iv->...jv', ops.QK * ops.Gamma, do_t, mm)))(gpu._to_chunks(do, B, N, C, H)))
  walk_bwd = jax.jit(lambda W, k, q, g, do, dv_local: gpu._walk_backward(
      W, k, q, g, reset, do, dv_local, h0, scale=scale, mm_dtype=mm, state_dtype=state_dtype))
  grads = jax.jit(lambda ops, t, hs, do_t, dhs, dv_new: xc.chunk_grads(  # (grads, dVb)
      ops, t[0], t[1], t[2], t[3], hs.astype(jnp.float32), do_t, dhs.astype(jnp.float32), dv_new,
      scale, mm))

  tiles_only = jax.jit(lambda q, k, v, g, beta: gpu._walks_tiles(q, k, v, g, beta, None, C)[0])
  tq, tk, tv, tg, tb = tiles_only(*inputs)

  @jax.jit
  def products(qt, kt, gt, bt):      # QKᵀ, KKᵀ, Γ and L: the inputs of the inverse
    gamma, strict, *_ = xc._decays(gt, None)
    KK = xc.mm('...ik,...jk->...ij', kt, kt, mm)
    Gamma = xc._gamma_matrix(gamma, strict)
    return (xc.mm('...ik,...jk->...ij', qt, kt, mm), Gamma,
            jnp.where(strict, bt[..., :, None] * KK * Gamma, 0.0))

  _, _, L = products(tq, tk, tg, tb)
  inverse = jax.jit(xc.unit_lower_inverse)
  A = inverse(L)
  w_u = jax.jit(lambda A, kt, vt, bt: (xc.mm('...ij,...jk->...ik', A, bt[..., None] * kt, mm),
                                       xc.mm('...ij,...jv->...iv', A, bt[..., None] * vt, mm)))
  t, ops, W = operators(*inputs)
  v_new, _, hs = walk_fwd(W, ops.U, k, g)
  do_t, dv_local = bwd_local(ops, do)
  _, dhs, dv_bwd = walk_bwd(W, k, q, g, do, dv_local)
  calls = {
      "fwd: tiles + chunk operators (XLA)": lambda: operators(*inputs),
      "fwd:   of which: [B,T,H,·] → [B,H,N,C,·] tiles (XLA)": lambda: tiles_only(*inputs),
      "fwd:   of which: QKᵀ, KKᵀ, Γ, L (XLA)": lambda: products(tq, tk, tg, tb),
      "fwd:   of which: A = (I+L)⁻¹ (XLA, fp32 doubling)": lambda: inverse(L),
      "fwd:   of which: W, U (XLA)": lambda: w_u(A, tk, tv, tb),
      "fwd: state walk (Pallas)": lambda: walk_fwd(W, ops.U, k, g),
      "fwd: output O (XLA)": lambda: output(t[0], ops, hs, v_new),
      "bwd: dṼ_local (XLA)": lambda: bwd_local(ops, do),
      "bwd: reverse walk (Pallas)": lambda: walk_bwd(W, k, q, g, do, dv_local),
      "bwd: chunk gradients (XLA)": lambda: grads(ops, t, hs, do_t, dhs, dv_bwd),
  }
  return {name: time_calls(lambda f=f: jax.block_until_ready(f()), repeats, warmup)[0]
          for name, f in calls.items()}


def pallas_parts_stage_times(inputs, do, C, repeats, warmup):
  """Median ms of each kernel of the walks schedule with CHUNK_PARALLEL="pallas", each jitted alone
  on precomputed inputs (T a multiple of C, no packed documents)."""
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  q, k, v, g, beta = inputs
  B, T, H, K = q.shape
  scale, mm = K ** -0.5, gpu._mm_dtype(q.dtype)
  op = gpu._op_dtype(q.dtype)
  h0 = jnp.zeros((B, H, K, v.shape[-1]), jnp.float32)
  reset = jnp.zeros((B, T), jnp.float32)
  prep = jax.jit(lambda *x: gpu._prep_pallas(*x, reset, C=C))
  walk_fwd = jax.jit(lambda W, U, k, g: gpu._walk_forward(W, U, k, g, reset, h0, mm_dtype=mm,
                                                          state_dtype=op, vnew_dtype=op))
  output = jax.jit(lambda q, k, v, g, hs, v_new: gpu._output_pallas(q, k, v, g, reset, hs, v_new,
                                                                    scale=scale, C=C))
  dv_local = jax.jit(lambda q, k, v, g, do: gpu._dv_local_pallas(q, k, v, g, reset, do,
                                                                 scale=scale, C=C))
  walk_bwd = jax.jit(lambda W, k, q, g, do, dvl: gpu._walk_backward(
      W, k, q, g, reset, do, dvl, h0, scale=scale, mm_dtype=mm, state_dtype=op, dvnew_dtype=op))
  grads = jax.jit(lambda q, k, v, g, beta, do, A, hs, v_new, dhs, dv_new: gpu._grads_pallas(
      q, k, v, g, beta, reset, A, hs, v_new, do, dhs, dv_new, scale=scale, C=C))
  A, W, U = prep(*inputs)
  v_new, _, hs = walk_fwd(W, U, k, g)
  dvl = dv_local(q, k, v, g, do)
  _, dhs, dv_new = walk_bwd(W, k, q, g, do, dvl)
  calls = {"parts fwd: prep (A, W, U)": lambda: prep(*inputs),
           "parts fwd: state walk": lambda: walk_fwd(W, U, k, g),
           "parts fwd: output": lambda: output(q, k, v, g, hs, v_new),
           "parts bwd: dṼ_local": lambda: dv_local(q, k, v, g, do),
           "parts bwd: reverse walk": lambda: walk_bwd(W, k, q, g, do, dvl),
           "parts bwd: gradients": lambda: grads(q, k, v, g, beta, do, A, hs, v_new, dhs, dv_new)}
  return {name: time_calls(lambda f=f: jax.block_until_ready(f()), repeats, warmup)[0]
          for name, f in calls.items()}


def reference(inputs, do, C):
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in inputs]
    _, fwd_bwd = jax_fns("chunked", C)
    o, grads = fwd_bwd(*f32, do.astype(jnp.float32))
    return np.asarray(o), [np.asarray(x) for x in grads]


@contextlib.contextmanager
def gpu_knobs(spec: str = ""):
  """Sets upper-case knobs of kernels_pallas.gpu from "NAME=VALUE,..." for the duration of the block
  and restores every knob afterwards (a variant must not leak into the next row or shape)."""
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  saved = {name: getattr(gpu, name) for name in dir(gpu) if name.isupper()}
  try:
    for item in filter(None, spec.split(",")):
      name, value = item.split("=")
      if name not in saved:
        raise ValueError(f"--knob_variants: kernels_pallas.gpu has no knob {name!r}; "
                         f"knobs: {sorted(saved)}")
      kind = type(saved[name])
      setattr(gpu, name, value == "True" if kind is bool else kind(value))
    jax.clear_caches()
    yield gpu
  finally:
    for name, value in saved.items():
      setattr(gpu, name, value)
    jax.clear_caches()


def main(argv):
  del argv
  C = _CHUNK.value
  impls = _IMPLS.value.split(",")
  rows, stages = [], []
  for shape_str in _SHAPES.value.split(";"):
    B, T, H, K, V = map(int, shape_str.split(","))
    inputs, do = make_inputs(B, T, H, K, V)
    ref = reference(inputs, do, C) if _CHECK_ERR.value else None
    variants = [(impl, None) for impl in impls] + [
        ("pallas", tuple(map(int, v.split(",")))) for v in _VARIANTS.value.split(";") if v] + [
        ("pallas", v) for v in _KNOBS.value.split(";") if v]
    for impl, knobs in variants:
      label = (impl if knobs is None else knobs if isinstance(knobs, str)
               else "pallas_" + "_".join(map(str, knobs)))
      row = dict(impl=label, B=B, T=T, H=H, K=K, V=V)
      try:
        with gpu_knobs(knobs if isinstance(knobs, str) else "") as gpu:
          bench_row(row, impl, None if isinstance(knobs, str) else knobs, gpu, inputs, do, ref, C)
      except Exception as e:  # keep the other rows: one failing impl must not lose the run
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
      print(json.dumps(row), flush=True)
      rows.append(row)
    if _STAGES.value:
      try:
        with gpu_knobs():
          st = walks_stage_times(inputs, do, C, _REPEATS.value, _WARMUP.value)
          st.update(pallas_parts_stage_times(inputs, do, C, _REPEATS.value, _WARMUP.value))
        stages.append(dict(B=B, T=T, H=H, K=K, V=V, stages_ms=st))
        print(json.dumps(stages[-1]), flush=True)
      except Exception:  # keep the timed rows
        traceback.print_exc()
    del inputs, do, ref
  write_results(rows, stages, C)


def bench_row(row, impl, knobs, gpu, inputs, do, ref, C):
  """Times one row into `row`: `impl` (pallas-<schedule>[+pallas_parts] picks one schedule of
  kernels_pallas.gpu), or "pallas" with the BLOCK_V,NUM_WARPS[,BWD_NUM_WARPS[,BWD_BLOCK_V]] tuple
  `knobs`; adds the errors against `ref` when given."""
  if knobs is not None:
    gpu.BLOCK_V, gpu.NUM_WARPS = knobs[:2]
    gpu.BWD_NUM_WARPS = knobs[2] if len(knobs) > 2 else gpu.BWD_NUM_WARPS
    gpu.BWD_BLOCK_V = knobs[3] if len(knobs) > 3 else gpu.BWD_BLOCK_V
  if impl.startswith("pallas-"):
    schedule, _, parts = impl.split("-", 1)[1].partition("+")
    gpu.SCHEDULE = schedule
    gpu.CHUNK_PARALLEL = "pallas" if parts == "pallas_parts" else "xla"
  jax.clear_caches()
  if impl == "fla":
    res, o, grads = bench_fla(inputs, do, _REPEATS.value, _WARMUP.value)
  else:
    res, o, grads = bench_jax(impl.split("-")[0], inputs, do, C, _REPEATS.value, _WARMUP.value)
  row.update(res)
  if ref is not None:
    row["err_o"] = rel_err(o, ref[0])
    for name, gx, gr in zip(GRAD_NAMES, grads, ref[1]):
      row[f"err_d{name}"] = rel_err(gx, gr)


def write_results(rows, stages, C):
  """JSON (with device, versions, date) and a Markdown table beside it."""
  versions = {}
  for name in ("torch", "triton", "fla"):
    try:
      versions[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except
      versions[name] = None
  out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
             device=str(jax.devices()[0].device_kind), jax=jax.__version__, **versions, chunk_size=C,
             repeats=_REPEATS.value, rows=rows, walks_stages=stages)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  md = [f"{out['device']}, jax {out['jax']}, C={C}, median of {_REPEATS.value} (ms); "
        "memory = fwd+bwd bytes beyond inputs (MiB); ratio = time / fla's", "",
        "| B,T,H,K,V | impl | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio | mem MiB | err o | max err grad |",
        "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    fla = next((r for r in rows if r["impl"] == "fla" and
                all(r[x] == row[x] for x in "BTHKV") and "fwd_ms" in r), None)
    shape = ",".join(str(row[x]) for x in "BTHKV")
    if "error" in row:
      md.append(f"| {shape} | {row['impl']} | failed: {row['error'][:80]} | | | | | | |")
      continue
    ratio = lambda key: f"{row[key] / fla[key]:.2f}" if fla else "-"
    gerr = max((row.get(f"err_d{n}", float('nan')) for n in GRAD_NAMES), default=float('nan'))
    md.append(f"| {shape} | {row['impl']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
              f"{ratio('fwd_ms')} | {ratio('fwd_bwd_ms')} | "
              f"{row.get('fwd_bwd_extra_bytes', 0) / 2**20:.0f} | {row.get('err_o', float('nan')):.1e} | "
              f"{gerr:.1e} |")
  for st in stages:
    md += ["", f"walks stages at {st['B']},{st['T']},{st['H']},{st['K']},{st['V']} (each jitted alone, ms):",
           ""] + [f"- {name}: {ms:.3f}" for name, ms in st["stages_ms"].items()]
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
