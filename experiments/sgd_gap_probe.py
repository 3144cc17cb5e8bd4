"""Why the project's μP under SGD loses to SP at width, at toy scale on CPU (issues 20 item 4, 27).

The paper's-setting sweep (`lr_transfer --preset=paper`) finds the project's μP SGD 0.30 behind its
SP at width 1024. This probe asks whether the gap shows at toy scale and which rule causes it:
the paper's family at widths 32 (base) and 256, 2 layers, 200 steps of 8 × 128 bytes of the
embedded corpus, the paper's SGD (Nesterov 0.98, clipping 1), one seed, log2 LR −6…−3, with

  * LR ablations of the project's μP (`lr_overrides`, identity at the base width),
  * forward-rule variants registered for this run only (identity at the base width):
      mup_ro1        the tied read-out without μP's 1/m multiplier,
      mup_ab_sp      W_a, W_b (output-like when heads are fixed) with SP's rule under SGD,
      mup_ro1_ab_sp  both,
  * the paper's μP and SP for reference.

    python -m experiments.sgd_gap_probe                 # ~1 h on 2 CPU cores
    python -m experiments.sgd_gap_probe --only=mup_ro1:embed:out:-1

Writes one JSON line per run to experiments/results/sgd_gap_probe_cpu.jsonl (skips runs there;
`--log2_lrs=-7,-8` runs other LRs instead of the grid).

`--probe=heads_adamw` (issue 20 item 4, the heads preset's AdamW gap: μP +0.012 behind SP at 1024
on an H100) asks the same of the heads scheme (heads of dim 16 grow in number, untied embedding)
under AdamW (no decay, clipping 1), widths 32 (base) and 256, log2 LR −10…−5, with the μP LR
ablations (identity at the base width) named in experiments/NOTES_lr_transfer.md:
  a  the vector-like parameters' LR × 1/m (norm gains, conv filters, A_log, dt_bias),
  b  every *_proj kernel's LR × m_in^0.38 (SP's hidden-matrix LR at 1024),
  c  the embedding's LR × 1/m.
Its rows go to experiments/results/gap_probe_heads_adamw_cpu.jsonl.

`--probe=heads_sgd` (issue 20 item 4 under SGD: μP 0.038 behind TP5's SP at 1024 on an H100) asks
the same of the heads scheme under the heads preset's SGD (momentum 0.9, clipping 1, output-norm
eps 1e-3), log2 LR −4 … 1, with one class of μP at a time moved to SP's treatment (HEADS_SGD_ROWS);
rows go to experiments/results/gap_probe_heads_sgd_cpu.jsonl. `--summarize` prints, for the row
pairs in TRANSFER_PAIRS, the optimum per width with its bootstrap interval over seeds, the drift
and the best loss (gdn_jax.lr_stats.transfer_summary), from the JSONL alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

from experiments import lr_transfer
from gdn_jax import lr_stats
from gdn_jax import train as train_lib
from gdn_jax.lr_protocol import Protocol, seed_grids
from gdn_jax.mup import tables
from gdn_jax.mup.tables import MUP, ONE, Rule, Scaling

_ONLY = flags.DEFINE_list("only", None, "Only these rows: PARAM[:OVERRIDE...] as in ROWS.")
OUT = os.path.join(lr_transfer.RESULTS, "sgd_gap_probe_cpu.jsonl")

_SGD_AB_SP = dict(MUP.rules["sgd"], output=Rule(init=Scaling(fan_in=-0.5)))
# The heads probe's read-out variants (untied LM head, AdamW), identity at the base width:
#   mup_head_sp    SP's LM head in function space: init × m^-½ (fan-in), no 1/m multiplier, LR × 1/m
#                  (the same per-step logit change as μP's head);
#   mup_head_init  μP's head (1/m multiplier, μP's LR: its updates and gradients) with SP's logits at
#                  init: init × m^+½, so multiplier × init = SP's m^-½;
#   mup_head_cN    μP's head with its init × N at every width (a base-width constant, so still μP;
#                  not the identity at the base width: these rows need base-width runs of their
#                  own).
#                  The tables' rules cannot say this (at the base width the head is in no width
#                  class), so `_scaled_head_builder` rescales the built model's head.
HEAD_INIT_C = (3, 8, 16)
HEAD_VARIANTS = {
    "mup_head_sp": tables.MUP_HEAD_SP,
    "mup_head_init": tables.MUP_HEAD_INIT,
}
HEAD_CONST_VARIANTS = {f"{p.name}_head_c{c}": dataclasses.replace(p, name=f"{p.name}_head_c{c}")
                       for c in HEAD_INIT_C for p in (MUP, tables.SP)}
VARIANTS = {
    "mup_ro1": dataclasses.replace(MUP, name="mup_ro1", tied_readout=ONE),
    "mup_ab_sp": dataclasses.replace(MUP, name="mup_ab_sp", rules=dict(MUP.rules, sgd=_SGD_AB_SP)),
    "mup_ro1_ab_sp": dataclasses.replace(MUP, name="mup_ro1_ab_sp", tied_readout=ONE,
                                         rules=dict(MUP.rules, sgd=_SGD_AB_SP)),
}
PROTOCOL = Protocol(family="paper", widths=(32, 256), base_width=32, layers=2, steps=200,
                    batch=8, seq_len=128, warmup=20, dtype="float32", rows=(("mup", ""),),
                    optimizers=("sgd",), seeds=(0,), sp_seeds=(0,), data="embedded",
                    val_batches=4)
LOG2_LRS = [-6.0, -5.0, -4.0, -3.0]
# (width, parametrization, overrides: LR overrides and row variants, as `job` takes them)
# SP rows: `const_init` (init_std at every width, as every SP row was trained until 2026-12-07),
# and TP5's fan-in SP (`sp`, the same at the base width).
CONST = ("const_init",)
ROWS = ([(32, "sp", CONST)] + [(32, p, ()) for p in ("mup", "paper", "paper_sp")]
        + [(256, "sp", CONST)] + [(256, p, ()) for p in ("mup", "paper", "paper_sp")]
        + [(256, "mup", ov) for ov in (("embed:out:-1",), ("conv:out:-1",), ("norm:out:-1",),
                                       ("a_proj:0.5", "b_proj:0.5"), ("a_proj:1", "b_proj:1"))]
        + [(256, "mup_ro1", ()), (256, "mup_ro1", ("embed:out:-1",)), (256, "mup_ab_sp", ()),
           (256, "mup_ro1_ab_sp", ("embed:out:-1",))])


HEADS_ADAMW_PROTOCOL = Protocol(
    family="heads", head_dim=16, widths=(32, 256), base_width=32, layers=2, steps=200, batch=8,
    seq_len=128, warmup=20, dtype="float32", rows=(("mup", ""),), optimizers=("adamw",),
    seeds=(0,), sp_seeds=(0,), data="embedded", val_batches=4,
    optimizer_settings={"adamw": dict(weight_decay=0.0, grad_clip=1.0)})
VECTORS = ("norm:out:-1", "conv:out:-1", "A_log:out:-1", "dt_bias:out:-1")     # a
HIDDEN = ("_proj:0.38",)                                                      # b
EMBED = ("embed:out:-1",)                                                     # c
# The most informative first: the gap at 256, the shared base row, the ablations, then SP at the
# base width (the same model and updates as μP there: a check).
HEADS_ADAMW_ROWS = [(256, "sp", CONST), (256, "mup", ()), (32, "mup", ()), (256, "mup", VECTORS),
                    (256, "mup", HIDDEN), (256, "mup", EMBED), (32, "sp", CONST),
                    (256, "mup", VECTORS + EMBED),   # a + c: at μP's optimum, SP's LR for both
                    (256, "mup_head_sp", ()), (256, "mup_head_init", ()),
                    # a larger base init constant for μP's head: does the base width want it too?
                    (32, "mup_head_c3", ()), (256, "mup_head_c3", ()), (32, "mup_head_c8", ()),
                    (256, "mup_head_c8", ()), (32, "mup_head_c16", ()), (256, "mup_head_c16", ()),
                    (256, "sp", ()),                  # TP5's fan-in SP
                    (256, "sp_head_c3", CONST)]        # fla's SP with the same base constant


# `--probe=heads_sgd` (issue 20 item 4 under SGD: on the held-out GPU sweep μP SGD is 0.038 behind
# TP5's SP at 1024, 1.1426 against 1.1045): the heads scheme under the heads preset's SGD
# (momentum 0.9, clipping 1, output-norm eps 1e-3), with the ablations that move one class of μP
# to SP's treatment at width (identity at the base width):
#   vectors  norm gains, conv filters, A_log, dt_bias: SGD LR × m (input class) → × 1;
#   embed    the embedding's SGD LR × m → × 1;
#   hidden   every *_proj kernel's LR × m^-0.62 (SP's global LR at 1024 is 2^-1.86 below its base);
#   head     SP's LM head in function space (mup_head_sp: init × m^-½, no 1/m multiplier, LR × 1/m).
HEADS_SGD_PROTOCOL = dataclasses.replace(
    HEADS_ADAMW_PROTOCOL, optimizers=("sgd",),
    optimizer_settings={"sgd": dict(momentum=0.9, grad_clip=1.0)},
    model_overrides=dict(output_norm_eps=1e-3))
SGD_HIDDEN = ("_proj:-0.62",)
HEADS_SGD_ROWS = [(256, "sp", ()), (256, "mup", ()), (32, "mup", ()), (256, "mup", VECTORS),
                  (256, "mup", EMBED), (256, "mup", SGD_HIDDEN), (256, "mup_head_sp", ()),
                  (256, "sp", CONST), (32, "sp", ()),
                  (256, "mup", ("embed:out:-0.5",)),   # the embedding's LR × m^½: in between
                  (256, "mup_head_sp", EMBED),          # the two that helped, together
                  # The embedding's LR × 1/8 at every width (a base constant): at 256 (m = 8) the
                  # same model and LRs as the EMBED row, so only the base width is new.
                  (32, "mup", ("embed:x:0.125",)),
                  # … and the constant's own base-width sweep (μTransfer's per-layer tuning).
                  *((32, "mup", (f"embed:x:{c}",)) for c in ("0.5", "0.25", "0.0625")),
                  # Past the GPU's best (1/16 at 128, still falling): does it bottom out, or is
                  # a frozen embedding the limit?
                  *((32, "mup", (f"embed:x:{c}",)) for c in ("0.03125", "0.0078125")),
                  (256, "mup", ("embed:x:0.0625",)),   # the best base constant, at width
                  # With that constant, SP's read-out against μP's head drawn × m^½ (the same
                  # updates and init; only the clip sees another raw gradient): init or clip?
                  (256, "mup_head_sp", ("embed:x:0.0625",)),
                  (256, "mup_head_init", ("embed:x:0.0625",))]


@dataclasses.dataclass(frozen=True)
class Probe:
  protocol: Protocol
  optimizer: str
  log2_lrs: list
  rows: list                 # (width, parametrization, overrides), as ROWS
  out: str


PROBES = {
    "paper_sgd": Probe(PROTOCOL, "sgd", LOG2_LRS, ROWS, OUT),
    "heads_adamw": Probe(HEADS_ADAMW_PROTOCOL, "adamw", [-10.0, -9.0, -8.0, -7.0, -6.0, -5.0],
                         HEADS_ADAMW_ROWS,
                         os.path.join(lr_transfer.RESULTS, "gap_probe_heads_adamw_cpu.jsonl")),
    "heads_sgd": Probe(HEADS_SGD_PROTOCOL, "sgd", [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0],
                       HEADS_SGD_ROWS,
                       os.path.join(lr_transfer.RESULTS, "gap_probe_heads_sgd_cpu.jsonl")),
}
# (name, base-width row[, wide row]) for --summarize: rows as (parametrization, variant, width).
# "embedding LR × 1/8" is a base constant: at 256 (m = 8) its model and LRs are the ablation's.
TRANSFER_PAIRS = {
    "heads_sgd": [
        ("μP", ("mup", "", 32), ("mup", "", 256)),
        ("μP, embedding LR × 1/8 at every width", ("mup", "embed:x:0.125", 32),
         ("mup", "embed:out:-1", 256)),
        ("μP, embedding LR × 1 (ablation)", ("mup", "", 32), ("mup", "embed:out:-1", 256)),
        ("TP5's SP", ("sp", "", 32), ("sp", "", 256)),
        ("μP, embedding LR × 1/16 at every width", ("mup", "embed:x:0.0625", 32),
         ("mup", "embed:x:0.0625", 256)),
        ("μP + SP's read-out, embedding LR × 1/16", ("mup", "embed:x:0.0625", 32),
         ("mup_head_sp", "embed:x:0.0625", 256)),
        ("μP, head drawn × m^½, embedding LR × 1/16", ("mup", "embed:x:0.0625", 32),
         ("mup_head_init", "embed:x:0.0625", 256)),
        # The embedding constant's base-width sweep (one width: optimum and best loss only).
        *((f"μP, embedding LR × {c} (base width)", ("mup", f"embed:x:{c}", 32))
          for c in ("0.5", "0.25", "0.125", "0.0625", "0.03125", "0.0078125")),
    ],
}


def summarize(path: str, pairs, seeds=None) -> list[dict]:
  """transfer_summary of each (name, base row[, wide row]) over the seeds its rows all hold (or
  `seeds`), each width on the log2 LRs that every one of those seeds ran."""
  with open(path) as f:
    runs = [json.loads(line) for line in f if line.strip()]
  row_of = lambda r: (r["parametrization"], r["variant"], r["width"])
  out = []
  for name_, *rows in pairs:
    held = [{r["seed"] for r in runs if row_of(r) == tuple(row)} for row in rows]
    use = sorted(set(seeds) if seeds is not None else set.intersection(*held))
    if not use or any(not set(use) <= h for h in held):
      raise ValueError(f"summarize: {name_!r} has no runs of seeds {use} for both rows {rows}; "
                       "expected the probe to have run them (--seed=N).")
    grids, losses = seed_grids([r for r in runs if row_of(r) in map(tuple, rows)
                                and r["seed"] in use])
    out.append(dict(name=name_, seeds=use, grids=grids,
                    summary=lr_stats.transfer_summary(grids, losses)))
  return out


_SUMMARIZE = flags.DEFINE_bool("summarize", False, "Print the optima, drift and best losses of "
                               "the probe's TRANSFER_PAIRS from its JSONL; run nothing.")
_PROBE = flags.DEFINE_enum("probe", "paper_sgd", list(PROBES), "Which probe: the paper family "
                           "under SGD, or the heads scheme under AdamW or SGD (module docstring).")
_SEED = flags.DEFINE_integer("seed", 0, "The runs' seed (model init and data order).")
_LOG2_LRS = flags.DEFINE_list("log2_lrs", None, "These log2 LRs instead of the probe's grid (e.g. "
                              "to extend a row whose best point sits at an edge).")


def job(probe: Probe, width, param, overrides, log2_lrs=None, seed=0) -> dict:
  """The lr_transfer job of one row: its LR grid (default the probe's), one seed, in one
  program. `overrides`: LR overrides (NAME[:out]:POWER) and row variants (const_init)."""
  return dict(parametrization=param, variant=",".join(overrides), optimizer=probe.optimizer,
              width=width, seeds=[seed], log2_lrs=list(log2_lrs or probe.log2_lrs), phase="fine",
              lr_overrides=[o for o in overrides if ":" in o])   # else a row variant: const_init


def name(param, overrides):
  return ":".join((param, *overrides))


def run_row(probe: Probe, width, param, overrides, log2_lrs=None, seed=0):
  """Trains one row's LR grid and appends its runs to the probe's JSONL."""
  t = time.time()
  rows = lr_transfer.run_job(probe.protocol, job(probe, width, param, overrides, log2_lrs, seed),
                             None)
  with open(probe.out, "a") as f:
    for r in rows:
      f.write(json.dumps({k: r[k] for k in ("parametrization", "variant", "width", "seed",
                                            "log2_lr", "val_loss", "clipped_fraction",
                                            "grad_norm_median", "steps", "tokens", "params",
                                            "backend", "date")}) + "\n")
  losses = [None if r["val_loss"] is None else round(r["val_loss"], 4) for r in rows]
  print(f"{width} {name(param, overrides)} {losses} ({time.time() - t:.0f} s)", flush=True)


def _scaled_head_builder(build_model):
  """`train.build_model` with the LM head's init × N for the *_head_cN rows."""
  def build(config, seed=None):
    model = build_model(config, seed)
    for c in HEAD_INIT_C:
      if config.parametrization.endswith(f"_head_c{c}"):
        model.lm_head.kernel[...] = model.lm_head.kernel[...] * c
    return model
  return build


def _num(v, spec=".2f") -> str:
  return "–" if v is None else format(v, spec)


def _pair(v) -> str:
  return "[–]" if v is None else f"[{v[0]:.2f}, {v[1]:.2f}]"


def main(argv):
  del argv
  tables.PARAMETRIZATIONS.update({**VARIANTS, **HEAD_VARIANTS, **HEAD_CONST_VARIANTS})
  train_lib.build_model = _scaled_head_builder(train_lib.build_model)
  probe = PROBES[_PROBE.value]
  if _SUMMARIZE.value:
    for row in summarize(probe.out, TRANSFER_PAIRS.get(_PROBE.value, [])):
      sm = row["summary"]
      fmt = lambda w: (f"{w}: {_num(sm['optimum'][w]['log2_lr'])} "
                       f"{_pair(sm['optimum'][w]['interval'])}, best "
                       f"{_num(sm['best_loss'][w], '.4f')}")
      drift = ("" if len(row["grids"]) < 2 else
               f"; drift {_num(sm['drift_log2'])} {_pair(sm['drift_interval'])}")
      print(f"{row['name']} (seeds {row['seeds']}): "
            + "; ".join(fmt(w) for w in sorted(row["grids"])) + drift)
    return
  seed = _SEED.value
  done = set()
  if os.path.exists(probe.out):
    with open(probe.out) as f:
      done = {(r["width"], name(r["parametrization"], r["variant"].split(",") if r["variant"]
                                else ()), r["log2_lr"], r["seed"]) for r in map(json.loads, f)}
  log2_lrs = [float(x) for x in _LOG2_LRS.value] if _LOG2_LRS.value else probe.log2_lrs
  for width, param, overrides in probe.rows:
    todo = [x for x in log2_lrs if (width, name(param, overrides), x, seed) not in done]
    if (_ONLY.value and name(param, overrides) not in _ONLY.value) or not todo:
      continue
    run_row(probe, width, param, overrides, todo, seed)


if __name__ == "__main__":
  app.run(main)
