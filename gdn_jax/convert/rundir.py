"""Run directories for converted checkpoints: an fla checkpoint → a gdn_jax.train run that the
trainer resumes (fine-tuning from step 0) and gdn_jax.sample reads, and a run's checkpoint → fla.

    python -m gdn_jax.convert --from_fla=DIR --workdir=OUT [--config=configs/tiny.py]
    python -m gdn_jax.convert --to_fla=OUT --workdir=RUN [--step=N --dtype=bfloat16]
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from gdn_jax import safetensors_io
from gdn_jax.convert.fla import (COMPUTE_FIELDS, ConversionError, _listed,
                                 fla_config_to_model_config, fla_state_to_params,
                                 forward_multipliers, load_params, read_fla_config, to_fla)
from gdn_jax.model import ModelConfig
from gdn_jax.model_config import ZERO_MEANS_NONE

_CONFIG_PY = '''"""The config of a run converted from fla by gdn_jax.convert (= config.json).

    gdn-train --config={workdir}/config.py --workdir={workdir}     (fine-tunes from step 0)
"""
import json

import ml_collections

CONFIG = json.loads({text!r})


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(CONFIG)
'''


def default_template():
  """configs/tiny.py of the source checkout: the training fields of a converted run when no
  --config is given."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"
  if not path.is_file():
    raise ConversionError(f"--config is not set and {str(path)!r} does not exist; expected "
                          "--config=<a gdn_jax.train config file>.")
  spec = importlib.util.spec_from_file_location("_gdn_convert_template", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_config(model_config: ModelConfig, template):
  """The training config of a converted run: `template` (an ml_collections ConfigDict, e.g.
  configs/tiny.py) with the model fields of `model_config` (its compute settings come from the
  template) and the model as its own μP base."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(template.to_dict())
  fields = dataclasses.asdict(model_config)
  for name in ZERO_MEANS_NONE:  # the config files' 0 = None
    fields[name] = fields[name] or 0
  for name in COMPUTE_FIELDS:
    if name in template.model:
      fields[name] = template.model[name]
  config.model = ml_collections.ConfigDict(fields)
  config.mup_base = ml_collections.ConfigDict({k: 0 for k in template.mup_base})
  return config


def fla_to_run(fla_dir: str | os.PathLike, workdir: str | os.PathLike, template) -> dict:
  """Converts an fla checkpoint into a gdn_jax.train run directory that the trainer resumes
  (from step 0: fine-tuning) and gdn_jax.sample reads: config.json, config.py (for gdn-train
  --config), fla_config.json (kept for --to_fla) and checkpoints/0 (parameters, the optimizer's
  initial state, step 0, RNG, the data position)."""
  from gdn_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from gdn_jax.data import pipeline, prepare  # pylint: disable=import-outside-toplevel
  from gdn_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  fla_config = read_fla_config(fla_dir)
  mc = fla_config_to_model_config(fla_config)
  config = run_config(mc, template)
  config_lib.validate_config(config)
  abstract = nnx.eval_shape(lambda: config_lib.build_model(config, 0))
  fold, refuse = forward_multipliers(abstract)
  if fold or refuse:
    items = [f"{n} ×{m:g}" for n, m in fold.items()] + refuse
    raise ConversionError(f"parametrization={config.parametrization!r} at its base width has "
                          f"forward multipliers fla does not have ({_listed(items)}); "
                          "supported: 'sp' or 'mup'.")
  state, _ = safetensors_io.read_checkpoint(fla_dir)
  model = load_params(abstract, fla_state_to_params(state, config_lib.model_config(config)))
  workdir = pathlib.Path(workdir)
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise ConversionError(f"--workdir={str(workdir)!r} already holds checkpoints; expected a new "
                          "run directory (nothing was written).")
  ckpt.check_or_write_config(workdir, config.to_json())
  (workdir / "config.py").write_text(_CONFIG_PY.format(workdir=workdir,
                                                       text=config.to_json(sort_keys=True)))
  (workdir / "fla_config.json").write_text(json.dumps(fla_config, indent=2) + "\n")
  tx = config_lib.make_tx(model, config)
  _, params = nnx.split(model)
  d = config.data
  paths = ({"train": d.train_path} if d.train_path else prepare.embedded_corpus())
  data_iter = pipeline.train_iterator(paths["train"], seed=config.seed, seq_len=d.seq_len,
                                      batch_size=d.batch_size)
  checkpointer = ckpt.Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_to_keep,
                                   async_save=False)
  checkpointer.save(0, {"params": params, "opt_state": tx.init(params),
                        "step": np.asarray(0, np.int64),
                        "rng": jax.random.key_data(jax.random.key(config.seed))}, data_iter)
  checkpointer.close()
  return {"workdir": str(workdir), "parametrization": config.parametrization,
          "model": config.model.to_dict()}


def run_to_fla(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
               dtype: str | None = None, fold_multipliers: bool = False,
               max_shard_bytes: int | None = None) -> list[pathlib.Path]:
  """Writes checkpoint `step` (None: the latest) of a gdn_jax.train run as an fla checkpoint,
  keeping the non-model fields of the run's fla_config.json when it was converted from fla."""
  from gdn_jax.sample import load_model  # pylint: disable=import-outside-toplevel
  model, _ = load_model(workdir, step)
  kept = pathlib.Path(workdir) / "fla_config.json"
  fla_config = json.loads(kept.read_text()) if kept.is_file() else None
  return to_fla(model, out, dtype=dtype, fold_multipliers=fold_multipliers,
                fla_config=fla_config, max_shard_bytes=max_shard_bytes)
