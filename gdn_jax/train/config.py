"""A training config (ml_collections, e.g. configs/tiny.py) → model, base model, optimizer.

    model_config(config) / base_model_config(config)     the ModelConfigs of the run and its μP base
    validate_config(config)                               ValueError naming the first bad field
    build_model(config, seed) / make_tx(model, config)    what the trainer and the sweeps train
    lr_schedule(config)                                   peak · factor(step) (gdn_jax.train.schedule)

Fields added after the first release are read with defaults, so older configs keep working:
`mixer_output_multiplier` (False), `sp_tied_embedding` (False), `optimizer.nesterov` (False),
`optimizer.weight_decay_convention` ("" = the parametrization's own), `optimizer.sgd_qk_heads_rule`
(False: the μP SGD table without its W_q, W_k heads rule, as before 2026-12-06),
`optimizer.embedding_lr_scale` (1.0; the checkpoint guard resumes runs without it,
`gdn_jax.checkpoint.ADDED_FIELDS`).
"""
from __future__ import annotations

import json
import math
import pathlib

import ml_collections
import optax
from flax import nnx

from gdn_jax import mup
from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from gdn_jax.model_config import ZERO_MEANS_NONE
from gdn_jax.train.schedule import KINDS as SCHEDULES
from gdn_jax.train.schedule import lr_factor

ON_NONFINITE = ("stop", "skip")
RUN = "the --workdir of a gdn_jax.train run"


def read_run_config(workdir, error: type[Exception] = ValueError) -> dict:
  """A run directory's config.json as a dict; `error` (a ValueError subclass of the caller)
  names a missing workdir, a missing file or invalid JSON."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise error(f"--workdir={str(workdir)!r} is not a directory; expected {RUN}.")
  path = workdir / "config.json"
  if not path.is_file():
    raise error(f"{str(path)!r} not found; expected {RUN} (training writes config.json before "
                "anything else).")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise error(f"{str(path)!r} is not valid JSON ({e}); expected the config that gdn_jax.train "
                "wrote.") from None


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """ModelConfig from config.model (0 → None for the fields in `ZERO_MEANS_NONE`)."""
  fields = dict(config.model)
  for name in ZERO_MEANS_NONE:
    fields[name] = fields.get(name) or None
  known = {f.name for f in ModelConfig.__dataclass_fields__.values()}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.model: unknown fields {unknown}; expected fields of ModelConfig "
                     f"{sorted(known)}.")
  return ModelConfig(**fields)


def base_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The μP base: the model with the widths in config.mup_base that are not 0."""
  mc = model_config(config)
  overrides = {k: v for k, v in dict(config.mup_base).items() if v}
  return ModelConfig(**{**{f: getattr(mc, f) for f in mc.__dataclass_fields__}, **overrides})


def _require(cond: bool, name: str, value, expected: str):
  if not cond:
    raise ValueError(f"config: `{name}`={value!r}; expected {expected}.")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def nesterov(config) -> bool:
  return bool(config.optimizer.get("nesterov", False))


def decay_convention(config) -> str | None:
  return config.optimizer.get("weight_decay_convention", "") or None


def sgd_qk_heads_rule(config) -> bool:
  return bool(config.optimizer.get("sgd_qk_heads_rule", False))


def embedding_lr_scale(config) -> float:
  """`optimizer.embedding_lr_scale` (1.0 where a config.json predates the field)."""
  return config.optimizer.get("embedding_lr_scale", 1.0)


def mixer_output_multiplier(config) -> bool:
  return bool(config.get("mixer_output_multiplier", False))


def sp_tied_embedding(config) -> bool:
  return bool(config.get("sp_tied_embedding", False))


