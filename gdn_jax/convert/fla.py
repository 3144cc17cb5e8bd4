"""Checkpoint conversion: fla's GatedDeltaNetForCausalLM (Hugging Face layout) ↔ GatedDeltaNetLM.

(Over 400 lines because the layout table and the list of what is refused stay beside the code
that applies them: ~100 of its lines are this docstring.)

    from_fla(directory) -> (ModelConfig, GatedDeltaNetLM)        config.json + model.safetensors
                                                                  (or sharded, with the index)
    to_fla(model, directory, *, dtype=None, fold_multipliers=False, fla_config=None,
           max_shard_bytes=None) -> files written
    (the command line and run directories: gdn_jax.convert.rundir, gdn_jax.convert.__main__)

Tensor level: `fla_config_to_model_config` / `model_config_to_fla_config`, `fla_state_to_params`
/ `params_to_fla_state` (name → NumPy array on both sides; ours are the dotted nnx paths such as
"blocks.0.mixer.q_proj.kernel"), `params_of(model)` and `load_params(model, params)`.

The layouts (facts from fla's source: models/gated_deltanet, layers/gated_deltanet.py,
modules/conv/short_conv.py, fused_norm_gate.py, mlp.py), per block i, fla under
`model.layers.{i}.`:

    ours (blocks.{i}.)          fla                       layout
    mixer_norm.weight           attn_norm.weight          [D] as is
    mixer.{q,k,v}_proj.kernel   attn.{q,k,v}_proj.weight  ours [D, out] = torch Linear [out, D]ᵀ
    mixer.{a,b}_proj.kernel     attn.{a,b}_proj.weight    [D, H] = [H, D]ᵀ
    mixer.g_proj.kernel         attn.g_proj.weight        (use_gate) [D, H·V] = [H·V, D]ᵀ
    mixer.{q,k,v}_conv.weight   attn.{q,k,v}_conv1d.weight (use_short_conv) ours [W, C];
                                                          torch depthwise Conv1d [C, 1, W]:
                                                          ours[i, c] = fla[c, 0, i]
    mixer.A_log, mixer.dt_bias  attn.A_log, attn.dt_bias  [H] as is
    mixer.o_norm.weight         attn.o_norm.weight        [V] as is (one gain for all heads)
    mixer.o_proj.kernel         attn.o_proj.weight        [H·V, D] = [D, H·V]ᵀ
    mlp_norm.weight             mlp_norm.weight           [D]
    mlp.{gate,up,down}_proj.kernel  mlp.{gate,up,down}_proj.weight   transposed
  and embed.embedding ↔ model.embeddings.weight [vocab, D] as is, final_norm.weight ↔
  model.norm.weight, lm_head.kernel [D, vocab] ↔ lm_head.weight [vocab, D]ᵀ. With tied embeddings
  (fla's `tie_word_embeddings`) Hugging Face writes no lm_head.weight; one that is present must
  equal model.embeddings.weight bit for bit. Head order is the same on both sides (fla's
  '(h d)' and our reshape are head-major). Values are moved, never rounded: a round trip
  fla → gdn-jax → fla gives every tensor back bit for bit (in its file dtype; bf16 and fp16
  are exact in float32 parameters).

The model math agrees: q, k, v = SiLU(causal depthwise conv(W x)) without conv bias, L2-normed
q, k (eps 1e-6), β = σ(W_b x) (2σ with allow_neg_eigval), g = −exp(A_log)·softplus(W_a x +
dt_bias), scale K^-½, o → RMSNorm_V(o)·w·SiLU(W_g x) (RMSNorm_V(o)·w without the gate) → W_o,
SwiGLU MLP, every RMSNorm with fla's `norm_eps`, intermediate size from `intermediate_size` or
256·⌈int(hidden·hidden_ratio·2/3)/256⌉ as fla's GatedMLP.

Refused, each with an error naming the field, its value and what is supported: fla's hybrid
attention layers (`attn` with layers), `attnres_block_size`, `hidden_act` other than "swish",
another `model_type`, an `expand_v` that does not give an integer head_v_dim; on our side an
`output_norm_eps` or `qk_norm_eps` fla cannot express (fla uses `norm_eps` and 1e-6) and any
ModelConfig field added later at a non-default value. Ignored because they do not change the
forward: fla's kernel and fusion switches (attn_mode, fuse_norm, fuse_swiglu,
fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp), use_cache, max_position_embeddings,
token ids; ours: dtype, param_dtype, chunk_size, rule_impl.

Forward multipliers (μP). fla's model has none: every Linear and the embedding are used as
stored, the readout scale is K^-½ and the norms' eps are the config's. `to_fla` checks the
model's own multipliers (`Linear.multiplier`, `Embed.multiplier`/`attend_multiplier`,
`GatedDeltaNet.qk_scale`, every norm's eps, the q/k norm eps). A model in SP — which includes
any μP model at its base width, where every multiplier is 1 — converts exactly. Otherwise:
  * Linear / embedding / tied read-out multipliers: refused by default; with
    `fold_multipliers=True` each is folded into its tensor (W·m computed in float64, rounded once
    to the stored dtype: the same function in exact arithmetic, within one rounding per weight);
    a tied read-out whose multiplier differs from the embedding's is exported untied
    (lm_head = m_readout · E).
  * qk_scale ≠ K^-½ or an eps ≠ fla's: always refused (no tensor can carry them).
`from_fla` builds the SP model (all multipliers 1); `--from_fla` writes a run whose model is its
own μP base (mup_base = 0), so "sp" and "mup" build the same forward; a parametrization whose
multipliers at its base are not 1 is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax import safetensors_io
from gdn_jax.layers import (Embed, GatedDeltaNet, GatedRMSNorm, Linear, RMSNorm, ShortConv,
                            SwiGLU)
from gdn_jax.model import Block, GatedDeltaNetLM, ModelConfig
from gdn_jax.mup.labels import dotted, key_of

FLA_QK_NORM_EPS = 1e-6     # fla's l2norm eps inside the chunked and recurrent kernels
FLA_MODEL_TYPE = "gated_deltanet"
FLA_ARCHITECTURE = "GatedDeltaNetForCausalLM"
# fla's GatedDeltaNetConfig defaults (the same from v0.2.2 to v0.5.2), used for fields a
# config.json leaves out. The sizes have no default here: they must be in the file.
FLA_DEFAULTS = dict(attn_mode="chunk", expand_v=2.0, use_gate=True, use_short_conv=True,
                    allow_neg_eigval=False, conv_size=4, num_v_heads=None, hidden_ratio=4,
                    intermediate_size=None, hidden_act="swish", norm_eps=1e-6, attn=None,
                    tie_word_embeddings=False, initializer_range=0.02, attnres_block_size=None)
FLA_REQUIRED = ("hidden_size", "num_heads", "head_dim", "num_hidden_layers", "vocab_size")
FLA_ATTN_MODES = ("chunk", "fused_recurrent")   # kernels of the same math
# ModelConfig fields that say how to compute, not what: not part of a checkpoint.
COMPUTE_FIELDS = ("dtype", "param_dtype", "chunk_size", "rule_impl", "loss_chunk_size",
                  "fuse_projections", "conv_impl")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


class ConversionError(ValueError):
  """A checkpoint, config or model that cannot be converted (the message says which and why)."""


# --- the name map -------------------------------------------------------------------------------

# (ours, fla, layout). "linear": ours [in, out] = torch Linear [out, in]ᵀ; "conv": ours [W, C],
# torch depthwise Conv1d [C, 1, W]; "same": as is.
_BLOCK = (
    ("mixer_norm.weight", "attn_norm.weight", "same"),
    ("mixer.q_proj.kernel", "attn.q_proj.weight", "linear"),
    ("mixer.k_proj.kernel", "attn.k_proj.weight", "linear"),
    ("mixer.v_proj.kernel", "attn.v_proj.weight", "linear"),
    ("mixer.a_proj.kernel", "attn.a_proj.weight", "linear"),
    ("mixer.b_proj.kernel", "attn.b_proj.weight", "linear"),
    ("mixer.g_proj.kernel", "attn.g_proj.weight", "linear"),         # use_gate
    ("mixer.q_conv.weight", "attn.q_conv1d.weight", "conv"),         # use_short_conv
    ("mixer.k_conv.weight", "attn.k_conv1d.weight", "conv"),
    ("mixer.v_conv.weight", "attn.v_conv1d.weight", "conv"),
    ("mixer.A_log", "attn.A_log", "same"),
    ("mixer.dt_bias", "attn.dt_bias", "same"),
    ("mixer.o_norm.weight", "attn.o_norm.weight", "same"),
    ("mixer.o_proj.kernel", "attn.o_proj.weight", "linear"),
    ("mlp_norm.weight", "mlp_norm.weight", "same"),
    ("mlp.gate_proj.kernel", "mlp.gate_proj.weight", "linear"),
    ("mlp.up_proj.kernel", "mlp.up_proj.weight", "linear"),
    ("mlp.down_proj.kernel", "mlp.down_proj.weight", "linear"),
)


def name_map(config: ModelConfig) -> list[tuple[str, str, str]]:
  """Every (our name, fla name, layout) of `config`'s parameters, in a fixed order."""
  out = [("embed.embedding", "model.embeddings.weight", "same")]
  for i in range(config.num_layers):
    for ours, fla, layout in _BLOCK:
      if ours == "mixer.g_proj.kernel" and not config.use_gate:
        continue
      if "_conv." in ours and not config.use_short_conv:
        continue
      out.append((f"blocks.{i}.{ours}", f"model.layers.{i}.{fla}", layout))
  out.append(("final_norm.weight", "model.norm.weight", "same"))
  if not config.tie_embeddings:
    out.append(("lm_head.kernel", "lm_head.weight", "linear"))
  return out


