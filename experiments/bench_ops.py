"""Benchmark the gated-delta-rule implementations on the current backend.

Times the forward and forward+backward of each `impl` of `gdn_jax.ops.gated_delta_rule`
(jit-compiled; compile excluded; every impl timed once per round, round-robin, each call
synchronised with block_until_ready; medians over the rounds)
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


def make_fns(impl, chunk_size):
  """(forward, forward+backward), both jit-compiled."""
  def forward(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, impl=impl,
                            chunk_size=chunk_size)[0]

  def loss(q, k, v, g, beta):
    return jnp.sum(forward(q, k, v, g, beta).astype(jnp.float32) ** 2)

  return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def interleaved_seconds(fns: dict, args, repeats: int) -> dict:
  """{name: [seconds per repeat]}, timing every fn once per round, round-robin.

  Each fn is compiled and called twice first (warm-up). Interleaving makes a slow spell of a
  shared machine hit every implementation alike, so per-round ratios are fair. Within a round,
  each timed call follows an untimed call of the same fn: a steady-state time, as for back-to-back
  repeats (a call right after another fn's large frees measured up to 1.5× slower on CPU).
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


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
  fns, configs = {}, []
  for impl in cfg["impls"].split(","):
    chunk_sizes = [64] if impl == "recurrent" else [int(c) for c in cfg["chunk_sizes"].split(",")]
    for chunk_size in chunk_sizes:
      name = impl if impl == "recurrent" else f"{impl}-C{chunk_size}"
      fwd, fwd_bwd = make_fns(impl, chunk_size)
      try:
        for fn in (fwd, fwd_bwd):
          jax.block_until_ready(fn(*inputs))
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        continue
      fns[(name, "forward")], fns[(name, "forward_backward")] = fwd, fwd_bwd
      configs.append((name, impl, chunk_size))
  times = interleaved_seconds(fns, inputs, _REPEATS.value)
  results = []
  for name, impl, chunk_size in configs:
    fwd, fwd_bwd = (float(np.median(times[(name, p)])) for p in ("forward", "forward_backward"))
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
      # the same ratio per round (both timed back to back), then the median over rounds
      r["speedup_vs_recurrent_per_round_median"] = {
          p: float(np.median(np.asarray(times[(base["name"], p)])
                             / np.asarray(times[(r["name"], p)])))
          for p in ("forward", "forward_backward")}
  env = environment()
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                   f"bench_ops_{env['backend']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = dict(environment=env, shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=cfg["dtype"]),
                method="jit, compile excluded, 2 warm-up calls, then %d rounds timing every "
                "impl once per round (interleaved; each timed call right after an untimed one); "
                "medians over rounds; use_qk_l2norm=True; "
                "fwd+bwd = value_and_grad of sum(o^2) w.r.t. q,k,v,g,beta" % _REPEATS.value,
                results=results)
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