def validate_config(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first bad field (checked before anything is written)."""
  o, d, t = config.optimizer, config.data, config.train
  _require(config.parametrization in mup.PARAMETRIZATIONS, "parametrization",
           config.parametrization, f"one of {tuple(mup.PARAMETRIZATIONS)}")
  _require(o.name in mup.OPTIMIZERS, "optimizer.name", o.name, f"one of {mup.OPTIMIZERS}")
  _require(o.lr > 0 and math.isfinite(o.lr), "optimizer.lr", o.lr, "a positive finite float")
  _require(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {SCHEDULES}")
  _require(_is_int(o.warmup_steps) and 0 <= o.warmup_steps < t.num_steps,
           "optimizer.warmup_steps", o.warmup_steps, f"an int in [0, num_steps={t.num_steps})")
  _require(0 <= o.final_lr_fraction <= 1, "optimizer.final_lr_fraction", o.final_lr_fraction,
           "a float in [0, 1]")
  for name in ("weight_decay", "grad_clip", "momentum"):
    _require(o[name] >= 0, f"optimizer.{name}", o[name], "a float ≥ 0 (0 = off)")
  _require(not nesterov(config) or (o.name == "sgd" and o.momentum > 0), "optimizer.nesterov",
           nesterov(config), "False unless optimizer.name='sgd' with momentum > 0")
  scale = embedding_lr_scale(config)
  _require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0
           and math.isfinite(scale), "optimizer.embedding_lr_scale", scale,
           "a finite float > 0 (the embedding's LR factor at every width; 1 = none)")
  convention = decay_convention(config)
  _require(convention is None or convention in mup.DECAY_CONVENTIONS,
           "optimizer.weight_decay_convention", convention,
           f'"" (the parametrization\'s own) or one of {mup.DECAY_CONVENTIONS}')
  if mixer_output_multiplier(config):
    _require(mup.PARAMETRIZATIONS[config.parametrization].mixer_output is not None,
             "mixer_output_multiplier", True,
             f"False with parametrization={config.parametrization!r} (it has no such rule)")
  for name in ("seq_len", "batch_size"):
    _require(_is_int(d[name]) and d[name] >= 1, f"data.{name}", d[name], "an int ≥ 1")
  _require(bool(d.train_path) == bool(d.val_path), "data.val_path", d.val_path,
           "set together with data.train_path (both empty = the embedded corpus)")
  for name in ("num_steps", "log_every", "checkpoint_every", "max_to_keep", "eval_batches"):
    _require(_is_int(t[name]) and t[name] >= 1, f"train.{name}", t[name], "an int ≥ 1")
  _require(_is_int(t.eval_every) and t.eval_every >= 0, "train.eval_every", t.eval_every,
           "an int ≥ 0 (0 = only at the end)")
  _require(_is_int(t.sample_tokens) and t.sample_tokens >= 0, "train.sample_tokens",
           t.sample_tokens, "an int ≥ 0 (0 = no sample)")
  _require(t.on_nonfinite in ON_NONFINITE, "train.on_nonfinite", t.on_nonfinite,
           f"one of {ON_NONFINITE}")
  model_config(config)  # ModelConfig validates the model fields
  base_model_config(config)
  overrides = lr_overrides(config)
  if overrides:  # every name must match a parameter (checked on shapes only)
    shapes = nnx.eval_shape(lambda: GatedDeltaNetLM(model_config(config), rngs=nnx.Rngs(0)))
    try:
      mup.param_groups(shapes, parametrization=config.parametrization, optimizer=o.name,
                       base_config=base_model_config(config), lr_overrides=overrides)
    except ValueError as e:
      raise ValueError(f"optimizer.lr_overrides={o.lr_overrides!r}: {e}") from None


def lr_overrides(config: ml_collections.ConfigDict) -> dict:
  """`optimizer.lr_overrides` ("embed:out:-1,q_proj:-1"; "" = none) as gdn_jax.mup Scalings."""
  spec = config.optimizer.get("lr_overrides", "") or ""
  try:
    return mup.parse_lr_overrides([s.strip() for s in spec.split(",") if s.strip()])
  except ValueError as e:
    raise ValueError(f"optimizer.lr_overrides={spec!r}: {e}") from None


def lr_factor_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step → factor(step) of gdn_jax.train.schedule (peak 1): the schedule inside the optimizer."""
  o = config.optimizer
  return lambda count: lr_factor(count, num_steps=config.train.num_steps,
                                 warmup_steps=o.warmup_steps,
                                 final_fraction=o.final_lr_fraction, kind=o.schedule)


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step → the learning rate, peak · factor(step)."""
  factor = lr_factor_schedule(config)
  return lambda count: config.optimizer.lr * factor(count)


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> GatedDeltaNetLM:
  """The run's model in its parametrization (init drawn from `seed`, default config.seed).

  Every parametrization is relative to the base (`base_model_config`), SP's included: its fan-in
  init is (docs/mup.md, "The tables"); a model that is its own base (mup_base all 0) keeps
  `init_std` everywhere."""
  return mup.build_model(model_config(config), parametrization=config.parametrization,
                         base_config=base_model_config(config), optimizer=config.optimizer.name,
                         mixer_output_multiplier=mixer_output_multiplier(config),
                         sp_tied_embedding=sp_tied_embedding(config),
                         rngs=nnx.Rngs(config.seed if seed is None else seed))


def make_tx(model, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then the μP/SP optimizer of gdn_jax.mup with the LR factor schedule
  (peak 1: the train step multiplies by the peak LR)."""
  o = config.optimizer
  tx = mup.make_optimizer(model, parametrization=config.parametrization, optimizer=o.name,
                          learning_rate=lr_factor_schedule(config), weight_decay=o.weight_decay,
                          base_config=base_model_config(config), b1=o.b1, b2=o.b2, eps=o.eps,
                          momentum=o.momentum, nesterov=nesterov(config),
                          lr_overrides=lr_overrides(config),
                          weight_decay_convention=decay_convention(config),
                          sp_tied_embedding=sp_tied_embedding(config),
                          sgd_qk_heads_rule=sgd_qk_heads_rule(config),
                          embedding_lr_scale=embedding_lr_scale(config))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx
