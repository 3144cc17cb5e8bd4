"""experiments/qk_curvature.py's per-layer measurement against a dense Hessian of the same
loss, built by another route (assigning W_q, W_k on the merged module, not by leaf index)."""
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import mup
from gdn_jax import model as model_lib
from gdn_jax.loss import cross_entropy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import qk_curvature  # pylint: disable=wrong-import-position

WIDTH, HEADS, HEAD_DIM, LAYER = 16, 2, 8, 1


def test_layer_curvature_matches_the_dense_hessian_of_that_layers_wq_wk():
  config = model_lib.ModelConfig(
      vocab_size=32, d_model=WIDTH, num_layers=2, num_heads=HEADS, head_k_dim=HEAD_DIM,
      head_v_dim=HEAD_DIM, mlp_hidden=32, chunk_size=16, rule_impl="recurrent", dtype="float32",
      output_norm_eps=1e-3)
  model = mup.build_model(config, parametrization="mup", rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  probe = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 9)))
  got = qk_curvature.layer_curvature(graphdef, params, rest, LAYER, probe, HEADS, HEAD_DIM,
                                     lanczos_steps=60)

  size = WIDTH * HEADS * HEAD_DIM

  def logits(flat):
    m = nnx.merge(graphdef, jax.tree.map(lambda x: x, params), rest)   # Params of this trace
    m.blocks[LAYER].mixer.q_proj.kernel[...] = flat[:size].reshape(WIDTH, -1)
    m.blocks[LAYER].mixer.k_proj.kernel[...] = flat[size:].reshape(WIDTH, -1)
    return m(probe[:, :-1])

  mixer = model.blocks[LAYER].mixer
  flat0 = jnp.concatenate([mixer.q_proj.kernel[...].ravel(), mixer.k_proj.kernel[...].ravel()])
  hessian = np.asarray(jax.hessian(lambda f: cross_entropy(logits(f), probe[:, 1:]))(flat0),
                       np.float64)
  eig = np.linalg.eigvalsh((hessian + hessian.T) / 2)
  jac = np.asarray(jax.jacfwd(logits)(flat0), np.float64).reshape(-1, config.vocab_size, 2 * size)
  p = np.asarray(jax.nn.softmax(logits(flat0)), np.float64).reshape(-1, config.vocab_size)
  ggn = sum(j.T @ (np.diag(pt) - np.outer(pt, pt)) @ j for j, pt in zip(jac, p)) / len(p)

  assert got["h_max"] == pytest.approx(eig[-1], rel=2e-3)
  assert got["h_min"] == pytest.approx(eig[0], rel=2e-3)
  assert got["g_max"] == pytest.approx(np.linalg.eigvalsh(ggn)[-1], rel=2e-3)
  assert eig[0] < -1e-3 < 1e-3 < eig[-1]          # H is indefinite here: both ends matter
  assert 1 / HEADS <= got["top_head_share"] <= 1
  assert 0 <= got["top_head_decay_rank"] < HEADS and 0 <= got["top_head_grad_rank"] < HEADS
