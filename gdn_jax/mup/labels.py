"""Every parameter's μP facts: fan sizes, width multipliers, role, class, and its group.

    param_infos(model, base_config, parametrization="mup") -> {path: ParamInfo}
    param_groups(model, *, parametrization, optimizer, ...) -> {path: Group(cls, lr, decay)}
    param_labels(model, *, parametrization, optimizer, ...) -> (label tree, {label: Group})

The base model is `nnx.eval_shape` of GatedDeltaNetLM(base_config): shapes only, no weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
from flax import nnx

from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from gdn_jax.mup import tables
from gdn_jax.mup.tables import Scaling


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """What μP knows about one parameter."""
  path: tuple
  shape: tuple[int, ...]
  fan_in: int
  fan_out: int
  base_fan_in: int
  base_fan_out: int
  d_model: int
  base_d_model: int
  role: str
  cls: str
  weight_decay: bool
  init_std: float | None

  @property
  def m_in(self) -> float:
    return self.fan_in / self.base_fan_in

  @property
  def m_out(self) -> float:
    return self.fan_out / self.base_fan_out

  @property
  def m_d(self) -> float:
    return self.d_model / self.base_d_model

  def scale(self, scaling: Scaling) -> float:
    return scaling(self.m_in, self.m_out, self.m_d)


class Group(NamedTuple):
  """A μP group: the parameters that share a class, an LR multiplier and a decay multiplier."""
  cls: str
  lr: float        # learning-rate multiplier r_p
  decay: float     # weight-decay multiplier w_p (0: never decayed)

  @property
  def label(self) -> str:
    return f"{self.cls}:lr={self.lr!r}:wd={self.decay!r}"


def dotted(path: tuple) -> str:
  return ".".join(map(str, path))


def key_of(keypath) -> tuple:
  """A jax key path over nnx.state(model, nnx.Param) → the parameter's path (drops `.value`)."""
  out = []
  for k in keypath:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value":
        continue
      out.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    else:
      out.append(str(k))
  return tuple(out)


def _fans(path, variable, shape) -> tuple[int, int]:
  meta = variable.get_metadata()
  if "fan_in_axes" not in meta or "fan_out_axes" not in meta:
    raise ValueError(f"μP: parameter {dotted(path)} has no `fan_in_axes` / `fan_out_axes` "
                     "metadata; expected every nnx.Param to carry μP labels "
                     "(see gdn_jax.layers.param).")
  fan_in = math.prod(shape[a] for a in meta["fan_in_axes"])
  fan_out = math.prod(shape[a] for a in meta["fan_out_axes"])
  return fan_in, fan_out


def params_of(model) -> dict[tuple, nnx.Param]:
  return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def _base_params(base_config: ModelConfig) -> dict[tuple, nnx.Param]:
  abstract = nnx.eval_shape(lambda: GatedDeltaNetLM(base_config, rngs=nnx.Rngs(0)))
  return params_of(abstract)


def param_infos(model, base_config: ModelConfig | None = None, *,
                parametrization: str = "mup") -> dict[tuple, ParamInfo]:
  """Fan sizes, width multipliers, role and class (under `parametrization`) of every parameter."""
  classify = tables.get(parametrization).classify
  base_config = model.config if base_config is None else base_config
  if not isinstance(base_config, ModelConfig):
    raise ValueError(f"`base_config` is a {type(base_config).__name__}; expected a ModelConfig "
                     "or None.")
  params, base = params_of(model), _base_params(base_config)
  if set(params) != set(base):
    diff = sorted(map(str, set(params) ^ set(base)))[:4]
    raise ValueError("`base_config` must build a model with the same parameters as `config` "
                     f"(same num_layers, use_gate, use_short_conv, tie_embeddings, layer_pattern, "
                     "attn_output_gate, attn_qk_norm); these paths "
                     f"differ: {diff}.")
  infos = {}
  for path, variable in params.items():
    shape = tuple(variable.shape)
    fan_in, fan_out = _fans(path, variable, shape)
    base_fan_in, base_fan_out = _fans(path, base[path], tuple(base[path].shape))
    meta = variable.get_metadata()
    role = meta.get("role")
    if role is None:
      raise ValueError(f"μP: parameter {dotted(path)} has no `role` label; expected every "
                       "nnx.Param to be made by gdn_jax.layers.param.")
    cls = classify(role, fan_in != base_fan_in, fan_out != base_fan_out)
    infos[path] = ParamInfo(path, shape, fan_in, fan_out, base_fan_in, base_fan_out,
                            model.config.d_model, base_config.d_model, role, cls,
                            bool(meta.get("weight_decay", False)), meta.get("init_std"))
  return infos


def parse_lr_overrides(specs) -> dict[str, Scaling]:
  """["g_proj:-0.5", "conv:out:-0.5", "embed:x:0.125", …] → {"g_proj": Scaling(fan_in=-0.5),
  "conv": Scaling(fan_out=-0.5), "embed": Scaling(factor=0.125)}: LR × m_in^p (or × m_out^p with
  `out`, or × a constant c > 0 at every width with `x`, a base-width constant such as μTransfer
  tunes per layer) for every parameter whose dotted path contains the name (the command-line form
  of `lr_overrides`)."""
  out = {}
  for spec in specs or ():
    name, _, value = str(spec).rpartition(":")
    axis = "fan_in"
    if name.endswith((":out", ":in", ":x")):
      name, _, side = name.rpartition(":")
      axis = "factor" if side == "x" else "fan_" + side
    try:
      number = float(value)
      if axis == "factor" and not 0 < number < math.inf:
        raise ValueError(value)
      out[name] = Scaling(**{axis: number})
    except ValueError:
      name = ""
    if not name:
      raise ValueError(f"LR override {spec!r}; expected 'NAME:POWER', 'NAME:out:POWER' or "
                       "'NAME:x:FACTOR', e.g. 'g_proj:-0.5' (LR × m_in^POWER, or m_out^POWER, "
                       "or × FACTOR > 0 at every width, for parameters whose path contains NAME).")
  return out


