"""Coordinate check of the GDN μP: activation sizes vs width, SP vs μP × AdamW / SGD.

For every width scheme, parametrization and optimizer, trains each width for a few steps with a
large LR on one fixed batch (`gdn_jax.coord_check`) and writes

  <out>.json   sizes, changes from init and fitted log2–log2 slopes per activation and step,
               plus a summary (max |slope| of μP at steps ≥ 1, max slope of SP);
  <out>.png    one row per (scheme, parametrization, optimizer), one panel per activation of the
               last block: log2 mean|x| against log2 width, one line per step.

  python experiments/coord_check.py --preset=cpu     # widths 64…1024, ~20 min on 2 CPU cores
  python experiments/coord_check.py --preset=gpu --schemes=heads --out=experiments/results/coord_check_gpu_heads
  python experiments/coord_check.py --preset=paper --schemes=paper \
      --parametrizations=paper,paper+mixer_out,paper_sp,mup,sp      # ~25 min on 2 CPU cores
  python experiments/coord_check.py --preset=paper --schemes=paper --parametrizations=mup+sp_tied \
      --out=experiments/results/coord_check_paper_sp_tied_cpu       # the default μP, ~5 min
  python experiments/coord_check.py --preset=hybrid_cpu   # GDN + attention ("GAS"), 64…512
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time

from absl import app, flags
import jax
import numpy as np

from gdn_jax import coord_check as cc_lib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PRESETS = {
    "cpu": dict(widths="64,128,256,512,1024", base_width=64, head_dim=8, num_heads=4, layers=2,
                batch=4, seq_len=64, steps=5, seeds="0,1,2,3", chunk_size=16, rule_impl="auto",
                out=os.path.join(RESULTS, "coord_check_cpu")),
    "gpu": dict(widths="256,512,1024,2048,4096", base_width=256, head_dim=32, num_heads=4,
                layers=2, batch=8, seq_len=128, steps=5, seeds="0,1,2", chunk_size=64,
                rule_impl="chunked", out=os.path.join(RESULTS, "coord_check_gpu")),
    # The paper's family (6 heads, head dims ∝ d) and recipe against ours, 8× on 2 CPU cores.
    "paper": dict(widths="64,128,256,512", base_width=64, head_dim=8, num_heads=6, layers=2,
                  batch=4, seq_len=64, steps=5, seeds="0,1,2,3", chunk_size=16,
                  rule_impl="auto", out=os.path.join(RESULTS, "coord_check_paper_cpu")),
    # Hybrid GDN + attention (a GDN block, a gated full-attention block, a sliding-window block),
    # both width schemes (head_dim: the attention logit scale H_base^½/H is exercised), 8×.
    "hybrid_cpu": dict(widths="64,128,256,512", base_width=64, head_dim=8, num_heads=4,
                       layers=3, batch=4, seq_len=64, steps=5, seeds="0,1,2", chunk_size=16,
                       rule_impl="auto", layer_pattern="GAS", attn_window=16,
                       out=os.path.join(RESULTS, "coord_check_hybrid_cpu")),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset (flags override it).")
_WIDTHS = flags.DEFINE_string("widths", None, "Comma-separated d_model values.")
_BASE = flags.DEFINE_integer("base_width", None, "Base width (μP == SP there).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", None, "Scheme 'heads': fixed head dim.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Scheme 'head_dim': fixed head count.")
_LAYERS = flags.DEFINE_integer("layers", None, "Blocks.")
_BATCH = flags.DEFINE_integer("batch", None, "Sequences in the fixed batch.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (sizes recorded at 0..steps).")
_SEEDS = flags.DEFINE_string("seeds", None, "Comma-separated seeds (sizes are seed-averaged).")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Chunk size of the rule.")
_IMPL = flags.DEFINE_string("rule_impl", None, "gated_delta_rule impl.")
_SCHEMES = flags.DEFINE_string("schemes", "heads,head_dim", "Comma-separated width schemes.")
_PARAMS = flags.DEFINE_string("parametrizations", "sp,mup", "Comma-separated: sp, mup, paper, "
                              "paper_sp, mup_head_sp, mup_head_init; a '+mixer_out' suffix adds "
                              "the mixer-output multiplier d0/d (the paper's gdn-mup.py variant), e.g. paper+mixer_out; "
                              "'+sp_tied' trains a tied embedding as SP does (mup+sp_tied).")
_OPTS = flags.DEFINE_string("optimizers", "adamw,sgd", "Comma-separated.")
_ADAM_LR = flags.DEFINE_float("adamw_lr", 1e-2, "AdamW base LR (large on purpose).")
_SGD_LR = flags.DEFINE_float("sgd_lr", 0.5, "SGD base LR (large on purpose).")
_VOCAB = flags.DEFINE_integer("vocab_size", 16, "Vocabulary of the Markov batch and the model.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension.")
_LR_OVERRIDES = flags.DEFINE_list("lr_override", [], "Ablation: NAME[:out]:POWER LR scalings "
                                   "(mup.parse_lr_overrides), applied to every row.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only redraw <out>.png from <out>.json.")
_PATTERN = flags.DEFINE_string("layer_pattern", None, "Hybrid models: ModelConfig.layer_pattern, "
                               "e.g. GAS ('' = all GDN).")
_WINDOW = flags.DEFINE_integer("attn_window", None, "Hybrid models: the window of 'S' blocks.")

PANELS = ("mixer_in", "q", "k", "v", "beta", "g", "S", "o", "mixer_out", "mlp_out", "block_out",
          "logits")
# Hybrid models: the last GDN block's, then the last attention block's, then the output.
HYBRID_PANELS = (("G", ("q", "k", "v", "S", "o", "mixer_out")),
                 ("A", ("q", "k", "v", "attn_logits", "o", "mixer_out")),
                 ("", ("block_out", "logits")))


def _setting(name):
  value = globals()["_" + {"base_width": "BASE", "head_dim": "HEAD_DIM", "num_heads": "NUM_HEADS",
                           "layers": "LAYERS", "batch": "BATCH", "seq_len": "SEQ",
                           "steps": "STEPS", "seeds": "SEEDS", "chunk_size": "CHUNK",
                           "rule_impl": "IMPL", "widths": "WIDTHS", "out": "OUT",
                           "layer_pattern": "PATTERN", "attn_window": "WINDOW"}[name]].value
  defaults = {"layer_pattern": "", "attn_window": 16}
  return PRESETS[_PRESET.value].get(name, defaults.get(name)) if value is None else value


def panel_names(last_layer: int, layer_pattern: str = "") -> list[tuple[str, str]]:
  """(activation name, panel title) of every panel of a row."""
  if not layer_pattern:
    return [(p if p == "logits" else f"L{last_layer}.{p}", p) for p in PANELS]
  kinds = (layer_pattern * (last_layer + 1))[:last_layer + 1]
  out = []
  for kind, panels in HYBRID_PANELS:
    if kind:
      layer = max(i for i, k in enumerate(kinds) if (k == "G") == (kind == "G"))
    for p in panels:
      name = p if p == "logits" else f"L{layer if kind else last_layer}.{p}"
      out.append((name, f"{kind}:{p}" if kind else p))
  return out


def summarize(result: dict, parametrization: str) -> dict:
  """μP: the largest |slope| at steps ≥ 1 (and ≥ 2); SP: the largest slope at steps ≥ 1."""
  name = parametrization.split("+")[0]
  if name in ("mup", "paper") or name.startswith("mup_"):   # μP and its read-out ablations
    s1, w1 = cc_lib.max_abs_slope(result, first_step=1)
    s2, w2 = cc_lib.max_abs_slope(result, first_step=2)
    d1, dw1 = cc_lib.max_abs_slope(result, kind="delta", first_step=1)
    return {"max_abs_slope_t>=1": s1, "at": w1, "max_abs_slope_t>=2": s2, "at_t>=2": w2,
            "max_abs_delta_slope_t>=1": d1, "delta_at": dw1,
            "final_loss_per_width": [per_step[-1] for per_step in result["loss"]]}
  best, where = -np.inf, ""
  for name, per_step in result["slopes"]["size"].items():
    for t, s in enumerate(per_step[1:], start=1):
      if s > best:
        best, where = s, f"{name}@t={t}"
  return {"max_slope_t>=1": best, "at": where}


def plot(results: dict, path: str, last_layer: int, layer_pattern: str = ""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(results)
  panels = panel_names(last_layer, layer_pattern)
  fig, axes = plt.subplots(len(rows), len(panels), figsize=(2.1 * len(panels), 2.0 * len(rows)),
                           squeeze=False)
  for r, key in enumerate(rows):
    res = results[key]
    widths = np.log2(res["widths"])
    for c, (name, panel) in enumerate(panels):
      ax = axes[r][c]
      sizes = np.asarray(res["size"][name])            # [width, step]
      steps = sizes.shape[1]
      shown = range(steps) if steps <= 11 else np.unique(np.linspace(0, steps - 1, 9).astype(int))
      for t in shown:
        ax.plot(widths, np.log2(sizes[:, t]), marker="o", ms=2, lw=1,
                color=plt.cm.viridis(t / max(steps - 1, 1)), label=f"t={t}")
      lo, hi = np.log2(sizes).min(), np.log2(sizes).max()
      mid, half = (lo + hi) / 2, max((hi - lo) / 2 * 1.1, 1.0)
      ax.set_ylim(mid - half, mid + half)  # ≥ 2 octaves: flat lines must look flat
      slope = res["slopes"]["size"][name][-1]
      ax.set_title(f"{panel}  slope@t={steps - 1}: {slope:+.2f}", fontsize=7)
      ax.tick_params(labelsize=6)
      if c == 0:
        ax.set_ylabel(key.replace("/", "\n"), fontsize=7)
      if r == len(rows) - 1:
        ax.set_xlabel("log2 width", fontsize=7)
  axes[0][0].legend(fontsize=5, loc="best")
  fig.suptitle(f"GDN{' + attention (' + layer_pattern + ')' if layer_pattern else ''} coordinate "
               "check: log2 mean|x| (S: √K·RMS) vs log2 width, one line per step", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv):
  del argv
  if _PLOT_ONLY.value:
    with open(_setting("out") + ".json") as f:
      record = json.load(f)
    first = next(iter(record["configs"].values()))
    plot(record["results"], _setting("out") + ".png", last_layer=first["num_layers"] - 1,
         layer_pattern=first.get("layer_pattern", ""))
    return
  widths = [int(w) for w in _setting("widths").split(",")]
  seeds = [int(s) for s in _setting("seeds").split(",")]
  out = _setting("out")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  results, summary, configs = {}, {}, {}
  start = time.time()
  for scheme in _SCHEMES.value.split(","):
    cc = cc_lib.CoordCheckConfig(
        scheme=scheme, base_width=_setting("base_width"), head_dim=_setting("head_dim"),
        num_heads=_setting("num_heads"), num_layers=_setting("layers"), batch=_setting("batch"),
        seq_len=_setting("seq_len"), steps=_setting("steps"), chunk_size=_setting("chunk_size"),
        rule_impl=_setting("rule_impl"), vocab_size=_VOCAB.value,
        layer_pattern=_setting("layer_pattern"), attn_window=_setting("attn_window"),
        lr_overrides=tuple(_LR_OVERRIDES.value))
    configs[scheme] = dataclasses.asdict(cc)
    for parametrization in _PARAMS.value.split(","):
      name, _, variant = parametrization.partition("+")
      cc_row = dataclasses.replace(cc, mixer_output_multiplier=variant == "mixer_out",
                                   sp_tied_embedding=variant == "sp_tied")
      for optimizer in _OPTS.value.split(","):
        lr = _ADAM_LR.value if optimizer == "adamw" else _SGD_LR.value
        t0 = time.time()
        res = cc_lib.coord_check(widths, cc_row, parametrization=name,
                                 optimizer=optimizer, learning_rate=lr, seeds=seeds)
        key = f"{scheme}/{parametrization}/{optimizer}"
        res["learning_rate"] = lr
        res["seconds"] = time.time() - t0
        results[key] = res
        summary[key] = summarize(res, parametrization)
        print(f"{key}: {summary[key]}  ({res['seconds']:.0f} s)", flush=True)
  record = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": str(jax.devices()[0]), "widths": widths, "seeds": seeds, "configs": configs,
      "seconds": time.time() - start, "summary": summary, "results": results,
  }
  with open(out + ".json", "w") as f:
    json.dump(record, f, indent=1)
  plot(results, out + ".png", last_layer=_setting("layers") - 1,
       layer_pattern=_setting("layer_pattern"))
  print(f"wrote {out}.json and {out}.png in {record['seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main)
