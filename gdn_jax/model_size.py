"""Exact parameter counts and training FLOPs of GatedDeltaNetLM(config), for MFU. Re-exported by
gdn_jax.model.
"""
from __future__ import annotations

from gdn_jax.model_config import ModelConfig

def _param_counts(config: ModelConfig) -> dict[str, int]:
  c = config
  D, Vocab = c.d_model, c.vocab_size
  L = sum(kind == "G" for kind in c.layer_kinds)          # GDN blocks (all of them by default)
  L_attn = c.num_layers - L
  Hk, H, K, V = c.num_heads, c.resolved_num_v_heads, c.head_k_dim, c.head_v_dim
  mixer_matmul = D * (2 * Hk * K + H * V + 2 * H) + H * V * D + (D * H * V if c.use_gate else 0)
  mixer_other = 2 * H + V + (c.conv_size * (2 * Hk * K + H * V) if c.use_short_conv else 0)
  mlp = 3 * D * c.resolved_mlp_hidden
  N, Nkv, Ha = c.resolved_num_attn_heads, c.resolved_num_kv_heads, c.resolved_attn_head_dim
  attn_matmul = D * Ha * (2 * N + 2 * Nkv + (N if c.attn_output_gate else 0))
  attn_other = 2 * Ha if c.attn_qk_norm else 0
  return {
      'embed': Vocab * D,
      'blocks_matmul': L * (mixer_matmul + mlp),
      'blocks_other': L * (mixer_other + 2 * D),
      'attn_blocks_matmul': L_attn * (attn_matmul + mlp),
      'attn_blocks_other': L_attn * (attn_other + 2 * D),
      'final_norm': D,
      'lm_head': 0 if c.tie_embeddings else D * Vocab,
  }


def num_params(config: ModelConfig) -> int:
  """Exact number of parameters of GatedDeltaNetLM(config)."""
  return sum(_param_counts(config).values())


def rule_flops_per_token_per_head(head_k_dim: int, head_v_dim: int, chunk: int) -> tuple[float,
                                                                                        float]:
  """(fwd, bwd) FLOPs per token per value head of the chunked rule (docs: gdn-and-kernels):

      fwd ≈ 6KV + 5.25CK + 4CV + C²/2,     bwd ≈ 16KV + 18CK + 10CV + 4C².
  """
  K, V, C = head_k_dim, head_v_dim, chunk
  fwd = 6 * K * V + 5.25 * C * K + 4 * C * V + C * C / 2
  bwd = 16 * K * V + 18 * C * K + 10 * C * V + 4 * C * C
  return fwd, bwd


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) model FLOPs per token, for MFU.

      6 · (matmul params, LM head included, embedding lookup excluded)
    + 6 · W · (2·Hk·K + H·V)                       depthwise conv (2 FLOPs per tap), ×3 for bwd
    + L · H · (rule fwd + rule bwd)(K, V, C)       chunked gated delta rule, C = min(chunk, T)

  Norms, gates and other elementwise work are not counted (as in 6N MFU conventions). In a
  hybrid model the last two terms count the GDN blocks only, the attention blocks' matrices join
  the first, and each attention block adds

    12 · N · H_attn · ctx                          qᵀk and the weighted sum of v (fwd + bwd),

  ctx the mean number of keys a query attends to: (T + 1)/2 causal, mean_t min(t + 1, W) with a
  window W.
  """
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"flops_per_token: `seq_len`={seq_len!r}; expected a positive int.")
  c = config
  counts = _param_counts(c)
  matmul = counts['blocks_matmul'] + (counts['embed'] if c.tie_embeddings else counts['lm_head'])
  H = c.resolved_num_v_heads
  conv = (6 * c.conv_size * (2 * c.num_heads * c.head_k_dim + H * c.head_v_dim)
          if c.use_short_conv else 0)
  fwd, bwd = rule_flops_per_token_per_head(c.head_k_dim, c.head_v_dim,
                                           min(c.chunk_size, seq_len))
  L = sum(kind == "G" for kind in c.layer_kinds)
  if not c.has_attention:
    return float(6 * matmul + L * (conv + H * (fwd + bwd)))
  attn = 0.0
  for kind in c.layer_kinds:
    if kind != "G":
      W = c.attn_window if kind == "S" else seq_len
      ctx = sum(min(t + 1, W) for t in range(seq_len)) / seq_len
      attn += 12 * c.resolved_num_attn_heads * c.resolved_attn_head_dim * ctx
  matmul += counts['attn_blocks_matmul']
  return float(6 * matmul + L * (conv + H * (fwd + bwd)) + attn)
