"""Learning-rate transfer across widths: μP vs SP, AdamW and SGD (the paper's main result).

Sweeps width × log2-spaced learning rate × parametrization × optimizer × seed at a fixed token
budget. All learning rates of one (scheme, parametrization, optimizer, width, seed) train together
in one vmapped program (`gdn_jax.sweep`). Each finished LR appends one JSON line to
`<results>/lr_transfer_<preset>.jsonl`; a rerun skips what is there (the sweep resumes).
`--analyze_only` turns the JSONL into the figure and the summary JSON:

  * optimum per width: quadratic fit of final validation loss vs log2 LR around the best point;
  * drift: max − min of the optimal log2 LR across widths (the transfer criterion: ≤ 0.5);
  * wider-is-better: at the base width's optimal LR, does the loss fall with width?
  * regret: at each width, the loss at the base width's optimal LR minus that width's best loss
    (what transferring the LR costs; near 0 when the basin is flat, even if the optimum drifts);
  * per seed: each seed's own optima and drift (the curves above are averaged over seeds);
  * divergence: NaN or loss above the uniform-prediction loss ln(256) counts as diverged.

  python experiments/lr_transfer.py --preset=cpu           # ≤ 10 min on 2 CPU cores
  python experiments/lr_transfer.py --preset=gpu --data=...  # device tool; resumable

Variants (each keyed and plotted separately, e.g. "heads/mup/sgd[o_eps=0.001]"):
  --output_norm_eps=1e-3     the mixer output norm's eps (SGD needs it; docs/mup.md, item 9)
  --qk_norm_eps=1            the q/k L2 norm's eps: caps that norm's gain 1/|k| (docs/mup.md)
  --lr_override=g_proj:-0.5  rule ablation: LR × m_in^-0.5 for parameters whose path has g_proj
                             (identity at the base width: the analysis uses the base-width runs
                             of the same variant without overrides, and the sweep skips them)
"""
from __future__ import annotations

import datetime
import json
import math
import os
import textwrap
import time

from absl import app, flags
import jax
import numpy as np

