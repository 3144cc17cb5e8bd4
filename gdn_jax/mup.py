"""The Maximal Update Parametrization (μP) for Gated DeltaNet LMs, driven by parameter labels.

Public interface:

    build_model(config, *, parametrization="sp", base_config=None, rngs) -> GatedDeltaNetLM
    make_optimizer(model, *, parametrization, optimizer="adamw", learning_rate, weight_decay=0.0,
                   base_config=None, b1=0.9, b2=0.95, eps=1e-8, momentum=0.0)
        -> optax.GradientTransformation           # use as nnx.Optimizer(model, tx, wrt=nnx.Param)
    param_infos(model, base_config) -> {path: ParamInfo}   # class + width multipliers per param
    RULES[(parametrization, optimizer)][class] -> Rule;  GDN_RULES[parametrization]

How it works (docs/mup.md has the derivations):
  1. Every nnx.Param carries `fan_in_axes` / `fan_out_axes` (gdn_jax.layers). Its fan-in and
     fan-out are compared with those of the same parameter in `nnx.eval_shape` of the base model
     (no base weights are built): m_in = fan_in / base_fan_in, m_out = fan_out / base_fan_out.
  2. A dimension that differs from the base is "infinite". The class follows
     (fan-in, fan-out): (finite, ∞) input-like, (∞, ∞) hidden, (∞, finite) output-like,
     (finite, finite) scalar.
  3. One table per (parametrization, optimizer) maps the class to four width scalings — init std,
     forward multiplier, LR multiplier, weight-decay multiplier — each m_in^a · m_out^b.
     GDN_RULES adds the rules that are not per-parameter: the q·k readout scale and the eps
     of the mixer's output norm.
  4. build_model rescales the default init by the table and writes the forward multipliers into
     the modules; make_optimizer scales each leaf's update by its LR multiplier and its decay by
     the weight-decay multiplier (lr·wd per step stays width-independent; no decay where the
     layer marks `weight_decay=False`: norm gains, conv filters, A_log, dt_bias).
At the base config every scaling is 1, so "sp" and "mup" give the same model and updates.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gdn_jax.layers import GatedDeltaNet
from gdn_jax.model import GatedDeltaNetLM, ModelConfig

PARAMETRIZATIONS = ("sp", "mup")
OPTIMIZERS = ("adamw", "sgd")
CLASSES = ("input", "hidden", "output", "scalar")


@dataclasses.dataclass(frozen=True)
class Scaling:
  """The width scaling m_in^fan_in · m_out^fan_out (exponents)."""
  fan_in: float = 0.0
  fan_out: float = 0.0

  def __call__(self, m_in: float, m_out: float) -> float:
    return m_in ** self.fan_in * m_out ** self.fan_out


ONE = Scaling()


@dataclasses.dataclass(frozen=True)
class Rule:
  """Per-class scalings, each relative to the base model's value (the base LR, WD, init std)."""
  init: Scaling = ONE     # init std
  mult: Scaling = ONE     # forward multiplier (on the layer's output)
  lr: Scaling = ONE       # learning-rate multiplier
  wd: Scaling = ONE       # weight-decay multiplier (keeps lr·wd constant: wd = 1 / lr)


# ---- The rules (Tensor Programs V, Table 3 written in microsoft/mup's multiplier form). ----
# SP: fan-in init (var ∝ 1/fan_in) on matrices that read a growing dim, one global LR.
_SP = {
    "input": Rule(),
    "hidden": Rule(init=Scaling(fan_in=-0.5)),
    "output": Rule(init=Scaling(fan_in=-0.5)),
    "scalar": Rule(),
}
RULES: dict[tuple[str, str], dict[str, Rule]] = {
    ("sp", "adamw"): _SP,
    ("sp", "sgd"): _SP,
    # μP + Adam: hidden LR 1/fan_in; the read-out gets a 1/fan_in forward multiplier instead of
    # a 1/fan_in² init variance; input-like and scalar parameters keep the base LR.
    ("mup", "adamw"): {
        "input": Rule(),
        "hidden": Rule(init=Scaling(fan_in=-0.5), lr=Scaling(fan_in=-1), wd=Scaling(fan_in=1)),
        "output": Rule(mult=Scaling(fan_in=-1)),
        "scalar": Rule(),
    },
    # μP + SGD: gradients of vector-like parameters are Θ(1/width), so their LR grows with
    # fan-out; the read-out's gradient is shrunk by its 1/fan_in multiplier, so its LR grows too.
    ("mup", "sgd"): {
        "input": Rule(lr=Scaling(fan_out=1), wd=Scaling(fan_out=-1)),
        "hidden": Rule(init=Scaling(fan_in=-0.5)),
        "output": Rule(mult=Scaling(fan_in=-1), lr=Scaling(fan_in=1), wd=Scaling(fan_in=-1)),
        "scalar": Rule(),
    },
}

