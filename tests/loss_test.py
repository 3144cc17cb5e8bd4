"""The fused LM head + cross-entropy (gdn_jax.loss.linear_cross_entropy) against a float64
reference written out in numpy, and the model / train step that use it (ModelConfig.loss_chunk_size)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.loss import cross_entropy, linear_cross_entropy
from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from gdn_jax.train.step import make_loss_fn


def _np_linear_ce(h, w, y, m):
  """Mean CE of z = m h w and its gradients, float64 numpy (softmax − onehot written out)."""
  z = m * h @ w
  z_max = z.max(-1, keepdims=True)
  lse = (z_max + np.log(np.exp(z - z_max).sum(-1, keepdims=True)))[:, 0]
  n = len(y)
  loss = np.mean(lse - z[np.arange(n), y])
  dz = np.exp(z - lse[:, None])
  dz[np.arange(n), y] -= 1
  dz *= m / n
  return loss, dz @ w.T, h.T @ dz


def _data(n=37, d=16, v=50, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)), 0.3 * rng.normal(size=(d, v)), rng.integers(0, v, size=n))


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])      # 37 = N; 64 > N; 8 leaves a ragged end
@pytest.mark.parametrize("transpose_w", [False, True])
def test_linear_ce_equals_a_float64_reference(chunk_size, transpose_w):
  h, w, y = _data()
  m = 2.5
  loss_ref, dh_ref, dw_ref = _np_linear_ce(h, w, y, m)
  w_in = w.T if transpose_w else w
  f = lambda h_, w_: linear_cross_entropy(h_, w_, jnp.asarray(y), multiplier=m,
                                          chunk_size=chunk_size, transpose_w=transpose_w)
  loss, (dh, dw) = jax.value_and_grad(f, (0, 1))(jnp.asarray(h, jnp.float32),
                                                  jnp.asarray(w_in, jnp.float32))
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(dh, dh_ref, atol=1e-6)
  np.testing.assert_allclose(dw.T if transpose_w else dw, dw_ref, atol=1e-6)
  assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32



@pytest.mark.parametrize("chunk_size", [3, 9, 100])         # t = 1, 3 (ragged: T = 7), 7
def test_linear_ce_over_batch_and_time_equals_the_reference(chunk_size):
  """[B, T, D]: chunks are time slices with the batch whole; same numbers as the flat [N, D]."""
  h, w, y = _data(n=21, seed=3)
  loss_ref, dh_ref, dw_ref = _np_linear_ce(h, w, y, 1.5)
  f = lambda h_, w_: linear_cross_entropy(h_, w_, jnp.asarray(y).reshape(3, 7), multiplier=1.5,
                                          chunk_size=chunk_size)
  loss, (dh, dw) = jax.value_and_grad(f, (0, 1))(jnp.asarray(h, jnp.float32).reshape(3, 7, -1),
                                                  jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(dh.reshape(21, -1), dh_ref, atol=1e-6)
  np.testing.assert_allclose(dw, dw_ref, atol=1e-6)

def test_linear_ce_matches_cross_entropy_of_the_logits_and_its_autodiff():
  """Same numbers as logits → cross_entropy, and the custom VJP is what autodiff of that gives
  (also for a cotangent other than 1, i.e. a loss scaled after the call)."""
  h, w, y = (jnp.asarray(a) for a in _data(n=20, seed=1))
  h, w = h.astype(jnp.float32), w.astype(jnp.float32)
  plain = lambda h_, w_: 3.0 * cross_entropy(0.5 * h_ @ w_, y)
  fused = lambda h_, w_: 3.0 * linear_cross_entropy(h_, w_, y, multiplier=0.5, chunk_size=6)
  np.testing.assert_allclose(fused(h, w), plain(h, w), rtol=1e-6)
  for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_linear_ce_bf16_inputs_keep_their_dtype_and_stay_close():
  h, w, y = _data(n=64, d=32, v=300, seed=2)
  loss_ref, dh_ref, _ = _np_linear_ce(h, w, y, 1.0)
  f = lambda h_, w_: linear_cross_entropy(h_, w_, jnp.asarray(y), chunk_size=16)
  loss, (dh, dw) = jax.value_and_grad(f, (0, 1))(jnp.asarray(h, jnp.bfloat16),
                                                  jnp.asarray(w, jnp.float32))
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(dh, np.float64), dh_ref, atol=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(h=np.zeros((2, 3, 4, 3))), "`h`"),
    (dict(w=np.zeros((5, 7))), "`w`"),
    (dict(targets=np.zeros((6,), np.int32)), "`targets`"),
    (dict(targets=np.zeros((4,), np.float32)), "`targets`"),
    (dict(chunk_size=0), "`chunk_size`"),
])
def test_linear_ce_bad_input_names_the_argument(kwargs, match):
  args = dict(h=np.zeros((4, 3)), w=np.zeros((3, 7)), targets=np.zeros((4,), np.int32),
              chunk_size=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    linear_cross_entropy(jnp.asarray(args["h"]), jnp.asarray(args["w"]),
                         jnp.asarray(args["targets"]), chunk_size=args["chunk_size"])


def _model(tie, dtype, loss_chunk_size, multiplier=0.7):
  c = ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=2, head_k_dim=16,
                  head_v_dim=16, tie_embeddings=tie, dtype=dtype, rule_impl="recurrent",
                  chunk_size=16, loss_chunk_size=loss_chunk_size)
  m = GatedDeltaNetLM(c, rngs=nnx.Rngs(0))
  if tie:
    m.embed.attend_multiplier = multiplier   # μP's read-out multipliers must reach the fused loss
  else:
    m.lm_head.multiplier = multiplier
  return m


@pytest.mark.parametrize("tie", [False, True])
def test_train_loss_with_loss_chunk_size_equals_the_plain_loss(tie):
  """make_loss_fn with loss_chunk_size > 0 (model.loss, fused) = the plain logits → loss path,
  value and gradient of every parameter, float32."""
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 97)
  results = []
  for lc in (0, 20):
    graphdef, params = nnx.split(_model(tie, "float32", lc))
    results.append(jax.jit(jax.value_and_grad(make_loss_fn(graphdef)))(params, tokens))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=2e-6 * max(1.0, float(jnp.abs(b).max())))


def test_model_loss_bf16_is_within_bf16_error_of_the_plain_loss():
  tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 97)
  plain = _model(False, "bfloat16", 0)
  fused = _model(False, "bfloat16", 16)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  loss = nnx.jit(lambda m: m.loss(inputs, targets))
  assert abs(float(loss(fused)) - float(loss(plain))) < 2e-2


def test_model_loss_checks_the_targets_and_the_config_checks_the_chunk():
  m = _model(False, "float32", 8)
  tokens = jnp.zeros((2, 9), jnp.int32)
  with pytest.raises(ValueError, match="`targets`"):
    m.loss(tokens, tokens[:, :-1])
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="loss_chunk_size"):
      dataclasses.replace(m.config, loss_chunk_size=bad)
