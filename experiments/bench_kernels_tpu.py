"""Benchmark the Mosaic TPU kernels against the pure-JAX chunked algorithm (XLA) on a TPU VM.

For each shape: forward and forward+backward medians (jit, compile excluded, after warm-up) of
  * "pallas_tpu": kernels_pallas.tpu.gated_delta_rule_tpu, chunk sizes from --chunk_sizes;
  * "chunked_xla": gdn_jax.ops chunked implementation (the XLA baseline), chunk 64;
relative errors of o and of every gradient against a float32 reference (the chunked algorithm on
float32 copies of the same inputs, Precision.HIGHEST), and the device memory of forward+backward
(XLA's memory analysis of the compiled program: temporaries + outputs). Writes JSON + a Markdown table to experiments/results/.

On a TPU VM (pip install -e . "jax[tpu]==0.11.2"):

  python experiments/bench_kernels_tpu.py                      # the issue-7 shapes, bf16
  python experiments/bench_kernels_tpu.py --shapes=8,2048,16,128,128 --chunk_sizes=64,128

Without a TPU:
  --aot_topology=v5e:2x2   compile the TPU kernels ahead of time for that chip (needs the `libtpu`
                           wheel importable; runs Mosaic's full compiler: layouts, VMEM) and report
                           XLA's memory analysis of forward+backward; no timing;
  --interpret              run the kernels in the Pallas interpreter (a smoke test of this script).
"""
import datetime
import importlib.metadata
import json
import os
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.ops.chunked import chunked_gated_delta_rule
from kernels_pallas import TpuConfig
from kernels_pallas.tpu import gated_delta_rule_tpu

_SHAPES = flags.DEFINE_string(
    "shapes", "8,2048,16,128,128;2,8192,16,128,128;8,2048,6,256,512;16,4096,16,128,128",
    "Semicolon-separated B,T,H,K,V (Hk = H).")
_CHUNKS = flags.DEFINE_string("chunk_sizes", "64,128", "Chunk sizes of the TPU kernel.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Dtype of q, k, v.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats (median reported).")
_AOT = flags.DEFINE_string("aot_topology", None, "Compile only, for this TPU topology "
                           "(e.g. v5e:2x2, v6e:2x2, v5p:2x2x1).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpreter (CPU smoke test).")
_OUT = flags.DEFINE_string("out", None, "Output JSON path (Markdown table beside it). Default: "
                           "experiments/results/bench_kernels_tpu_<device>.json")


def make_inputs(B, T, H, K, V, dtype, seed=0):
  """Random inputs as the layer makes them: L2-normalised q, k; GDN-like decays; β = σ(·)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  l2 = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
  q = l2(jax.random.normal(ks[0], (B, T, H, K))).astype(dtype)
  k = l2(jax.random.normal(ks[1], (B, T, H, K))).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H))) * 0.5
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  h0 = jnp.zeros((B, H, K, V), jnp.float32)
  reset = jnp.zeros((B, T), bool)
  return q, k, v, g, beta, h0, reset


def impls(chunk_sizes, interpret):
  """name → f(q, k, v, g, β, h0, reset) -> (o, S), every one on the same validated inputs."""
  out = {}
  config = TpuConfig(interpret=interpret)
  for C in chunk_sizes:
    out[f"pallas_tpu_C{C}"] = (lambda C: lambda q, k, v, g, b, h0, r: gated_delta_rule_tpu(
        q, k, v, g, b, q.shape[-1] ** -0.5, h0, r, C, config))(C)
  # Nothing is packed here: the chunked algorithm's mask-free path (reset None) is its fastest.
  out["chunked_xla_C64"] = lambda q, k, v, g, b, h0, r: chunked_gated_delta_rule(
      q, k, v, g, b, q.shape[-1] ** -0.5, h0, None, 64)
  return out


def fwd_and_fwd_bwd(f, reset):
  """jit'd forward and forward+backward (gradients of q, k, v, g, β, h0) of a fixed random loss."""
  def forward(q, k, v, g, b, h0):
    return f(q, k, v, g, b, h0, reset)

  def loss(q, k, v, g, b, h0):
    o, S = forward(q, k, v, g, b, h0)
    return jnp.sum(o.astype(jnp.float32) * jnp.cos(o.astype(jnp.float32))) + jnp.sum(S)

  return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))                # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def device_bytes(jitted, args):
  """XLA's memory analysis of the compiled function: temporaries + outputs (arguments excluded)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def aot_compile(fns, args, topology):
  """Compile each function for `topology` without a TPU (libtpu's compile-only client)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = Mesh(np.array(devices[:1]), ("x",))
  sharding = NamedSharding(mesh, PartitionSpec())
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  seconds, nbytes = [], []
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    for fn in fns:
      start = time.perf_counter()
      analysis = fn.trace(*avals).lower().compile().memory_analysis()
      seconds.append(time.perf_counter() - start)
      nbytes.append(None if analysis is None else
                    int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes))
  return dict(device_kind=devices[0].device_kind, compile_s=seconds, fwd_bwd_bytes=nbytes[-1])