# GDN-specific: o = qk_scale · Sᵀq with L2-normalised q, k. qk_scale = K_base^-1/2 · (K/K_base)^p.
# SP keeps fla's K^-1/2 (p = −1/2); μP keeps the base scale (p = 0): with unit q, k the μP
# "1/d attention" rule is already built in (docs/mup.md, §q·k readout).
# The output norm's eps: eps = norm_eps · (K/K_base)^e. At init cos(q, k) = Θ(K^-1/2), so with the
# μP scale mean(o²) = Θ(1/K); μP scales eps the same way (e = −1) so that the norm's eps regime
# (how much RMSNorm damps a small o) is width-independent. SP keeps fla's fixed eps (e = 0).
# The q/k L2 norm's eps: eps_qk = qk_norm_eps · (K/K_base)^f. Pre-norm q, k have Θ(1)
# coordinates, so |q|² = Θ(K); μP scales eps with it (f = 1) so that the cap eps^-1/2 on the norm's
# gain stays the same multiple of the typical gain 1/|q|. SP keeps fla's fixed eps (f = 0).
GDN_RULES: dict[str, dict[str, float]] = {
    "sp": {"qk_scale_power": -0.5, "o_norm_eps_power": 0.0, "qk_norm_eps_power": 0.0},
    "mup": {"qk_scale_power": 0.0, "o_norm_eps_power": -1.0, "qk_norm_eps_power": 1.0},
}

for _p in PARAMETRIZATIONS:  # init and multipliers do not depend on the optimizer
  for _cls in CLASSES:
    _a, _s = RULES[(_p, "adamw")][_cls], RULES[(_p, "sgd")][_cls]
    assert (_a.init, _a.mult) == (_s.init, _s.mult), (_p, _cls)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """What μP knows about one parameter."""
  path: tuple
  shape: tuple[int, ...]
  fan_in: int
  fan_out: int
  base_fan_in: int
  base_fan_out: int
  cls: str
  weight_decay: bool

  @property
  def m_in(self) -> float:
    return self.fan_in / self.base_fan_in

  @property
  def m_out(self) -> float:
    return self.fan_out / self.base_fan_out


def _dotted(path: tuple) -> str:
  return ".".join(map(str, path))


def _check_choice(name: str, value: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"`{name}`={value!r}; expected one of {choices}.")


def classify(fan_in_infinite: bool, fan_out_infinite: bool) -> str:
  """(fan-in, fan-out) → class: (finite, ∞) input, (∞, ∞) hidden, (∞, fin.) output, else scalar."""
  if fan_in_infinite:
    return "hidden" if fan_out_infinite else "output"
  return "input" if fan_out_infinite else "scalar"


def _fans(path, variable, shape) -> tuple[int, int]:
  meta = variable.get_metadata()
  if "fan_in_axes" not in meta or "fan_out_axes" not in meta:
    raise ValueError(f"μP: parameter {_dotted(path)} has no `fan_in_axes` / "
                     "`fan_out_axes` metadata; expected every nnx.Param to carry μP labels "
                     "(see gdn_jax.layers.param).")
  fan_in = math.prod(shape[a] for a in meta["fan_in_axes"])
  fan_out = math.prod(shape[a] for a in meta["fan_out_axes"])
  return fan_in, fan_out


def _params(model) -> dict[tuple, nnx.Param]:
  return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def _base_params(base_config: ModelConfig) -> dict[tuple, nnx.Param]:
  abstract = nnx.eval_shape(lambda: GatedDeltaNetLM(base_config, rngs=nnx.Rngs(0)))
  return _params(abstract)


