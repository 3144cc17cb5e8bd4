"""The Gated DeltaNet language model: pre-norm blocks and the LM (config in gdn_jax.model_config,
exact sizes and FLOPs in gdn_jax.model_size; both re-exported here).

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

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax.attention import Attention
from gdn_jax.layers import (Embed, GatedDeltaNet, Linear, RMSNorm, SwiGLU, decode_dot,
                            decode_norm_dot, decode_swiglu, scale_columns, stacked_kernel)
from gdn_jax.loss import cross_entropy, linear_cross_entropy
from gdn_jax.model_config import DTYPES, LAYER_KINDS, ModelConfig  # noqa: F401 (re-exported)
from gdn_jax.model_size import flops_per_token, num_params, rule_flops_per_token_per_head  # noqa: F401

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
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      fuse_projections=config.fuse_projections)
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

  def decode_weights(self, decode_config=None) -> dict:
    """`step`'s weights in the compute dtype, built once per generation: the mixer's, and the
    MLP's gate and up projections side by side [D, 2F] (one matmul) and its down projection.
    With `DecodeConfig.gemv_backend` "mosaic" a GDN mixer's in-projection gets zero columns up to
    a multiple of its block_n (the Mosaic GPU GEMV takes whole column blocks only)."""
    from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
    cfg = DecodeConfig.or_default(decode_config)
    mlp, dt = self.mlp, self.mlp.down_proj.dtype
    mixer = ({} if cfg.gemv_backend != "mosaic" or not isinstance(self.mixer, GatedDeltaNet)
             else dict(column_multiple=cfg.gemv_launch_for("in_proj")["block_n"]))
    return {'mixer': self.mixer.decode_weights(**mixer),
            'gate_up': stacked_kernel([mlp.gate_proj, mlp.up_proj], dt),
            'down': mlp.down_proj.kernel[...].astype(dt)}

  def step(self, x_BxD, cache, weights=None, *, impl: str = "xla", matmul_rows: int = 1,
           decode_config=None):
    """One decode token: (x [B, D], new cache); `weights` from `decode_weights()` (None: here);
    `matmul_rows`: `layers.decode_dot`'s padding of every weight product."""
    w = self.decode_weights(decode_config) if weights is None else weights
    if self._fuses_norms(x_BxD, w, decode_config):
      x, new_cache, _ = self._step_with_norm_gemvs(x_BxD, cache, w, impl, decode_config)
      return x, new_cache
    with jax.named_scope("in_proj"):   # the scopes name the parts in profiles (bench_decode.py)
      h = self.mixer_norm(x_BxD)
    y, new_cache = self.mixer.step(h, cache, w['mixer'], impl=impl, matmul_rows=matmul_rows,
                                   decode_config=decode_config)
    mlp = self.mlp
    dt = mlp.down_proj.dtype
    with jax.named_scope("mlp"):
      x = x_BxD + y
      down = decode_swiglu(self.mlp_norm(x).astype(dt), w['gate_up'], w['down'],
                           [mlp.gate_proj, mlp.up_proj], matmul_rows, decode_config=decode_config)
      return x + scale_columns(down, [mlp.down_proj]), new_cache

  def _fuses_norms(self, x_BxD, w, decode_config) -> bool:
    """Whether `step` makes its norms and the mixer's residual add in the GEMVs' prologues:
    `DecodeConfig.use_gemv_norm` (batch 1 on the GEMV path), a GDN mixer whose output product
    is a GEMV too, and the stream, the norms and the weights in one dtype."""
    from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
    cfg = DecodeConfig.or_default(decode_config)
    mixer = self.mixer
    if not isinstance(mixer, GatedDeltaNet):
      return False
    dtypes = {jnp.dtype(d) for d in (x_BxD.dtype, self.mixer_norm.dtype, self.mlp_norm.dtype,
                                      w['mixer']['in'].dtype, w['mixer']['o'].dtype,
                                      w['gate_up'].dtype)}
    return (cfg.use_gemv_norm(x_BxD.shape[0], x_BxD.shape[1]) and len(dtypes) == 1
            and cfg.use_gemv(1, contract_dim=w['mixer']['o'].shape[0]))

  def step_deferred(self, x_BxD, cache, weights, pending=None, *, impl: str = "xla",
                    matmul_rows: int = 1, decode_config=None):
    """`step` with the MLP's output left unadded where the next GEMV can add it: (x, new cache,
    pending), the block's output being x + `resolve_pending`(pending) (pending None: x).

    `pending` is the previous block's (its down product's float32 sum [1, 1, D] and the down
    Linear's multiplier): added in this block's in-projection prologue where this block makes
    its norms in the GEMV prologues (`_fuses_norms`), else first, as the unfused step adds it.
    This block defers its own output where `DecodeConfig.gemv_down_atomic` holds and its down
    product can accumulate (`_defers_output`): the down GEMV's programs add their partials
    atomically into zeros that the gate/up GEMV makes, so no XLA kernel sums them and adds the
    residual between two layers."""
    if not self._fuses_norms(x_BxD, weights, decode_config):
      x = x_BxD if pending is None else resolve_pending(x_BxD, pending)
      return (*self.step(x, cache, weights, impl=impl, matmul_rows=matmul_rows,
                         decode_config=decode_config), None)
    return self._step_with_norm_gemvs(x_BxD, cache, weights, impl, decode_config, pending,
                                      defer=self._defers_output(x_BxD, weights, decode_config))

  def _defers_output(self, x_BxD, w, decode_config) -> bool:
    """Whether `step_deferred` leaves this block's MLP output to the next GEMV: on the fused-norm
    path, `DecodeConfig.gemv_down_atomic`, the MLP's chained GEMVs (`layers.decode_swiglu`) and
    D a multiple of the down product's block_n (atomic adds take no mask)."""
    from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
    cfg = DecodeConfig.or_default(decode_config)
    mlp, D = self.mlp, x_BxD.shape[1]
    return (cfg.gemv_down_atomic and cfg.gemv_backend == "triton" and cfg.gemv_swiglu
            and cfg.use_gemv(1, contract_dim=w['down'].shape[0])
            and all(l.multiplier == 1.0 for l in (mlp.gate_proj, mlp.up_proj))
            and D % cfg.gemv_launch_for("mlp_out")["block_n"] == 0)

  def _step_with_norm_gemvs(self, x_BxD, cache, w, impl, decode_config, pending=None,
                            defer=False):
    """`step` at batch 1 with DecodeConfig.gemv_norm: the mixer's norm (and `pending`'s add,
    `step_deferred`) in the in-projection's GEMV; W_o's split partials (or their atomic sum), its
    multiplier, the residual add and the MLP's norm in the gate/up GEMV (layers.decode_norm_dot),
    which hands its partials to the down product. Returns (x, new cache, pending): with `defer`,
    x is the stream before the MLP's output and pending that output (`step_deferred`); else the
    block's output and None."""
    out = self.mixer.step(x_BxD, cache, w['mixer'], impl=impl, decode_config=decode_config,
                          in_norm=self.mixer_norm, sum_out=False, in_addend=pending)
    y_parts, new_cache = out[:2]
    x = x_BxD if pending is None else out[2]      # the stream with the previous output added
    mlp = self.mlp
    with jax.named_scope("mlp"):
      gate_up_parts, x, *zeros = decode_norm_dot(
          x, w['gate_up'], self.mlp_norm, y_parts,
          addend_multiplier=self.mixer.o_proj.multiplier, sum_splits=False,
          zeros_out=x.shape[1] if defer else 0, decode_config=decode_config, product="mlp_in")
      down = decode_swiglu(None, w['gate_up'], w['down'], [mlp.gate_proj, mlp.up_proj],
                           decode_config=decode_config, gate_up_parts=gate_up_parts,
                           accumulator=zeros[0] if defer else None)
      if defer:
        return x, new_cache, (down[None], float(mlp.down_proj.multiplier))
      return x + scale_columns(down, [mlp.down_proj]), new_cache, None