def _to_fla_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.T[:, None, :])
  return x


def _from_fla_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x[:, 0, :].T)
  return np.asarray(x)


def _fla_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "linear":
    return shape[::-1]
  if layout == "conv":
    return (shape[1], 1, shape[0])
  return shape


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Our parameter names → shapes for `config` (from the model's own construction, no init)."""
  abstract = nnx.eval_shape(lambda: GatedDeltaNetLM(config, rngs=nnx.Rngs(0)))
  return {name: tuple(leaf.shape) for name, leaf in _named_leaves(nnx.state(abstract, nnx.Param))}


def _named_leaves(state) -> list[tuple[str, typing.Any]]:
  """(dotted name, leaf) of an nnx state (mup.labels' parameter paths: `.value` dropped)."""
  return [(dotted(key_of(path)), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]


# --- tensors ------------------------------------------------------------------------------------

def fla_state_to_params(state: typing.Mapping[str, np.ndarray],
                        config: ModelConfig) -> dict[str, np.ndarray]:
  """fla tensor name → array (a Hugging Face state dict) into our name → array.

  Raises ConversionError naming the first fla tensor that is missing (in the order of
  `name_map`), has the wrong shape (expected and received), or is left over (in name order).
  """
  shapes = param_shapes(config)
  params, used = {}, set()
  for ours, fla, layout in name_map(config):
    if fla not in state:
      raise ConversionError(f"fla checkpoint: tensor {fla!r} is missing; expected it for "
                            f"{ours} of the config (and {len(state)} tensors were found).")
    array = np.asarray(state[fla])
    expected = _fla_shape(shapes[ours], layout)
    if tuple(array.shape) != expected:
      raise ConversionError(f"fla checkpoint: tensor {fla!r} has shape {list(array.shape)}; "
                            f"expected {list(expected)} (from the config).")
    params[ours] = _from_fla_layout(array, layout)
    used.add(fla)
  if config.tie_embeddings and "lm_head.weight" in state:
    head, embed = np.asarray(state["lm_head.weight"]), np.asarray(state["model.embeddings.weight"])
    if head.shape != embed.shape or head.dtype != embed.dtype or head.tobytes() != embed.tobytes():
      raise ConversionError("fla checkpoint: tie_word_embeddings is true but tensor "
                            "'lm_head.weight' differs from 'model.embeddings.weight'; expected "
                            "no lm_head.weight (Hugging Face drops tied copies) or an equal one.")
    used.add("lm_head.weight")
  extra = sorted(set(state) - used)
  if extra:
    raise ConversionError(f"fla checkpoint: tensor {extra[0]!r} has no counterpart in "
                          f"GatedDeltaNetLM for this config ({len(extra)} unmatched tensors); "
                          "expected only the tensors of fla's GatedDeltaNetForCausalLM "
                          f"({len(used)} for this config).")
  return params


def params_to_fla_state(params: typing.Mapping[str, np.ndarray],
                        config: ModelConfig) -> dict[str, np.ndarray]:
  """Our name → array into fla tensor name → array (no lm_head.weight when tied, as Hugging
  Face writes it). Raises ConversionError naming the first missing, misshaped or extra one."""
  shapes = param_shapes(config)
  state, used = {}, set()
  for ours, fla, layout in name_map(config):
    if ours not in params:
      raise ConversionError(f"parameters: {ours!r} is missing; expected it for {fla}.")
    array = np.asarray(params[ours])
    if tuple(array.shape) != shapes[ours]:
      raise ConversionError(f"parameters: {ours!r} has shape {list(array.shape)}; expected "
                            f"{list(shapes[ours])} (from the config).")
    state[fla] = _to_fla_layout(array, layout)
    used.add(ours)
  extra = sorted(set(params) - used)
  if extra:
    raise ConversionError(f"parameters: {extra[0]!r} has no counterpart in fla's "
                          f"GatedDeltaNetForCausalLM ({len(extra)} unmatched).")
  return state


def params_of(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters, our name → NumPy array (in the parameter dtype)."""
  return {name: np.asarray(leaf) for name, leaf in _named_leaves(nnx.state(model, nnx.Param))}


def load_params(model: nnx.Module, params: typing.Mapping[str, np.ndarray]) -> nnx.Module:
  """A copy of `model` (concrete, or abstract from nnx.eval_shape) whose parameters are `params`,
  each cast to the model's parameter dtype. Every parameter must be given with its shape."""
  graphdef, state = nnx.split(model)
  names = {name for name, _ in _named_leaves(nnx.state(model, nnx.Param))}
  extra = sorted(set(params) - names)
  if extra:
    raise ConversionError(f"parameters: {extra[0]!r} is not a parameter of the model.")

  def fill(path, leaf):
    name = dotted(key_of(path))
    if name not in names:
      return leaf
    if name not in params:
      raise ConversionError(f"parameters: {name!r} is missing.")
    value = np.asarray(params[name])
    if tuple(value.shape) != tuple(leaf.shape):
      raise ConversionError(f"parameters: {name!r} has shape {list(value.shape)}; expected "
                            f"{list(leaf.shape)}.")
    return jnp.asarray(value.astype(leaf.dtype, copy=False))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def model_from_params(config: ModelConfig, params: typing.Mapping[str, np.ndarray]
                      ) -> GatedDeltaNetLM:
  """The SP GatedDeltaNetLM of `config` with `params` (no random init is drawn)."""
  return load_params(nnx.eval_shape(lambda: GatedDeltaNetLM(config, rngs=nnx.Rngs(0))), params)


# --- configs ------------------------------------------------------------------------------------

def _refuse(field: str, value, supported: str):
  raise ConversionError(f"fla config: `{field}`={value!r} is not supported; supported: "
                        f"{supported}.")


def _attn_layers(attn) -> list:
  """Layer indices of fla's hybrid attention spec(s) (a dict, a list of dicts, or None)."""
  specs = [] if attn is None else attn if isinstance(attn, list) else [attn]
  layers = []
  for spec in specs:
    layers += list(spec.get("layers", [])) if isinstance(spec, dict) else [spec]
  return layers


def fla_config_to_model_config(fla_config: typing.Mapping, *, dtype: str = "float32",
                               param_dtype: str = "float32", chunk_size: int = 64,
                               rule_impl: str = "auto") -> ModelConfig:
  """ModelConfig of an fla GatedDeltaNetConfig (its config.json as a dict); the compute settings
  are ours to choose. Raises ConversionError naming a missing or unsupported field."""
  cfg = dict(fla_config)
  model_type = cfg.get("model_type", FLA_MODEL_TYPE)
  if model_type != FLA_MODEL_TYPE:
    _refuse("model_type", model_type, f"{FLA_MODEL_TYPE!r} (fla's {FLA_ARCHITECTURE})")
  for name in FLA_REQUIRED:
    if name not in cfg:
      raise ConversionError(f"fla config: `{name}` is missing; expected every one of "
                            f"{FLA_REQUIRED} (the model's sizes).")
  c = {**FLA_DEFAULTS, **{k: v for k, v in cfg.items() if k in FLA_DEFAULTS or k in FLA_REQUIRED}}
  if c["attn_mode"] not in FLA_ATTN_MODES:
    _refuse("attn_mode", c["attn_mode"], f"one of {FLA_ATTN_MODES}")
  if _attn_layers(c["attn"]):
    _refuse("attn", c["attn"], "None or no layers: gdn_jax.convert converts GDN-only models "
            "(fla's hybrid attention layers have no counterpart in GatedDeltaNetLM)")
  if c["attnres_block_size"] is not None:
    _refuse("attnres_block_size", c["attnres_block_size"], "None (no attention residuals)")
  if c["hidden_act"] != "swish":
    _refuse("hidden_act", c["hidden_act"], "'swish' (the SwiGLU MLP)")
  if cfg.get("conv_bias"):
    _refuse("conv_bias", cfg["conv_bias"], "False (ShortConv has no bias)")
  for name in ("hidden_size", "num_heads", "head_dim", "num_hidden_layers", "vocab_size",
               "conv_size", "expand_v", "norm_eps", "initializer_range"):
    if not isinstance(c[name], (int, float)) or isinstance(c[name], bool):
      _refuse(name, c[name], "a number")
  head_v = c["head_dim"] * c["expand_v"]
  if not (isinstance(head_v, (int, float)) and float(head_v).is_integer()):
    _refuse("expand_v", c["expand_v"], f"a ratio that makes head_dim={c['head_dim']} × expand_v "
            "an integer head_v_dim")
  hidden = c["intermediate_size"]
  if hidden is None:  # fla's GatedMLP: 2/3 · hidden_ratio · D rounded up to a multiple of 256
    ratio = 4 if c["hidden_ratio"] is None else c["hidden_ratio"]
    hidden = int(c["hidden_size"] * ratio * 2 / 3)
    hidden = 256 * ((hidden + 256 - 1) // 256)
  try:
    return ModelConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_heads"], head_k_dim=c["head_dim"], head_v_dim=int(head_v),
        num_v_heads=c["num_v_heads"], mlp_hidden=hidden, conv_size=c["conv_size"],
        use_gate=bool(c["use_gate"]), use_short_conv=bool(c["use_short_conv"]),
        allow_neg_eigval=bool(c["allow_neg_eigval"]), norm_eps=float(c["norm_eps"]),
        output_norm_eps=None, qk_norm_eps=FLA_QK_NORM_EPS,
        tie_embeddings=bool(c["tie_word_embeddings"]),
        init_std=float(c["initializer_range"]), dtype=dtype, param_dtype=param_dtype,
        chunk_size=chunk_size, rule_impl=rule_impl)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"fla config → ModelConfig: {e}") from None


def model_config_to_fla_config(config: ModelConfig) -> dict:
  """The model fields of fla's GatedDeltaNetConfig for `config` (config.json as a dict).
  Raises ConversionError naming a field fla cannot express."""
  defaults = type(config)()
  handled = {"vocab_size", "d_model", "num_layers", "num_heads", "head_k_dim", "head_v_dim",
             "num_v_heads", "mlp_hidden", "conv_size", "use_gate", "use_short_conv",
             "allow_neg_eigval", "norm_eps", "output_norm_eps", "qk_norm_eps", "tie_embeddings",
             "init_std", *COMPUTE_FIELDS,
             "lm_head_init_std"}   # shapes only the init draw, not the weights being exported
  for f in dataclasses.fields(config):  # fields added to ModelConfig after this converter
    if f.name not in handled and getattr(config, f.name) != getattr(defaults, f.name):
      raise ConversionError(f"ModelConfig: `{f.name}`={getattr(config, f.name)!r} has no "
                            "counterpart in fla's GatedDeltaNetConfig; supported: its default "
                            f"{getattr(defaults, f.name)!r}.")
  if config.resolved_output_norm_eps != config.norm_eps:
    raise ConversionError(f"ModelConfig: `output_norm_eps`={config.output_norm_eps!r} differs "
                          f"from norm_eps={config.norm_eps!r}; supported: None or norm_eps "
                          "(fla's output norm uses norm_eps).")
  if config.qk_norm_eps != FLA_QK_NORM_EPS:
    raise ConversionError(f"ModelConfig: `qk_norm_eps`={config.qk_norm_eps!r}; supported: "
                          f"{FLA_QK_NORM_EPS} (fla's L2-norm eps, fixed in its kernels).")
  K, V = config.head_k_dim, config.head_v_dim
  expand_v = V / K
  if int(K * expand_v) != V:
    raise ConversionError(f"ModelConfig: `head_v_dim`={V} with head_k_dim={K}: fla's "
                          f"int(head_dim · expand_v) = {int(K * expand_v)}; supported: a "
                          "head_v_dim that it reproduces.")
  return {
      "model_type": FLA_MODEL_TYPE, "architectures": [FLA_ARCHITECTURE], "attn_mode": "chunk",
      "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
      "num_heads": config.num_heads, "head_dim": K, "expand_v": expand_v,
      "num_v_heads": config.num_v_heads, "hidden_ratio": 4,
      "intermediate_size": config.resolved_mlp_hidden, "hidden_act": "swish",
      "conv_size": config.conv_size, "use_gate": config.use_gate,
      "use_short_conv": config.use_short_conv, "allow_neg_eigval": config.allow_neg_eigval,
      "norm_eps": config.norm_eps, "attn": None, "tie_word_embeddings": config.tie_embeddings,
      "initializer_range": config.init_std, "vocab_size": config.vocab_size,
  }


# --- forward multipliers ------------------------------------------------------------------------

_KNOWN_MODULES = (GatedDeltaNetLM, Block, GatedDeltaNet, Linear, Embed, RMSNorm, GatedRMSNorm,
                  ShortConv, SwiGLU, nnx.List)


def forward_multipliers(model: GatedDeltaNetLM) -> tuple[dict[str, float], list[str]]:
  """What makes `model`'s forward differ from fla's with the same tensors:
  ({our parameter name: multiplier ≠ 1 foldable into it}, [reasons that cannot be folded]).
  The read-out of a tied model is "lm_head.kernel" (its multiplier applies to Eᵀ)."""
  config = model.config
  fold, refuse = {}, []
  for path, module in nnx.iter_modules(model):
    where = ".".join(map(str, path)) or "model"
    if not isinstance(module, _KNOWN_MODULES):
      refuse.append(f"{where} is a {type(module).__name__}, which fla's GatedDeltaNet model "
                    "does not have")
    elif isinstance(module, Linear) and module.multiplier != 1.0:
      fold[f"{where}.kernel"] = module.multiplier
    elif isinstance(module, Embed):
      if module.multiplier != 1.0:
        fold[f"{where}.embedding"] = module.multiplier
      if config.tie_embeddings and module.attend_multiplier != 1.0:
        fold["lm_head.kernel"] = module.attend_multiplier
    elif isinstance(module, (RMSNorm, GatedRMSNorm)) and module.eps != config.norm_eps:
      refuse.append(f"{where}.eps={module.eps!r} (fla: norm_eps={config.norm_eps!r})")
    elif isinstance(module, GatedDeltaNet):
      if module.qk_scale != module.head_k_dim ** -0.5:
        refuse.append(f"{where}.qk_scale={module.qk_scale!r} (fla: head_dim^-1/2 = "
                      f"{module.head_k_dim ** -0.5!r})")
      if module.qk_norm_eps != FLA_QK_NORM_EPS:
        refuse.append(f"{where}.qk_norm_eps={module.qk_norm_eps!r} (fla: {FLA_QK_NORM_EPS})")
  return fold, refuse


def _listed(items: list[str], n: int = 3) -> str:
  return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _scaled(x: np.ndarray, m: float) -> np.ndarray:
  return (x.astype(np.float64) * m).astype(x.dtype)


def _fold(params: dict, config: ModelConfig, fold: dict) -> tuple[dict, ModelConfig]:
  """params with each multiplier folded into its tensor; a tied read-out with a multiplier other
  than the embedding's becomes an untied lm_head."""
  params = dict(params)
  readout = fold.pop("lm_head.kernel", None)
  embed_m = fold.get("embed.embedding", 1.0)
  for name, m in fold.items():
    params[name] = _scaled(params[name], m)
  if readout is not None and readout != embed_m:
    E = params["embed.embedding"]
    params["lm_head.kernel"] = np.ascontiguousarray(_scaled(E, readout / embed_m).T)
    config = dataclasses.replace(config, tie_embeddings=False)
  return params, config


# --- directories --------------------------------------------------------------------------------

def read_fla_config(directory: str | os.PathLike) -> dict:
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{str(path)!r} not found; expected a Hugging Face checkpoint "
                          "directory of fla's GatedDeltaNetForCausalLM (config.json + "
                          "model.safetensors).")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{str(path)!r} is not valid JSON ({e}).") from None


def from_fla(directory: str | os.PathLike, *, dtype: str = "float32",
             param_dtype: str = "float32", chunk_size: int = 64,
             rule_impl: str = "auto") -> tuple[ModelConfig, GatedDeltaNetLM]:
  """(ModelConfig, SP GatedDeltaNetLM) of an fla checkpoint directory: config.json and
  model.safetensors, or shards with model.safetensors.index.json. Float32 parameters (the
  default) hold bf16/fp16 files exactly."""
  config = fla_config_to_model_config(read_fla_config(directory), dtype=dtype,
                                      param_dtype=param_dtype, chunk_size=chunk_size,
                                      rule_impl=rule_impl)
  state, _ = safetensors_io.read_checkpoint(directory)
  return config, model_from_params(config, fla_state_to_params(state, config))


def to_fla(model: GatedDeltaNetLM, directory: str | os.PathLike, *, dtype: str | None = None,
           fold_multipliers: bool = False, fla_config: typing.Mapping | None = None,
           max_shard_bytes: int | None = None) -> list[pathlib.Path]:
  """Writes `model` as fla's GatedDeltaNetForCausalLM: config.json and model.safetensors (or
  shards of at most `max_shard_bytes` with the index), loadable with
  `GatedDeltaNetForCausalLM.from_pretrained(directory)`.

  dtype: "float32", "bfloat16" or "float16" for every tensor (None: the parameters' dtype).
  fold_multipliers: fold Linear / embedding multipliers into the tensors (module docstring);
  without it a model whose forward multipliers are not all 1 is refused. fla_config: a config
  dict whose other keys (token ids, fusion switches, ...) are kept; the model's fields replace
  its own. Returns the files written. The directory must not hold a checkpoint already.
  """
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ConversionError(f"to_fla: `dtype`={dtype!r}; expected None or one of {EXPORT_DTYPES}.")
  if not isinstance(model, GatedDeltaNetLM):
    raise ConversionError(f"to_fla: `model` is a {type(model).__name__}; expected a "
                          "GatedDeltaNetLM.")
  config = model.config
  model_config_to_fla_config(config)   # a field fla cannot express: named before anything else
  fold, refuse = forward_multipliers(model)
  if refuse:
    raise ConversionError(f"to_fla: the model's forward differs from fla's in ways no tensor can "
                          f"carry: {_listed(refuse)}; supported: SP forward scales (e.g. a μP "
                          "model at its base width).")
  if fold and not fold_multipliers:
    raise ConversionError(f"to_fla: the model has forward multipliers fla does not have: "
                          f"{_listed([f'{n} ×{m:g}' for n, m in fold.items()])}; supported: all "
                          "1 (SP, or μP at its base width), or fold_multipliers=True to fold "
                          "them into the weights.")
  params, config = _fold(params_of(model), config, fold)
  fla = model_config_to_fla_config(config)
  state = params_to_fla_state(params, config)
  if dtype is not None:
    state = {k: v.astype(jnp.dtype(dtype)) for k, v in state.items()}
  stored = {str(v.dtype) for v in state.values()}
  fla["torch_dtype"] = stored.pop() if len(stored) == 1 else "float32"
  out = {**({} if fla_config is None else dict(fla_config)), **fla}
  if "dtype" in out:   # newer transformers write `dtype` instead of `torch_dtype`
    out["dtype"] = fla["torch_dtype"]
  directory = pathlib.Path(directory)
  files = safetensors_io.write_checkpoint(directory, state, {"format": "pt"}, max_shard_bytes)
  (directory / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
  return files + [directory / "config.json"]
