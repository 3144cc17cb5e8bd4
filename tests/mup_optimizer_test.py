"""μP through optax.multi_transform: label trees, bit-equality with the earlier per-leaf
transforms, user-chosen inner optimizers per group, and errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gdn_jax import mup
from gdn_jax.families import paper_config
from gdn_jax.model import ModelConfig


def heads_cfg(d, **kw):
  return ModelConfig(vocab_size=32, d_model=d, num_layers=1, num_heads=d // 16, head_k_dim=16,
                     head_v_dim=16, mlp_hidden=2 * d, chunk_size=16, **kw)


def paper_cfg(d, **kw):
  return paper_config(d, num_layers=1, vocab_size=32, chunk_size=16, **kw)


TOK = jax.random.randint(jax.random.key(0), (2, 17), 0, 32)


def loss_fn(model, tok=TOK):
  logits = model(tok[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()


# ---- The implementation before multi_transform: one chain, per-leaf multipliers. ----

def _per_leaf(values, fn):
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda kp, x: fn(values[mup.key_of(kp)], x), tree)


def legacy_scale_by_leaf(mults):
  def update(updates, state, params=None):
    del params
    return _per_leaf(mults, lambda r, u: u * jnp.asarray(r, u.dtype))(updates), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def legacy_decay_by_leaf(decay):
  def update(updates, state, params):
    lam = _per_leaf(decay, lambda lam, x: lam)(params)
    return jax.tree.map(lambda u, x, l: u + l * x.astype(u.dtype) if l else u,
                        updates, params, lam), state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def legacy_optimizer(groups, *, optimizer, learning_rate, weight_decay, momentum=0.0):
  lr = {p: g.lr for p, g in groups.items()}
  wd = {p: weight_decay * g.decay for p, g in groups.items()}
  if optimizer == "adamw":
    parts = [optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)]
    if weight_decay:
      parts.append(legacy_decay_by_leaf(wd))
  else:
    parts = [legacy_decay_by_leaf(wd)] if weight_decay else []
    if momentum:
      parts.append(optax.trace(decay=momentum))
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate),
                     legacy_scale_by_leaf(lr))


CASES = [("sp", heads_cfg), ("mup", heads_cfg), ("paper", paper_cfg), ("paper_sp", paper_cfg)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("parametrization,make", CASES)
def test_updates_bit_equal_to_the_per_leaf_implementation(parametrization, make, optimizer):
  """Same gradients in, the same updates out, to the last bit, over a few steps (op by op:
  separately compiled programs may fuse the backward's reductions in another order)."""
  base, cfg = make(32), make(128)
  kw = dict(parametrization=parametrization, optimizer=optimizer, base_config=base)
  model = mup.build_model(cfg, parametrization=parametrization, base_config=base,
                          optimizer=optimizer, rngs=nnx.Rngs(2))
  schedule = optax.linear_schedule(0.02, 0.005, 4)
  new = mup.make_optimizer(model, **kw, learning_rate=schedule, weight_decay=0.1, momentum=0.9)
  old = legacy_optimizer(mup.param_groups(model, **kw), optimizer=optimizer,
                         learning_rate=schedule, weight_decay=0.1, momentum=0.9)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  states = [new.init(params), old.init(params)]
  grad_fn = jax.jit(jax.grad(lambda p, tok: loss_fn(nnx.merge(*nnx.split(model)[:1],
                                                             nnx.State(p)), tok)))
  for t in range(3):
    grads = grad_fn(params, jax.random.randint(jax.random.key(t), (2, 17), 0, 32))
    (u_new, states[0]), (u_old, states[1]) = (new.update(grads, states[0], params),
                                              old.update(grads, states[1], params))
    jax.tree.map(np.testing.assert_array_equal, u_new, u_old)
    params = optax.apply_updates(params, u_new)


@pytest.mark.parametrize("options", [{}, dict(tie_embeddings=True), dict(use_short_conv=False),
                                     dict(use_gate=False), dict(num_v_heads=4)])
@pytest.mark.parametrize("parametrization", ["mup", "paper"])
def test_label_tree_matches_the_parameter_tree(parametrization, options):
  make = lambda d: dataclasses.replace(heads_cfg(d), num_heads=2, head_k_dim=d // 2,
                                       head_v_dim=d // 2, **options)
  model = mup.build_model(make(64), parametrization=parametrization, base_config=make(32),
                          rngs=nnx.Rngs(0))
  labels, groups = mup.param_labels(model, parametrization=parametrization, optimizer="sgd",
                                    base_config=make(32))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  by_path = mup.param_groups(model, parametrization=parametrization, optimizer="sgd",
                             base_config=make(32))
  flat = {mup.key_of(kp): l for kp, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert flat == {p: g.label for p, g in by_path.items()}
  assert set(groups) == set(flat.values()) and all(groups[l].label == l for l in groups)
  # Groups separate what the table separates: class, LR and decay multipliers.
  assert len({(g.cls, g.lr, g.decay) for g in groups.values()}) == len(groups)


def test_inner_optimizer_for_one_group():
  """A user-chosen base transform (Lion on the embedding); μP's multipliers around it; the
  other groups keep Adam and are unchanged."""
  base, cfg = heads_cfg(32), heads_cfg(128)
  kw = dict(parametrization="mup", optimizer="adamw", base_config=base, learning_rate=0.01)

  def inner(group):
    return optax.scale_by_lion(b1=0.9, b2=0.99) if group.cls == "input" else \
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)

  runs = {}
  for name, extra in (("adam", {}), ("lion", dict(inner=inner)),
                      ("lion_dict", dict(inner={"input": optax.scale_by_lion(b1=0.9, b2=0.99),
                                                "hidden": optax.scale_by_adam(b2=0.95),
                                                "output": optax.scale_by_adam(b2=0.95),
                                                "scalar": optax.scale_by_adam(b2=0.95)}))):
    model = mup.build_model(cfg, parametrization="mup", base_config=base, rngs=nnx.Rngs(5))
    opt = nnx.Optimizer(model, mup.make_optimizer(model, **kw, **extra), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = nnx.grad(loss_fn)(model)
    opt.update(model, grads)
    runs[name] = (before, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                  nnx.to_pure_dict(nnx.state(grads, nnx.Param)))
  before, after, grads = runs["lion"]
  # Lion's first step is sign(g) (the μP LR multiplier of the embedding is 1).
  np.testing.assert_allclose(after["embed"]["embedding"],
                             before["embed"]["embedding"] - 0.01 * np.sign(grads["embed"]["embedding"]),
                             rtol=0, atol=1e-7)
  np.testing.assert_array_equal(after["blocks"][0]["mixer"]["q_proj"]["kernel"],
                                runs["adam"][1]["blocks"][0]["mixer"]["q_proj"]["kernel"])
  assert not np.array_equal(after["embed"]["embedding"], runs["adam"][1]["embed"]["embedding"])
  jax.tree.map(np.testing.assert_array_equal, runs["lion_dict"][1], after)


def test_decay_is_decoupled_from_a_custom_inner_transform():
  """AdamW's decay is added after the inner transform: with Lion on the embedding, its first step
  is −lr · r · (sign(g) + wd · w · θ), not Lion of the decayed gradient."""
  base, cfg = heads_cfg(32), heads_cfg(128)
  model = mup.build_model(cfg, parametrization="mup", base_config=base, rngs=nnx.Rngs(6))
  tx = mup.make_optimizer(model, parametrization="mup", optimizer="adamw", learning_rate=0.01,
                          weight_decay=0.5, base_config=base,
                          inner={"input": optax.scale_by_lion(b1=0.9, b2=0.99),
                                 "hidden": optax.scale_by_adam(), "output": optax.scale_by_adam(),
                                 "scalar": optax.scale_by_adam()})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = nnx.to_pure_dict(nnx.state(nnx.grad(loss_fn)(model), nnx.Param))
  updates, _ = tx.update(grads, tx.init(params), params)
  group = mup.param_groups(model, parametrization="mup", base_config=base)[("embed", "embedding")]
  e, g = params["embed"]["embedding"], grads["embed"]["embedding"]
  np.testing.assert_allclose(updates["embed"]["embedding"],
                             -0.01 * group.lr * (np.sign(g) + 0.5 * group.decay * e), rtol=1e-6)


def test_inner_errors():
  base, cfg = heads_cfg(32), heads_cfg(64)
  model = mup.build_model(cfg, parametrization="mup", base_config=base, rngs=nnx.Rngs(0))
  kw = dict(parametrization="mup", base_config=base, learning_rate=1.0)
  with pytest.raises(ValueError, match="name no μP group"):
    mup.make_optimizer(model, **kw, inner={"embedding": optax.scale_by_adam()})
  with pytest.raises(ValueError, match="no transform for group"):
    mup.make_optimizer(model, **kw, inner={"hidden": optax.scale_by_adam()})
  with pytest.raises(ValueError, match="GradientTransformation"):
    mup.make_optimizer(model, **kw, inner=lambda g: "adam")
  other = mup.build_model(heads_cfg(32), parametrization="mup", rngs=nnx.Rngs(0))
  tx = mup.make_optimizer(model, **kw)
  params = nnx.state(other, nnx.Param)
  params = nnx.State({**params, "extra": nnx.Param(jnp.zeros(3))})
  with pytest.raises(ValueError, match="no rule for parameter extra"):
    tx.init(params)
