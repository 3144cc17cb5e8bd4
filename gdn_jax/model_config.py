"""ModelConfig: the sizes and options of a Gated DeltaNet LM (pure GDN or hybrid), validated on
construction. Imported by gdn_jax.model, which re-exports it.
"""
from __future__ import annotations

import dataclasses

from gdn_jax.ops import IMPLS

DTYPES = ("float32", "bfloat16", "float16")
CONV_IMPLS = ("xla", "pallas")   # ShortConv's training path (gdn_jax.layers)
LAYER_KINDS = {"G": "GDN mixer", "A": "full causal attention", "S": "sliding-window attention"}


def _round_up(x: float, multiple: int) -> int:
  return int(-(-int(round(x)) // multiple) * multiple)


# Optional fields that config files (ml_collections, which cannot hold None) write as 0.
ZERO_MEANS_NONE = ("num_v_heads", "mlp_hidden", "output_norm_eps", "lm_head_init_std")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and options of a Gated DeltaNet LM.

  Attributes:
    vocab_size: tokens (256 for bytes).
    d_model: residual width D.
    num_layers: blocks L (each: GDN mixer, then SwiGLU MLP).
    num_heads: q/k heads Hk.
    head_k_dim: K, the q/k head dim (the state is K × V per value head).
    head_v_dim: V, the value head dim (fla's expand_v = V / K).
    num_v_heads: value heads H (grouped value attention when H > Hk, H % Hk == 0); None = Hk.
    mlp_hidden: SwiGLU hidden size; None = 8/3 · D rounded up to a multiple of 32.
    conv_size: ShortConv kernel W.
    use_gate: output gate SiLU(W_g x) in the mixer's output norm.
    use_short_conv: causal depthwise conv on q, k, v (else just SiLU).
    allow_neg_eigval: β = 2σ(·) so I − βkkᵀ may have negative eigenvalues.
    norm_eps: eps of every RMSNorm.
    output_norm_eps: eps of the mixer's gated output norm RMSNorm_V(o); None = norm_eps. Its
      size relative to mean(o²) sets how strongly the norm amplifies gradients of a small o
      (docs/mup.md, "the output norm's eps and SGD").
    qk_norm_eps: eps of the L2 norm of q and k, q / sqrt(Σ q² + eps) (fla: 1e-6). It caps that
      norm's gain 1/|q| at eps^-1/2 (docs/mup.md, "Bounding the q/k norm's gain").
    tie_embeddings: logits = h Eᵀ instead of a separate LM head.
    init_std: std of every Linear / Embed init at this config (μP rescales it; docs/mup.md).
    lm_head_init_std: std of the untied LM head's init instead of init_std (None: init_std). μP
      keeps the head's draw at every width (its 1/m multiplier shrinks the logits), so this is a
      base-width constant that μP transfers, like the LR (docs/mup.md, "The read-out's init").
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    chunk_size: chunk length of the chunked rule; rule_impl: gated_delta_rule's `impl`.
    rule_kernel_config: settings of the rule's Pallas GPU kernels, "field=value,..." of
      `kernels_pallas.GpuConfig` (e.g. "walk_fwd_output=True,walk_bwd_dv_local=True"); "" = the
      measured defaults. Used where the rule runs those kernels (rule_impl "pallas", or "auto"
      when it picks them; interpret mode off GPUs); ignored on TPU. A compute knob, like
      loss_chunk_size.
    loss_chunk_size: tokens per chunk of the training loss's fused LM head + cross-entropy
      (gdn_jax.loss.linear_cross_entropy: the [B, T, V] logits are never stored); 0 = logits,
      then cross-entropy. A compute knob: parameters and the model's outputs do not change.
    fuse_projections: the GDN mixer's input projections (q, k, v, gate, a, b) as one product and
      the MLP's gate and up as another (gdn_jax.layers.fused_linears); parameters stay separate.
      A compute knob, like loss_chunk_size.
    conv_impl: the short conv of q, k, v in training (calls without a conv state): "xla" (its
      taps as XLA ops) or "pallas" (kernels_pallas/short_conv.py: a Triton kernel per direction,
      the backward making dx and every tap's dw in one pass; the interpreter off GPUs; one device,
      no mesh). Prefill from a cache and decoding stay XLA. A compute knob, like
      loss_chunk_size; opt-in: its backward was timed slower than XLA's (experiments/NOTES_train.md).

  Hybrid models (gdn_jax.attention; all ignored while layer_pattern has no 'A' or 'S'):
    layer_pattern: one letter per block, tiled to num_layers: 'G' GDN, 'A' full causal attention,
      'S' sliding-window attention; e.g. "GGGA" (Qwen3-Next: 3 GDN : 1 attention) or "GS"
      (GDN-H1). "" = every block GDN (the original model, unchanged).
    num_attn_heads: attention query heads N; None = num_heads.
    num_kv_heads: key/value heads (GQA; N % num_kv_heads == 0); None = num_attn_heads.
    attn_head_dim: attention head dim H (even: RoPE rotates pairs); None = head_k_dim.
    attn_window: W of the 'S' layers: each token attends to itself and the W − 1 before it.
    rope_theta: RoPE base θ.
    rope_fraction: the fraction of the attention head dim H that RoPE rotates: the first
      R = round(rope_fraction · H) dims of each q/k head (R even, ≥ 2), with the frequencies
      θ^(−2i/R); the other H − R pass through unrotated. 1.0 = all of H; Qwen3-Next: 0.25
      (Hugging Face's `partial_rotary_factor`).
    attn_output_gate: o ⊙ σ(W_g x) before W_o (Qwen3-Next's gated attention).
    attn_qk_norm: RMSNorm over the head dim of q and k before RoPE (Qwen3-Next).
  """
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_k_dim: int = 64
  head_v_dim: int = 64
  num_v_heads: int | None = None
  mlp_hidden: int | None = None
  conv_size: int = 4
  use_gate: bool = True
  use_short_conv: bool = True
  allow_neg_eigval: bool = False
  norm_eps: float = 1e-5
  output_norm_eps: float | None = None
  qk_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  init_std: float = 0.02
  lm_head_init_std: float | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  chunk_size: int = 64
  rule_impl: str = "auto"
  rule_kernel_config: str = ""
  loss_chunk_size: int = 0
  fuse_projections: bool = False
  conv_impl: str = "xla"
  layer_pattern: str = ""
  num_attn_heads: int | None = None
  num_kv_heads: int | None = None
  attn_head_dim: int | None = None
  attn_window: int = 0
  rope_theta: float = 10000.0
  rope_fraction: float = 1.0
  attn_output_gate: bool = False
  attn_qk_norm: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_k_dim", "head_v_dim",
                 "conv_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig: `{name}`={value!r}; expected a positive int.")
    for name in ("num_v_heads", "mlp_hidden"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value <= 0):
        raise ValueError(f"ModelConfig: `{name}`={value!r}; expected a positive int or None.")
    if self.resolved_num_v_heads % self.num_heads:
      raise ValueError(f"ModelConfig: `num_v_heads`={self.num_v_heads} is not a multiple of "
                       f"`num_heads`={self.num_heads}; expected num_v_heads % num_heads == 0 "
                       "(each value head reads one q/k head).")
    if self.lm_head_init_std is not None and self.tie_embeddings:
      raise ValueError(f"ModelConfig: `lm_head_init_std`={self.lm_head_init_std!r} with "
                       "`tie_embeddings`=True, which has no LM head of its own; expected None "
                       "(the tied read-out is the embedding, drawn with `init_std`).")
    for name in ("norm_eps", "init_std", "output_norm_eps", "qk_norm_eps", "lm_head_init_std"):
      value = getattr(self, name)
      if name in ("output_norm_eps", "lm_head_init_std") and value is None:
        continue
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig: `{name}`={value!r}; expected a positive float.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig: `{name}`={getattr(self, name)!r}; expected one of "
                         f"{DTYPES}.")
    if self.rule_impl not in IMPLS:
      raise ValueError(f"ModelConfig: `rule_impl`={self.rule_impl!r}; expected one of {IMPLS}.")
    if self.rule_kernel_config:
      if self.rule_impl not in ("auto", "pallas"):
        raise ValueError(f"ModelConfig: `rule_kernel_config`={self.rule_kernel_config!r} with "
                         f"`rule_impl`={self.rule_impl!r}; kernel settings are for 'pallas' or "
                         "'auto': set rule_kernel_config=''.")
      try:
        self.gpu_kernel_config()
      except ValueError as e:
        raise ValueError(f"ModelConfig: `rule_kernel_config`: {e}") from None
    lc = self.loss_chunk_size
    if not isinstance(lc, int) or isinstance(lc, bool) or lc < 0:
      raise ValueError(f"ModelConfig: `loss_chunk_size`={lc!r}; expected an int ≥ 0 (tokens per "
                       "chunk of the fused head + cross-entropy, e.g. 4096; 0 = off).")
    if not isinstance(self.fuse_projections, bool):
      raise ValueError(f"ModelConfig: `fuse_projections`={self.fuse_projections!r}; expected "
                       "True or False.")
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"ModelConfig: `conv_impl`={self.conv_impl!r}; expected one of "
                       f"{CONV_IMPLS} (the short conv's training path).")
    c = self.chunk_size
    if not isinstance(c, int) or c < 16 or c > 128 or c & (c - 1):
      raise ValueError(f"ModelConfig: `chunk_size`={c!r}; expected a power of two in [16, 128].")
    self._check_hybrid()

  def _check_hybrid(self):
    p = self.layer_pattern
    if not isinstance(p, str) or set(p) - set(LAYER_KINDS):
      kinds = ", ".join(f"{k}: {v}" for k, v in LAYER_KINDS.items())
      raise ValueError(f"ModelConfig: `layer_pattern`={p!r}; expected a string of the letters "
                       f"{'/'.join(LAYER_KINDS)} ({kinds}), e.g. 'GGGA', or '' for all GDN.")
    if p and self.num_layers % len(p):
      raise ValueError(f"ModelConfig: `layer_pattern`={p!r} ({len(p)} letters) does not tile "
                       f"`num_layers`={self.num_layers}; expected a pattern whose length divides "
                       f"num_layers (e.g. num_layers={len(p) * max(1, self.num_layers // len(p))})"
                       " or one letter per layer.")
    for name in ("num_attn_heads", "num_kv_heads", "attn_head_dim"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value <= 0):
        raise ValueError(f"ModelConfig: `{name}`={value!r}; expected a positive int or None.")
    w = self.attn_window
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
      raise ValueError(f"ModelConfig: `attn_window`={w!r}; expected an int ≥ 0.")
    if "S" in p and w < 1:
      raise ValueError(f"ModelConfig: `attn_window`={w!r} but `layer_pattern`={p!r} has "
                       "sliding-window layers 'S'; expected attn_window ≥ 1 (or 'A' layers).")
    theta = self.rope_theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
      raise ValueError(f"ModelConfig: `rope_theta`={theta!r}; expected a positive float.")
    f = self.rope_fraction
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
      raise ValueError(f"ModelConfig: `rope_fraction`={f!r}; expected a float in (0, 1] (the "
                       "fraction of the attention head dim that RoPE rotates; 1.0 = all of it).")
    for name in ("attn_output_gate", "attn_qk_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig: `{name}`={getattr(self, name)!r}; expected a bool.")
    if not self.has_attention:
      return
    if self.resolved_num_attn_heads % self.resolved_num_kv_heads:
      raise ValueError(f"ModelConfig: `num_kv_heads`={self.resolved_num_kv_heads} does not divide "
                       f"`num_attn_heads`={self.resolved_num_attn_heads}; expected num_attn_heads "
                       "% num_kv_heads == 0 (each query head reads one key/value head).")
    if self.resolved_attn_head_dim % 2:
      raise ValueError(f"ModelConfig: `attn_head_dim`={self.resolved_attn_head_dim} (None = "
                       "head_k_dim) is odd; expected an even head dim (RoPE rotates pairs).")
    H, R = self.resolved_attn_head_dim, self.rope_dim
    if R < 2 or R % 2:
      raise ValueError(f"ModelConfig: `rope_fraction`={self.rope_fraction!r} rotates "
                       f"round({self.rope_fraction!r} · attn_head_dim={H}) = {R} dims; expected "
                       "a fraction giving an even count ≥ 2 (RoPE rotates pairs), e.g. 0.25 or "
                       "0.5 for a head dim that is a multiple of 8, or 1.0 (all of it).")

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """One letter per block ('G', 'A', 'S'): `layer_pattern` tiled to num_layers."""
    p = self.layer_pattern or "G"
    return tuple(p * (self.num_layers // len(p)))

  @property
  def has_attention(self) -> bool:
    return any(k != "G" for k in self.layer_kinds)

  @property
  def resolved_num_attn_heads(self) -> int:
    return self.num_heads if self.num_attn_heads is None else self.num_attn_heads

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.resolved_num_attn_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def resolved_attn_head_dim(self) -> int:
    return self.head_k_dim if self.attn_head_dim is None else self.attn_head_dim

  @property
  def rope_dim(self) -> int:
    """R, the dims of each attention head that RoPE rotates: round(rope_fraction · H)."""
    return int(round(self.rope_fraction * self.resolved_attn_head_dim))

  def gpu_kernel_config(self):
    """`rule_kernel_config` as a `kernels_pallas.GpuConfig` (None for ""): what the GDN layers
    pass to the rule off TPUs."""
    if not self.rule_kernel_config:
      return None
    import kernels_pallas  # pylint: disable=import-outside-toplevel
    return kernels_pallas.GpuConfig.parse(self.rule_kernel_config)

  @property
  def resolved_output_norm_eps(self) -> float:
    return self.norm_eps if self.output_norm_eps is None else float(self.output_norm_eps)

  @property
  def resolved_num_v_heads(self) -> int:
    return self.num_heads if self.num_v_heads is None else self.num_v_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return _round_up(8 * self.d_model / 3, 32) if self.mlp_hidden is None else self.mlp_hidden
