"""Learning-rate transfer across widths: does the LR tuned at the base width stay optimal?

One sweep = a protocol (preset): a model family that grows with the width d, rows
(parametrization + variant), optimizers, seeds, data, and how the LR grids are chosen.
Every run trains through the trainer's own step and schedule (`gdn_jax.sweep.train_grid`:
all (seed, LR) replicas of one row × optimizer × width in one compiled program). Each run
appends one JSON line to `<results_dir>/lr_transfer_<tag>.jsonl`; a rerun skips what is there.

Grids (pilot, ½-log2 grids, extensions) and the analysis are `gdn_jax.lr_protocol`'s; the
statistics (seed-mean optima, exact bootstrap intervals over seeds, drift, regret, trend) are
`gdn_jax.lr_stats`'s. Jobs run in `--workers` processes sharing the GPU (small models are
launch-bound: several programs at once fill the GPU, and compile while others run).

  python -m experiments.lr_transfer --preset=cpu                        # ~10 min on 2 CPU cores
  python -m experiments.lr_transfer --preset=paper --data_dir=D --workers=4 --max_minutes=8
  python -m experiments.lr_transfer --preset=paper --analyze_only        # JSON, PNG, Markdown

Variants for ablations (keyed and plotted apart): --output_norm_eps, --qk_norm_eps,
--lm_head_init_std, --lr_override=NAME[:out]:POWER (identity at the base width, whose runs it
shares) or NAME:x:FACTOR (a constant LR factor: its own base-width runs). Base-width constants:
--embedding_lr_scale=C (the trainer's optimizer.embedding_lr_scale; keyed `embed:x:C`).
"""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import time

from absl import app, flags
import numpy as np

from gdn_jax.lr_protocol import (Ablation, Plan, Protocol, analyze, markdown_loss_table,
                                 markdown_table, row_name)
from gdn_jax.model_config import ZERO_MEANS_NONE
from gdn_jax.mup import tables

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# What the analysis can fit: the validation loss, or the mean training loss of the last 10 % of
# steps. In these sweeps no run sees a token twice, so each training batch is unseen when its
# loss is taken: an estimate of the loss on the training distribution over ~12× more tokens than
# the validation windows (but averaged over the last steps' models, not the final one alone).
METRICS = {"val": "val_loss", "train_tail": "train_loss_tail"}

_ALL_ROWS = (("paper", ""), ("paper_sp", ""), ("mup", ""), ("sp", ""), ("paper", "mixer_out"))
# Row variants, each the identity at the base width (so they share the base row's runs there):
#   mixer_out  the paper's d0/d multiplier on every GDN mixer's output
#   sp_tied    the tied embedding trained as SP trains it (read-out multiplier 1, LR not scaled)
#   const_init SP with `init_std` (0.02) at every width, as fla's models initialise (its
#              `initializer_range`), instead of TP5's fan-in init relative to the base
#   head_sp    μP with SP's untied LM head in function space (issue 20 item 4): fan-in init
#              (× m^-½), no 1/m multiplier, LR × 1/m. Its per-step logit change is μP's head's,
#              its logits at init SP's (√m larger than μP's). Under SGD the same rule keeps
#              μP's effective update (1/m multiplier × LR m × gradient/m).
#   head_init  μP's head (1/m multiplier, μP's LR) with its draw × m^½, so that its logits at
#              init are SP's. Under SGD it is head_sp but for gradient clipping: the raw gradient
#              of head_sp's head is m × μP's (no 1/m multiplier), so it weighs m² more in the
#              global norm that the clip compares. Selected by --rows only (not a preset row).
_VARIANT_ROWS = (("mup", "sp_tied"), ("paper", "sp_tied"))
# Row variants trained as another parametrization (the read-out ablations of gdn_jax.mup.tables).
_VARIANT_PARAMETRIZATIONS = {("mup", "head_sp"): tables.MUP_HEAD_SP,
                             ("mup", "head_init"): tables.MUP_HEAD_INIT}
