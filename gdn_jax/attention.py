"""Causal softmax attention, the other token mixer of hybrid GDN models (GDN-H1, Qwen3-Next).

For input x_t (width D), N query heads and N_kv key/value heads of dim H (N % N_kv = 0, GQA):

    q_t = RoPE_R(RMSNorm_H(W_q x_t)),  k_t = RoPE_R(RMSNorm_H(W_k x_t)),  v_t = W_v x_t (per head)
    o_t = Σ_{s ∈ M(t)} softmax_s(scale · q_tᵀ k_s) v_s     (query head n reads kv head n // (N/N_kv))
    y_t = W_o [ o_t ⊙ σ(W_g x_t) ]                           (σ gate: Qwen3-Next's gated attention)

M(t) = the earlier tokens s ≤ t of t's own packed document (segment id) and, with a sliding window
W, only the last W of them (t − s < W). The q/k RMSNorm (a gain of size H shared by the heads) and
the gate are optional (`attn_qk_norm`, `attn_output_gate`). RoPE_R rotates the first R dims of a
head, the pairs (i, i + R/2) by pos · θ^(−2i/R) (Hugging Face's rotate-half layout), and passes the
other H − R through: R = round(`rope_fraction` · H), H by default, H/4 in Qwen3-Next (HF's
`partial_rotary_factor`). The logit q_tᵀk_s then depends on the positions through t − s only:
each rotated pair contributes Re(z_q z̄_k e^{i(t−s)ω}), the unrotated dims their plain product.
`pos` counts from 0 at the start of each packed document, so a document's logits do not depend
on what precedes it in the row.

`scale` is H^-½ by default; `gdn_jax.mup.build_model` sets it from the parametrization's table:
scale = H_base^-½ · (H / H_base)^p, p = −½ in SP (H^-½) and −1 in μP (H_base^½ / H, the "1/d"
attention of Tensor Programs V, equal to SP's at the base head dim). The logits, the softmax and
the weighted sum are `jax.nn.dot_product_attention` (implementation=None: XLA today; jax may pick
cuDNN's flash attention on GPU).

KV cache (decoding; `init_cache`, `step`, and `__call__(cache=...)` for a prefill that continues
one): {'k', 'v': [B, C, N_kv, H] (compute dtype, k after RoPE), 'pos': [B] int32, the position of
the next token in its document}. It is a ring: the token at position p lives in slot p mod C, so
a slot's position is p_next − 1 − ((p_next − 1 − slot) mod C) (negative: empty), derived, not
stored. A sliding-window layer keeps C = W slots: O(W) memory for any length. A full-attention
layer keeps C = `max_len` slots, the most tokens it will see (prompt + generation); past that the
ring forgets the oldest tokens, i.e. it then behaves as a window of max_len (the caller sizes it:
`gdn_jax.generate` uses prompt bucket + max_new_tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax.layers import Linear, RMSNorm, decode_dot, scale_columns, stacked_kernel


def segment_positions(segment_ids_BxT, B: int, T: int, offset_B=None):
  """(positions [B, T] int32 counted from each document's first token, first-document mask).

  Documents are the runs of equal segment ids. `offset_B`: the position of the first token of
  the row's first run (a prefill that continues a cached document); later runs start at 0.
  """
  idx_T = jnp.arange(T, dtype=jnp.int32)
  if segment_ids_BxT is None:
    start_BxT = jnp.zeros((B, T), jnp.int32)
  else:
    is_start = jnp.concatenate([jnp.ones((B, 1), bool),
                                segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(is_start, idx_T, 0), axis=1)
  pos_BxT = idx_T - start_BxT
  first_BxT = start_BxT == 0
  if offset_B is not None:
    pos_BxT = pos_BxT + jnp.where(first_BxT, offset_B[:, None].astype(jnp.int32), 0)
  return pos_BxT, first_BxT, start_BxT


def rope(x_BxTxNxH, positions_BxT, theta: float, rotary_dim: int | None = None):
  """Rotary embedding, rotate-half layout: (x₁, x₂) → (x₁ cos − x₂ sin, x₂ cos + x₁ sin), with the
  angle pos · θ^(−2i/R) for the pair (i, i + R/2) of the first R = `rotary_dim` dims (None: all
  H); dims R..H pass through unchanged (partial rotary). float32 math, returned in x's dtype."""
  H = x_BxTxNxH.shape[-1]
  if rotary_dim is not None and rotary_dim != H:
    R = rotary_dim
    return jnp.concatenate([rope(x_BxTxNxH[..., :R], positions_BxT, theta),
                            x_BxTxNxH[..., R:]], -1)
  half = H // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))      # [H/2]
  angle = positions_BxT.astype(jnp.float32)[..., None] * inv_freq               # [B, T, H/2]
  cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxTxNxH.dtype)