def param_infos(model, base_config: ModelConfig | None = None) -> dict[tuple, ParamInfo]:
  """Fan sizes, width multipliers and μP class of every parameter, keyed by its path."""
  base_config = model.config if base_config is None else base_config
  if not isinstance(base_config, ModelConfig):
    raise ValueError(f"`base_config` is a {type(base_config).__name__}; expected a ModelConfig "
                     "or None.")
  params, base = _params(model), _base_params(base_config)
  if set(params) != set(base):
    diff = sorted(map(str, set(params) ^ set(base)))[:4]
    raise ValueError("`base_config` must build a model with the same parameters as `config` "
                     f"(same num_layers, use_gate, use_short_conv, tie_embeddings); these paths "
                     f"differ: {diff}.")
  infos = {}
  for path, variable in params.items():
    shape = tuple(variable.shape)
    base_shape = tuple(base[path].shape)
    fan_in, fan_out = _fans(path, variable, shape)
    base_fan_in, base_fan_out = _fans(path, base[path], base_shape)
    cls = classify(fan_in != base_fan_in, fan_out != base_fan_out)
    infos[path] = ParamInfo(path, shape, fan_in, fan_out, base_fan_in, base_fan_out, cls,
                            bool(variable.get_metadata().get("weight_decay", False)))
  return infos


def _module_at(model, path):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def build_model(config: ModelConfig, *, parametrization: str = "sp",
                base_config: ModelConfig | None = None, rngs: nnx.Rngs) -> GatedDeltaNetLM:
  """A GatedDeltaNetLM in parametrization "sp" or "mup" relative to `base_config`.

  `base_config=None` means config is its own base: a plain model with the default init.
  The draw is the same for both parametrizations (same rngs), so at the base width they agree.
  """
  _check_choice("parametrization", parametrization, PARAMETRIZATIONS)
  model = GatedDeltaNetLM(config, rngs=rngs)
  base_config = config if base_config is None else base_config
  rules = RULES[(parametrization, "adamw")]  # init and multipliers are optimizer-independent
  for path, info in param_infos(model, base_config).items():
    rule = rules[info.cls]
    init, mult = rule.init(info.m_in, info.m_out), rule.mult(info.m_in, info.m_out)
    variable = _module_at(model, path)
    if init != 1.0:
      variable[...] = (variable[...].astype(jnp.float32) * init).astype(variable.dtype)
    if mult != 1.0:
      owner = _module_at(model, path[:-1])
      if not hasattr(owner, "multiplier"):
        raise ValueError(f"μP asks for a forward multiplier {mult:g} on "
                         f"{_dotted(path)}, but {type(owner).__name__} has no "
                         "`multiplier`.")
      owner.multiplier = mult
  if config.tie_embeddings:  # the tied read-out reads the width: an output-like use of E
    m_d = config.d_model / base_config.d_model
    model.embed.attend_multiplier = rules["output"].mult(m_d, 1.0)
  gdn = GDN_RULES[parametrization]
  k_base, m_k = base_config.head_k_dim, config.head_k_dim / base_config.head_k_dim
  for _, module in nnx.iter_modules(model):
    if isinstance(module, GatedDeltaNet):
      module.qk_scale = k_base ** -0.5 * m_k ** gdn["qk_scale_power"]
      module.o_norm.eps = config.resolved_output_norm_eps * m_k ** gdn["o_norm_eps_power"]
      module.qk_norm_eps = config.qk_norm_eps * m_k ** gdn["qk_norm_eps_power"]
  return model


# ---- Optimizer: per-leaf LR and weight-decay multipliers over the nnx.Param state. ----

def _key_of(keypath) -> tuple:
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


def _map_by_path(fn: Callable[[tuple, Any], Any], tree):
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(_key_of(kp), x), tree)


def _lookup(table: dict[tuple, float], path: tuple) -> float:
  if path not in table:
    raise ValueError(f"μP optimizer: no rule for parameter {_dotted(path)}; expected "
                     "the optimizer to be built from the same model it updates.")
  return table[path]


