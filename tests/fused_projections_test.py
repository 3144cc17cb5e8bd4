"""ModelConfig.fuse_projections: the GDN input projections and the MLP's gate/up as one product
each (gdn_jax.layers.fused_linears) give the unfused model's outputs and gradients, with μP's
per-Linear multipliers, and the same parameters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.layers import Linear, fused_linears
from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from gdn_jax.train.step import make_loss_fn

_CONFIG = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=2, head_k_dim=8,
                      head_v_dim=16, num_v_heads=4, mlp_hidden=48, rule_impl="recurrent")


def _model(fuse: bool, use_gate: bool = True):
  m = GatedDeltaNetLM(dataclasses.replace(_CONFIG, fuse_projections=fuse, use_gate=use_gate),
                      rngs=nnx.Rngs(0))
  block = m.blocks[0]
  for lin, mult in ((block.mixer.q_proj, 0.5), (block.mixer.a_proj, 3.0),
                    (block.mlp.up_proj, 0.25)):
    lin.multiplier = mult          # μP's forward multipliers must act per projection
  return m


def test_fused_projections_equal_the_separate_ones():
  tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, 61)
  results = []
  for fuse in (False, True):
    graphdef, params = nnx.split(_model(fuse))
    results.append((params, jax.value_and_grad(make_loss_fn(graphdef))(params, tokens)))
  (p0, (l0, g0)), (p1, (l1, g1)) = results
  assert jax.tree.structure(p0) == jax.tree.structure(p1)          # same parameters
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(jnp.abs(b).max())))


def test_fused_linears_apply_each_multiplier_to_its_columns():
  rngs = nnx.Rngs(1)
  lins = [Linear(5, n, init_std=1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
          for n in (3, 1, 4)]
  lins[1].multiplier = -2.0
  x = jax.random.normal(jax.random.key(2), (2, 7, 5))
  for got, lin in zip(fused_linears(x, lins, jnp.float32), lins):
    np.testing.assert_allclose(got, lin(x), rtol=1e-6, atol=1e-6)


def test_the_fused_product_has_aligned_columns():
  """The stacked kernel is padded with zero columns to a multiple of 128 (8 + 1 + 4 → 128; 128
  stays 128), and the outputs keep their own widths."""
  rngs = nnx.Rngs(3)
  x = jax.random.normal(jax.random.key(4), (2, 5))
  for widths, n in (((8, 1, 4), 128), ((64, 64), 128), ((100, 100), 256)):
    lins = [Linear(5, w, init_std=1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
            for w in widths]
    jaxpr = jax.make_jaxpr(lambda x: fused_linears(x, lins, jnp.float32))(x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [d.outvars[0].aval.shape for d in dots] == [(2, n)]
    outs = fused_linears(x, lins, jnp.float32)
    assert [o.shape[-1] for o in outs] == list(widths)
    for got, lin in zip(outs, lins):
      np.testing.assert_allclose(got, lin(x), rtol=1e-6, atol=1e-6)


def test_fuse_projections_must_be_a_bool():
  with pytest.raises(ValueError, match="fuse_projections"):
    dataclasses.replace(_CONFIG, fuse_projections=1)
