"""Where μP SGD's stability edge sits in GDN: the loss Hessian restricted to one layer's W_q, W_k
against width, split into its Gauss-Newton part and the rest, and localised on heads or not.

Per width (scheme A: heads ∝ width at a fixed head dim) and seed, trains μP SGD with the
lr_transfer recipe (momentum 0.9, global-norm clipping at 1, output_norm_eps 1e-3, warm-up then
cosine) for --steps steps at --log2_lr, then, on a held-out probe batch, runs Lanczos
(`gdn_jax.curvature.qk_layer_curvature`) on

  H   the Hessian of the loss with respect to (W_q, W_k) of one layer, the other weights fixed;
  G   its Gauss-Newton part Jᵀ H_ℓ J (H − G is the network's own curvature, weighted by p − y).

For W_q, W_k the μP SGD LR multiplier is 1 at every width (hidden class), so the base LR times
λ_max(H) is the quantity SGD's stability edge compares with 2 (1 + momentum). Tensor-Programs
bookkeeping keeps G's typical scale width-independent; "super consistency" (Noci et al. 2024,
arXiv 2402.17457) reports λ_max(H) itself width-independent under μP in MLPs, ResNets, ViTs and
Transformers. Per layer the JSON records λ_max and λ_min of H, λ_max of G, and where H's top
eigenvector sits: its share on the largest head and that head's ranks by decay rate and by
gradient norm (`qk_layer_curvature`'s docstring).

  python experiments/qk_curvature.py          # widths 64 → 512, 3 seeds, ~21 min on 2 CPU cores
  python experiments/qk_curvature.py --per_head --widths=64,256 --lanczos_steps=20 \
      --out=experiments/results/qk_curvature_heads_cpu     # + each head's own λ_max

Writes experiments/results/qk_curvature_cpu.{json,png}. Uses the recurrent rule: forward-mode
autodiff (the Hessian-vector product) cannot pass the chunked rule's custom VJP.
"""
from __future__ import annotations

import datetime
import json
import os
import time

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdn_jax import curvature, mup
from gdn_jax import model as model_lib
from gdn_jax import train as train_lib
from gdn_jax.data import pipeline, prepare

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_WIDTHS = flags.DEFINE_string("widths", "64,128,256,512", "Comma-separated d_model values.")
_BASE = flags.DEFINE_integer("base_width", 64, "Base width of the μP model.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 16, "Fixed head dim (heads = width / head_dim).")
_LAYERS = flags.DEFINE_integer("layers", 3, "Blocks.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step (the probe batch has twice this).")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 150, "SGD steps before the curvature is measured.")
_LOG2_LR = flags.DEFINE_float("log2_lr", -1.0, "log2 of the base SGD LR (the transferred optimum "
                              "of the H100 sweeps).")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (init and batches).")
_LANCZOS = flags.DEFINE_integer("lanczos_steps", 30, "Lanczos steps per operator.")
_OUT = flags.DEFINE_string("out", os.path.join(RESULTS, "qk_curvature_cpu"),
                           "Output path without extension.")
_QK_RULE = flags.DEFINE_bool("sgd_qk_heads_rule", False, "Train with the μP SGD table's W_q, W_k "
                             "heads rule. Off by default: the study measures the curvature that "
                             "motivates the rule, under the table without it (its committed "
                             "results).")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only redraw <out>.png from <out>.json.")
_PER_HEAD = flags.DEFINE_bool("per_head", False, "Also λ_max of each q/k head's own block "
                              "(`curvature.qk_head_curvatures`; the extreme-value test of "
                              "docs/mup.md): per layer, a list `head_h_max`.")


def model_config(width: int) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(
      vocab_size=256, d_model=width, num_layers=_LAYERS.value, num_heads=width // _HEAD_DIM.value,
      head_k_dim=_HEAD_DIM.value, head_v_dim=_HEAD_DIM.value, mlp_hidden=4 * width,
      chunk_size=16, rule_impl="recurrent", dtype="float32", output_norm_eps=1e-3)


def train(config, base, batches, seed: int):
  """μP SGD as in experiments/lr_transfer.py's SGD sweeps, through the trainer's step and LR
  schedule (gdn_jax.train): returns (graphdef, params, rest) split for gdn_jax.curvature."""
  model = mup.build_model(config, parametrization="mup", base_config=base, optimizer="sgd",
                          rngs=nnx.Rngs(seed))
  steps = _STEPS.value
  factor = lambda count: train_lib.lr_factor(count, num_steps=steps, warmup_steps=steps // 10,
                                             final_fraction=0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   mup.make_optimizer(model, parametrization="mup", optimizer="sgd",
                                      learning_rate=factor, base_config=base, momentum=0.9,
                                      sgd_qk_heads_rule=_QK_RULE.value))
  graphdef, params = nnx.split(model)
  step = jax.jit(train_lib.make_train_step(graphdef, tx))
  opt_state = tx.init(params)
  for t in range(steps):
    params, opt_state, _ = step(params, opt_state, jnp.asarray(batches(t)), 2.0 ** _LOG2_LR.value)
  return nnx.split(nnx.merge(graphdef, params), nnx.Param, ...)


