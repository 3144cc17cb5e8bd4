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

Writes one JSON line per run to experiments/results/sgd_gap_probe_cpu.jsonl (skips rows there).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

from experiments import lr_transfer
from gdn_jax.lr_protocol import Protocol
from gdn_jax.mup import tables
from gdn_jax.mup.tables import MUP, ONE, Rule, Scaling

_ONLY = flags.DEFINE_list("only", None, "Only these rows: PARAM[:OVERRIDE...] as in ROWS.")
OUT = os.path.join(lr_transfer.RESULTS, "sgd_gap_probe_cpu.jsonl")

_SGD_AB_SP = dict(MUP.rules["sgd"], output=Rule(init=Scaling(fan_in=-0.5)))
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
# (width, parametrization, lr_overrides)
ROWS = ([(32, p, ()) for p in ("sp", "mup", "paper", "paper_sp")]
        + [(256, p, ()) for p in ("sp", "mup", "paper", "paper_sp")]
        + [(256, "mup", ov) for ov in (("embed:out:-1",), ("conv:out:-1",), ("norm:out:-1",),
                                       ("a_proj:0.5", "b_proj:0.5"), ("a_proj:1", "b_proj:1"))]
        + [(256, "mup_ro1", ()), (256, "mup_ro1", ("embed:out:-1",)), (256, "mup_ab_sp", ()),
           (256, "mup_ro1_ab_sp", ("embed:out:-1",))])


def name(param, overrides):
  return ":".join((param, *overrides))


def main(argv):
  del argv
  tables.PARAMETRIZATIONS.update(VARIANTS)
  done = set()
  if os.path.exists(OUT):
    with open(OUT) as f:
      done = {(r["width"], name(r["parametrization"], r["variant"].split(",") if r["variant"]
                                else ())) for r in map(json.loads, f)}
  for width, param, overrides in ROWS:
    if (_ONLY.value and name(param, overrides) not in _ONLY.value) or \
        (width, name(param, overrides)) in done:
      continue
    t = time.time()
    job = dict(parametrization=param, variant=",".join(overrides), optimizer="sgd", width=width,
               seeds=[0], log2_lrs=LOG2_LRS, phase="fine", lr_overrides=list(overrides))
    rows = lr_transfer.run_job(PROTOCOL, job, None)
    with open(OUT, "a") as f:
      for r in rows:
        f.write(json.dumps({k: r[k] for k in ("parametrization", "variant", "width", "seed",
                                              "log2_lr", "val_loss", "clipped_fraction",
                                              "grad_norm_median", "steps", "tokens", "params",
                                              "backend", "date")}) + "\n")
    losses = [None if r["val_loss"] is None else round(r["val_loss"], 4) for r in rows]
    print(f"{width} {name(param, overrides)} {losses} ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
