"""Training: config → model, optimizer, data, mesh → the jit train loop with checkpoints.

    gdn-train --config=configs/tiny.py --workdir=/tmp/gdn-tiny [--config.optimizer.lr=3e-3 ...]
    python -m gdn_jax.train  (same flags)

Small modules, one job each:
    config.py    config → ModelConfig, μP base, validation, model, optimizer (make_tx)
    schedule.py  the LR schedule factor (warmup, then cosine / linear / constant)
    step.py      the train step: loss → gradient → clipped μP update × peak LR, NaN guard
    progress.py  step metrics → metrics.jsonl, progress lines, tokens/s, MFU
    loop.py      train(): data, mesh, checkpoints, evaluation, SIGTERM, sample
    cli.py       the absl command line
    upgrade.py   `python -m gdn_jax.train.upgrade --workdir=W`: a run directory written before the
                 multi_transform optimizer (2026-12-06) converted so that it resumes
The LR sweeps (gdn_jax.sweep), the coordinate check and the curvature study build their steps
with the same `make_train_step` and schedule.
"""
from gdn_jax.train.cli import cli, define_flags, main
from gdn_jax.train.config import (base_model_config, build_model, lr_overrides, lr_schedule,
                                  make_tx, model_config, validate_config)
from gdn_jax.train.loop import jit_steps, train
from gdn_jax.train.progress import PEAK_FLOPS, NonFiniteLossError, peak_flops
from gdn_jax.train.schedule import lr_factor
from gdn_jax.train.step import make_loss_fn, make_train_step

__all__ = ["train", "cli", "main", "define_flags", "model_config", "base_model_config",
           "validate_config", "lr_overrides", "lr_schedule", "make_tx", "build_model",
           "jit_steps", "make_train_step", "make_loss_fn", "lr_factor", "PEAK_FLOPS",
           "peak_flops", "NonFiniteLossError"]