def window_sampler(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
  """step → [batch_size, seq_len + 1] windows at random offsets (deterministic in (seed, step))."""
  def batch(step: int) -> np.ndarray:
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return batch


def plot(record: dict, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  runs = record["runs"]
  layers = sorted({int(k) for r in runs for k in r["layers"]})
  fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
  edge = 2 * (1 + 0.9) / 2.0 ** record["settings"]["log2_lr"]
  for ax, layer in zip(axes.flat, layers):
    for key, marker, label in (("h_max", "o", "λ_max(H)"), ("g_max", "x", "λ_max(G), Gauss-Newton")):
      xs = [np.log2(r["width"]) for r in runs]
      ys = [max(r["layers"][str(layer)][key], 1e-3) for r in runs]
      ax.scatter(xs, ys, marker=marker, label=label, alpha=0.8)
      widths = sorted({r["width"] for r in runs})
      med = [np.median([r["layers"][str(layer)][key] for r in runs if r["width"] == w])
             for w in widths]
      ax.plot(np.log2(widths), np.maximum(med, 1e-3), lw=1, alpha=0.6)
    ax.axhline(edge, color="k", ls=":", lw=1, label=f"2(1+μ)/lr = {edge:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("log2 width (heads = width / %d)" % record["settings"]["head_dim"])
    ax.set_title(f"layer {layer}: W_q, W_k block", fontsize=9)
  axes[0][0].set_ylabel("top eigenvalue (dots: seeds, lines: median)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"μP SGD after {record['settings']['steps']} steps at log2 LR "
               f"{record['settings']['log2_lr']:g}: curvature of the loss in W_q, W_k", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def finish(record: dict, out: str):
  """A study's end: with per-head data, its `head_summary` added (printed, <out>.json rewritten);
  then the figure <out>.png."""
  if any("head_h_max" in rec for r in record["runs"] for rec in r["layers"].values()):
    record["head_summary"] = curvature.head_summary(record["runs"])
    print(json.dumps(record["head_summary"], indent=1))
    with open(out + ".json", "w") as f:
      json.dump(record, f, indent=1)
  plot(record, out + ".png")


def main(argv):
  del argv
  out = _OUT.value
  if _PLOT_ONLY.value:       # also (re)writes the per-head summary of a --per_head study
    with open(out + ".json") as f:
      finish(json.load(f), out)
    return
  train_tokens = pipeline.load_tokens(prepare.embedded_corpus()["train"])
  base = model_config(_BASE.value)
  settings = dict(widths=_WIDTHS.value, base_width=_BASE.value, head_dim=_HEAD_DIM.value,
                  layers=_LAYERS.value, batch=_BATCH.value, seq_len=_SEQ.value,
                  steps=_STEPS.value, log2_lr=_LOG2_LR.value, lanczos_steps=_LANCZOS.value,
                  momentum=0.9, grad_clip=1.0, output_norm_eps=1e-3)
  env = dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
             jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  runs = []
  for seed in [int(s) for s in _SEEDS.value.split(",")]:
    batches = window_sampler(train_tokens, _BATCH.value, _SEQ.value, seed)
    probe = jnp.asarray(np.concatenate([batches(10_000_000 + i) for i in range(2)]))
    for width in [int(w) for w in _WIDTHS.value.split(",")]:
      start = time.time()
      config = model_config(width)
      graphdef, params, rest = train(config, base, batches, seed)
      layers = {str(layer): curvature.qk_layer_curvature(
                    graphdef, params, rest, layer=layer, tokens=probe, head_k_dim=_HEAD_DIM.value,
                    lanczos_steps=_LANCZOS.value, seed=layer)
                for layer in range(_LAYERS.value)}
      if _PER_HEAD.value:
        for layer, rec in layers.items():
          rec["head_h_max"] = curvature.qk_head_curvatures(
              graphdef, params, rest, layer=int(layer), tokens=probe,
              head_k_dim=_HEAD_DIM.value, lanczos_steps=_LANCZOS.value, seed=int(layer)).tolist()
      runs.append(dict(width=width, heads=config.num_heads, seed=seed, layers=layers,
                       seconds=time.time() - start))
      print(f"width {width:4d} seed {seed}: " + "; ".join(
          f"L{k} H {v['h_min']:+.2f}…{v['h_max']:+.2f} G {v['g_max']:.2f} "
          f"head share {v['top_head_share']:.2f}" for k, v in layers.items()), flush=True)
      with open(out + ".json", "w") as f:     # rewritten after every run: a cut-off study keeps
        json.dump(dict(settings=settings, env=env, runs=runs), f, indent=1)   # what it measured
  finish(dict(settings=settings, env=env, runs=runs), out)


if __name__ == "__main__":
  app.run(main)
