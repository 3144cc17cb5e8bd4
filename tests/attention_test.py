"""Attention (gdn_jax.attention): an independent NumPy reference (causal, window, GQA, RoPE,
partial RoPE, q/k norm, gate, packed documents), packed == separate, the KV ring (decode,
continued prefill)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.attention import Attention
from gdn_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, head_k_dim=8,
                  head_v_dim=8, chunk_size=16, layer_pattern="A", num_attn_heads=4,
                  num_kv_heads=2, attn_head_dim=8, attn_output_gate=True, attn_qk_norm=True,
                  rope_theta=100.0)
VARIANTS = {   # name: (config changes, window)
    "gqa_gate_norm": ({}, 0),
    "window": ({"attn_output_gate": False}, 3),
    "mha_plain_window": ({"num_kv_heads": 4, "attn_qk_norm": False, "attn_output_gate": False},
                         5),
    "partial_rope": ({"attn_head_dim": 16, "rope_fraction": 0.25}, 0),   # 4 of 16 dims rotate
}
# Qwen3-Next's partial rotary: RoPE on the first quarter (4) of each head's 16 dims.
PARTIAL = dataclasses.replace(CFG, attn_head_dim=16, rope_fraction=0.25, attn_qk_norm=False)


def make(cfg=CFG, window=0, seed=0):
  """Weights large enough that the softmax is far from uniform and every path moves y."""
  layer = Attention(cfg, window=window, rngs=nnx.Rngs(seed))
  for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
    if hasattr(layer, name):
      lin = getattr(layer, name)
      lin.kernel[...] = lin.kernel[...] * 25.0
  for name in ("q_norm", "k_norm"):
    if hasattr(layer, name):   # gains ≠ 1, so a missing norm gain shows
      norm = getattr(layer, name)
      norm.weight[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed + 7), norm.weight.shape)
  return layer


def attention_ref(layer, x, segment_ids=None, rope_fraction=1.0):
  """float64 NumPy, written from the math: per (t, s) a mask M = same document ∧ s ≤ t ∧
  t − s < W; RoPE as complex rotation of the pairs (i, i + R/2) by pos·θ^(−2i/R) of the first
  R = round(rope_fraction · H) dims, the others kept."""
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)
  x = np.asarray(x, np.float64)
  B, T, _ = x.shape
  N, Nkv, H = layer.num_heads, layer.num_kv_heads, layer.head_dim
  q = (x @ w(layer.q_proj)).reshape(B, T, N, H)
  k = (x @ w(layer.k_proj)).reshape(B, T, Nkv, H)
  v = (x @ w(layer.v_proj)).reshape(B, T, Nkv, H)
  if layer.use_qk_norm:
    rms = lambda a, g: a / np.sqrt((a * a).mean(-1, keepdims=True) + layer.q_norm.eps) * g
    q = rms(q, np.asarray(layer.q_norm.weight[...], np.float64))
    k = rms(k, np.asarray(layer.k_norm.weight[...], np.float64))
  seg = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
  pos = np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  R = round(rope_fraction * H)
  freq = layer.rope_theta ** (-2.0 * np.arange(R // 2) / R)

  def rotate(a):
    z = (a[..., :R // 2] + 1j * a[..., R // 2:R]) * np.exp(1j * pos[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag, a[..., R:]], -1)

  q, k = rotate(q), rotate(k)
  o = np.zeros((B, T, N, H))
  for b in range(B):
    for n in range(N):
      kh = n // (N // Nkv)
      for t in range(T):
        s = np.arange(T)
        keep = (seg[b] == seg[b, t]) & (s <= t) & ((t - s < layer.window) if layer.window
                                                   else True)
        logits = layer.scale * k[b, :, kh] @ q[b, t, n]
        p = np.where(keep, np.exp(logits - logits[keep].max()), 0.0)
        o[b, t, n] = (p / p.sum()) @ v[b, :, kh]
  o = o.reshape(B, T, N * H)
  if layer.use_gate:
    o = o / (1 + np.exp(-(x @ w(layer.g_proj))))
  return o @ w(layer.o_proj)


def inputs(B, T, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, CFG.d_model))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_numpy_reference(name):
  changes, window = VARIANTS[name]
  cfg = dataclasses.replace(CFG, **changes)
  layer = make(cfg, window)
  layer.scale = 0.3     # a scale set from outside (as μP does) is the one used
  x = inputs(2, 12)
  seg = jnp.asarray([[0] * 12, [3] * 5 + [4] * 7])
  for s in (None, seg):
    y = nnx.jit(lambda m, x, s: m(x, s))(layer, x, s)
    ref = attention_ref(layer, x, s, cfg.rope_fraction)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(y, ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-4)


def test_packed_documents_equal_separate_runs():
  layer = make(window=4)
  a, b = inputs(1, 7, seed=1), inputs(1, 9, seed=2)

  @nnx.jit
  def run(layer, a, b):
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.asarray([[5] * 7 + [2] * 9])
    return layer(packed, seg), layer(a), layer(b), layer(packed)

  y, ya, yb, unpacked = run(layer, a, b)
  np.testing.assert_allclose(y[:, :7], ya, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y[:, 7:], yb, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(unpacked[:, 7:] - yb).max()) > 1e-2   # the ids matter


@pytest.mark.parametrize("window, max_len", [(0, 20), (4, None)])
def test_decode_ring_and_continued_prefill_equal_the_forward(window, max_len):
  """Token by token through the KV ring (W slots for a window, so it wraps several times), and a
  prefill that continues a cache with a new document after the continued one."""
  layer = make(window=window)
  x = inputs(2, 17, seed=3)

  @nnx.jit
  def run(layer, x):
    def body(cache, x_B):
      y, cache = layer.step(x_B, cache)
      return cache, y
    _, stepped = jax.lax.scan(body, layer.init_cache(2, max_len=max_len), jnp.swapaxes(x, 0, 1))
    # Prefill 10 tokens, continue with 7: the first 3 continue the document, 4 start a new one.
    y1, cache = layer(x[:, :10], return_cache=True, max_len=max_len)
    seg = jnp.asarray([[1] * 3 + [2] * 4] * 2)
    y2, cache = layer(x[:, 10:], seg, cache=cache, return_cache=True)
    # The returned cache is the new document's: decoding from it continues that document.
    y_next, _ = layer.step(x[:, 0], cache)
    new_doc = layer(jnp.concatenate([x[:, 13:], x[:, :1]], 1))
    return layer(x), jnp.swapaxes(stepped, 0, 1), y1, y2, y_next, new_doc

  full, stepped, y1, y2, y_next, new_doc = run(layer, x)
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  close(stepped, full)
  close(jnp.concatenate([y1, y2[:, :3]], 1), full[:, :13])
  close(y2[:, 3:], new_doc[:, :4])
  close(y_next, new_doc[:, -1])


def test_full_attention_cache_needs_max_len():
  with pytest.raises(ValueError, match="max_len"):
    make().init_cache(1)
  assert make(window=4).init_cache(1)['k'].shape == (1, 4, 2, 8)     # the window's slots


def rope_ref(x, pos, theta, R):
  """float64 NumPy RoPE of the first R dims, pair by pair: (x_i, x_{i+R/2}) turned by the angle
  pos · θ^(−2i/R); the dims R.. copied."""
  x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)[:, :, None]
  out = x.copy()
  for i in range(R // 2):
    c, s = np.cos(pos * theta ** (-2.0 * i / R)), np.sin(pos * theta ** (-2.0 * i / R))
    out[..., i] = x[..., i] * c - x[..., i + R // 2] * s
    out[..., i + R // 2] = x[..., i + R // 2] * c + x[..., i] * s
  return out


def partial_qk():
  """(A PARTIAL layer, abstract: no weights needed with the q/k norm off; its `_qk`, the RoPE
  shared by the forward and `step`, jitted)."""
  layer = nnx.eval_shape(lambda: Attention(PARTIAL, rngs=nnx.Rngs(0)))
  return layer, jax.jit(layer._qk)


def test_partial_rope_rotates_the_first_quarter_with_its_own_frequencies():
  """q and k as the layer rotates them: dims 4..16 bit for bit as they came, dims 0..4 RoPE with
  θ^(−2i/4), not the full head's θ^(−2i/16)."""
  layer, qk = partial_qk()
  assert (layer.rope_dim, make().rope_dim) == (4, 8)           # 1.0 (the default): all of H
  r = np.random.default_rng(4)
  q, k = r.standard_normal((2, 6, 4, 16), np.float32), r.standard_normal((2, 6, 2, 16), np.float32)
  pos = r.integers(0, 300, (2, 6), dtype=np.int32)
  rq, rk = qk(q, k, pos)
  for a, rot in ((q, rq), (k, rk)):
    np.testing.assert_array_equal(rot[..., 4:], a[..., 4:])
    np.testing.assert_allclose(rot, rope_ref(a, pos, layer.rope_theta, 4), atol=1e-4, rtol=1e-4)
    assert float(np.abs(rot[..., :4] - a[..., :4]).max()) > 0.5


def test_partial_rope_scores_depend_on_the_position_difference_only():
  """qᵀk of q at position i and k at position j is a function of i − j: shifting both by 113
  keeps every score (unrotated dims included); shifting q alone changes them."""
  _, qk = partial_qk()
  r = np.random.default_rng(5)
  q, k = (r.standard_normal((1, 8, 2, 16), np.float32) for _ in range(2))
  pos_q, pos_k = (r.integers(0, 200, (1, 8), dtype=np.int32) for _ in range(2))
  scores = jax.jit(lambda pq, pk: jnp.einsum('btnh,bsnh->bnts', qk(q, k, pq)[0],
                                             qk(q, k, pk)[1]))
  ref = scores(pos_q, pos_k)
  np.testing.assert_allclose(scores(pos_q + 113, pos_k + 113), ref, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(scores(pos_q + 113, pos_k) - ref).max()) > 0.1
