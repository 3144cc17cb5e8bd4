"""build_model: a GatedDeltaNetLM with a parametrization's init and forward multipliers."""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from gdn_jax.attention import Attention
from gdn_jax.layers import GatedDeltaNet
from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from gdn_jax.mup import tables
from gdn_jax.mup.labels import dotted, param_infos
from gdn_jax.mup.tables import Std


def _module_at(model, path):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _set_multiplier(model, path, mult: float):
  owner = _module_at(model, path[:-1])
  if not hasattr(owner, "multiplier"):
    raise ValueError(f"μP asks for a forward multiplier {mult:g} on {dotted(path)}, but "
                     f"{type(owner).__name__} has no `multiplier`.")
  owner.multiplier = owner.multiplier * mult


def init_std_factor(info, rule_init) -> float:
  """What the parameter's default draw is multiplied by: a relative Scaling, or target/own std
  for an absolute `Std` (exactly 1.0 when they agree, so the draw is kept bit for bit)."""
  if not isinstance(rule_init, Std):
    return info.scale(rule_init)
  if info.init_std is None:
    raise ValueError(f"μP: the rule asks for an absolute init std on {dotted(info.path)}, "
                     "whose init is not a zero-mean normal draw (no `init_std` label).")
  target = rule_init(info.d_model)
  return 1.0 if math.isclose(target, info.init_std, rel_tol=1e-12) else target / info.init_std


def build_model(config: ModelConfig, *, parametrization: str = "sp",
                base_config: ModelConfig | None = None, optimizer: str = "adamw",
                mixer_output_multiplier: bool = False, sp_tied_embedding: bool = False,
                rngs: nnx.Rngs) -> GatedDeltaNetLM:
  """A GatedDeltaNetLM in `parametrization` ("sp", "mup", "paper", "paper_sp") relative to
  `base_config`.

  `base_config=None` means config is its own base. The draw is the same for every
  parametrization (same rngs); each rescales it, so at the base width "sp" and "mup" agree.
  `optimizer` picks the table: init and multipliers depend on it only in the paper's recipe
  (init factor 0.5 for AdamW, 0.32 for SGD). `mixer_output_multiplier`: multiply every GDN
  mixer's output by the parametrization's `mixer_output` scaling (the paper's model/gdn-mup.py
  variant: d0/d); refused where the parametrization has none. `sp_tied_embedding`: a tied
  embedding's read-out without the parametrization's `tied_readout` multiplier (SP's read-out;
  pass the same flag to `make_optimizer`, which gives the embedding SP's LR); no effect on an
  untied model (its embedding and LM head keep their classes' rules).
  """
  p = tables.get(parametrization)
  tables.check_optimizer(optimizer)
  if mixer_output_multiplier and p.mixer_output is None:
    raise ValueError(f"`mixer_output_multiplier`=True: {parametrization!r} has no mixer-output "
                     "rule; expected it with 'mup' or 'paper'.")
  model = GatedDeltaNetLM(config, rngs=rngs)
  base_config = config if base_config is None else base_config
  rules = p.rules[optimizer]
  for path, info in param_infos(model, base_config, parametrization=parametrization).items():
    rule = rules[info.cls]
    factor, mult = init_std_factor(info, rule.init), info.scale(rule.mult)
    if factor != 1.0:
      variable = _module_at(model, path)
      variable[...] = (variable[...].astype(jnp.float32) * factor).astype(variable.dtype)
    if mult != 1.0:
      _set_multiplier(model, path, mult)
  m_d = config.d_model / base_config.d_model
  if config.tie_embeddings:  # the tied read-out reads the width: an output-like use of E
    model.embed.attend_multiplier = 1.0 if sp_tied_embedding else p.tied_readout(1.0, 1.0, m_d)
  k_base, m_k = base_config.head_k_dim, config.head_k_dim / base_config.head_k_dim
  out_mult = p.mixer_output(1.0, 1.0, m_d) if mixer_output_multiplier else 1.0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, GatedDeltaNet):
      module.qk_scale = k_base ** -0.5 * m_k ** p.qk_scale_power
      module.o_norm.eps = config.resolved_output_norm_eps * m_k ** p.o_norm_eps_power
      module.qk_norm_eps = config.qk_norm_eps * m_k ** p.qk_norm_eps_power
      if out_mult != 1.0:
        module.o_proj.multiplier = module.o_proj.multiplier * out_mult
    elif isinstance(module, Attention):  # hybrid models: the attention logit scale (tables)
      if p.attn_scale_power is None:
        raise ValueError(f"`parametrization`={parametrization!r} defines no attention rule; "
                         "expected 'mup' or 'sp' for a model with attention layers.")
      h_base = base_config.resolved_attn_head_dim
      m_h = config.resolved_attn_head_dim / h_base
      module.scale = h_base ** -0.5 * m_h ** p.attn_scale_power
  return model