def slot_positions(next_pos_B, capacity: int):
  """The position held by each ring slot [B, C] when the next token has position next_pos
  (negative: the slot is empty)."""
  last = next_pos_B[:, None] - 1
  return last - jnp.mod(last - jnp.arange(capacity, dtype=jnp.int32), capacity)


class Attention(nnx.Module):
  """Causal softmax attention with (partial) RoPE, GQA, an optional sliding window, q/k RMSNorm
  and output gate (module docstring). `window` = W (0: full attention)."""

  def __init__(self, config, *, window: int = 0, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    N, Nkv, H = c.resolved_num_attn_heads, c.resolved_num_kv_heads, c.resolved_attn_head_dim
    D = c.d_model
    self.num_heads, self.num_kv_heads, self.head_dim = N, Nkv, H
    # role "attention": the project's μP classifies these by fans (q, k, v, o, gate: hidden); the
    # paper's recipe defines no rule for them and refuses the role (gdn_jax.mup.tables).
    lin = dict(init_std=c.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
               role="attention")
    self.q_proj = Linear(D, N * H, **lin)
    self.k_proj = Linear(D, Nkv * H, **lin)
    self.v_proj = Linear(D, Nkv * H, **lin)
    if c.attn_output_gate:
      self.g_proj = Linear(D, N * H, **lin)
    if c.attn_qk_norm:
      norm = dict(eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.q_norm = RMSNorm(H, **norm)
      self.k_norm = RMSNorm(H, **norm)
    self.o_proj = Linear(N * H, D, **lin)
    self.use_gate, self.use_qk_norm = bool(c.attn_output_gate), bool(c.attn_qk_norm)
    self.window = int(window)
    self.rope_theta = float(c.rope_theta)
    self.rope_dim = c.rope_dim        # R: the rotated dims of each head (H = all)
    self.scale = H ** -0.5
    self.dtype = dtype
    self.record = False

  # ---- cache ----

  def capacity(self, max_len: int | None) -> int:
    """Slots of the KV ring: W for a sliding window, `max_len` for full attention."""
    if self.window:
      return self.window
    if max_len is None or not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f"Attention cache: `max_len`={max_len!r}; a full-attention layer ('A' in "
                       "layer_pattern) needs the most tokens its cache will hold (prompt + "
                       "generated), an int ≥ 1.")
    return max_len

  def init_cache(self, batch: int, state_dtype=jnp.float32, *, max_len: int | None = None):
    """Empty KV ring {'k', 'v': [B, C, N_kv, H] (compute dtype), 'pos': [B] int32 zeros}.
    `state_dtype` (the GDN state's) is ignored: keys and values stay in the compute dtype, the
    dtype the forward attends over, so decoding matches it."""
    del state_dtype
    C = self.capacity(max_len)
    kv = jnp.zeros((batch, C, self.num_kv_heads, self.head_dim), self.dtype)
    return {'k': kv, 'v': kv, 'pos': jnp.zeros((batch,), jnp.int32)}

  def call_cache(self, cache: dict) -> dict:
    """The decode cache in `__call__`'s form (the same form)."""
    return cache

  def decode_cache(self, call_cache: dict, state_dtype=jnp.float32) -> dict:
    """`__call__`'s returned cache in the decode form (the same form; `state_dtype` ignored)."""
    del state_dtype
    return call_cache

  # ---- forward ----

  def _sow(self, name, value):
    if self.record:
      self.sow(nnx.Intermediate, name, value)

  def _qk(self, q, k, pos_BxT):
    if self.use_qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    self._sow('q', q)
    self._sow('k', k)
    return (rope(q, pos_BxT, self.rope_theta, self.rope_dim),
            rope(k, pos_BxT, self.rope_theta, self.rope_dim))

  def _attend(self, q, k, v, mask, *, is_causal: bool = False, window_size=None):
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale, is_causal=is_causal,
                                     local_window_size=window_size, implementation=None)
    if self.record:  # the logits scale·qᵀk where attended (0 elsewhere), for the coordinate check
      G = self.num_heads // self.num_kv_heads
      kk = jnp.repeat(k, G, axis=2) if G > 1 else k
      logits = self.scale * jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32),
                                       kk.astype(jnp.float32))
      T, S = q.shape[1], k.shape[1]
      keep = jnp.ones((1, 1, T, S), bool) if mask is None else mask
      if is_causal:
        keep = keep & jnp.tril(jnp.ones((T, S), bool))
      if window_size is not None:
        keep = keep & (jnp.arange(T)[:, None] - jnp.arange(S)[None, :] <= window_size[0])
      self._sow('attn_logits', jnp.where(keep, logits, 0.0))
    return o

  def _output(self, o_BxTxNxH, x):
    self._sow('o', o_BxTxNxH)
    o = o_BxTxNxH.reshape(*o_BxTxNxH.shape[:-2], -1)
    if self.use_gate:
      o = (o.astype(jnp.float32) * jax.nn.sigmoid(self.g_proj(x).astype(jnp.float32))
           ).astype(self.dtype)
    return self.o_proj(o)

  def __call__(self, x_BxTxD, segment_ids_BxT=None, *, cache=None, return_cache: bool = False,
               max_len: int | None = None):
    """Full-sequence forward. With `cache` (decode form), the first document of each row
    continues the cached one (as GatedDeltaNet's prefill). Returns y [B, T, D], or (y, new cache)
    with return_cache; a new cache (no `cache`) has `capacity(max_len)` slots and holds the last
    document of each row."""
    B, T, _ = x_BxTxD.shape
    N, Nkv, H, W = self.num_heads, self.num_kv_heads, self.head_dim, self.window
    self._sow('mixer_in', x_BxTxD)
    q = self.q_proj(x_BxTxD).reshape(B, T, N, H)
    k = self.k_proj(x_BxTxD).reshape(B, T, Nkv, H)
    v = self.v_proj(x_BxTxD).reshape(B, T, Nkv, H)
    self._sow('v', v)
    pos, first, start = segment_positions(segment_ids_BxT, B, T,
                                          None if cache is None else cache['pos'])
    q, k = self._qk(q, k, pos)
    same_doc = None
    if segment_ids_BxT is not None:  # the same run of segment ids (a packed document)
      same_doc = start[:, :, None] == start[:, None, :]                       # [B, T, T]
    if cache is None:
      o = self._attend(q, k, v, None if same_doc is None else same_doc[:, None],
                       is_causal=True, window_size=(W - 1, 0) if W else None)
    else:
      # Keys: the C cached slots, then the T new tokens. A cached slot is seen by the queries of
      # the first document only (it continues the cached one), within the window.
      C = cache['k'].shape[1]
      old_pos = slot_positions(cache['pos'], C)                                # [B, C]
      old_ok = (old_pos >= 0)[:, None, :] & first[:, :, None]
      idx = jnp.arange(T)
      new_ok = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (B, T, T))
      if same_doc is not None:
        new_ok = new_ok & same_doc
      if W:
        old_ok = old_ok & (pos[:, :, None] - old_pos[:, None, :] < W)
        new_ok = new_ok & (idx[None, :, None] - idx[None, None, :] < W)
      mask = jnp.concatenate([old_ok, new_ok], axis=-1)[:, None]               # [B, 1, T, C+T]
      o = self._attend(q, jnp.concatenate([cache['k'], k], 1),
                       jnp.concatenate([cache['v'], v], 1), mask)
    y = self._output(o, x_BxTxD)
    self._sow('mixer_out', y)
    if not return_cache:
      return y
    if cache is None:
      cache = self.init_cache(B, max_len=max_len)
    return y, self._write(cache, k, v, pos, start)

  def _write(self, cache, k, v, pos_BxT, start_BxT):
    """The cache after these tokens: the last document of each row, at slots pos mod C (only
    the last min(T, C) tokens can survive; the others would be overwritten)."""
    C, T = cache['k'].shape[1], k.shape[1]
    m = min(T, C)
    last = (start_BxT == start_BxT[:, -1:])[:, T - m:]
    slots = jnp.where(last, jnp.mod(pos_BxT[:, T - m:], C), C)        # C: out of range, dropped
    b = jnp.arange(k.shape[0])[:, None]
    put = lambda buf, new: buf.at[b, slots].set(new[:, T - m:].astype(buf.dtype), mode='drop')
    return {'k': put(cache['k'], k), 'v': put(cache['v'], v), 'pos': pos_BxT[:, -1] + 1}

  # ---- decoding ----

  def _in_projs(self):
    return [self.q_proj, self.k_proj, self.v_proj] + ([self.g_proj] if self.use_gate else [])

  def decode_weights(self) -> dict:
    """`step`'s weights in the compute dtype, built once per generation: 'in', the input
    projections side by side [D, (2N + 2N_kv)·H or without the gate (N + 2N_kv)·H] (columns
    q | k | v | gate), and 'o', W_o."""
    return {'in': stacked_kernel(self._in_projs(), self.dtype),
            'o': self.o_proj.kernel[...].astype(self.dtype)}

  def step(self, x_BxD, cache, weights=None, *, impl: str = "xla", matmul_rows: int = 1,
           decode_config=None):
    """One decode token: (y [B, D], new cache), what `__call__` gives for this token. `impl`
    (the GDN rule's kernel choice) does not apply here: attention over the ring is one
    `jax.nn.dot_product_attention` call. `matmul_rows`, `decode_config`: `layers.decode_dot`'s
    padding and GEMV choice for the projections."""
    del impl
    w = self.decode_weights() if weights is None else weights
    B, dt = x_BxD.shape[0], self.dtype
    N, Nkv, H = self.num_heads, self.num_kv_heads, self.head_dim
    projs = self._in_projs()
    with jax.named_scope("in_proj"):
      y = scale_columns(decode_dot(x_BxD.astype(dt), w['in'], matmul_rows,
                                     decode_config=decode_config, product="in_proj"), projs)
    with jax.named_scope("attention"):
      q = y[:, :N * H].reshape(B, 1, N, H)
      k = y[:, N * H:(N + Nkv) * H].reshape(B, 1, Nkv, H)
      v = y[:, (N + Nkv) * H:(N + 2 * Nkv) * H].reshape(B, 1, Nkv, H)
      pos = cache['pos']
      q, k = self._qk(q, k, pos[:, None])
      C = cache['k'].shape[1]
      b, slot = jnp.arange(B), jnp.mod(pos, C)
      k_cache = cache['k'].at[b, slot].set(k[:, 0].astype(cache['k'].dtype))
      v_cache = cache['v'].at[b, slot].set(v[:, 0].astype(cache['v'].dtype))
      # Every filled slot is attended: a window's ring has W slots, so it holds the window.
      held = slot_positions(pos + 1, C)                                           # [B, C]
      o = self._attend(q, k_cache, v_cache, (held >= 0)[:, None, None, :])
    with jax.named_scope("out_proj"):
      o = o.reshape(B, N * H)
      if self.use_gate:
        g = y[:, (N + 2 * Nkv) * H:]
        o = (o.astype(jnp.float32) * jax.nn.sigmoid(g.astype(jnp.float32))).astype(dt)
      out = decode_dot(o.astype(dt), w['o'], matmul_rows, decode_config=decode_config,
                       product="out_proj")
      if self.o_proj.multiplier != 1.0:
        out = out * jnp.asarray(self.o_proj.multiplier, dt)
    return out, {'k': k_cache, 'v': v_cache, 'pos': pos + 1}
