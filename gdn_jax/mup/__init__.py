"""The Maximal Update Parametrization (μP) for Gated DeltaNet LMs, driven by parameter labels.

Public interface:

    build_model(config, *, parametrization="sp", base_config=None, optimizer="adamw",
                mixer_output_multiplier=False, rngs) -> GatedDeltaNetLM
    make_optimizer(model, *, parametrization, optimizer="adamw", learning_rate, weight_decay=0.0,
                   base_config=None, b1=0.9, b2=0.95, eps=1e-8, momentum=0.0, nesterov=False,
                   lr_overrides=None, weight_decay_convention=None, inner=None)
        -> optax.GradientTransformation       # an optax.multi_transform over the μP groups
    param_labels(model, *, parametrization, optimizer, base_config, ...) -> (labels, {label: Group})
    param_groups(model, ...) -> {path: Group(cls, lr, decay)};  param_infos(model, base_config)
    PARAMETRIZATIONS: "sp", "mup" (the project's), "paper", "paper_sp" (Liu & Gu's recipe);
        read-out ablations of μP "mup_head_sp", "mup_head_init" (issue 20; not recommended)

How it works (docs/mup.md has the derivations and the paper's recipe):
  1. Every nnx.Param carries `fan_in_axes` / `fan_out_axes`, a `role` and, for normal draws, its
     `init_std` (gdn_jax.layers). Fans are compared with those of the same parameter in
     `nnx.eval_shape` of the base model (no base weights are built).
  2. The parametrization classifies each parameter (by which fans grow, or by role) and reads
     four width scalings from its table (`tables`): init std, forward multiplier, LR multiplier,
     and whether it is decayed; the decay multiplier follows the decay convention.
  3. build_model rescales the default init draw and writes the forward multipliers into the
     modules; make_optimizer builds one optax chain per μP group and routes parameters to them
     with `optax.multi_transform`.
At the base config every scaling of "sp" and "mup" is 1: they give the same model and updates.
"""
from gdn_jax.mup.build import build_model
from gdn_jax.mup.labels import (Group, ParamInfo, key_of, multipliers, param_groups,
                                param_infos, param_labels, parse_lr_overrides)
from gdn_jax.mup.optimizer import make_optimizer
from gdn_jax.mup.tables import (DECAY_CONVENTIONS, OPTIMIZERS, PARAMETRIZATIONS, ONE,
                                Parametrization, Rule, Scaling, Std)

__all__ = [
    "build_model", "make_optimizer", "param_labels", "param_groups", "param_infos",
    "multipliers", "parse_lr_overrides", "key_of", "Group", "ParamInfo", "Parametrization",
    "Rule", "Scaling", "Std", "ONE", "PARAMETRIZATIONS", "OPTIMIZERS", "DECAY_CONVENTIONS",
]
