"""The command line: `gdn-train` / `python -m gdn_jax.train`.

    gdn-train --config=configs/tiny.py --workdir=/tmp/gdn-tiny [--config.optimizer.lr=3e-3 ...]
"""
from __future__ import annotations

import json
import sys

import jax

from gdn_jax.train.loop import train
from gdn_jax.train.progress import NonFiniteLossError


def cli_main(argv, run, *, verbosity: str = "error", errors=(ValueError,)):
  """The shared body of the package's absl mains (gdn-train, gdn_jax.sample, the upgrade):
  quiet absl logging (orbax logs every save), no positional arguments, `run(flags)`, and an
  expected error turned into one line `error: ...` on stderr with exit status 1."""
  from absl import flags, logging
  logging.set_verbosity(getattr(logging, verbosity.upper()))
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments {argv[1:]}; expected only flags.")
    return run(flags.FLAGS)
  except errors as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
  def run(f):
    if f.distributed:  # multi-host: coordinator address, process count and id from the environment
      jax.distributed.initialize()
    return train(f.config, f.workdir)

  summary = cli_main(argv, run, verbosity="warning", errors=(ValueError, NonFiniteLossError))
  keys = ("step", "val_loss", "tokens_per_s", "skipped", "preempted")
  print(json.dumps({k: summary[k] for k in keys if k in summary}), flush=True)


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, sample.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; "
                    "see docs/training.md).")
  flags.mark_flags_as_required(["config", "workdir"])


def cli():
  from absl import app
  define_flags()
  app.run(main)
