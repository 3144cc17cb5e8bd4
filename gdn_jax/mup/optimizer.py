"""make_optimizer: μP per-group LR and weight-decay multipliers through `optax.multi_transform`.

Each μP group (`gdn_jax.mup.param_labels`: class, LR multiplier r, decay multiplier w) gets its
own chain, and `optax.multi_transform` routes every parameter to its group's chain:

    AdamW:  u ← −lr · r · (adam(g) + wd · w · θ)
    SGD:    u ← −lr · r · trace(g + wd · w · θ)             trace = momentum[, Nesterov]

By default Adam's moments are computed once over the whole tree, in front of the partition
(they are per-coordinate arithmetic, so this is the same math; optax compiles Adam's bias
correction per tree, and one tree keeps the updates bit-identical to the earlier per-leaf
implementation and the Adam state in one piece). `inner` replaces Adam / momentum by any optax
transformation of unit step size per group (Lion, Muon, ...), inside the partition: μP then only
supplies the multipliers around it. Pick the table that matches its update size
(`optimizer="adamw"` for normalised updates, `"sgd"` for raw gradients).
"""
from __future__ import annotations

from typing import Callable

import jax
import optax

from gdn_jax.mup import tables
from gdn_jax.mup.labels import Group, dotted, key_of, param_groups
from gdn_jax.mup.tables import Scaling


def label_fn(groups_by_path: dict[tuple, Group]) -> Callable:
  """params → a tree of group labels (for multi_transform; works on nnx.State and plain trees)."""
  def labels(params):
    def one(keypath, _):
      path = key_of(keypath)
      if path not in groups_by_path:
        raise ValueError(f"μP optimizer: no rule for parameter {dotted(path)}; expected the "
                         "optimizer to be built from the same model it updates.")
      return groups_by_path[path].label
    return jax.tree_util.tree_map_with_path(one, params)
  return labels


def group_chain(group: Group, *, optimizer: str, learning_rate, weight_decay: float,
                inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """One group's chain: the inner transform, decay, the (scheduled) LR and the μP multiplier."""
  decay = weight_decay * group.decay
  decay_part = [optax.add_decayed_weights(decay)] if decay else []
  if optimizer == "adamw":   # decoupled: the decay is added after the normalised update
    parts = [inner, *decay_part]
  else:                      # SGD: the decay is part of the gradient (as torch.optim.SGD)
    parts = [*decay_part, inner]
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate),
                     optax.scale(group.lr))


def _inner_lookup(inner, groups: dict[str, Group]) -> Callable[[Group], object]:
  """`inner` as a callable, or a mapping keyed by group label or class name."""
  if callable(inner):
    return inner
  if not isinstance(inner, dict):
    raise ValueError(f"`inner` is a {type(inner).__name__}; expected a callable Group -> "
                     "GradientTransformation or a dict keyed by group label or class.")
  known = set(groups) | {g.cls for g in groups.values()}
  unknown = sorted(set(inner) - known)
  if unknown:
    raise ValueError(f"`inner` has transforms for {unknown}, which name no μP group of this "
                     f"model; expected labels or classes among {sorted(known)}.")

  def lookup(group):
    for key in (group.label, group.cls):
      if key in inner:
        return inner[key]
    raise ValueError(f"`inner` has no transform for group {group.label!r}; expected a key "
                     f"{group.label!r} or its class {group.cls!r}.")
  return lookup


def make_optimizer(model, *, parametrization: str, optimizer: str = "adamw", learning_rate,
                   weight_decay: float = 0.0, base_config=None, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, momentum: float = 0.0,
                   nesterov: bool = False, lr_overrides: dict[str, Scaling] | None = None,
                   weight_decay_convention: str | None = None,
                   sp_tied_embedding: bool = False, sgd_qk_heads_rule: bool = True,
                   embedding_lr_scale: float = 1.0, inner=None
                   ) -> optax.GradientTransformation:
  """AdamW or SGD(+momentum) with the μP/SP per-group multipliers, as one multi_transform.

  Per parameter p in group (r_p, w_p) (`param_groups`), each step
      AdamW:  θ ← θ − lr · r_p · (adam(g) + wd · w_p · θ)
      SGD:    θ ← θ − lr · r_p · trace_momentum(g + wd · w_p · θ)
  `learning_rate` is a float or an optax schedule. `lr_overrides`, `weight_decay_convention`,
  `sp_tied_embedding`, `sgd_qk_heads_rule`, `embedding_lr_scale`: see `param_groups`. `inner`: the base
  transformation per group instead of Adam / momentum, as a callable `inner(group)` or a dict
  keyed by group label or class name (every group must find one); it must not scale by the LR:
  decay, LR and μP multiplier are added around it.
  """
  tables.check_optimizer(optimizer)
  by_path = param_groups(model, parametrization=parametrization, optimizer=optimizer,
                         base_config=base_config, lr_overrides=lr_overrides,
                         weight_decay_convention=weight_decay_convention,
                         sp_tied_embedding=sp_tied_embedding,
                         sgd_qk_heads_rule=sgd_qk_heads_rule,
                         embedding_lr_scale=embedding_lr_scale)
  groups = {g.label: g for g in by_path.values()}

  if inner is None and optimizer == "adamw":
    per_group = {label: group_chain(group, optimizer=optimizer, learning_rate=learning_rate,
                                    weight_decay=weight_decay, inner=optax.identity())
                 for label, group in sorted(groups.items())}
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.multi_transform(per_group, label_fn(by_path)))
  if inner is None:
    make_inner = lambda group: (optax.trace(decay=momentum, nesterov=nesterov) if momentum
                                else optax.identity())
  else:
    make_inner = _inner_lookup(inner, groups)
  transforms = {}
  for label, group in sorted(groups.items()):
    tx = make_inner(group)
    if not isinstance(tx, optax.GradientTransformation):
      raise ValueError(f"`inner` returned {type(tx).__name__} for group {label!r}; expected an "
                       "optax.GradientTransformation.")
    transforms[label] = group_chain(group, optimizer=optimizer, learning_rate=learning_rate,
                                    weight_decay=weight_decay, inner=tx)
  return optax.multi_transform(transforms, label_fn(by_path))
