"""gdn_jax.curvature against dense references: the Hessian from jax.hessian, the Gauss-Newton
matrix Jᵀ H_ℓ J assembled in float64 numpy from the Jacobian, and eigenvalues from numpy; on a
tanh MLP and on a small GDN language model."""
from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import curvature, mup
from gdn_jax import model as model_lib
from gdn_jax.loss import cross_entropy

N, D_IN, HIDDEN, VOCAB = 6, 3, 4, 5


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Compiling the GDN's Hessian-vector products and dense Hessians is most of this file's time:
  XLA's optimisations would double it and these small programs need no speed (the eigenvalues
  agree with the optimised run's to 1e-7)."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _problem(seed=0):
  """A tanh MLP to logits over 5 classes; params as a dict pytree, loss = mean cross-entropy."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32)
  y = rng.integers(0, VOCAB, size=N)
  params = {"w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(HIDDEN, VOCAB)) / 2, jnp.float32)}
  logits_fn = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]
  loss_fn = lambda p: -jnp.mean(jax.nn.log_softmax(logits_fn(p))[np.arange(N), y])
  return params, logits_fn, loss_fn


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _unflat(vec, like):
  return ravel_pytree(like)[1](jnp.asarray(vec, jnp.float32))


def _dense_hessian(loss_fn, params):
  flat0 = _flat(params)
  return np.asarray(jax.hessian(lambda f: loss_fn(_unflat(f, params)))(
      jnp.asarray(flat0, jnp.float32)), np.float64)


def _dense_ggn(logits_fn, params):
  """Jᵀ H_ℓ J in float64 from the [N·V, P] Jacobian: H_ℓ = (diag p − p pᵀ) / N per token."""
  flat0 = jnp.asarray(_flat(params), jnp.float32)
  jac = np.asarray(jax.jacfwd(lambda f: logits_fn(_unflat(f, params)))(flat0), np.float64)
  z = np.asarray(logits_fn(params), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = np.zeros((flat0.size, flat0.size))
  for t in range(N):
    h_l = (np.diag(p[t]) - np.outer(p[t], p[t])) / N
    g += jac[t].T @ h_l @ jac[t]
  return g


def test_hvp_matches_the_dense_hessian():
  params, _, loss_fn = _problem()
  dense = _dense_hessian(loss_fn, params)
  for seed in range(3):
    v = np.random.default_rng(10 + seed).normal(size=dense.shape[0])
    got = _flat(curvature.hvp(loss_fn, params, _unflat(v, params)))
    np.testing.assert_allclose(got, dense @ v, rtol=1e-4, atol=1e-5)


def test_ggn_vp_matches_jt_h_j_and_differs_from_the_hessian():
  params, logits_fn, loss_fn = _problem()
  dense = _dense_ggn(logits_fn, params)
  v = np.random.default_rng(3).normal(size=dense.shape[0])
  got = _flat(curvature.ggn_vp(logits_fn, params, _unflat(v, params)))
  np.testing.assert_allclose(got, dense @ v, rtol=1e-4, atol=1e-5)
  # The tanh layer's own curvature is what G leaves out: H ≠ G here.
  assert np.abs(_dense_hessian(loss_fn, params) - dense).max() > 1e-2
  assert np.linalg.eigvalsh(dense).min() > -1e-6       # G is positive semi-definite


def test_ggn_equals_hessian_when_logits_are_linear_in_the_params():
  params, _, _ = _problem()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(N, HIDDEN)), jnp.float32)
  y = rng.integers(0, VOCAB, size=N)
  w = {"w2": params["w2"]}
  logits_fn = lambda p: x @ p["w2"]
  loss_fn = lambda p: -jnp.mean(jax.nn.log_softmax(logits_fn(p))[np.arange(N), y])
  v = _unflat(rng.normal(size=HIDDEN * VOCAB), w)
  np.testing.assert_allclose(_flat(curvature.ggn_vp(logits_fn, w, v)),
                             _flat(curvature.hvp(loss_fn, w, v)), rtol=1e-4, atol=1e-6)


def _symmetric(eigenvalues, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
  return q @ np.diag(eigenvalues) @ q.T


def test_lanczos_finds_both_ends_of_the_spectrum_and_the_top_vector():
  eig = np.concatenate([[-6.0, 4.0], np.random.default_rng(2).uniform(-1, 1, size=48)])
  a = _symmetric(eig, seed=1)
  matvec = lambda v: {"x": jnp.asarray(a, jnp.float32) @ v["x"]}
  values, v = curvature.lanczos(matvec, {"x": jnp.ones(50)}, steps=25)
  assert len(values) == 25
  assert values[0] == pytest.approx(-6.0, rel=1e-4)   # the most negative
  assert values[-1] == pytest.approx(4.0, rel=1e-4)   # the most positive: the SGD edge
  top = np.linalg.eigh(a)[1][:, -1]
  assert abs(np.dot(np.asarray(v["x"], np.float64), top)) == pytest.approx(1.0, abs=1e-3)
  assert float(jnp.linalg.norm(v["x"])) == pytest.approx(1.0, rel=1e-5)


def test_lanczos_is_exact_on_an_invariant_subspace_and_stops_there():
  a = _symmetric([3.0, -1.0, 0.5, 2.0, 7.0], seed=3)
  _, vecs = np.linalg.eigh(a)
  v0 = jnp.asarray(vecs[:, 1] + vecs[:, 4], jnp.float32)    # spans 2 eigenvectors only
  values, _ = curvature.lanczos(lambda v: jnp.asarray(a, jnp.float32) @ v, v0, steps=5)
  np.testing.assert_allclose(values, [0.5, 7.0], rtol=1e-4)


@pytest.mark.parametrize("v0, kwargs, match", [(jnp.ones(3), dict(steps=0), "`steps`"),
                                               (jnp.zeros(3), {}, "`v0` is zero")])
def test_lanczos_rejects_bad_input(v0, kwargs, match):
  with pytest.raises(ValueError, match=match):
    curvature.lanczos(lambda v: v, v0, **kwargs)


def _gdn(num_layers=2):
  config = model_lib.ModelConfig(
      vocab_size=32, d_model=16, num_layers=num_layers, num_heads=2, head_k_dim=8, head_v_dim=8,
      mlp_hidden=32, chunk_size=16, rule_impl="recurrent", dtype="float32", output_norm_eps=1e-3)
  model = mup.build_model(config, parametrization="mup", rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 9)))
  return config, model, tokens


def test_qk_layer_curvature_matches_the_dense_hessian_of_that_layers_wq_wk():
  """Against a dense Hessian built by another route: W_q, W_k assigned on the merged module."""
  config, model, tokens = _gdn()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  layer, size = 1, config.d_model * config.num_heads * config.head_k_dim
  got = curvature.qk_layer_curvature(graphdef, params, rest, layer=layer, tokens=tokens,
                                     head_k_dim=config.head_k_dim, lanczos_steps=60)

  def logits(flat):
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x, params), rest)   # Params of this trace
    m.blocks[layer].mixer.q_proj.kernel[...] = flat[:size].reshape(config.d_model, -1)
    m.blocks[layer].mixer.k_proj.kernel[...] = flat[size:].reshape(config.d_model, -1)
    return m(tokens[:, :-1])

  mixer = model.blocks[layer].mixer
  flat0 = jnp.concatenate([mixer.q_proj.kernel[...].ravel(), mixer.k_proj.kernel[...].ravel()])
  # jit: one compiled program each instead of ~1000 op-by-op dispatches over 512 tangents.
  hessian = np.asarray(jax.jit(jax.hessian(lambda f: cross_entropy(logits(f), tokens[:, 1:])))(
      flat0), np.float64)
  eig = np.linalg.eigvalsh((hessian + hessian.T) / 2)
  jac = np.asarray(jax.jit(jax.jacfwd(logits))(flat0), np.float64).reshape(
      -1, config.vocab_size, 2 * size)
  p = np.asarray(jax.nn.softmax(logits(flat0)), np.float64).reshape(-1, config.vocab_size)
  ggn = sum(j.T @ (np.diag(pt) - np.outer(pt, pt)) @ j for j, pt in zip(jac, p)) / len(p)

  print("relative errors: h_max", got["h_max"] / eig[-1] - 1, "h_min", got["h_min"] / eig[0] - 1,
        "g_max", got["g_max"] / np.linalg.eigvalsh(ggn)[-1] - 1)
  assert got["h_max"] == pytest.approx(eig[-1], rel=2e-3)
  assert got["h_min"] == pytest.approx(eig[0], rel=2e-3)
  assert got["g_max"] == pytest.approx(np.linalg.eigvalsh(ggn)[-1], rel=2e-3)
  assert eig[0] < -1e-3 < 1e-3 < eig[-1]          # H is indefinite here: both ends matter
  assert 1 / config.num_heads <= got["top_head_share"] <= 1
  assert 0 <= got["top_head_decay_rank"] < config.num_heads
  assert 0 <= got["top_head_grad_rank"] < config.num_heads


def test_qk_head_curvatures_match_the_dense_hessians_head_blocks():
  """Each head's λ_max is the top eigenvalue of the dense (W_q, W_k) Hessian's principal block on
  that head's columns (built by another route), and none exceeds the whole block's (interlacing)."""
  config, model, tokens = _gdn()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  layer, d, H, K = 1, config.d_model, config.num_heads, config.head_k_dim
  size = d * H * K
  got = curvature.qk_head_curvatures(graphdef, params, rest, layer=layer, tokens=tokens,
                                     head_k_dim=K, lanczos_steps=40)

  def loss(flat):
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x, params), rest)
    m.blocks[layer].mixer.q_proj.kernel[...] = flat[:size].reshape(d, -1)
    m.blocks[layer].mixer.k_proj.kernel[...] = flat[size:].reshape(d, -1)
    return cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])

  mixer = model.blocks[layer].mixer
  flat0 = jnp.concatenate([mixer.q_proj.kernel[...].ravel(), mixer.k_proj.kernel[...].ravel()])
  hessian = np.asarray(jax.jit(jax.hessian(loss))(flat0), np.float64)
  hessian = (hessian + hessian.T) / 2
  columns = np.arange(size).reshape(d, H, K)           # W_q[i, h·K + j] sits at i·H·K + h·K + j
  want = [np.linalg.eigvalsh(hessian[np.ix_(idx, idx)])[-1]
          for idx in (np.concatenate([columns[:, h].ravel(), size + columns[:, h].ravel()])
                      for h in range(H))]
  assert got.shape == (H,)
  np.testing.assert_allclose(got, want, rtol=2e-3)
  assert got.max() <= np.linalg.eigvalsh(hessian)[-1] * (1 + 1e-6)
  assert abs(got[0] - got[1]) > 1e-3 * abs(got).max()   # the heads differ: not one head twice


def test_qk_layer_curvature_rejects_a_missing_layer():
  config, model, tokens = _gdn(num_layers=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="`layer`=1"):
    curvature.qk_layer_curvature(graphdef, params, rest, layer=1, tokens=tokens,
                                 head_k_dim=config.head_k_dim)
