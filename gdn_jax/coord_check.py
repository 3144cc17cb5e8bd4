"""Coordinate check: do activation coordinate sizes stay Θ(1) across widths during training?

For each width n, build the model in parametrization P (relative to a base width), train it for a
few steps with a large LR on one fixed batch, and record before every step t = 0..steps the
coordinate size of every sown activation:

    size(x) = mean |x_i|                    (the state S: RMS over its K×V entries)
    delta(x) = mean |x_i(t) − x_i(0)|       (its change from init, same tokens)

Under μP both stay flat in n for t ≥ 1; under SP, hidden activations and logits grow with n.
`fit_slopes` fits log2 size = a + slope · log2 n per (activation, step).

Activations (per block l, names "L{l}.<name>"): mixer_in (normed residual), q, k, v (after conv
and SiLU, before the L2 norm: after it they are unit vectors by construction), beta, g, S (final
state), o (before the output norm), mixer_out, mlp_out, block_out (residual after the block);
plus embed_out and logits.

Width schemes: "heads" grows the number of heads at fixed head dims (d = num_heads · head_dim);
"head_dim" grows the head dims at a fixed number of heads; "paper" is the paper's family (6 heads,
head_k_dim = 0.75·d/6, value dim 1.5·d, fla's SwiGLU size, eps 1e-6, tied embeddings;
gdn_jax.families.paper_config). Training goes through the trainer's step
(gdn_jax.train.make_train_step) at a constant LR.

Hybrid models (`layer_pattern`, e.g. "GAS"; schemes "heads" and "head_dim"): the attention blocks
take the GDN blocks' head count and head dim, half as many key/value heads (GQA), the output gate,
q/k RMSNorm and a window of `attn_window` for 'S'. Their activations: mixer_in, q, k (after the
q/k norm, before RoPE), v, attn_logits (scale·qᵀk where attended, 0 elsewhere), o (before the
gate), mixer_out.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax import families, mup
from gdn_jax.model import ModelConfig
from gdn_jax.train.step import make_train_step

SCHEMES = ("heads", "head_dim", "paper")
RMS_NAMES = ("S",)


@dataclasses.dataclass(frozen=True)
class CoordCheckConfig:
  """What to train and how (defaults: the CPU test sizes)."""
  scheme: str = "heads"
  base_width: int = 64
  head_dim: int = 16          # "heads": fixed head dim
  num_heads: int = 4          # "head_dim": fixed head count
  num_layers: int = 2
  mlp_ratio: int = 2          # mlp_hidden = mlp_ratio · d (exactly proportional)
  vocab_size: int = 32        # small vocabulary: every logit coordinate carries signal
  batch: int = 4
  seq_len: int = 64
  steps: int = 4
  stay: float = 0.9           # probability that the next token follows the fixed permutation
  chunk_size: int = 16
  rule_impl: str = "auto"
  output_norm_eps: float | None = None   # the mixer output norm's eps at the base (None: 1e-5)
  mixer_output_multiplier: bool = False  # the paper's gdn-mup.py variant (d0/d on the mixer)
  sp_tied_embedding: bool = False        # a tied embedding trained as SP trains it (mup.build_model)
  layer_pattern: str = ""     # hybrid models: ModelConfig.layer_pattern ("" = all GDN)
  attn_window: int = 16       # the window of 'S' blocks
  lr_overrides: tuple[str, ...] = ()     # ablations of a rule: mup.parse_lr_overrides specs

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"CoordCheckConfig: `scheme`={self.scheme!r}; expected one of {SCHEMES}.")
    if self.layer_pattern and self.scheme == "paper":
      raise ValueError(f"CoordCheckConfig: `layer_pattern`={self.layer_pattern!r} with scheme "
                       "'paper'; expected a hybrid pattern with the 'heads' or 'head_dim' scheme "
                       "(the paper's family and recipe define no attention).")


def width_config(width: int, cc: CoordCheckConfig) -> ModelConfig:
  """The model at width d = `width` under the scheme of `cc`."""
  if cc.scheme == "paper":
    extra = {} if cc.output_norm_eps is None else dict(output_norm_eps=cc.output_norm_eps)
    return families.paper_config(width, num_layers=cc.num_layers, vocab_size=cc.vocab_size,
                                 chunk_size=cc.chunk_size, rule_impl=cc.rule_impl, **extra)
  if cc.scheme == "heads":
    if width % cc.head_dim:
      raise ValueError(f"width_config: `width`={width} is not a multiple of head_dim="
                       f"{cc.head_dim}; expected width = num_heads · head_dim.")
    heads, dim = width // cc.head_dim, cc.head_dim
  else:
    if width % cc.num_heads:
      raise ValueError(f"width_config: `width`={width} is not a multiple of num_heads="
                       f"{cc.num_heads}; expected width = num_heads · head_dim.")
    heads, dim = cc.num_heads, width // cc.num_heads
  hybrid = {}
  if cc.layer_pattern:
    hybrid = dict(layer_pattern=cc.layer_pattern, num_attn_heads=heads,
                  num_kv_heads=heads // 2 if heads % 2 == 0 else heads, attn_head_dim=dim,
                  attn_window=cc.attn_window, attn_output_gate=True, attn_qk_norm=True)
  return ModelConfig(vocab_size=cc.vocab_size, d_model=width, num_layers=cc.num_layers,
                     num_heads=heads, head_k_dim=dim, head_v_dim=dim,
                     mlp_hidden=cc.mlp_ratio * width, chunk_size=cc.chunk_size,
                     rule_impl=cc.rule_impl, output_norm_eps=cc.output_norm_eps, **hybrid)


def markov_batch(seed: int, cc: CoordCheckConfig) -> jax.Array:
  """A fixed, learnable batch [B, T+1]: a Markov chain on the vocabulary that follows a random
  permutation with probability `stay`, else jumps uniformly.

  Why not i.i.d. tokens over a large vocabulary: the hidden features of unrelated tokens are
  nearly orthogonal, so most coordinates of an update (and most logits) are incoherent noise of
  size Θ(n^-1/2) that swamps the Θ(1) μP signal at the small widths a CPU can reach. A
  learnable chain on a small vocabulary keeps every logit coordinate informative.
  """
  rng = np.random.default_rng(10_000 + seed)
  perm = rng.permutation(cc.vocab_size)
  idx = np.empty((cc.batch, cc.seq_len + 1), np.int64)
  idx[:, 0] = rng.integers(cc.vocab_size, size=cc.batch)
  for t in range(cc.seq_len):
    jump = rng.random(cc.batch) > cc.stay
    idx[:, t + 1] = np.where(jump, rng.integers(cc.vocab_size, size=cc.batch), perm[idx[:, t]])
  return jnp.asarray(idx, jnp.int32)


def _set_record(model, on: bool):
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "record"):
      module.record = on


def _name(keypath) -> str:
  keys = mup.key_of(keypath)
  keys = [k for k in keys if k not in ("mixer",)]
  if keys and keys[0] == "blocks":
    return f"L{keys[1]}." + str(keys[2])
  return str(keys[0])


@nnx.jit
def _forward(model, tokens_BxT):
  _, sown = nnx.capture(lambda m, t: m(t), nnx.Intermediate)(model, tokens_BxT)
  return sown


def record_activations(model, tokens_BxT) -> dict[str, np.ndarray]:
  """Runs one forward pass with recording on; returns {name: activation array}."""
  _set_record(model, True)
  try:
    sown = _forward(model, tokens_BxT)
  finally:
    _set_record(model, False)
  out = {}
  for keypath, x in jax.tree_util.tree_flatten_with_path(sown)[0]:
    out[_name(keypath)] = np.asarray(x, np.float32)
  return out


def coord_size(name: str, x: np.ndarray) -> float:
  """mean |x|; for the state S [B, H, K, V]: √K · RMS(S).

  S = Σ β k vᵀ is built from unit keys k = k̂/√K, whose coordinates are Θ(K^-1/2) by
  construction; √K·S = Σ β k̂ vᵀ is the state in units of unit-RMS keys k̂, so its entries are
  Θ(1) in μP whichever dimension grows (the raw RMS would show slope −1/2 when K grows).
  """
  if name.split(".")[-1] in RMS_NAMES:
    return float(np.sqrt(x.shape[-2] * np.mean(np.square(x))))
  return float(np.mean(np.abs(x)))


def run_width(width: int, cc: CoordCheckConfig, *, parametrization: str, optimizer: str,
              learning_rate: float, seeds=(0,)) -> list[dict]:
  """Sizes and changes of every activation at steps 0..cc.steps, one dict per seed."""
  config = width_config(width, cc)
  base = width_config(cc.base_width, cc)
  runs, step = [], None
  for seed in seeds:
    model = mup.build_model(config, parametrization=parametrization, base_config=base,
                            optimizer=optimizer,
                            mixer_output_multiplier=cc.mixer_output_multiplier,
                            sp_tied_embedding=cc.sp_tied_embedding, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    if step is None:  # one compiled step per width, shared by all seeds
      tx = mup.make_optimizer(model, parametrization=parametrization, optimizer=optimizer,
                              learning_rate=1.0, base_config=base,
                              sp_tied_embedding=cc.sp_tied_embedding,
                              lr_overrides=mup.parse_lr_overrides(cc.lr_overrides))
      step = jax.jit(make_train_step(graphdef, tx))
    opt_state = tx.init(params)
    tokens = markov_batch(seed, cc)  # fixed across widths and steps
    size, delta, losses, init = {}, {}, [], None
    for t in range(cc.steps + 1):
      acts = record_activations(nnx.merge(graphdef, params), tokens[:, :-1])
      init = acts if init is None else init
      for name, x in acts.items():
        size.setdefault(name, []).append(coord_size(name, x))
        delta.setdefault(name, []).append(coord_size(name, x - init[name]))
      if t < cc.steps:
        params, opt_state, metrics = step(params, opt_state, tokens, learning_rate)
        losses.append(float(metrics["loss"]))
    runs.append({"size": size, "delta": delta, "loss": losses})
  return runs


def fit_slope(widths, values) -> float:
  """Least-squares slope of log2(value) against log2(width)."""
  x = np.log2(np.asarray(widths, np.float64))
  y = np.log2(np.maximum(np.asarray(values, np.float64), 1e-30))
  return float(np.polyfit(x, y, 1)[0])


def coord_check(widths, cc: CoordCheckConfig, *, parametrization: str, optimizer: str,
                learning_rate: float, seeds=(0,)) -> dict:
  """Seed-averaged sizes [width][step] per activation and their log–log slopes per step.

  Returns {"widths", "size": {name: [[per step] per width]}, "delta": ..., "loss",
           "slopes": {"size"|"delta": {name: [slope per step]}}}.
  """
  widths = [int(w) for w in widths]
  runs = [run_width(w, cc, parametrization=parametrization, optimizer=optimizer,
                    learning_rate=learning_rate, seeds=seeds) for w in widths]
  out = {"widths": widths, "loss": [np.mean([r["loss"] for r in rw], 0).tolist() for rw in runs]}
  slopes = {}
  for kind in ("size", "delta"):
    names = runs[0][0][kind].keys()
    table = {n: [np.mean([r[kind][n] for r in rw], 0).tolist() for rw in runs] for n in names}
    out[kind] = table
    slopes[kind] = {n: [fit_slope(widths, [v[t] for v in table[n]]) if kind == "size" or t > 0
                        else 0.0 for t in range(cc.steps + 1)] for n in names}
  out["slopes"] = slopes
  return out


def max_abs_slope(result: dict, *, kind: str = "size", first_step: int = 1,
                  exclude: tuple[str, ...] = ()) -> tuple[float, str]:
  """The largest |slope| over activations and steps ≥ first_step (and where it occurs)."""
  best, where = 0.0, ""
  for name, per_step in result["slopes"][kind].items():
    if name.split(".")[-1] in exclude:
      continue
    for t, s in enumerate(per_step):
      if t >= first_step and abs(s) > best:
        best, where = abs(s), f"{name}@t={t}"
  return best, where