def environment():
  dev = jax.devices()[0]
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = None
  return dict(backend=jax.default_backend(), device_kind=dev.device_kind,
              device_count=jax.device_count(), platform=platform.platform(),
              python=platform.python_version(), jax=jax.__version__, libtpu=libtpu,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def table(rows):
  lines = ["| shape (B, T, H, K, V) | impl | fwd ms | fwd+bwd ms | vs chunked_xla fwd+bwd | "
           "o rel err | max grad rel err | fwd+bwd temp+out MiB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "forward_s" not in r:
      peak = "" if r["fwd_bwd_bytes"] is None else f"{r['fwd_bwd_bytes'] / 2**20:.0f}"
      lines.append(f"| {r['shape']} | {r['name']} | compiled for {r['device_kind']} in "
                   f"{sum(r['compile_s']):.1f} s | | | | | {peak} |")
      continue
    peak = "" if r["fwd_bwd_bytes"] is None else f"{r['fwd_bwd_bytes'] / 2**20:.0f}"
    lines.append(f"| {r['shape']} | {r['name']} | {1e3 * r['forward_s']:.3f} | "
                 f"{1e3 * r['forward_backward_s']:.3f} | {r.get('ratio_fwd_bwd', float('nan')):.2f} | "
                 f"{r['o_rel_err']:.1e} | {max(r['grad_rel_err'].values()):.1e} | {peak} |")
  return "\n".join(lines)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  chunk_sizes = [int(c) for c in _CHUNKS.value.split(",")]
  rows = []
  for spec in _SHAPES.value.split(";"):
    B, T, H, K, V = (int(x) for x in spec.split(","))
    if _AOT.value:  # shapes only: nothing is computed on this host
      *args, reset = jax.eval_shape(lambda: make_inputs(B, T, H, K, V, dtype))
      reset = jnp.zeros(reset.shape, bool)
    else:
      *args, reset = make_inputs(B, T, H, K, V, dtype)
      f32_args = [a.astype(jnp.float32) for a in args]
      ref_fwd, ref_fwd_bwd = fwd_and_fwd_bwd(impls([], False)["chunked_xla_C64"], reset)
      with jax.default_matmul_precision("highest"):
        o_ref, _ = ref_fwd(*f32_args)
        _, grads_ref = ref_fwd_bwd(*f32_args)
    shape_rows = []
    for name, f in impls(chunk_sizes, _INTERPRET.value).items():
      fwd, fwd_bwd = fwd_and_fwd_bwd(f, reset)
      row = dict(shape=spec, name=name, dtype=dtype.name)
      if _AOT.value:  # the Mosaic kernels only: the XLA baseline needs no Mosaic check
        if name.startswith("pallas"):
          row.update(aot_compile([fwd, fwd_bwd], args, _AOT.value))
          shape_rows.append(row)
          print(row, flush=True)
        continue
      o, _ = fwd(*args)
      _, grads = fwd_bwd(*args)
      row.update(forward_s=median_seconds(fwd, args, _REPEATS.value),
                 forward_backward_s=median_seconds(fwd_bwd, args, _REPEATS.value),
                 o_rel_err=rel_err(o, o_ref),
                 grad_rel_err={n: rel_err(a, b) for n, a, b in
                               zip(("q", "k", "v", "g", "beta", "h0"), grads, grads_ref)},
                 fwd_bwd_bytes=device_bytes(fwd_bwd, args))
      shape_rows.append(row)
      print(row, flush=True)
    base = next((r for r in shape_rows if r["name"] == "chunked_xla_C64"), None)
    for r in shape_rows:
      if base is not None and "forward_backward_s" in base:
        r["ratio_fwd_bwd"] = r["forward_backward_s"] / base["forward_backward_s"]
    rows += shape_rows
  env = environment()
  tag = ("aot_" + _AOT.value.replace(":", "_") if _AOT.value
         else "interpret" if _INTERPRET.value else env["device_kind"].replace(" ", "_"))
  out = _OUT.value or os.path.join("experiments", "results", f"bench_kernels_tpu_{tag}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as fh:
    json.dump(dict(environment=env, dtype=dtype.name, rows=rows), fh, indent=1)
  with open(os.path.splitext(out)[0] + ".md", "w") as fh:
    fh.write(table(rows) + "\n")
  print(table(rows))
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)
