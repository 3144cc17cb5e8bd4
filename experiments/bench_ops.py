"""Benchmark the gated-delta-rule implementations on the current backend.

Times the forward and forward+backward of each `impl` of `gdn_jax.ops.gated_delta_rule`
(jit-compiled; compile excluded; median of repeats, each synchronised with block_until_ready)
and writes JSON (device, versions, date, shapes, times, ratios) + a PNG bar chart.

  python experiments/bench_ops.py --preset=cpu     # B=2, T=2048, H=4, K=V=64, float32
  python experiments/bench_ops.py --preset=gpu     # B=8, T=2048, H=16, K=V=128, bfloat16
"""
import datetime
import json
import os
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.ops import gated_delta_rule

PRESETS = {
    "cpu": dict(batch=2, seq_len=2048, heads=4, head_k_dim=64, head_v_dim=64, dtype="float32",
                impls="recurrent,chunked", chunk_sizes="32,64"),
    "gpu": dict(batch=8, seq_len=2048, heads=16, head_k_dim=128, head_v_dim=128, dtype="bfloat16",
                impls="recurrent,chunked,pallas", chunk_sizes="64"),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Shape/impl preset; flags override it.")
_BATCH = flags.DEFINE_integer("batch", None, "B.")
_SEQ = flags.DEFINE_integer("seq_len", None, "T.")
_HEADS = flags.DEFINE_integer("heads", None, "H (= Hk).")
_KDIM = flags.DEFINE_integer("head_k_dim", None, "K.")
_VDIM = flags.DEFINE_integer("head_v_dim", None, "V.")
_DTYPE = flags.DEFINE_string("dtype", None, "Input dtype of q, k, v.")
_IMPLS = flags.DEFINE_string("impls", None, "Comma-separated impls to time.")
_CHUNKS = flags.DEFINE_string("chunk_sizes", None, "Comma-separated chunk sizes (chunked/pallas).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats (median reported).")
_OUT = flags.DEFINE_string("out", None, "Output JSON path (PNG beside it). "
                           "Default: experiments/results/bench_ops_<backend>.json")


def make_inputs(B, T, H, K, V, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H))) * 0.5     # typical GDN decays
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  return q, k, v, g, beta


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))                # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_impl(impl, chunk_size, inputs, repeats):
  def forward(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, impl=impl,
                            chunk_size=chunk_size)[0]

  def loss(q, k, v, g, beta):
    return jnp.sum(forward(q, k, v, g, beta).astype(jnp.float32) ** 2)

  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
  return median_seconds(fwd, inputs, repeats), median_seconds(fwd_bwd, inputs, repeats)


def environment():
  dev = jax.devices()[0]
  import flax, optax  # pylint: disable=import-outside-toplevel
  return dict(backend=jax.default_backend(), device_kind=dev.device_kind,
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              platform=platform.platform(), python=platform.python_version(),
              jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__")
              else None, flax=flax.__version__, optax=optax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def plot(results, path, title):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = [r["name"] for r in results]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.5))
  ax.bar(x - 0.2, [1e3 * r["forward_s"] for r in results], 0.4, label="forward")
  ax.bar(x + 0.2, [1e3 * r["forward_backward_s"] for r in results], 0.4, label="forward+backward")
  ax.set_xticks(x, labels)
  ax.set_ylabel("ms (median)")
  ax.set_yscale("log")
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  cfg = dict(PRESETS[_PRESET.value])
  for key, flag in (("batch", _BATCH), ("seq_len", _SEQ), ("heads", _HEADS),
                    ("head_k_dim", _KDIM), ("head_v_dim", _VDIM), ("dtype", _DTYPE),
                    ("impls", _IMPLS), ("chunk_sizes", _CHUNKS)):
    if flag.value is not None:
      cfg[key] = flag.value
  B, T, H, K, V = (cfg[k] for k in ("batch", "seq_len", "heads", "head_k_dim", "head_v_dim"))
  inputs = make_inputs(B, T, H, K, V, jnp.dtype(cfg["dtype"]))
  results = []
  for impl in cfg["impls"].split(","):
    chunk_sizes = [64] if impl == "recurrent" else [int(c) for c in cfg["chunk_sizes"].split(",")]
    for chunk_size in chunk_sizes:
      name = impl if impl == "recurrent" else f"{impl}-C{chunk_size}"
      try:
        fwd, fwd_bwd = time_impl(impl, chunk_size, inputs, _REPEATS.value)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        continue
      results.append(dict(name=name, impl=impl, chunk_size=chunk_size, forward_s=fwd,
                          forward_backward_s=fwd_bwd))
      print(f"{name:>14}: forward {1e3 * fwd:9.2f} ms   forward+backward {1e3 * fwd_bwd:9.2f} ms",
            flush=True)
  base = next((r for r in results if r["impl"] == "recurrent"), None)
  if base:
    for r in results:
      r["speedup_vs_recurrent"] = dict(forward=base["forward_s"] / r["forward_s"],
                                       forward_backward=base["forward_backward_s"]
                                       / r["forward_backward_s"])
  env = environment()
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                   f"bench_ops_{env['backend']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = dict(environment=env, shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=cfg["dtype"]),
                method="jit, compile excluded, median of %d repeats after 2 warm-up calls; "
                "use_qk_l2norm=True; fwd+bwd = value_and_grad of sum(o^2) w.r.t. q,k,v,g,beta"
                % _REPEATS.value, results=results)
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  plot(results, out.replace(".json", ".png"),
       f"gated_delta_rule on {env['device_kind']} — B{B} T{T} H{H} K{K} V{V} {cfg['dtype']}")
  print(f"wrote {out}")
  for r in results:
    if "speedup_vs_recurrent" in r:
      s = r["speedup_vs_recurrent"]
      print(f"{r['name']:>14}: {s['forward']:.2f}x forward, {s['forward_backward']:.2f}x "
            "forward+backward vs recurrent")


if __name__ == "__main__":
  app.run(main)
