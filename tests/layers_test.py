"""Layers against independent float64 NumPy references (ShortConv, GatedRMSNorm, the whole mixer)."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.layers import GatedDeltaNet, GatedRMSNorm, ShortConv
from gdn_jax.model import ModelConfig
from tests.np_reference import gated_delta_rule_ref

CFG = ModelConfig(d_model=16, num_layers=1, num_heads=2, head_k_dim=4, head_v_dim=6,
                  num_v_heads=4, chunk_size=16, rule_impl="chunked")


def silu(x):
  return x / (1 + np.exp(-x))


def conv_ref(x_BxTxC, w_WxC, seg_BxT=None):
  """y_t = SiLU(Σ_i w_i x_{t−W+1+i}), zero before the sequence and across segments."""
  B, T, C = x_BxTxC.shape
  W = w_WxC.shape[0]
  y = np.zeros((B, T, C))
  for b in range(B):
    for t in range(T):
      for i in range(W):
        s = t - (W - 1) + i
        if s >= 0 and (seg_BxT is None or seg_BxT[b, s] == seg_BxT[b, t]):
          y[b, t] += w_WxC[i] * x_BxTxC[b, s]
  return silu(y)


def test_short_conv_matches_reference_with_segments_and_steps():
  conv = ShortConv(5, 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 11, 5)).astype(np.float32)
  seg = np.array([[0] * 4 + [1] * 7, [3] * 11], np.int32)
  w = np.asarray(conv.weight[...], np.float64)
  y, _ = conv(jnp.asarray(x), jnp.asarray(seg))
  np.testing.assert_allclose(y, conv_ref(x, w, seg), atol=1e-5)
  # Splitting the sequence through the cache, or stepping one token at a time, changes nothing.
  y1, state = conv(jnp.asarray(x[:, :6]))
  y2, _ = conv(jnp.asarray(x[:, 6:]), state_BxWxC=state)
  np.testing.assert_allclose(np.concatenate([y1, y2], 1), conv_ref(x, w), atol=1e-5)
  state, ys = conv.init_state(2), []
  for t in range(11):
    y_t, state = conv.step(jnp.asarray(x[:, t]), state)
    ys.append(y_t)
  np.testing.assert_allclose(np.stack(ys, 1), conv_ref(x, w), atol=1e-5)


def test_gated_rms_norm_matches_reference():
  norm = GatedRMSNorm(6, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
  norm.weight[...] = jnp.linspace(0.5, 1.5, 6)
  r = np.random.default_rng(1)
  o, gate = r.normal(size=(2, 3, 4, 6)), r.normal(size=(2, 3, 4, 6))
  ref = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 6)
  np.testing.assert_allclose(norm(jnp.asarray(o, jnp.float32), jnp.asarray(gate, jnp.float32)),
                             ref * silu(gate), rtol=1e-5, atol=1e-6)


def mixer_ref(m: GatedDeltaNet, x, seg):
  """The GDN mixer from its definition, in float64, with the NumPy rule reference."""
  p = lambda v: np.asarray(v[...], np.float64)
  Hk, H, K, V = m.num_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
  B, T, _ = x.shape
  q = conv_ref(x @ p(m.q_proj.kernel), p(m.q_conv.weight), seg).reshape(B, T, Hk, K)
  k = conv_ref(x @ p(m.k_proj.kernel), p(m.k_conv.weight), seg).reshape(B, T, Hk, K)
  v = conv_ref(x @ p(m.v_proj.kernel), p(m.v_conv.weight), seg).reshape(B, T, H, V)
  beta = 1 / (1 + np.exp(-(x @ p(m.b_proj.kernel))))
  g = -np.exp(p(m.A_log)) * np.log1p(np.exp(x @ p(m.a_proj.kernel) + p(m.dt_bias)))
  o, _ = gated_delta_rule_ref(q, k, v, g, beta, scale=m.qk_scale, use_qk_l2norm=True,
                              segment_ids=seg, qk_norm_eps=m.qk_norm_eps)
  y = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + m.o_norm.eps) * p(m.o_norm.weight)
  y = y * silu((x @ p(m.g_proj.kernel)).reshape(B, T, H, V))
  return y.reshape(B, T, H * V) @ p(m.o_proj.kernel)


@pytest.mark.parametrize("qk_norm_eps", [1e-6, 0.3])
def test_mixer_matches_reference_and_init_ranges(qk_norm_eps):
  m = GatedDeltaNet(dataclasses.replace(CFG, qk_norm_eps=qk_norm_eps), rngs=nnx.Rngs(3))
  assert m.qk_norm_eps == qk_norm_eps
  # Larger weights than the 0.02 init so every path (gates, conv, delta rule) matters.
  for lin in (m.q_proj, m.k_proj, m.v_proj, m.a_proj, m.b_proj, m.g_proj, m.o_proj):
    lin.kernel[...] = lin.kernel[...] * 20
  r = np.random.default_rng(2)
  x = r.normal(size=(2, 20, 16))
  seg = np.array([[0] * 9 + [1] * 11, [0] * 20], np.int32)
  y = nnx.jit(lambda m, x, s: m(x, s))(m, jnp.asarray(x, jnp.float32), jnp.asarray(seg))
  ref = mixer_ref(m, x, seg)
  assert y.shape == (2, 20, 16) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  A = np.exp(np.asarray(m.A_log[...]))
  dt = np.log1p(np.exp(np.asarray(m.dt_bias[...])))
  assert np.all((A > 0) & (A <= 16)) and np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))


def test_readout_scale_and_output_norm_eps_are_one_knob():
  """o reaches the output only through RMSNorm, and RMSNorm(c·o; eps) = RMSNorm(o; eps/c²): a
  readout scale c with eps equals scale 1 with eps/c², in the output and in every gradient
  (docs/mup.md, scheme B)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 12, 16)), jnp.float32)
  c, eps = 4.0, 1e-2

  def loss_and_grads(scale, o_eps):
    m = GatedDeltaNet(CFG, rngs=nnx.Rngs(5))
    m.qk_scale, m.o_norm.eps = scale, o_eps
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    return nnx.value_and_grad(loss)(m)

  (l1, g1), (l2, g2) = loss_and_grads(c, eps), loss_and_grads(1.0, eps / c ** 2)
  (l3, _) = loss_and_grads(1.0, eps)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  assert abs(float(l1) - float(l3)) > 1e-3       # the eps regime matters here: not a vacuous check
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max() + 1))