PRESETS = {
    # 2 CPU cores, ~10 minutes: the heads scheme at toy scale, fixed 1-log2 grids, one seed.
    "cpu": Protocol(family="heads", widths=(16, 32, 64, 128), base_width=16, head_dim=16,
                    layers=2, steps=100, batch=8, seq_len=64, warmup=10, dtype="float32",
                    rows=(("sp", ""), ("mup", "")), optimizers=("adamw", "sgd"), seeds=(0,),
                    sp_seeds=(0,), data="embedded",
                    grid={"adamw": (-10, -4, 1), "sgd": (-5, 1, 1)},
                    optimizer_settings={"adamw": dict(weight_decay=0.0, grad_clip=0.0),
                                        "sgd": dict(momentum=0.9, grad_clip=0.0)},
                    val_batches=4),
    # The heads scheme of issues 6 and 20 (4 layers, head dim 32, 32 × 256 tokens per step), with
    # the output-norm eps 1e-3 that SGD needs (docs/mup.md, the tables; AdamW does not care).
    # rule_impl "auto" (here and in "paper"): the Pallas kernels inside the vmapped programs on a
    # GPU (their speed against the chunked rule: NOTES_lr_transfer.md).
    "heads": Protocol(family="heads", widths=(128, 256, 512, 1024, 2048), base_width=128,
                      head_dim=32, layers=4, steps=1000, batch=32, seq_len=256, warmup=100,
                      rows=(("mup", ""), ("sp", ""), ("mup", "head_sp"), ("sp", "const_init")),
                      optimizers=("adamw", "sgd"),
                      seeds=(100, 101, 102), sp_seeds=(100, 101), data="heldout_a",
                      pilot={"adamw": (-13, -5, 1), "sgd": (-6, 1, 1)},
                      optimizer_settings={"adamw": dict(weight_decay=0.0, grad_clip=1.0),
                                          "sgd": dict(momentum=0.9, grad_clip=1.0)},
                      max_replicas={2048: 4, 1024: 9}, max_job_runs={2048: 4},
                      rule_impl="auto",
                      model_overrides=dict(output_norm_eps=1e-3)),
    # A CPU test of the whole protocol: pilot, ½-log2 grids, extensions, all five rows.
    "smoke": Protocol(family="paper", widths=(32, 64), base_width=32, layers=1, steps=6,
                      batch=2, seq_len=16, warmup=2, dtype="float32", rows=_ALL_ROWS,
                      optimizers=("adamw", "sgd"), seeds=(0, 1), sp_seeds=(0,),
                      data="embedded", pilot={"adamw": (-8, -4, 2), "sgd": (-4, 0, 2)},
                      fine_points_base=3, fine_points=3, val_batches=1),
    # The paper's setting (issue 27): 6 heads whose dims grow, d0 = 128 → 8·d0, 4 layers (the
    # paper: 8), held-out seeds and data, the paper's optimizers for every row.
    "paper": Protocol(family="paper", widths=(128, 256, 512, 1024), base_width=128, layers=4,
                      steps=1000, batch=16, seq_len=256, warmup=100,
                      rows=_ALL_ROWS + _VARIANT_ROWS,
                      optimizers=("adamw", "sgd"), seeds=(100, 101, 102), sp_seeds=(100, 101),
                      data="heldout_a", pilot={"adamw": (-13, -5, 1), "sgd": (-9, 0, 1)},
                      max_replicas={1024: 9, 512: 21}, rule_impl="auto"),
}

# The Qwen3-Next layout (issue 24): 3 GDN blocks : 1 gated full-attention block, in the heads
# scheme (GDN and attention heads of dim 32 grow in number with d), the "paper" preset's budget.
PRESETS["hybrid"] = dataclasses.replace(
    PRESETS["heads"], widths=(128, 256, 512, 1024), batch=16, optimizers=("adamw",),
    rows=(("mup", ""), ("sp", "")), max_replicas={1024: 9, 512: 21},
    model_overrides=dict(layer_pattern="GGGA", attn_output_gate=True, attn_qk_norm=True,
                         rope_theta=1e7, rope_fraction=0.25))

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Sweep protocol.")
_TAG = flags.DEFINE_string("tag", None, "Results file tag (default: the preset).")
_RESULTS_DIR = flags.DEFINE_string("results_dir", RESULTS, "Where the JSONL and outputs go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder holding <slice>/{train,val}.npy "
                                "(python -m gdn_jax.data.build_corpus --sources=...).")