def resolve_decay_convention(parametrization: str, convention: str | None) -> str:
  """The decay convention to use: `convention`, or the parametrization's own when None/""."""
  if not convention:
    return tables.get(parametrization).decay_convention
  if convention not in tables.DECAY_CONVENTIONS:
    raise ValueError(f"`weight_decay_convention`={convention!r}; expected one of "
                     f"{tables.DECAY_CONVENTIONS} or None (the parametrization's own).")
  return convention


def param_groups(model, *, parametrization: str, optimizer: str = "adamw",
                 base_config: ModelConfig | None = None,
                 lr_overrides: dict[str, Scaling] | None = None,
                 weight_decay_convention: str | None = None,
                 sp_tied_embedding: bool = False,
                 sgd_qk_heads_rule: bool = True,
                 embedding_lr_scale: float = 1.0) -> dict[tuple, Group]:
  """{path: Group(class, LR multiplier r_p, weight-decay multiplier w_p or 0 where no decay)}.

  Under SGD the W_q, W_k kernels (role "qk_proj") get the table's × (H/H_base)^sgd_qk_heads_power
  on top of their class's rule (H = the GDN layers' num_heads; tables.Parametrization);
  `sgd_qk_heads_rule=False` leaves it out (the tables before 2026-12-06: runs started then resume
  with it, gdn_jax.train.config).
  `lr_overrides` {name: Scaling}: an extra width scaling of the LR of every parameter whose dotted
  path contains `name`, on top of the table (for ablations of a rule; 1 at the base width, so μP
  and SP still agree there, unless it has a constant `factor`). Every name must match some
  parameter.
  `weight_decay_convention`: "independent" (w_p = 1/r_p), "coupled" (w_p = 1), or None for the
  parametrization's own (tables module docstring).
  `sp_tied_embedding`: a tied embedding matrix gets SP's LR (multiplier 1 at every width), the
  optimizer half of `build_model(sp_tied_embedding=True)` (docs/mup.md, "The tied embedding");
  no effect on an untied model.
  `embedding_lr_scale` C: the embedding matrix's LR × C at every width, the base included, on top
  of its class's rule: a base-width constant of the model (like the LR itself and the head's init
  std), the same for every parametrization, so μP and SP stay one model at the base width. Under
  SGD the embedding's best constant differs from the hidden matrices' (docs/mup.md, "The
  embedding's base constant"); under AdamW 1 is near right.
  """
  if not (isinstance(embedding_lr_scale, (int, float)) and not isinstance(embedding_lr_scale, bool)
          and 0 < embedding_lr_scale < math.inf):
    raise ValueError(f"`embedding_lr_scale`={embedding_lr_scale!r}; expected a number > 0 (the "
                     "embedding's LR factor at every width; 1 = none), e.g. 0.0625.")
  p = tables.get(parametrization)
  tables.check_optimizer(optimizer)
  convention = resolve_decay_convention(parametrization, weight_decay_convention)
  rules = p.rules[optimizer]
  lr_overrides = dict(lr_overrides or {})
  infos = param_infos(model, base_config, parametrization=parametrization)
  base_heads = (model.config if base_config is None else base_config).num_heads
  qk_heads = ((model.config.num_heads / base_heads) ** p.sgd_qk_heads_power
              if optimizer == "sgd" and sgd_qk_heads_rule else 1.0)
  names = {path: dotted(path) for path in infos}
  for name in lr_overrides:
    if not any(name in d for d in names.values()):
      raise ValueError(f"`lr_overrides` name {name!r} matches no parameter; expected part of a "
                       "parameter path such as 'mixer.g_proj.kernel'.")
  out = {}
  for path, info in infos.items():
    rule = rules[info.cls]
    extra = math.prod(info.scale(s) for name, s in lr_overrides.items() if name in names[path])
    tied = sp_tied_embedding and model.config.tie_embeddings and info.role == "embedding"
    table_lr = 1.0 if tied else info.scale(rule.lr)
    if info.role == "qk_proj":
      table_lr *= qk_heads
    if info.role == "embedding":
      table_lr *= embedding_lr_scale
    lr = table_lr * extra
    decays = info.weight_decay if rule.decay is None else rule.decay
    decay = (1.0 / lr if convention == "independent" else 1.0) if decays else 0.0
    out[path] = Group(info.cls, lr, decay)
  return out


def multipliers(model, **kwargs) -> dict[tuple, Group]:
  """Alias of `param_groups` (the name of earlier versions): {path: (class, lr, decay)}."""
  return param_groups(model, **kwargs)


def param_labels(model, **kwargs) -> tuple[object, dict[str, Group]]:
  """The μP partition of the parameters, as optax.multi_transform wants it.

  Returns (labels, groups): `labels` is a pytree shaped like `nnx.state(model, nnx.Param)` whose
  leaves are group labels such as "hidden:lr=0.25:wd=4.0" (class, LR multiplier, weight-decay
  multiplier), and `groups` maps each label to its `Group`. Keyword arguments: `param_groups`'s.
  """
  by_path = param_groups(model, **kwargs)
  state = nnx.state(model, nnx.Param)

  def label(keypath, _):
    path = key_of(keypath)
    if path not in by_path:
      raise ValueError(f"μP labels: no group for parameter {dotted(path)}.")
    return by_path[path].label

  labels = jax.tree_util.tree_map_with_path(label, nnx.to_pure_dict(state))
  return labels, {g.label: g for g in by_path.values()}