def test_neg_eigval_doubles_beta():
  cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, head_k_dim=4, head_v_dim=4,
                    allow_neg_eigval=True)
  m = GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 16))
  beta, _ = m._gates(x)
  np.testing.assert_allclose(beta, 2 / (1 + np.exp(-np.asarray(m.b_proj(x)))), rtol=1e-6)


@pytest.mark.parametrize("module", ["mixer", "conv", "norm"])
def test_every_param_has_mup_labels(module):
  made = {"mixer": lambda: GatedDeltaNet(CFG, rngs=nnx.Rngs(0)),
          "conv": lambda: ShortConv(3, 4, dtype=jnp.float32, param_dtype=jnp.float32,
                                    rngs=nnx.Rngs(0)),
          "norm": lambda: GatedRMSNorm(3, eps=1e-5, dtype=jnp.float32,
                                       param_dtype=jnp.float32)}[module]()
  params = [v for _, v in nnx.iter_graph(made) if isinstance(v, nnx.Param)]
  assert params
  for v in params:
    meta = v.get_metadata()
    axes = tuple(meta["fan_in_axes"]) + tuple(meta["fan_out_axes"])
    assert len(set(axes)) == len(axes) and all(0 <= a < v.ndim for a in axes)
    assert isinstance(meta["weight_decay"], bool)