def scale_by_leaf(multipliers: dict[tuple, float]) -> optax.GradientTransformation:
  """u ← m_path · u, with m looked up by each leaf's parameter path."""
  def update_fn(updates, state, params=None):
    del params
    return _map_by_path(lambda p, u: u * jnp.asarray(_lookup(multipliers, p), u.dtype),
                        updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def add_decayed_weights_by_leaf(weight_decay: dict[tuple, float]) -> optax.GradientTransformation:
  """u ← u + λ_path · θ (decoupled when placed after the Adam scaling)."""
  def update_fn(updates, state, params):
    if params is None:
      raise ValueError("add_decayed_weights_by_leaf: `params` is None; expected the parameters.")
    decay = _map_by_path(lambda p, x: _lookup(weight_decay, p), params)
    return jax.tree.map(lambda u, x, lam: u + lam * x.astype(u.dtype) if lam else u,
                        updates, params, decay), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def parse_lr_overrides(specs) -> dict[str, Scaling]:
  """["g_proj:-0.5", "conv:out:-0.5", …] → {"g_proj": Scaling(fan_in=-0.5), "conv":
  Scaling(fan_out=-0.5)}: LR × m_in^p (or × m_out^p with `out`) for every parameter whose dotted
  path contains the name (the command-line form of `lr_overrides`)."""
  out = {}
  for spec in specs or ():
    name, _, power = str(spec).rpartition(":")
    axis = "fan_in"
    if name.endswith(":out") or name.endswith(":in"):
      name, _, side = name.rpartition(":")
      axis = "fan_" + side
    try:
      out[name] = Scaling(**{axis: float(power)})
    except ValueError:
      name = ""
    if not name:
      raise ValueError(f"LR override {spec!r}; expected 'NAME:POWER' or 'NAME:out:POWER', e.g. "
                       "'g_proj:-0.5' (LR × m_in^POWER, or m_out^POWER, for parameters whose "
                       "path contains NAME).")
  return out


def multipliers(model, *, parametrization: str, optimizer: str = "adamw",
                base_config: ModelConfig | None = None,
                lr_overrides: dict[str, Scaling] | None = None
                ) -> dict[tuple, tuple[str, float, float]]:
  """{path: (class, LR multiplier, weight-decay multiplier or 0 where no decay)}.

  `lr_overrides` {name: Scaling}: an extra width scaling of the LR of every parameter whose dotted
  path contains `name`, on top of the table (for ablations of a rule; 1 at the base width, so μP
  and SP still agree there). Its weight-decay multiplier is divided by the same factor (lr·wd
  per step unchanged). Every name must match some parameter.
  """
  _check_choice("parametrization", parametrization, PARAMETRIZATIONS)
  _check_choice("optimizer", optimizer, OPTIMIZERS)
  rules = RULES[(parametrization, optimizer)]
  lr_overrides = dict(lr_overrides or {})
  infos = param_infos(model, base_config)
  dotted = {path: _dotted(path) for path in infos}
  for name in lr_overrides:
    if not any(name in d for d in dotted.values()):
      raise ValueError(f"`lr_overrides` name {name!r} matches no parameter; expected part of a "
                       "parameter path such as 'mixer.g_proj.kernel'.")
  out = {}
  for path, info in infos.items():
    rule = rules[info.cls]
    extra = math.prod(scaling(info.m_in, info.m_out) for name, scaling in lr_overrides.items()
                      if name in dotted[path])
    wd = rule.wd(info.m_in, info.m_out) / extra if info.weight_decay else 0.0
    out[path] = (info.cls, rule.lr(info.m_in, info.m_out) * extra, wd)
  return out


def make_optimizer(model, *, parametrization: str, optimizer: str = "adamw", learning_rate,
                   weight_decay: float = 0.0, base_config: ModelConfig | None = None,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   momentum: float = 0.0, lr_overrides: dict[str, Scaling] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW or SGD(+momentum) with μP/SP per-parameter LR and weight-decay multipliers.

  Per parameter p with LR multiplier r_p and weight-decay multiplier w_p (table), each step
      AdamW:  θ ← θ − lr · r_p · (adam(g) + wd · w_p · θ)
      SGD:    θ ← θ − lr · r_p · trace_momentum(g + wd · w_p · θ)
  with w_p = 1 / r_p on decayed matrices (lr·wd per step width-independent) and 0 on parameters
  labelled weight_decay=False. `learning_rate` is a float or an optax schedule.
  `lr_overrides`: extra per-parameter LR width scalings (see `multipliers`).
  """
  mults = multipliers(model, parametrization=parametrization, optimizer=optimizer,
                      base_config=base_config, lr_overrides=lr_overrides)
  lr_mult = {p: m[1] for p, m in mults.items()}
  wd = {p: weight_decay * m[2] for p, m in mults.items()}
  if optimizer == "adamw":
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
      parts.append(add_decayed_weights_by_leaf(wd))
  else:
    parts = [add_decayed_weights_by_leaf(wd)] if weight_decay else []
    if momentum:
      parts.append(optax.trace(decay=momentum))
  parts += [optax.scale_by_learning_rate(learning_rate), scale_by_leaf(lr_mult)]
  return optax.chain(*parts)
