"""Model families that grow with one width d: the width schemes of the μP experiments.

    paper_config(d, ...)      the paper's family (Liu & Gu 2026): 6 q/k heads whose dims grow
    heads_config(d, ...)      scheme A: heads ∝ d at a fixed head dim
    head_dims_config(d, ...)  scheme B: a fixed number of heads whose dims ∝ d
"""
from __future__ import annotations

from gdn_jax.model import ModelConfig


def fla_mlp_hidden(d_model: int, hidden_ratio: int = 4, multiple_of: int = 256) -> int:
  """fla's GatedMLP size: int(d · ratio · 2/3) rounded up to a multiple of 256 (2816 at 1024)."""
  size = int(d_model * hidden_ratio * 2 / 3)
  return multiple_of * -(-size // multiple_of)


def paper_config(d_model: int, *, num_layers: int = 8, vocab_size: int = 50304,
                 **overrides) -> ModelConfig:
  """The model family of the paper's experiments (its config/train_gdn_small_*.py).

  6 q/k heads with head_k_dim = 0.75·d/6 (key dim 0.75·d), value heads of 2·head_k_dim (value
  dim 1.5·d), short conv 4, output gate, SwiGLU with hidden ratio 4 rounded as fla does, every
  norm eps 1e-6 (the gated output norm and the q/k L2 norm too), tied embeddings. The paper
  trains 8 layers and a 50304-token GPT-2 vocabulary; `overrides` sets any other ModelConfig
  field (e.g. fewer layers, a byte vocabulary, the compute dtype).
  """
  if not isinstance(d_model, int) or d_model <= 0 or d_model % 8:
    raise ValueError(f"paper_config: `d_model`={d_model!r}; expected a positive multiple of 8 "
                     "(head_k_dim = 0.75·d/6 must be an integer).")
  head_k_dim = d_model // 8
  fields = dict(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=6,
                head_k_dim=head_k_dim, head_v_dim=2 * head_k_dim,
                mlp_hidden=fla_mlp_hidden(d_model), conv_size=4, use_gate=True,
                use_short_conv=True, norm_eps=1e-6, output_norm_eps=1e-6, qk_norm_eps=1e-6,
                tie_embeddings=True)
  fields.update(overrides)
  return ModelConfig(**fields)


def heads_config(d_model: int, *, head_dim: int, mlp_ratio: int = 4, **overrides) -> ModelConfig:
  """Scheme A: d / head_dim heads of K = V = head_dim; SwiGLU hidden mlp_ratio · d."""
  if d_model % head_dim:
    raise ValueError(f"heads_config: `d_model`={d_model} is not a multiple of `head_dim`="
                     f"{head_dim}; expected d = num_heads · head_dim.")
  return ModelConfig(**{**dict(d_model=d_model, num_heads=d_model // head_dim,
                               head_k_dim=head_dim, head_v_dim=head_dim,
                               mlp_hidden=mlp_ratio * d_model), **overrides})


def head_dims_config(d_model: int, *, num_heads: int, mlp_ratio: int = 4,
                     **overrides) -> ModelConfig:
  """Scheme B: `num_heads` heads of K = V = d / num_heads; SwiGLU hidden mlp_ratio · d."""
  if d_model % num_heads:
    raise ValueError(f"head_dims_config: `d_model`={d_model} is not a multiple of `num_heads`="
                     f"{num_heads}; expected d = num_heads · head_dim.")
  return ModelConfig(**{**dict(d_model=d_model, num_heads=num_heads,
                               head_k_dim=d_model // num_heads, head_v_dim=d_model // num_heads,
                               mlp_hidden=mlp_ratio * d_model), **overrides})