from gdn_jax import model as model_lib
from gdn_jax import mup
from gdn_jax import sweep
from gdn_jax.data import pipeline, prepare

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PRESETS = {
    # 2 CPU cores, ≤ 10 minutes: widths 16 → 128 (8x), 7 learning rates, 1 seed.
    "cpu": dict(widths="16,32,64,128", base_width=16, head_dim=16,
                log2_lrs="-10,-9,-8,-7,-6,-5,-4", sgd_log2_lrs="-5,-4,-3,-2,-1,0,1",
                steps=100, batch=8, seq_len=64, layers=2, seeds="0", warmup=10, dtype="float32"),
    # One H100: widths 128 → 2048 (16x), ≥ 1000 steps, 2 seeds, bf16 compute.
    "gpu": dict(widths="128,256,512,1024,2048", base_width=128, head_dim=32,
                log2_lrs="-12,-11,-10,-9,-8,-7,-6,-5", sgd_log2_lrs="-6,-5,-4,-3,-2,-1,0,1",
                steps=1000, batch=32, seq_len=256, layers=4, seeds="0,1", warmup=100,
                dtype="bfloat16"),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Sweep preset.")
_WIDTHS = flags.DEFINE_string("widths", None, "Comma-separated d_model values.")
_LRS = flags.DEFINE_string("log2_lrs", None, "Comma-separated log2 learning rates (AdamW).")
_SGD_LRS = flags.DEFINE_string("sgd_log2_lrs", None, "Comma-separated log2 learning rates (SGD).")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps per run.")
_SEEDS = flags.DEFINE_string("seeds", None, "Comma-separated seeds.")
_PARAMS = flags.DEFINE_string("parametrizations", "sp,mup", "Comma-separated.")
_OPTS = flags.DEFINE_string("optimizers", "adamw,sgd", "Comma-separated.")
_SCHEME = flags.DEFINE_enum("scheme", "heads", ["heads", "dims"],
                            "Width scheme: more heads at fixed head dims, or larger head dims.")
_DATA = flags.DEFINE_string("data", None, "Folder with train.npy/val.npy from "
                            "`python -m gdn_jax.data.prepare`; default: the embedded corpus.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None, "Stop starting new runs after this long.")
_ANALYZE = flags.DEFINE_bool("analyze_only", False, "Only analyse the JSONL and plot.")
_SEQUENTIAL_CHECK = flags.DEFINE_bool("measure_vmap_speedup", True,
                                      "Time one width sequentially vs vmapped (once per file).")
_TAG = flags.DEFINE_string("tag", None, "Results file tag (default: the preset).")
_RULE_IMPL = flags.DEFINE_string("rule_impl", "chunked", "gated_delta_rule impl of the models.")
_MAX_LRS = flags.DEFINE_integer("max_lrs_per_program", None, "With vectorize: vmap at most this "
                                "many LRs at once (memory grows with it; default: all).")
_LR_OVERRIDES = flags.DEFINE_list("lr_override", [], "Rule ablations: NAME:POWER multiplies the "
                                   "LR of parameters whose path contains NAME by m_in^POWER "
                                   "(e.g. g_proj:-0.5); NAME:out:POWER by m_out^POWER (e.g. "
                                   "conv:out:-0.5). Runs are keyed and plotted by this variant.")
_OUT_EPS = flags.DEFINE_float("output_norm_eps", None, "eps of the mixer's output norm (default: "
                               "norm_eps, 1e-5). Runs are keyed and plotted by this variant.")
_QK_EPS = flags.DEFINE_float("qk_norm_eps", None, "eps of the q/k L2 norm (default: fla's 1e-6; "
                              "docs/mup.md). Runs are keyed and plotted by this variant.")
_CLIP = flags.DEFINE_float("grad_clip", None, "Global-norm gradient clipping threshold (default: "
                            "off). Runs are keyed and plotted by this variant.")
_VECTORIZE = flags.DEFINE_bool("vectorize", None, "Train the LRs of a width in one vmapped "
                               "program (default: on accelerators; on CPU it does not pay).")


def settings():
  cfg = dict(PRESETS[_PRESET.value])
  for key, flag in (("widths", _WIDTHS), ("log2_lrs", _LRS), ("sgd_log2_lrs", _SGD_LRS),
                    ("steps", _STEPS), ("seeds", _SEEDS)):
    if flag.value is not None:
      cfg[key] = flag.value
  cfg["widths"] = [int(w) for w in str(cfg["widths"]).split(",")]
  cfg["seeds"] = [int(s) for s in str(cfg["seeds"]).split(",")]
  cfg["log2_lrs"] = [float(x) for x in str(cfg["log2_lrs"]).split(",")]
  cfg["sgd_log2_lrs"] = [float(x) for x in str(cfg["sgd_log2_lrs"]).split(",")]
  return cfg


def model_config(width: int, cfg, scheme: str):
  """Width scheme 'heads': heads ∝ width at a fixed head dim (K = V); 'dims': 4 heads, head dim
  ∝ width. The MLP is 4x wide."""
  if scheme == "heads":
    num_heads, head_dim = max(width // cfg["head_dim"], 1), cfg["head_dim"]
  else:
    num_heads, head_dim = 4, max(width // 4, 8)
  return model_lib.ModelConfig(
      vocab_size=256, d_model=width, num_layers=cfg["layers"], num_heads=num_heads,
      head_k_dim=head_dim, head_v_dim=head_dim, mlp_hidden=4 * width, chunk_size=64,
      rule_impl=_RULE_IMPL.value, dtype=cfg["dtype"], output_norm_eps=_OUT_EPS.value,
      **({} if _QK_EPS.value is None else dict(qk_norm_eps=_QK_EPS.value)))


def load_splits(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) byte tokens: a `gdn_jax.data.prepare` output folder, or the embedded corpus."""
  if data_dir is None:
    paths = prepare.embedded_corpus()
  else:
    paths = {split: os.path.join(data_dir, f"{split}.npy") for split in ("train", "val")}
  return pipeline.load_tokens(paths["train"]), pipeline.load_tokens(paths["val"])


def results_path():
  return os.path.join(RESULTS, f"lr_transfer_{_TAG.value or _PRESET.value}.jsonl")


def done_keys(path):
  keys = set()
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r.get("kind") == "run":
          keys.add((r["scheme"], r["parametrization"], r["optimizer"], r["width"], r["seed"],
                    r.get("variant", "")))
  return keys


def run_sweep(cfg):
  train_tokens, val_tokens = load_splits(_DATA.value)
  path = results_path()
  os.makedirs(RESULTS, exist_ok=True)
  done = done_keys(path)
  vectorize = (_VECTORIZE.value if _VECTORIZE.value is not None
               else jax.default_backend() != "cpu")
  start = time.time()
  base = model_config(cfg["base_width"], cfg, _SCHEME.value)
  env = dict(device_kind=jax.devices()[0].device_kind, backend=jax.default_backend(),
             jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  lr_overrides = mup.parse_lr_overrides(_LR_OVERRIDES.value)
  variant = ",".join(_LR_OVERRIDES.value
                     + ([f"o_eps={_OUT_EPS.value:g}"] if _OUT_EPS.value is not None else [])
                     + ([f"qk_eps={_QK_EPS.value:g}"] if _QK_EPS.value is not None else [])
                     + ([f"clip={_CLIP.value:g}"] if _CLIP.value else []))
  for seed in cfg["seeds"]:
    batches = sweep.window_sampler(train_tokens, cfg["batch"], cfg["seq_len"], seed)
    val = sweep.fixed_windows(val_tokens, cfg["batch"], cfg["seq_len"], 4)
    for optimizer in _OPTS.value.split(","):
      log2_lrs = cfg["sgd_log2_lrs"] if optimizer == "sgd" else cfg["log2_lrs"]
      for width in cfg["widths"]:         # width-major: a cut-off sweep has SP and μP alike
        for parametrization in _PARAMS.value.split(","):
          key = (_SCHEME.value, parametrization, optimizer, width, seed, variant)
          if key in done:
            continue
          if width == cfg["base_width"] and (*key[:-1], without_lr_overrides(variant)) in done:
            print(f"{parametrization} {optimizer} width {width} seed {seed}: the LR overrides are "
                  "1 at the base width; its runs without them are used")
            continue
          if _MAX_MINUTES.value and time.time() - start > 60 * _MAX_MINUTES.value:
            print("time budget reached; rerun to resume")
            return
          config = model_config(width, cfg, _SCHEME.value)
          result = sweep.train_learning_rates(
              config, [2.0 ** x for x in log2_lrs], batches, val, steps=cfg["steps"],
              parametrization=parametrization, optimizer=optimizer, base_config=base,
              warmup_steps=cfg["warmup"], momentum=0.9 if optimizer == "sgd" else 0.0,
              grad_clip=_CLIP.value or None, seed=seed, vectorize=vectorize,
              max_lrs_per_program=_MAX_LRS.value, lr_overrides=lr_overrides)
          with open(path, "a") as f:
            for i, x in enumerate(log2_lrs):
              tail = result.train_loss[i, -max(cfg["steps"] // 10, 1):]
              norms = result.grad_norm[i]
              clip = dict(clipped_fraction=float(np.mean(norms > _CLIP.value))) if _CLIP.value else {}
              f.write(json.dumps(dict(
                  kind="run", scheme=_SCHEME.value, parametrization=parametrization,
                  optimizer=optimizer, width=width, seed=seed, log2_lr=x, variant=variant,
                  val_loss=None if math.isnan(result.val_loss[i]) else float(result.val_loss[i]),
                  train_loss_tail=float(np.mean(tail)),
                  loss_spike=sweep.loss_spike(result.train_loss[i]),
                  grad_norm_median=float(np.median(norms)), **clip, steps=cfg["steps"],
                  batch=cfg["batch"],
                  seq_len=cfg["seq_len"], layers=cfg["layers"], seconds=result.seconds,
                  params=model_lib.num_params(config), **env)) + "\n")
          print(f"{parametrization:>4} {optimizer:>5} width {width:5d} seed {seed}: "
                f"{result.seconds:6.1f}s  best log2 lr "
                f"{log2_lrs[int(np.nanargmin(result.val_loss))] if np.isfinite(result.val_loss).any() else 'n/a'}"
                f"  val {np.nanmin(result.val_loss) if np.isfinite(result.val_loss).any() else float('nan'):.4f}",
                flush=True)
  if _SEQUENTIAL_CHECK.value:
    measure_vmap_speedup(cfg, train_tokens, val_tokens, base)


def measure_vmap_speedup(cfg, train_tokens, val_tokens, base):
  """Same runs, vmapped vs one by one: the speed-up of training many LRs in one program."""
  path = os.path.join(RESULTS, f"lr_transfer_{_TAG.value or _PRESET.value}_vmap_speedup.json")
  if os.path.exists(path):
    return
  width = cfg["widths"][len(cfg["widths"]) // 2]
  lrs = [2.0 ** x for x in cfg["log2_lrs"]]
  steps = min(cfg["steps"], 50)
  batches = sweep.window_sampler(train_tokens, cfg["batch"], cfg["seq_len"], 0)
  val = sweep.fixed_windows(val_tokens, cfg["batch"], cfg["seq_len"], 1)
  times = {}
  for vectorize in (True, False):
    r = sweep.train_learning_rates(model_config(width, cfg, _SCHEME.value), lrs, batches, val,
                                   steps=steps, parametrization="mup", optimizer="adamw",
                                   base_config=base, seed=0, vectorize=vectorize)
    times["vmapped" if vectorize else "sequential"] = dict(train_s=r.seconds,
                                                           compile_s=r.compile_seconds)
  record = dict(width=width, num_lrs=len(lrs), steps=steps, **times,
                speedup_train=times["sequential"]["train_s"] / times["vmapped"]["train_s"],
                device_kind=jax.devices()[0].device_kind,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"vmap over {len(lrs)} LRs: {record['speedup_train']:.2f}x faster than sequential")


# --- analysis ---------------------------------------------------------------------------------

DIVERGED = math.log(256.0)   # worse than predicting uniformly at random


def optimum(log2_lrs, losses):
  """log2 LR minimising a parabola through the best grid point and its neighbours."""
  xs, ys = np.asarray(log2_lrs, float), np.asarray(losses, float)
  ok = np.isfinite(ys) & (ys < DIVERGED)
  if not ok.any():
    return None, "all diverged"
  i = int(np.argmin(np.where(ok, ys, np.inf)))
  if i == 0 or i == len(xs) - 1 or not (ok[i - 1] and ok[i + 1]):
    return float(xs[i]), "edge of grid" if i in (0, len(xs) - 1) else "neighbour diverged"
  a, b, _ = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
  return (float(-b / (2 * a)) if a > 0 else float(xs[i])), "quadratic fit"


def without_lr_overrides(variant: str) -> str:
  """The variant with its `--lr_override` entries (NAME[:out]:POWER) dropped: "conv:out:-1,
  o_eps=0.001" -> "o_eps=0.001". The overrides multiply LRs by m^POWER, which is 1 at the base
  width, so at the base width both variants are the same model with the same updates."""
  return ",".join(p for p in variant.split(",") if p and ":" not in p)


def analyze(path, out_prefix, base_width=None):
  """Summary JSON + figure of a sweep's JSONL. A variant with LR overrides that has no runs at
  `base_width` uses the base-width runs of its variant without overrides (identical there)."""
  rows = [json.loads(l) for l in open(path) if l.strip()]
  rows = [r for r in rows if r.get("kind") == "run"]
  summary = {}
  group_of = lambda r: (r["scheme"], r["parametrization"], r["optimizer"], r.get("variant", ""))
  for scheme, param, opt, variant in sorted({group_of(r) for r in rows}):
    sel = [r for r in rows if group_of(r) == (scheme, param, opt, variant)]
    shared_from = None
    plain = without_lr_overrides(variant)
    if (base_width is not None and plain != variant
        and not any(r["width"] == base_width for r in sel)):
      shared_from = plain
      sel += [r for r in rows if r["width"] == base_width
              and group_of(r) == (scheme, param, opt, shared_from)]
    widths = sorted({r["width"] for r in sel})
    curves, optima = {}, {}
    for w in widths:
      by_lr = {}
      for r in sel:
        if r["width"] == w:
          loss = r["val_loss"] if r["val_loss"] is not None else float("nan")
          by_lr.setdefault(r["log2_lr"], []).append(loss)
      xs = sorted(by_lr)
      ys = [float(np.mean(by_lr[x])) if all(np.isfinite(by_lr[x])) else float("nan") for x in xs]
      curves[w] = dict(log2_lr=xs, val_loss=ys)
      optima[w] = dict(zip(("log2_lr", "how"), optimum(xs, ys)))
    drift = _drift([o["log2_lr"] for o in optima.values() if o["log2_lr"] is not None])
    trend = optimum_trend({w: o["log2_lr"] for w, o in optima.items()})
    # Wider is better at the base width's optimal learning rate (nearest grid point).
    base_opt = optima[widths[0]]["log2_lr"]
    at_transfer = {}
    if base_opt is not None:
      for w in widths:
        xs, ys = curves[w]["log2_lr"], curves[w]["val_loss"]
        j = int(np.argmin(np.abs(np.asarray(xs) - base_opt)))
        at_transfer[w] = ys[j]
    # Regret: what using the base width's LR costs at each width (loss above that width's best).
    regret = {w: float(at_transfer[w] - np.nanmin(curves[w]["val_loss"]))
              for w in at_transfer if np.isfinite(curves[w]["val_loss"]).any()}
    per_seed = _per_seed_optima(sel, widths)
    vals = [at_transfer[w] for w in widths] if at_transfer else []
    monotone = bool(vals and all(np.isfinite(vals)) and all(a > b for a, b in zip(vals, vals[1:])))
    name = f"{scheme}/{param}/{opt}" + (f"[{variant}]" if variant else "")
    best = {w: float(np.nanmin(c["val_loss"])) for w, c in curves.items()
            if np.isfinite(c["val_loss"]).any()}
    summary[name] = dict(
        widths=widths, optimum=optima, drift_log2=drift, **trend, best_loss=best,
        base_width_runs_from=shared_from,
        width_range=widths[-1] / widths[0], loss_at_transferred_lr=at_transfer,
        wider_is_better=monotone, transfer_regret=regret, curves=curves,
        optimum_per_seed=per_seed["optima"], drift_log2_per_seed=per_seed["drift"],
        diverged_runs=sum(1 for r in sel if r["val_loss"] is None or r["val_loss"] >= DIVERGED))
  with open(out_prefix + ".json", "w") as f:
    json.dump(dict(source=os.path.basename(path), summary=summary,
                   criterion="muP drift <= 0.5 log2 across >= 8x widths; loss falls with width"),
              f, indent=2)
  plot(summary, out_prefix + ".png")
  plot_variants(summary, out_prefix + "_variants.png")
  for name, s in summary.items():
    print(f"{name:>18}: drift {s['drift_log2']} log2 over {s['width_range']:.0f}x widths; "
          f"optima {[(w, None if o['log2_lr'] is None else round(o['log2_lr'], 2)) for w, o in s['optimum'].items()]}; "
          f"wider-is-better {s['wider_is_better']}; diverged {s['diverged_runs']}; "
          f"regret {({w: round(r, 4) for w, r in s['transfer_regret'].items()})}; "
          f"per-seed drift {({k: round(d, 2) for k, d in s['drift_log2_per_seed'].items()})}; "
          f"trend {_fmt_trend(s)}; best loss {({w: round(b, 4) for w, b in s['best_loss'].items()})}")
  return summary


def _per_seed_optima(sel, widths):
  """Each seed's own optimum per width and, for seeds run at every width, its drift."""
  optima, drift = {}, {}
  for seed in sorted({r["seed"] for r in sel}):
    mine = {}
    for w in widths:
      pts = sorted((r["log2_lr"], float("nan") if r["val_loss"] is None else r["val_loss"])
                   for r in sel if r["width"] == w and r["seed"] == seed)
      if pts:
        mine[w] = optimum([x for x, _ in pts], [y for _, y in pts])[0]
    optima[seed] = mine
    found = [mine.get(w) for w in widths]
    if all(o is not None for o in found) and _drift(found) is not None:
      drift[seed] = _drift(found)
  return dict(optima=optima, drift=drift)


def optimum_trend(optima_by_width):
  """The systematic part of the drift: least-squares line through the optima against log2 width.

  max − min of noisy optima grows with the noise alone; the fitted slope separates a trend from
  scatter. Returns the slope (log2 LR per width doubling), the trend drift (slope × log2 of the
  width range) and its standard error from the residuals (None with fewer than three widths)."""
  pts = [(math.log2(w), o) for w, o in sorted(optima_by_width.items()) if o is not None]
  none = dict(trend_log2_per_doubling=None, trend_drift_log2=None, trend_drift_se=None)
  if len(pts) < 2:
    return none
  x, y = np.array(pts).T
  span = x[-1] - x[0]
  slope, intercept = np.polyfit(x, y, 1)
  se = None
  if len(x) > 2:
    resid = y - (slope * x + intercept)
    se = float(np.sqrt(resid @ resid / (len(x) - 2) / np.sum((x - x.mean()) ** 2)) * span)
  return dict(trend_log2_per_doubling=float(slope), trend_drift_log2=float(slope * span),
              trend_drift_se=se)


def _fmt_trend(s):
  if s.get("trend_drift_log2") is None:
    return "-"
  se = s["trend_drift_se"]
  return f"{s['trend_drift_log2']:+.2f}" + ("" if se is None else f" ± {se:.2f}") + " log2"


def _drift(optima):
  """max − min of the optimal log2 LRs (None with fewer than two)."""
  return float(max(optima) - min(optima)) if len(optima) > 1 else None


def plot(summary, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = sorted(summary)
  cols = 2
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    s = summary[name]
    cmap = plt.get_cmap("viridis")
    finite = [y for w in s["widths"] for y in s["curves"][w]["val_loss"] if np.isfinite(y)]
    # Zoom on the basins: losses more than 0.35 above the best are drawn as ^ at the top edge.
    top = min(max(finite), min(finite) + 0.35, DIVERGED) + 0.02 if finite else DIVERGED
    for i, w in enumerate(s["widths"]):
      color = cmap(i / max(len(s["widths"]) - 1, 1))
      xs, ys = np.asarray(s["curves"][w]["log2_lr"]), np.asarray(s["curves"][w]["val_loss"])
      ok = np.isfinite(ys) & (ys < DIVERGED)
      ax.plot(xs[ok], np.minimum(ys[ok], top), "o-", color=color, label=f"width {w}", ms=3)
      high = ok & (ys > top)
      ax.plot(xs[high], np.full(high.sum(), top), "^", color=color, ms=6)    # off the scale
      ax.plot(xs[~ok], np.full((~ok).sum(), top), "x", color=color, ms=6)   # diverged
      o = s["optimum"][w]["log2_lr"]
      if o is not None:
        ax.axvline(o, color=color, ls=":", lw=0.8)
    drift = s["drift_log2"]
    title = f"{name}: optimum drift {drift:.2f} log2" if drift is not None else name
    ax.set_title("\n".join(textwrap.wrap(title, 64)), fontsize=9)
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel("final validation loss (^ off scale, x = diverged)")
    ax.set_ylim(top=top + 0.05)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_variants(summary, path):
  """Ablation view: per (scheme, parametrization, optimizer) with several variants, each
  variant's curve at the widest width they all reach, over the base-width curve (dashed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  groups = {}
  for name in sorted(summary):
    groups.setdefault(name.split("[")[0], []).append(name)
  groups = {g: names for g, names in groups.items() if len(names) > 1}
  if not groups:
    return
  fig, axes = plt.subplots(1, len(groups), figsize=(10 * len(groups), 6), squeeze=False)
  for ax, (group, names) in zip(axes.flat, groups.items()):
    settings = {n: [p for p in n[len(group):].strip("[]").split(",") if p] for n in names}
    shared = set.intersection(*map(set, settings.values()))  # said once, in the title
    widest = max(set.intersection(*(set(summary[n]["widths"]) for n in names)), default=None)
    base = summary[names[0]]["widths"][0]
    c = summary[names[0]]["curves"][base]
    ax.plot(c["log2_lr"], c["val_loss"], "k--", label=f"width {base} (base)")
    for i, n in enumerate(names):
      c = summary[n]["curves"].get(widest)
      if c is None:
        continue
      own = [p for p in settings[n] if p not in shared]
      ax.plot(c["log2_lr"], c["val_loss"], "os^D"[i // 10 % 4] + ("-", "--", ":")[i // 10 % 3],
              ms=3,
              color=plt.get_cmap("tab10")(i % 10),
              label=textwrap.fill(f"{','.join(own) or '(table)'}: best "
                                  f"{np.nanmin(c['val_loss']):.4f}", 70))
    finite = [y for line in ax.get_lines() for y in line.get_ydata() if np.isfinite(y)]
    if finite:
      ax.set_ylim(min(finite) - 0.01, min(max(finite), min(finite) + 0.2))
    ax.set_title(f"{group}: variants at width {widest}"
                 + (f" (all with {','.join(sorted(shared))})" if shared else ""), fontsize=10)
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
  fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv):
  del argv
  cfg = settings()
  if not _ANALYZE.value:
    run_sweep(cfg)
  path = results_path()
  analyze(path, path.replace(".jsonl", ""), base_width=cfg["base_width"])


if __name__ == "__main__":
  app.run(main)