_DATA_SLICE = flags.DEFINE_string("data_slice", None, "Data slice instead of the preset's (e.g. "
                                  "heldout_b); its runs go to lr_transfer_<preset>_<slice>.jsonl "
                                  "unless --tag names the file.")
_RULE_IMPL = flags.DEFINE_enum("rule_impl", None, ["auto", "chunked", "pallas", "recurrent"],
                               "The rule inside the sweep's programs instead of the preset's "
                               "(auto, the GPU presets' choice: the Pallas kernels on GPU, "
                               "vmapped with the replicas; chunked: the pure-JAX rule).")
_WIDTHS = flags.DEFINE_list("widths", None, "Only these widths (default: the preset's).")
_OPTS = flags.DEFINE_list("optimizers", None, "Only these optimizers.")
_ROWS = flags.DEFINE_list("rows", None, "Only these rows, e.g. paper,paper+mixer_out,sp.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes sharing the device (1: in-process).")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None, "Submit no job after this long.")
_ANALYZE = flags.DEFINE_bool("analyze_only", False, "Only analyse the JSONL and plot.")
_METRIC = flags.DEFINE_enum("metric", "val", list(METRICS), "The loss the analysis fits: val (the "
                            "fixed validation windows) or train_tail (the training loss of the "
                            "last 10 % of steps, each batch unseen before its step); outputs of "
                            "train_tail get the suffix _train_tail.")
_OUT_EPS = flags.DEFINE_float("output_norm_eps", None, "Variant: base output-norm eps.")
_QK_EPS = flags.DEFINE_float("qk_norm_eps", None, "Variant: q/k L2-norm eps.")
_HEAD_STD = flags.DEFINE_float("lm_head_init_std", None, "Variant: the untied LM head's init "
                               "std at the base width (μP keeps it; not the identity there).")
_LR_OVERRIDES = flags.DEFINE_list("lr_override", [], "Variant: NAME[:out]:POWER LR scalings, "
                                  "or NAME:x:FACTOR (× FACTOR at every width).")
_EMBED_LR = flags.DEFINE_float("embedding_lr_scale", None, "Variant: the embedding's LR × this "
                               "at every width (the trainer's optimizer.embedding_lr_scale, a "
                               "base-width constant; SGD's is 1/16). Keyed `embed:x:C`, as the "
                               "same factor given by --lr_override.")


# ---- Configs. ---------------------------------------------------------------------------------

def model_config(p: Protocol, width: int, extra: dict):
  from gdn_jax import families  # pylint: disable=import-outside-toplevel
  common = dict(vocab_size=256, num_layers=p.layers, chunk_size=64 if p.seq_len >= 64 else 16,
                rule_impl=p.rule_impl, dtype=p.dtype, **{**p.model_overrides, **extra})
  if p.family == "paper":
    return families.paper_config(width, **common)
  if p.family == "heads":
    return families.heads_config(width, head_dim=p.head_dim, **common)
  return families.head_dims_config(width, num_heads=p.num_heads, **common)