def resolve_pending(x_BxD, pending):
  """x + rnd(m · rnd(a)): a block's deferred output (`Block.step_deferred`: a [1, 1, D] float32
  sum a and its Linear's multiplier m) added to the stream x in x's dtype, as the unfused step
  rounds the down product and `layers.scale_columns`."""
  addend, multiplier = pending
  y = addend[0].astype(x_BxD.dtype)
  if multiplier != 1.0:
    y = y * jnp.asarray(multiplier, x_BxD.dtype)
  return x_BxD + y


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
      head_std = config.init_std if config.lm_head_init_std is None else config.lm_head_init_std
      self.lm_head = Linear(config.d_model, config.vocab_size, init_std=head_std,
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

  def _trunk(self, tokens_BxT, segment_ids_BxT):
    """The residual stream after the last block, x_L [B, T, D]."""
    self._check_tokens(tokens_BxT, segment_ids_BxT)
    x = self.embed(tokens_BxT)
    if self.record:
      self.sow(nnx.Intermediate, 'embed_out', x)
    for block in self.blocks:
      x = block(x, segment_ids_BxT)
    return x

  def __call__(self, tokens_BxT, segment_ids_BxT=None):
    """Logits [B, T, V] (float32). segment_ids: packed documents never see each other."""
    return self._logits(self._trunk(tokens_BxT, segment_ids_BxT))

  def loss(self, tokens_BxT, targets_BxT, segment_ids_BxT=None):
    """Mean cross-entropy of the logits at `tokens` against `targets` [B, T] (float32).

    With config.loss_chunk_size > 0 the LM head and the loss run fused over token chunks
    (gdn_jax.loss.linear_cross_entropy; the logits are not stored, nor recorded); else it is
    cross_entropy(self(tokens), targets). The two agree to float32 rounding (bf16 compute: the
    fused one skips rounding the logits to bf16).
    """
    if not self.config.loss_chunk_size or self.record:
      return cross_entropy(self(tokens_BxT, segment_ids_BxT), targets_BxT)
    if targets_BxT.shape != tokens_BxT.shape:
      raise ValueError(f"GatedDeltaNetLM.loss: `targets` has shape {tuple(targets_BxT.shape)}; "
                       f"expected the tokens' shape {tuple(tokens_BxT.shape)}.")
    h = self.final_norm(self._trunk(tokens_BxT, segment_ids_BxT))
    if self.config.tie_embeddings:
      w, m = self.embed.embedding[...], self.embed.attend_multiplier
    else:
      w, m = self.lm_head.kernel[...], self.lm_head.multiplier
    return linear_cross_entropy(
        h, w, targets_BxT, multiplier=m, chunk_size=self.config.loss_chunk_size,
        transpose_w=self.config.tie_embeddings, compute_dtype=self.config.dtype)

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

  def decode_weights(self, decode_config=None) -> dict:
    """The weights of `decode_step` in the compute dtype, fused per block (`Block.decode_weights`;
    `decode_config`: the kernels they are for) and the read-out matrix; built once per
    generation so that no step re-casts a parameter."""
    dt = jnp.dtype(self.config.dtype)
    head = (self.embed.embedding if self.config.tie_embeddings else self.lm_head.kernel)
    return {'blocks': [block.decode_weights(decode_config) for block in self.blocks],
            'head': head[...].astype(dt)}

  def decode_step(self, token_B, cache, weights=None, *, impl: str = "xla",
                  matmul_rows: int = 1, decode_config=None):
    """One token with the recurrent update: (logits [B, V] float32, new cache).

    `weights` from `decode_weights()` (None: built in this call); `impl` "xla", "pallas" or
    "pallas_fused" (the rule's single-token update, `GatedDeltaNet.step`); `matmul_rows`: every
    weight product on the batch padded to at least this many rows (`layers.decode_dot`; 1 = none);
    `decode_config`: the Pallas step kernels' launch settings (kernels_pallas.config.DecodeConfig;
    the read-out's GEMV is product "head" of its `gemv_overrides`).
    """
    w = self.decode_weights(decode_config) if weights is None else weights
    with jax.named_scope("embed"):
      x = self.embed(token_B)
    new_cache, pending = [], None     # pending: a block's output left to the next GEMV
    for i, block in enumerate(self.blocks):
      x, c, pending = block.step_deferred(x, cache[i], w['blocks'][i], pending, impl=impl,
                                          matmul_rows=matmul_rows, decode_config=decode_config)
      new_cache.append(c)
    with jax.named_scope("head"):
      tied = self.config.tie_embeddings   # h Eᵀ, contracting E's feature axis (no transpose)
      m = self.embed.attend_multiplier if tied else self.lm_head.multiplier
      if self._head_fuses_norm(x, w['head'], decode_config):   # the final norm in the GEMV
        addend = {} if pending is None else dict(addends_SxD=pending[0],
                                                 addend_multiplier=pending[1])
        logits, _ = decode_norm_dot(x, w['head'], self.final_norm, w_contract=int(tied),
                                    decode_config=decode_config, product="head", **addend)
      else:
        if pending is not None:
          x = resolve_pending(x, pending)
        h = self.final_norm(x).astype(w['head'].dtype)
        logits = decode_dot(h, w['head'], matmul_rows, w_contract=int(tied),
                            decode_config=decode_config, product="head")
      if m != 1.0:
        logits = logits * (m if self.config.tie_embeddings else jnp.asarray(m, logits.dtype))
      return logits.astype(jnp.float32), new_cache

  def _head_fuses_norm(self, x_BxD, w_head, decode_config) -> bool:
    """Whether `decode_step` makes the final norm in the read-out GEMV's prologue
    (`DecodeConfig.use_gemv_norm`; the stream, the norm and the read-out in one dtype)."""
    from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
    cfg = DecodeConfig.or_default(decode_config)
    one_dtype = jnp.dtype(x_BxD.dtype) == jnp.dtype(self.final_norm.dtype) == w_head.dtype
    return one_dtype and cfg.use_gemv_norm(x_BxD.shape[0], x_BxD.shape[1])
