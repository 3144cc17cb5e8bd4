"""The paper's recipe ("paper", "paper_sp"): every multiplier and init std at d = 512, d0 = 256
against the table worked out by hand; "paper" with f = 0.32 at its base is "paper_sp"."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax import mup
from gdn_jax.families import fla_mlp_hidden, paper_config

D0, D = 256, 512      # m = d / d0 = 2


def cfg(d, **kw):
  return paper_config(d, num_layers=1, vocab_size=64, chunk_size=16, **kw)


def raw(d, **kw):
  """The default draw (a model that is its own base under "sp": nothing rescaled)."""
  return mup.build_model(cfg(d, **kw), parametrization="sp", rngs=nnx.Rngs(0))


def groups(parametrization, optimizer, d=D, **kw):
  model = mup.build_model(cfg(d), parametrization=parametrization, base_config=cfg(D0),
                          optimizer=optimizer, rngs=nnx.Rngs(0))
  out = mup.param_groups(model, parametrization=parametrization, optimizer=optimizer,
                         base_config=cfg(D0), **kw)
  return {".".join(map(str, k)).replace("blocks.0.", ""): v for k, v in out.items()}


def test_paper_family_sizes():
  c = paper_config(1024)
  assert (c.num_heads, c.head_k_dim, c.head_v_dim) == (6, 128, 256)   # key 0.75 d, value 1.5 d
  assert c.mlp_hidden == 2816 and fla_mlp_hidden(128) == 512           # int(4·d·2/3) ↑ 256
  assert c.tie_embeddings and c.num_layers == 8 and c.vocab_size == 50304
  assert c.norm_eps == c.output_norm_eps == c.qk_norm_eps == 1e-6
  with pytest.raises(ValueError, match="multiple of 8"):
    paper_config(100)


# (class, LR multiplier, weight-decay multiplier) at m = 2, from the table in docs/mup.md.
# AdamW: every matrix, conv and norm gain LR × 1/m; embedding, A_log, dt_bias × 1; decay on
# matrices and convs only, with PyTorch's convention (decay × the group's LR: w = 1).
ADAMW = {
    "embed.embedding": ("embedding", 1.0, 0.0),
    "mixer.q_proj.kernel": ("hidden", 0.5, 1.0), "mixer.o_proj.kernel": ("hidden", 0.5, 1.0),
    "mlp.down_proj.kernel": ("hidden", 0.5, 1.0), "mixer.q_conv.weight": ("hidden", 0.5, 1.0),
    "mixer.a_proj.kernel": ("gate", 0.5, 1.0), "mixer.b_proj.kernel": ("gate", 0.5, 1.0),
    "mixer.A_log": ("gate_scalar", 1.0, 0.0), "mixer.dt_bias": ("gate_scalar", 1.0, 0.0),
    "mixer_norm.weight": ("norm", 0.5, 0.0), "mixer.o_norm.weight": ("norm", 0.5, 0.0),
    "final_norm.weight": ("norm", 0.5, 0.0),
}
# SGD: hidden × 1, embedding × m, W_a, W_b × m^-½, A_log, dt_bias × m^½; no decay on the gates.
SGD = {
    "embed.embedding": ("embedding", 2.0, 0.0),
    "mixer.q_proj.kernel": ("hidden", 1.0, 1.0), "mixer.v_conv.weight": ("hidden", 1.0, 1.0),
    "mlp.up_proj.kernel": ("hidden", 1.0, 1.0),
    "mixer.a_proj.kernel": ("gate", 2 ** -0.5, 0.0), "mixer.b_proj.kernel": ("gate", 2 ** -0.5, 0.0),
    "mixer.A_log": ("gate_scalar", 2 ** 0.5, 0.0), "mixer.dt_bias": ("gate_scalar", 2 ** 0.5, 0.0),
    "mixer.o_norm.weight": ("norm", 1.0, 0.0),
}


@pytest.mark.parametrize("optimizer,expected", [("adamw", ADAMW), ("sgd", SGD)])
def test_paper_groups_at_twice_the_base_width(optimizer, expected):
  got = groups("paper", optimizer)
  for name, (cls, lr, wd) in expected.items():
    assert got[name].cls == cls, name
    assert got[name].lr == pytest.approx(lr, rel=1e-12), name
    assert got[name].decay == pytest.approx(wd, rel=1e-12), name
  sp = groups("paper_sp", optimizer)
  assert all(g.lr == 1.0 for g in sp.values())                    # one global LR
  assert sp["embed.embedding"].decay == 0.0 and sp["mixer.q_proj.kernel"].decay == 1.0
  # The project's decay convention on request: w = 1/r (lr·wd per step width-independent).
  indep = groups("paper", optimizer, weight_decay_convention="independent")
  assert indep["mixer.q_proj.kernel"].decay == pytest.approx(1 / expected["mixer.q_proj.kernel"][1])


@pytest.mark.parametrize("optimizer,f", [("adamw", 0.5), ("sgd", 0.32)])
def test_paper_init_std_and_forward_multipliers(optimizer, f):
  base = raw(D)
  paper = mup.build_model(cfg(D), parametrization="paper", base_config=cfg(D0),
                          optimizer=optimizer, rngs=nnx.Rngs(0))
  paper_out = mup.build_model(cfg(D), parametrization="paper", base_config=cfg(D0),
                              optimizer=optimizer, mixer_output_multiplier=True, rngs=nnx.Rngs(0))
  sp = mup.build_model(cfg(D), parametrization="paper_sp", base_config=cfg(D0),
                       optimizer=optimizer, rngs=nnx.Rngs(0))
  mb, mp, ms = base.blocks[0].mixer, paper.blocks[0].mixer, sp.blocks[0].mixer
  linear = f / D ** 0.5                 # every Linear and conv: f / √d, d = d_model
  check = lambda new, old, std_old, std_new: np.testing.assert_allclose(
      np.asarray(new[...]), np.asarray(old[...]) * (std_new / std_old), rtol=1e-6, atol=0)
  for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "a_proj", "b_proj"):
    check(getattr(mp, name).kernel, getattr(mb, name).kernel, 0.02, linear)
    check(getattr(ms, name).kernel, getattr(mb, name).kernel, 0.02, 0.02)
  check(paper.blocks[0].mlp.down_proj.kernel, base.blocks[0].mlp.down_proj.kernel, 0.02, linear)
  for name in ("q_conv", "k_conv", "v_conv"):       # the project's draw is N(0, 1/W), W = 4
    check(getattr(mp, name).weight, getattr(mb, name).weight, 0.5, linear)
    check(getattr(ms, name).weight, getattr(mb, name).weight, 0.5, 0.02)
  check(paper.embed.embedding, base.embed.embedding, 0.02, 0.02)
  for name in ("A_log", "dt_bias"):               # fla's constant gate init, untouched
    np.testing.assert_array_equal(getattr(mp, name)[...], getattr(mb, name)[...])
  np.testing.assert_array_equal(mp.o_norm.weight[...], np.ones(mp.o_norm.weight.shape))
  # Forward: tied logits × d0/d; fla's K^-½ readout scale and fixed eps 1e-6; the mixer-output
  # multiplier d0/d only with the flag.
  assert paper.embed.attend_multiplier == D0 / D and sp.embed.attend_multiplier == 1.0
  assert mp.qk_scale == pytest.approx((D // 8) ** -0.5) == ms.qk_scale
  assert mp.o_norm.eps == mp.qk_norm_eps == 1e-6
  assert mp.o_proj.multiplier == 1.0 and paper_out.blocks[0].mixer.o_proj.multiplier == D0 / D
  assert all(m.multiplier == 1.0 for m in (mp.q_proj, mp.a_proj, paper.embed))


def test_paper_with_f_032_at_its_base_is_paper_sp():
  """At d = d0 = 256, f/√d = 0.32/16 = 0.02: the SGD recipe's model and updates are SP's."""
  models, opts = [], []
  tok = jax.random.randint(jax.random.key(1), (2, 33), 0, 64)
  for p in ("paper", "paper_sp"):
    model = mup.build_model(cfg(D0), parametrization=p, base_config=cfg(D0), optimizer="sgd",
                            rngs=nnx.Rngs(3))
    tx = mup.make_optimizer(model, parametrization=p, optimizer="sgd", learning_rate=0.1,
                            base_config=cfg(D0), momentum=0.98, nesterov=True)
    models.append(model)
    opts.append(nnx.Optimizer(model, tx, wrt=nnx.Param))
  same = lambda: jax.tree.map(np.testing.assert_array_equal, nnx.state(models[0], nnx.Param),
                              nnx.state(models[1], nnx.Param))
  same()

  @nnx.jit
  def step(model, opt):
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tok[:, :-1])) *
                              -jax.nn.one_hot(tok[:, 1:], 64)) * 64
    opt.update(model, nnx.grad(loss)(model))
  for _ in range(2):
    for model, opt in zip(models, opts):
      step(model, opt)
  same()
  # With AdamW's f = 0.5 the same base model differs from SP (0.5/16 ≠ 0.02).
  adam = mup.build_model(cfg(D0), parametrization="paper", base_config=cfg(D0), rngs=nnx.Rngs(3))
  assert not np.array_equal(adam.blocks[0].mixer.q_proj.kernel[...],
                            models[1].blocks[0].mixer.q_proj.kernel[...])


def test_paper_errors():
  model = raw(D0)
  with pytest.raises(ValueError, match="optimizer"):
    mup.build_model(cfg(D0), parametrization="paper", optimizer="lion", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="optimizer"):
    mup.param_groups(model, parametrization="paper_sp", optimizer="adafactor")
  with pytest.raises(ValueError, match="parametrization"):
    mup.build_model(cfg(D0), parametrization="paper_mup", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mixer_output_multiplier"):
    mup.build_model(cfg(D0), parametrization="paper_sp", mixer_output_multiplier=True,
                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="weight_decay_convention"):
    mup.param_groups(model, parametrization="paper", weight_decay_convention="torch")