def train_config(p: Protocol, job: dict):
  """The trainer's config of one job (what `gdn-train` would train at one LR)."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  extra = dict(job.get("model_extra", {}))
  model, base = model_config(p, job["width"], extra), model_config(p, p.base_width, extra)
  c = tiny.get_config()
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__}
  fields.update({name: fields[name] or 0 for name in ZERO_MEANS_NONE})
  c.model = ml_collections.ConfigDict(fields)
  c.mup_base = ml_collections.ConfigDict(dict(
      d_model=base.d_model, num_heads=base.num_heads, head_k_dim=base.head_k_dim,
      head_v_dim=base.head_v_dim, mlp_hidden=base.mlp_hidden))
  c.parametrization = job["parametrization"]
  parts = job["variant"].split(",")
  if "const_init" in parts:   # the model is its own base: no rescaled init
    c.mup_base = ml_collections.ConfigDict({k: 0 for k in c.mup_base})
  for (param, part), trained_as in _VARIANT_PARAMETRIZATIONS.items():
    if job["parametrization"] == param and part in parts:
      c.parametrization = trained_as.name
  c.mixer_output_multiplier = "mixer_out" in parts
  c.sp_tied_embedding = "sp_tied" in parts
  settings = {**dict(momentum=0.0, nesterov=False, weight_decay=0.0, grad_clip=0.0),
              **p.optimizer_settings[job["optimizer"]]}
  c.optimizer.update(name=job["optimizer"], lr=1.0, schedule="cosine", warmup_steps=p.warmup,
                     final_lr_fraction=p.final_fraction,
                     lr_overrides=",".join(job.get("lr_overrides", [])), **settings,
                     **job.get("optimizer_extra", {}))
  c.data.update(seq_len=p.seq_len, batch_size=p.batch)
  c.train.num_steps = p.steps
  return c


# ---- Data. ------------------------------------------------------------------------------------

def load_slice(data_dir: str | None, name: str):
  """(train, val) uint8 tokens of a data slice (never imports grain: the GPU image lacks it)."""
  if name == "embedded":
    from gdn_jax.data import prepare  # pylint: disable=import-outside-toplevel
    paths = prepare.embedded_corpus()
  else:
    if not data_dir:
      raise ValueError(f"--data_dir is required for the data slice {name!r}; expected a folder "
                       f"holding {name}/train.npy (docs/training.md, 'LR-transfer data').")
    paths = {s: os.path.join(data_dir, name, f"{s}.npy") for s in ("train", "val")}
  return tuple(np.load(paths[s], mmap_mode="r") for s in ("train", "val"))


# ---- One job (runs in a worker process). -------------------------------------------------------

_WORKER_CACHE: dict = {}


def run_job(p: Protocol, job: dict, data_dir: str | None) -> list[dict]:
  """Trains one job's (seed, LR) grid and returns one row per run."""
  import jax  # pylint: disable=import-outside-toplevel
  from gdn_jax import sweep, train  # pylint: disable=import-outside-toplevel
  from gdn_jax.model import num_params  # pylint: disable=import-outside-toplevel
  from gdn_jax.mup import tables  # pylint: disable=import-outside-toplevel
  if p.data not in _WORKER_CACHE:
    tr, va = load_slice(data_dir, p.data)
    _WORKER_CACHE[p.data] = (np.asarray(tr), sweep.fixed_windows(np.asarray(va), p.batch,
                                                                  p.seq_len, p.val_batches))
  tokens, val = _WORKER_CACHE[p.data]
  config = train_config(p, job)
  cap = p.max_replicas.get(job["width"])
  while True:
    try:
      grid = sweep.train_grid(config, [2.0 ** x for x in job["log2_lrs"]], job["seeds"], tokens,
                              val, max_replicas_per_program=cap)
      break
    except Exception as e:  # out of device memory: halve the replicas per program
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      total = len(job["seeds"]) * len(job["log2_lrs"])
      if (cap or total) <= 1:
        raise
      cap = max(1, (cap or total) // 2)
  device = jax.devices()[0]
  peak = train.peak_flops(device, config.model.dtype)
  env = dict(device_kind=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  program = dict(seconds=grid.seconds, compile_seconds=grid.compile_seconds,
                 programs=grid.programs, replicas_per_program=cap,
                 mfu=grid.model_flops / grid.seconds / peak if peak else None)
  rows = []
  for si, seed in enumerate(job["seeds"]):
    for li, x in enumerate(job["log2_lrs"]):
      loss = float(grid.val_loss[si, li])
      tail = grid.train_loss[si, li, -max(p.steps // 10, 1):]
      norms = grid.grad_norm[si, li]
      clip = config.optimizer.grad_clip
      rows.append(dict(
          kind="run", scheme=p.scheme, parametrization=job["parametrization"],
          variant=job["variant"], optimizer=job["optimizer"], width=job["width"], seed=seed,
          log2_lr=float(x), phase=job["phase"], data=p.data,
          val_loss=None if math.isnan(loss) else loss,
          train_loss_tail=float(np.mean(tail)), loss_spike=sweep.loss_spike(grid.train_loss[si, li]),
          grad_norm_median=float(np.median(norms)),
          clipped_fraction=float(np.mean(norms > clip)) if clip else None,
          nonfinite_steps=int(grid.nonfinite_steps[si, li]), steps=p.steps, batch=p.batch,
          seq_len=p.seq_len, layers=p.layers, tokens=p.steps * p.batch * p.seq_len,
          params=num_params(train.model_config(config)), program=program,
          sgd_qk_heads_power=(tables.get(job["parametrization"]).sgd_qk_heads_power
                              if config.optimizer.sgd_qk_heads_rule else 0.0),
          rule_impl=config.model.rule_impl, **env))
  return rows


# ---- Planning: which jobs are ready, given what the JSONL holds. --------------------------------

def ablation() -> Ablation:
  """The variant the ablation flags ask for (applied to every row). --embedding_lr_scale=C is
  keyed `embed:x:C`, the name of the same factor as an --lr_override (the runs of either are
  one set); the trainer gets it as optimizer.embedding_lr_scale."""
  parts, extra, optimizer_extra = list(_LR_OVERRIDES.value or []), [], []
  if _EMBED_LR.value is not None:
    if any(part.startswith("embed:x:") for part in parts):
      raise ValueError(f"--embedding_lr_scale={_EMBED_LR.value:g} with --lr_override="
                       f"{','.join(parts)}: the same factor twice; expected one of them.")
    if not 0 < _EMBED_LR.value < math.inf:
      raise ValueError(f"--embedding_lr_scale={_EMBED_LR.value:g}; expected a number > 0.")
    parts.append(f"embed:x:{_EMBED_LR.value:g}")
    optimizer_extra.append(("embedding_lr_scale", _EMBED_LR.value))
  if _OUT_EPS.value is not None:
    parts.append(f"o_eps={_OUT_EPS.value:g}")
    extra.append(("output_norm_eps", _OUT_EPS.value))
  if _QK_EPS.value is not None:
    parts.append(f"qk_eps={_QK_EPS.value:g}")
    extra.append(("qk_norm_eps", _QK_EPS.value))
  if _HEAD_STD.value is not None:
    parts.append(f"head_std={_HEAD_STD.value:g}")
    extra.append(("lm_head_init_std", _HEAD_STD.value))
  return Ablation(tuple(parts), tuple(extra), tuple(_LR_OVERRIDES.value or []),
                  tuple(optimizer_extra))


# ---- The sweep. -------------------------------------------------------------------------------

def select_rows(p: Protocol, names: list[str] | None, preset: str) -> tuple:
  """The rows `--rows` names (None: the preset's). A registered variant row (`head_sp`,
  `head_init`) runs when named, also where the preset does not list it; a name that is neither
  is an error (it would otherwise plan nothing)."""
  if not names:
    return p.rows
  extra = tuple(r for r in _VARIANT_PARAMETRIZATIONS if r not in p.rows)
  known = [row_name(*r) for r in p.rows + extra]
  unknown = [name for name in names if name not in known]
  if unknown:
    raise ValueError(f"--rows={','.join(names)}: no row {unknown} in preset {preset!r}; choose "
                     f"from {known}.")
  return tuple(r for r in p.rows + extra if row_name(*r) in names)


def protocol() -> Protocol:
  p = PRESETS[_PRESET.value]
  keep = lambda values, flag, conv: tuple(v for v in values if flag.value is None
                                          or conv(v) in flag.value)
  widths = keep(p.widths, _WIDTHS, str)
  if p.base_width not in widths:
    widths = (p.base_width,) + widths
  return dataclasses.replace(p, widths=widths, optimizers=keep(p.optimizers, _OPTS, str),
                             rows=select_rows(p, _ROWS.value, _PRESET.value),
                             data=_DATA_SLICE.value or p.data,
                             rule_impl=_RULE_IMPL.value or p.rule_impl)


def results_file(results_dir: str, preset: str, tag: str | None = None,
                 data_slice: str | None = None) -> str:
  """One JSONL per (preset, data slice): runs on another slice never share a file (or a plan)."""
  default = (preset if not data_slice or data_slice == PRESETS[preset].data
             else f"{preset}_{data_slice}")
  return os.path.join(results_dir, f"lr_transfer_{tag or default}.jsonl")


def results_path() -> str:
  return results_file(_RESULTS_DIR.value, _PRESET.value, _TAG.value, _DATA_SLICE.value)


def check_data(rows: list[dict], data: str, path: str):
  """ValueError if `path` holds runs on another data slice than the sweep's (a plan over mixed
  slices would pick grids and optima from the wrong curves)."""
  other = sorted({r["data"] for r in rows if r.get("data") not in (None, data)})
  if other:
    raise ValueError(f"{path} holds runs on data slice(s) {other}; this sweep trains on {data!r}. "
                     "Expected --tag naming another file, or the slice those runs used "
                     "(--data_slice).")


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in (json.loads(line) for line in f if line.strip()) if r.get("kind") == "run"]


def check_table(p: Protocol, rows: list[dict], path: str):
  """ValueError if `path` holds SGD runs trained with another W_q, W_k heads factor than this
  code's table gives them (a row written before the rule records none: power 0). Only the factor
  (H/H_base)^power counts, so runs at the base width, and in families whose head count is fixed
  (the paper's), are the same under either table."""
  from gdn_jax.mup import tables  # pylint: disable=import-outside-toplevel
  heads = lambda width: model_config(p, width, {}).num_heads
  base_heads = heads(p.base_width)
  for r in rows:
    if r["optimizer"] != "sgd":
      continue
    ratio = heads(r["width"]) / base_heads
    then = r.get("sgd_qk_heads_power", 0.0)
    now = tables.get(r["parametrization"]).sgd_qk_heads_power
    if ratio ** then != ratio ** now:
      raise ValueError(
          f"{path} holds {r['parametrization']} SGD runs at width {r['width']} trained with W_q, "
          f"W_k's LR × (H/H_base)^{then:g}; the table now gives ^{now:g}, so new runs would not "
          "extend them. Expected --tag naming another file, or an --lr_override that gives the "
          f"old factor (e.g. q_proj:{then - now:g},k_proj:{then - now:g}) with rows relabelled "
          "as in experiments/NOTES_lr_transfer.md.")


def run_sweep(p: Protocol):
  path = results_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rows = read_rows(path)
  check_data(rows, p.data, path)
  check_table(p, rows, path)
  start, in_flight = time.time(), {}
  workers = max(1, _WORKERS.value)
  if workers > 1:   # the workers inherit this: each takes an equal share of device memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / workers:.3f}")
  pool = (futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
          if workers > 1 else None)
  job_id = lambda j: (j["parametrization"], j["variant"], j["optimizer"], j["width"], j["phase"])
  try:
    while True:
      out_of_time = _MAX_MINUTES.value and time.time() - start > 60 * _MAX_MINUTES.value
      busy = {job_id(j) for j in in_flight.values()}
      ready = [] if out_of_time else [j for j in Plan(p, read_rows(path), ablation()).jobs()
                                      if job_id(j) not in busy]
      if pool is None:
        if not ready:
          break
        _record(path, ready[0], run_job(p, ready[0], _DATA_DIR.value), start)
        continue
      for job in ready[:workers - len(in_flight)]:
        in_flight[pool.submit(run_job, p, job, _DATA_DIR.value)] = job
      if not in_flight:
        break
      done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
      for fut in done:
        _record(path, in_flight.pop(fut), fut.result(), start)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  if _MAX_MINUTES.value and time.time() - start > 60 * _MAX_MINUTES.value:
    print("time budget reached; rerun to resume", flush=True)


def _record(path: str, job: dict, rows: list[dict], start: float):
  with open(path, "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  prog = rows[0]["program"]
  best = min(rows, key=lambda r: np.inf if r["val_loss"] is None else r["val_loss"])
  mfu = f"{100 * prog['mfu']:.1f}%" if prog["mfu"] else "n/a"
  print(f"[{(time.time() - start) / 60:5.1f} min] {row_name(job['parametrization'], job['variant'])}"
        f" {job['optimizer']} w{job['width']} {job['phase']} seeds {job['seeds']} "
        f"lrs {job['log2_lrs'][0]:g}..{job['log2_lrs'][-1]:g} ({len(job['log2_lrs'])}): "
        f"{prog['seconds']:.0f}s + compile {prog['compile_seconds']:.0f}s, MFU {mfu}; best "
        f"{best['log2_lr']:g} → {best['val_loss']}", flush=True)


# ---- Analysis. --------------------------------------------------------------------------------

def plot(summary: dict, path: str):
  """Left: each row's optimum against width with its interval, per optimizer. Right: the
  seed-mean loss curves of every row and width."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  opts = sorted({n.split("[")[0].split("/")[2] for n in summary})
  names = list(summary)
  per_opt = max(sum(n.split("[")[0].split("/")[2] == o for n in names) for o in opts)
  fig, axes = plt.subplots(len(opts), 1 + per_opt, figsize=(4.2 * (1 + per_opt), 3.6 * len(opts)),
                           squeeze=False)
  for i, opt in enumerate(opts):
    mine = [n for n in names if n.split("[")[0].split("/")[2] == opt]
    ax = axes[i][0]
    for j, n in enumerate(mine):
      s = summary[n]
      ws = [w for w in s["widths"] if s["optimum"][w]["log2_lr"] is not None]
      ys = [s["optimum"][w]["log2_lr"] for w in ws]
      lo = [y - (s["optimum"][w]["interval"] or (y, y))[0] for w, y in zip(ws, ys)]
      hi = [(s["optimum"][w]["interval"] or (y, y))[1] - y for w, y in zip(ws, ys)]
      ax.errorbar(np.log2(ws) + 0.04 * (j - len(mine) / 2), ys, yerr=[lo, hi], marker="o",
                  capsize=3, label=f"{n.split('/')[1]}{'[' + n.split('[')[1] if '[' in n else ''}"
                  f": drift {s['drift_log2']:.2f}" if s["drift_log2"] is not None else n)
    ax.set_xlabel("log2 width")
    ax.set_ylabel(f"{opt}: optimal log2 LR (95 % bootstrap interval)")
    ax.legend(fontsize=7)
    for ax, n in zip(axes[i][1:], mine):
      s = summary[n]
      cmap = plt.get_cmap("viridis")
      for k, w in enumerate(s["widths"]):
        c = s["curves"][w]
        ys = np.array([np.nan if y is None else y for y in c["val_loss"]])
        ax.plot(c["log2_lr"], ys, "o-", ms=3, color=cmap(k / max(len(s["widths"]) - 1, 1)),
                label=f"width {w}")
        o = s["optimum"][w]["log2_lr"]
        if o is not None:
          ax.axvline(o, color=cmap(k / max(len(s["widths"]) - 1, 1)), ls=":", lw=0.8)
      finite = [y for w in s["widths"] for y in s["curves"][w]["val_loss"] if y is not None]
      if finite:
        ax.set_ylim(min(finite) - 0.01, min(max(finite), min(finite) + 0.3))
      ax.set_title(n, fontsize=8)
      ax.set_xlabel("log2 learning rate")
      ax.legend(fontsize=6)
    for ax in axes[i][1 + len(mine):]:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def with_metric(rows: list[dict], metric: str) -> list[dict]:
  """The rows with `val_loss` holding `metric`'s loss (the analysis reads val_loss)."""
  field = METRICS[metric]
  return rows if field == "val_loss" else [dict(r, val_loss=r[field]) for r in rows]


def write_outputs(rows: list[dict], prefix: str, base_width: int, metric: str = "val"):
  source = os.path.basename(prefix) + ".jsonl"
  summary = analyze(with_metric(rows, metric), base_width)
  if metric != "val":
    prefix += f"_{metric}"
  with open(prefix + ".json", "w") as f:
    json.dump(dict(source=source, metric=METRICS[metric], summary=summary,
                   criterion="drift of the seed-mean optimum <= 0.5 log2 over >= 8x, each "
                             "width's interval overlapping the base's; SP drift >= 2"),
              f, indent=1)
  tables = markdown_table(summary) + "\n" + markdown_loss_table(summary)
  with open(prefix + ".md", "w") as f:
    f.write(tables)
  plot(summary, prefix + ".png")
  print(tables)
  return summary


def main(argv):
  del argv
  p = protocol()
  if not _ANALYZE.value:
    run_sweep(p)
  path = results_path()
  write_outputs(read_rows(path), path[:-len(".jsonl")], p.base_width, _METRIC.value)


if __name__ == "__main__":
  app.run(main)
