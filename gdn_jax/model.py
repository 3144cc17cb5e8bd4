"""The Gated DeltaNet language model: config, pre-norm blocks, LM, exact sizes and FLOPs.

Public interface (other modules import exactly these names):

    ModelConfig                          frozen dataclass, validated in __post_init__
    GatedDeltaNetLM(config, *, rngs)     __call__(tokens_BxT, segment_ids_BxT=None) -> logits_BxTxV (f32)
        .init_cache(batch, state_dtype=f32, *, max_len=None) / .prefill(tokens, segment_ids=None,
                 cache=None, *, last_only=False, state_dtype=f32, max_len=None) -> (logits, cache)
        .decode_weights() -> weights cast and fused once per generation
        .decode_step(token_B, cache, weights=None, *, impl="xla") -> (logits_BxV, cache)
    num_params(config) -> int            exact parameter count
    flops_per_token(config, seq_len)     training (fwd + bwd) model FLOPs per token, for MFU

Sampling lives in `gdn_jax.generate` (`generate(model, prompt_BxT, max_new_tokens, ...)`); μP in
`gdn_jax.mup` (`build_model`, `make_optimizer`).

    x_0 = Embed(tokens)
    x_l = x_{l−1} + Mixer_l(RMSNorm(x_{l−1}));  x_l ← x_l + SwiGLU(RMSNorm(x_l))   l = 1..L
    logits = LMHead(RMSNorm(x_L))           (untied by default; tied: h Eᵀ)

Mixer_l is the GDN mixer (gdn_jax.layers.GatedDeltaNet) unless `layer_pattern` makes block l a
hybrid model's softmax attention (gdn_jax.attention.Attention): 'A' full, 'S' sliding window.
An empty pattern is the all-GDN model, with the parameters, init and numerics it always had.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax.attention import Attention
from gdn_jax.layers import Embed, GatedDeltaNet, Linear, RMSNorm, SwiGLU
from gdn_jax.ops import IMPLS

DTYPES = ("float32", "bfloat16", "float16")
LAYER_KINDS = {"G": "GDN mixer", "A": "full causal attention", "S": "sliding-window attention"}


def _round_up(x: float, multiple: int) -> int:
  return int(-(-int(round(x)) // multiple) * multiple)


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
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    chunk_size: chunk length of the chunked rule; rule_impl: gated_delta_rule's `impl`.

  Hybrid models (gdn_jax.attention; all ignored while layer_pattern has no 'A' or 'S'):
    layer_pattern: one letter per block, tiled to num_layers: 'G' GDN, 'A' full causal attention,
      'S' sliding-window attention; e.g. "GGGA" (Qwen3-Next: 3 GDN : 1 attention) or "GS"
      (GDN-H1). "" = every block GDN (the original model, unchanged).
    num_attn_heads: attention query heads N; None = num_heads.
    num_kv_heads: key/value heads (GQA; N % num_kv_heads == 0); None = num_attn_heads.
    attn_head_dim: attention head dim H (even: RoPE rotates pairs); None = head_k_dim.
    attn_window: W of the 'S' layers: each token attends to itself and the W − 1 before it.
    rope_theta: RoPE base θ.
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
  dtype: str = "float32"
  param_dtype: str = "float32"
  chunk_size: int = 64
  rule_impl: str = "auto"
  layer_pattern: str = ""
  num_attn_heads: int | None = None
  num_kv_heads: int | None = None
  attn_head_dim: int | None = None
  attn_window: int = 0
  rope_theta: float = 10000.0
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
    for name in ("norm_eps", "init_std", "output_norm_eps", "qk_norm_eps"):
      value = getattr(self, name)
      if name == "output_norm_eps" and value is None:
        continue
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig: `{name}`={value!r}; expected a positive float.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig: `{name}`={getattr(self, name)!r}; expected one of "
                         f"{DTYPES}.")
    if self.rule_impl not in IMPLS:
      raise ValueError(f"ModelConfig: `rule_impl`={self.rule_impl!r}; expected one of {IMPLS}.")
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
  def resolved_output_norm_eps(self) -> float:
    return self.norm_eps if self.output_norm_eps is None else float(self.output_norm_eps)

  @property
  def resolved_num_v_heads(self) -> int:
    return self.num_heads if self.num_v_heads is None else self.num_v_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return _round_up(8 * self.d_model / 3, 32) if self.mlp_hidden is None else self.mlp_hidden


class Block(nnx.Module):
  """Pre-norm residual block: x + Mixer(norm(x)), then + SwiGLU(norm(·)). The mixer is GDN
  (kind 'G') or attention (kind 'A' full, 'S' sliding window; gdn_jax.attention)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, kind: str = "G"):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    norm = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.mixer_norm = RMSNorm(config.d_model, **norm)
    if kind == "G":
      self.mixer = GatedDeltaNet(config, rngs=rngs)
    else:
      self.mixer = Attention(config, window=config.attn_window if kind == "S" else 0, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, **norm)
    self.mlp = SwiGLU(config.d_model, config.resolved_mlp_hidden, init_std=config.init_std,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.record = False

  def _mlp(self, x):
    y = self.mlp(self.mlp_norm(x))
    if self.record:
      self.sow(nnx.Intermediate, 'mlp_out', y)
    x = x + y
    if self.record:
      self.sow(nnx.Intermediate, 'block_out', x)
    return x

  def __call__(self, x_BxTxD, segment_ids_BxT=None, *, cache=None, return_cache: bool = False,
               max_len: int | None = None):
    """`max_len`: the KV capacity of a new full-attention cache (Attention; ignored by GDN)."""
    extra = dict(max_len=max_len) if isinstance(self.mixer, Attention) else {}
    out = self.mixer(self.mixer_norm(x_BxTxD), segment_ids_BxT, cache=cache,
                     return_cache=return_cache, **extra)
    y, new_cache = out if return_cache else (out, None)
    x = self._mlp(x_BxTxD + y)
    return (x, new_cache) if return_cache else x

  def init_cache(self, batch: int, state_dtype=jnp.float32, max_len: int | None = None):
    """The mixer's empty decode cache (GDN: conv inputs and state; attention: a KV ring)."""
    if isinstance(self.mixer, Attention):
      return self.mixer.init_cache(batch, max_len=max_len)
    return self.mixer.init_cache(batch, state_dtype)

  def decode_weights(self) -> dict:
    """`step`'s weights in the compute dtype, built once per generation: the mixer's, and the
    MLP's gate and up projections side by side [D, 2F] (one matmul) and its down projection."""
    mlp, dt = self.mlp, self.mlp.down_proj.dtype
    return {'mixer': self.mixer.decode_weights(),
            'gate_up': jnp.concatenate([mlp.gate_proj.kernel[...].astype(dt),
                                        mlp.up_proj.kernel[...].astype(dt)], axis=1),
            'down': mlp.down_proj.kernel[...].astype(dt)}

  def step(self, x_BxD, cache, weights=None, *, impl: str = "xla"):
    """One decode token: (x [B, D], new cache); `weights` from `decode_weights()` (None: here)."""
    w = self.decode_weights() if weights is None else weights
    with jax.named_scope("in_proj"):   # the scopes name the parts in profiles (bench_decode.py)
      h = self.mixer_norm(x_BxD)
    y, new_cache = self.mixer.step(h, cache, w['mixer'], impl=impl)
    mlp = self.mlp
    dt = mlp.down_proj.dtype
    scale = lambda y, lin: y if lin.multiplier == 1.0 else y * jnp.asarray(lin.multiplier, dt)
    with jax.named_scope("mlp"):
      x = x_BxD + y
      gu = jnp.dot(self.mlp_norm(x).astype(dt), w['gate_up'])
      F = w['down'].shape[0]
      h = jax.nn.silu(scale(gu[:, :F], mlp.gate_proj)) * scale(gu[:, F:], mlp.up_proj)
      return x + scale(jnp.dot(h, w['down']), mlp.down_proj), new_cache


class GatedDeltaNetLM(nnx.Module):
  """Embedding, L pre-norm blocks (GDN, or attention where `layer_pattern` says), final RMSNorm,
  LM head. Logits are float32."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise ValueError(f"GatedDeltaNetLM: `config` is a {type(config).__name__}; expected a "
                       "ModelConfig.")
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = Embed(config.vocab_size, config.d_model, init_std=config.init_std, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs, kind=kind) for kind in config.layer_kinds])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                              param_dtype=param_dtype)
    if not config.tie_embeddings:
      self.lm_head = Linear(config.d_model, config.vocab_size, init_std=config.init_std,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs, role="readout")
    self.record = False

  def _logits(self, x):
    h = self.final_norm(x)
    if self.config.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    if self.record:
      self.sow(nnx.Intermediate, 'logits', logits)
    return logits

  def _check_tokens(self, tokens, segment_ids):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"GatedDeltaNetLM: `tokens` has shape {tuple(tokens.shape)} and dtype "
                       f"{tokens.dtype}; expected integer tokens of shape [B, T].")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"GatedDeltaNetLM: `segment_ids` has shape {tuple(segment_ids.shape)}; "
                       f"expected the tokens' shape {tuple(tokens.shape)}.")

  def __call__(self, tokens_BxT, segment_ids_BxT=None):
    """Logits [B, T, V] (float32). segment_ids: packed documents never see each other."""
    self._check_tokens(tokens_BxT, segment_ids_BxT)
    x = self.embed(tokens_BxT)
    if self.record:
      self.sow(nnx.Intermediate, 'embed_out', x)
    for block in self.blocks:
      x = block(x, segment_ids_BxT)
    return self._logits(x)

  def _check_max_len(self, max_len, where: str, tokens: int = 0):
    if "A" not in self.config.layer_kinds:
      return
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < max(tokens, 1):
      raise ValueError(f"GatedDeltaNetLM.{where}: `max_len`={max_len!r}; this model has "
                       "full-attention layers ('A' in layer_pattern), whose KV cache needs its "
                       f"capacity: an int ≥ {max(tokens, 1)}, the most tokens (prompt + generated)"
                       " the cache will hold.")

  def init_cache(self, batch: int, state_dtype=jnp.float32, *,
                 max_len: int | None = None) -> list[dict]:
    """Empty decode cache: per GDN block the conv inputs and the state S (float32 or
    `state_dtype`; `GatedDeltaNet.init_cache`), per attention block a KV ring
    (`Attention.init_cache`: W slots for 'S', `max_len` for 'A', where max_len is required)."""
    self._check_max_len(max_len, "init_cache")
    return [block.init_cache(batch, state_dtype, max_len) for block in self.blocks]

  def prefill(self, tokens_BxT, segment_ids_BxT=None, cache=None, *, last_only: bool = False,
              state_dtype=jnp.float32, max_len: int | None = None):
    """Chunked forward over a prompt that also returns the decode cache: (logits, cache).

    With `cache`, the prompt continues the cached sequence. With packed `segment_ids`, the
    returned cache belongs to the last document. `last_only`: logits of the last position only
    ([B, 1, V]; a long prompt's [B, T, V] float32 logits can outweigh the model). The cache's
    state S is stored in `state_dtype`. `max_len`: the KV capacity of the full-attention layers
    of a new cache (required with 'A' layers and no `cache`; ≥ T).
    """
    self._check_tokens(tokens_BxT, segment_ids_BxT)
    if cache is None:
      self._check_max_len(max_len, "prefill", tokens_BxT.shape[1])
    x = self.embed(tokens_BxT)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, c = block(x, segment_ids_BxT,
                   cache=None if cache is None else block.mixer.call_cache(cache[i]),
                   return_cache=True, max_len=max_len)
      new_cache.append(block.mixer.decode_cache(c, state_dtype))
    return self._logits(x[:, -1:] if last_only else x), new_cache

  def decode_weights(self) -> dict:
    """The weights of `decode_step` in the compute dtype, fused per block (`Block.decode_weights`)
    and the read-out matrix; built once per generation so that no step re-casts a parameter."""
    dt = jnp.dtype(self.config.dtype)
    head = (self.embed.embedding if self.config.tie_embeddings else self.lm_head.kernel)
    return {'blocks': [block.decode_weights() for block in self.blocks],
            'head': head[...].astype(dt)}

  def decode_step(self, token_B, cache, weights=None, *, impl: str = "xla"):
    """One token with the recurrent update: (logits [B, V] float32, new cache).

    `weights` from `decode_weights()` (None: built in this call); `impl` "xla" or "pallas"
    (the rule's single-token update, `GatedDeltaNet.step`).
    """
    w = self.decode_weights() if weights is None else weights
    with jax.named_scope("embed"):
      x = self.embed(token_B)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, c = block.step(x, cache[i], w['blocks'][i], impl=impl)
      new_cache.append(c)
    with jax.named_scope("head"):
      h = self.final_norm(x).astype(w['head'].dtype)
      if self.config.tie_embeddings:  # h Eᵀ, contracting E's feature axis (no transpose)
        logits = jax.lax.dot_general(h, w['head'], (((1,), (1,)), ((), ())))
        m = self.embed.attend_multiplier
      else:
        logits, m = jnp.dot(h, w['head']), self.lm_head.multiplier
      if m != 1.0:
        logits = logits * (m if self.config.tie_embeddings else jnp.asarray(m, logits.dtype))
      return logits.astype(jnp.float32), new_cache


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
