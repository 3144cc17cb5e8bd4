"""μP: label coverage, classes per width scheme, hand-computed multipliers, μP == SP at base."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gdn_jax import mup
from gdn_jax.model import ModelConfig


def heads_cfg(d, **kw):
  """Scheme A: heads grow at a fixed head dim 16; MLP exactly 2d."""
  return ModelConfig(vocab_size=32, d_model=d, num_layers=1, num_heads=d // 16, head_k_dim=16,
                     head_v_dim=16, mlp_hidden=2 * d, chunk_size=16, **kw)


def dims_cfg(d, **kw):
  """Scheme B: 2 heads whose dims grow."""
  return ModelConfig(vocab_size=32, d_model=d, num_layers=1, num_heads=2, head_k_dim=d // 2,
                     head_v_dim=d // 2, mlp_hidden=2 * d, chunk_size=16, **kw)


def name(path):
  return ".".join(map(str, path))


def loss_fn(model, tok):
  logits = model(tok[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()


@nnx.jit
def train_step(model, opt, tok):
  loss, grads = nnx.value_and_grad(loss_fn)(model, tok)
  opt.update(model, grads)
  return loss


TOK = jax.random.randint(jax.random.key(0), (2, 17), 0, 32)
SGD_QK_HEADS_POWER = -1.0      # the μP SGD table's W_q, W_k rule: LR × (H/H_base)^-1


@pytest.mark.parametrize("scheme", ["heads", "dims"])
def test_label_tree_covers_every_param_once_with_expected_classes(scheme):
  make = heads_cfg if scheme == "heads" else dims_cfg
  model = mup.build_model(make(128), parametrization="mup", base_config=make(32),
                          rngs=nnx.Rngs(0))
  infos = mup.param_infos(model, make(32))
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  state_paths = [mup.key_of(kp) for kp, _ in leaves]
  assert sorted(map(name, state_paths)) == sorted(map(name, infos))  # each exactly once
  classes = {name(p)[len("blocks.0."):] if p[0] == "blocks" else name(p): i.cls
             for p, i in infos.items()}
  expected = {
      "embed.embedding": "input", "lm_head.kernel": "output", "final_norm.weight": "input",
      "mixer_norm.weight": "input", "mixer.q_proj.kernel": "hidden",
      "mixer.o_proj.kernel": "hidden", "mixer.q_conv.weight": "input",
      "mlp.down_proj.kernel": "hidden",
      # Where the scheme matters: per-head quantities and the head-dim-sized gain.
      "mixer.a_proj.kernel": "hidden" if scheme == "heads" else "output",
      "mixer.b_proj.kernel": "hidden" if scheme == "heads" else "output",
      "mixer.A_log": "input" if scheme == "heads" else "scalar",
      "mixer.dt_bias": "input" if scheme == "heads" else "scalar",
      "mixer.o_norm.weight": "scalar" if scheme == "heads" else "input",
  }
  for key, cls in expected.items():
    assert classes[key] == cls, key


def test_lr_and_weight_decay_multipliers_of_a_toy_model():
  """Width 32 → 128 (m = 4), hand-computed from the tables."""
  model = mup.build_model(heads_cfg(128), parametrization="mup", base_config=heads_cfg(32),
                          rngs=nnx.Rngs(0))
  get = lambda opt, p: {name(k): v for k, v in mup.multipliers(
      model, parametrization=p, optimizer=opt, base_config=heads_cfg(32)).items()}
  adam, sgd, sp = get("adamw", "mup"), get("sgd", "mup"), get("adamw", "sp")
  # (class, LR multiplier, weight-decay multiplier; 0 = never decayed)
  assert adam["blocks.0.mixer.q_proj.kernel"] == ("hidden", 0.25, 4.0)
  assert adam["blocks.0.mlp.down_proj.kernel"] == ("hidden", 0.25, 4.0)
  assert adam["lm_head.kernel"] == ("output", 1.0, 1.0)
  assert adam["embed.embedding"] == ("input", 1.0, 1.0)
  assert adam["blocks.0.mixer.A_log"] == ("input", 1.0, 0.0)
  assert adam["blocks.0.mixer.o_norm.weight"] == ("scalar", 1.0, 0.0)
  assert sgd["blocks.0.mixer.q_proj.kernel"] == ("hidden", 0.25, 4.0)   # × (H/H_base)^-1
  assert sgd["blocks.0.mixer.v_proj.kernel"] == ("hidden", 1.0, 1.0)
  assert sgd["lm_head.kernel"] == ("output", 4.0, 0.25)
  assert sgd["embed.embedding"] == ("input", 4.0, 0.25)
  assert sgd["blocks.0.mixer.dt_bias"] == ("input", 4.0, 0.0)
  assert sgd["blocks.0.mixer.q_conv.weight"] == ("input", 4.0, 0.0)
  assert all(lr == 1.0 for _, lr, _ in sp.values())


def test_build_model_init_std_and_forward_multipliers():
  base = dims_cfg(32)
  mu = mup.build_model(dims_cfg(256), parametrization="mup", base_config=base, rngs=nnx.Rngs(0))
  sp = mup.build_model(dims_cfg(256), parametrization="sp", base_config=base, rngs=nnx.Rngs(0))
  m = 8.0
  std = lambda v: float(np.std(np.asarray(v[...])))
  mixer_mu, mixer_sp = mu.blocks[0].mixer, sp.blocks[0].mixer
  # Hidden: std 0.02 / √m in both; read-out: μP keeps std 0.02 and multiplies by 1/m.
  assert std(mixer_mu.q_proj.kernel) == pytest.approx(0.02 / m ** 0.5, rel=0.05)
  assert std(mixer_sp.q_proj.kernel) == pytest.approx(0.02 / m ** 0.5, rel=0.05)
  assert std(mu.lm_head.kernel) == pytest.approx(0.02, rel=0.05)
  assert std(sp.lm_head.kernel) == pytest.approx(0.02 / m ** 0.5, rel=0.05)
  assert (mu.lm_head.multiplier, sp.lm_head.multiplier) == (1 / m, 1.0)
  # Scheme B: W_a, W_b are read-outs in μP; the q·k scale and the output-norm eps (GDN rules).
  assert (mixer_mu.a_proj.multiplier, mixer_mu.b_proj.multiplier) == (1 / m, 1 / m)
  assert mixer_mu.qk_scale == pytest.approx(16 ** -0.5)
  assert mixer_sp.qk_scale == pytest.approx(128 ** -0.5)
  assert mixer_mu.o_norm.eps == pytest.approx(1e-5 / m)
  assert mixer_sp.o_norm.eps == pytest.approx(1e-5)
  # The q/k L2 norm's eps follows |q|² = Θ(K) in μP and stays fla's in SP.
  assert mixer_mu.qk_norm_eps == pytest.approx(1e-6 * m)
  assert mixer_sp.qk_norm_eps == pytest.approx(1e-6)
  # output_norm_eps sets the base value of that eps alone (the other norms keep norm_eps).
  big = mup.build_model(dims_cfg(256, output_norm_eps=1e-3), parametrization="mup",
                        base_config=dims_cfg(32, output_norm_eps=1e-3), rngs=nnx.Rngs(0))
  assert big.blocks[0].mixer.o_norm.eps == pytest.approx(1e-3 / m)
  assert big.blocks[0].mixer_norm.eps == big.final_norm.eps == 1e-5
  assert mixer_mu.q_conv.weight[...].std() == pytest.approx(mixer_sp.q_conv.weight[...].std())
  tied = mup.build_model(dims_cfg(256, tie_embeddings=True), parametrization="mup",
                         base_config=dims_cfg(32, tie_embeddings=True), rngs=nnx.Rngs(0))
  assert tied.embed.attend_multiplier == 1 / m and tied.embed.multiplier == 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_equals_sp_at_base_width(optimizer):
  cfg = heads_cfg(64)
  models, opts = [], []
  for p in ("sp", "mup"):
    model = mup.build_model(cfg, parametrization=p, base_config=cfg, rngs=nnx.Rngs(1))
    tx = mup.make_optimizer(model, parametrization=p, optimizer=optimizer, learning_rate=0.05,
                            weight_decay=0.1, base_config=cfg, momentum=0.9)
    models.append(model)
    opts.append(nnx.Optimizer(model, tx, wrt=nnx.Param))
  same = lambda: jax.tree.map(np.testing.assert_array_equal, nnx.state(models[0], nnx.Param),
                              nnx.state(models[1], nnx.Param))
  same()
  np.testing.assert_array_equal(nnx.jit(lambda m: m(TOK))(models[0]),
                                nnx.jit(lambda m: m(TOK))(models[1]))
  for model, opt in zip(models, opts):
    train_step(model, opt, TOK)
  same()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_first_update_follows_the_per_leaf_formula(optimizer):
  """θ₁ − θ₀ = −lr · r_p · (u(g) + wd · w_p · θ₀), u = sign(g) for Adam's first step, g for SGD."""
  base, cfg = heads_cfg(32), heads_cfg(128)
  model = mup.build_model(cfg, parametrization="mup", base_config=base, rngs=nnx.Rngs(2))
  lr, wd = 0.01, 0.3
  tx = mup.make_optimizer(model, parametrization="mup", optimizer=optimizer, learning_rate=lr,
                          weight_decay=wd, base_config=base, eps=1e-20)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = {name(mup.key_of(kp)): np.asarray(x) for kp, x in
            jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))[0]}
  grads = nnx.jit(nnx.grad(loss_fn))(model, TOK)
  grads = {name(mup.key_of(kp)): np.asarray(x) for kp, x in
           jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(grads, nnx.Param)))[0]}
  train_step(model, opt, TOK)
  after = {name(mup.key_of(kp)): np.asarray(x) for kp, x in
           jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))[0]}
  mults = {name(k): v for k, v in mup.multipliers(model, parametrization="mup",
                                                  optimizer=optimizer, base_config=base).items()}
  for key in ("blocks.0.mixer.q_proj.kernel", "lm_head.kernel", "embed.embedding",
              "blocks.0.mixer.dt_bias"):
    _, r, w = mults[key]
    u = np.sign(grads[key]) if optimizer == "adamw" else grads[key]
    expected = before[key] - lr * r * (u + wd * w * before[key])
    # A wrong sign or multiplier is off by ≥ lr·r; float32 rounding of θ is ~1e-9.
    np.testing.assert_allclose(after[key], expected, rtol=0, atol=1e-3 * lr * r, err_msg=key)


def test_schedule_learning_rate_and_errors():
  cfg = heads_cfg(64)
  model = mup.build_model(cfg, parametrization="mup", base_config=heads_cfg(32),
                          rngs=nnx.Rngs(0))
  tx = mup.make_optimizer(model, parametrization="mup", learning_rate=optax.linear_schedule(
      1e-3, 0.0, 10), base_config=heads_cfg(32))
  assert np.isfinite(float(train_step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), TOK)))
  with pytest.raises(ValueError, match="parametrization"):
    mup.build_model(cfg, parametrization="ntk", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="optimizer"):
    mup.make_optimizer(model, parametrization="mup", optimizer="lion", learning_rate=1.0)
  with pytest.raises(ValueError, match="base_config"):
    mup.build_model(cfg, parametrization="mup",
                    base_config=dataclasses.replace(heads_cfg(32), num_layers=2),
                    rngs=nnx.Rngs(0))


def test_lr_overrides_scale_one_group_and_keep_the_base_model():
  """`lr_overrides` multiplies the matched parameters' LR by m_in^p (and divides their decay),
  leaves every other parameter alone and is 1 at the base width."""
  base = heads_cfg(32)
  model = mup.build_model(heads_cfg(128), parametrization="mup", base_config=base,
                          rngs=nnx.Rngs(0))
  over = mup.parse_lr_overrides(["g_proj:-0.5"])
  assert over == {"g_proj": mup.Scaling(fan_in=-0.5)}
  get = lambda **kw: {name(k): v for k, v in mup.multipliers(
      model, parametrization="mup", optimizer="sgd", base_config=base, **kw).items()}
  plain, scaled = get(), get(lr_overrides=over)
  assert scaled["blocks.0.mixer.g_proj.kernel"] == ("hidden", 0.5, 2.0)      # 1 · 4^-½, wd 1/0.5
  assert {k: v for k, v in scaled.items() if "g_proj" not in k} == \
         {k: v for k, v in plain.items() if "g_proj" not in k}
  base_model = mup.build_model(base, parametrization="mup", base_config=base, rngs=nnx.Rngs(0))
  at_base = mup.multipliers(base_model, parametrization="mup", optimizer="sgd", base_config=base,
                            lr_overrides=over)
  assert all(lr == 1.0 for _, lr, _ in at_base.values())
  with pytest.raises(ValueError, match="matches no parameter"):
    get(lr_overrides={"nope": mup.Scaling(fan_in=-1)})
  assert mup.parse_lr_overrides(["conv:out:-0.5", "g_proj:in:1"]) == {
      "conv": mup.Scaling(fan_out=-0.5), "g_proj": mup.Scaling(fan_in=1.0)}
  conv = {k: v for k, v in get(lr_overrides=mup.parse_lr_overrides(["conv:out:-0.5"])).items()
          if "conv" in k}
  assert conv and all(lr == plain[k][1] / 2 for k, (_, lr, _) in conv.items())   # m_out = 4
  for bad in ("g_proj", "g_proj:x", ":-1", ":out:-1", "embed:x:0", "embed:x:-2", "embed:x:inf", ":x:2"):
    with pytest.raises(ValueError, match="NAME:POWER"):
      mup.parse_lr_overrides([bad])


def test_a_constant_lr_factor_applies_at_every_width_including_the_base():
  """`NAME:x:FACTOR` multiplies the matched LRs by FACTOR at the base width and at any other, on
  top of the table's width scaling (a base-width constant; the power forms are 1 at the base)."""
  base = heads_cfg(32)
  over = mup.parse_lr_overrides(["embed:x:0.125"])
  assert over == {"embed": mup.Scaling(factor=0.125)}
  for width in (32, 128):
    model = mup.build_model(heads_cfg(width), parametrization="mup", base_config=base,
                            rngs=nnx.Rngs(0))
    get = lambda **kw: {name(k): v for k, v in mup.multipliers(
        model, parametrization="mup", optimizer="sgd", base_config=base, **kw).items()}
    plain, scaled = get(), get(lr_overrides=over)
    emb = [k for k in plain if "embed" in k]
    assert emb and all(scaled[k][1] == pytest.approx(plain[k][1] * 0.125) for k in emb)
    assert {k: v for k, v in scaled.items() if k not in emb} == \
           {k: v for k, v in plain.items() if k not in emb}
    if width == 128:   # the table's SGD rule for the embedding (× m) stays under the factor
      assert all(plain[k][1] == pytest.approx(4.0) for k in emb)


def test_embedding_lr_scale_is_checked():
  model = mup.build_model(heads_cfg(32), parametrization="mup", rngs=nnx.Rngs(0))
  for bad in (0.0, -1.0, math.inf, True, "0.5"):
    with pytest.raises(ValueError, match=r"`embedding_lr_scale`=.*expected a number > 0"):
      mup.param_groups(model, parametrization="mup", optimizer="sgd", embedding_lr_scale=bad)


@pytest.mark.parametrize("parametrization", ["mup", "paper"])
def test_sp_tied_embedding_changes_only_the_tied_matrix_and_only_off_the_base_width(
    parametrization):
  """`sp_tied_embedding`: the tied read-out loses its 1/m multiplier and the embedding its
  width-scaled LR (SGD: × m in both tables); everything else, and the base width, unchanged."""
  base, wide = dims_cfg(32, tie_embeddings=True), dims_cfg(128, tie_embeddings=True)

  def build(cfg, flag):
    return mup.build_model(cfg, parametrization=parametrization, base_config=base,
                           optimizer="sgd", sp_tied_embedding=flag, rngs=nnx.Rngs(0))

  def groups(model, flag):
    return {name(k): v for k, v in mup.param_groups(
        model, parametrization=parametrization, optimizer="sgd", base_config=base,
        sp_tied_embedding=flag).items()}

  np.testing.assert_array_equal(build(base, True)(TOK), build(base, False)(TOK))
  assert groups(build(base, True), True) == groups(build(base, False), False)
  plain, flagged = build(wide, False), build(wide, True)
  assert plain.embed.attend_multiplier == pytest.approx(0.25) and \
      flagged.embed.attend_multiplier == 1.0
  np.testing.assert_array_equal(plain.embed.embedding[...], flagged.embed.embedding[...])
  g_plain, g_flag = groups(plain, False), groups(flagged, True)
  emb = [k for k in g_plain if k.startswith("embed")]
  assert len(emb) == 1 and g_plain[emb[0]].lr == pytest.approx(4.0) and g_flag[emb[0]].lr == 1.0
  assert {k: v for k, v in g_flag.items() if k not in emb} == \
         {k: v for k, v in g_plain.items() if k not in emb}
  # An untied model has no tied matrix: the flag changes nothing there.
  untied = lambda flag: mup.build_model(dims_cfg(128), parametrization=parametrization,
                                        base_config=dims_cfg(32), optimizer="sgd",
                                        sp_tied_embedding=flag, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(untied(True)(TOK), untied(False)(TOK))
  assert mup.param_groups(untied(True), parametrization=parametrization, optimizer="sgd",
                          base_config=dims_cfg(32), sp_tied_embedding=True) == \
      mup.param_groups(untied(False), parametrization=parametrization, optimizer="sgd",
                       base_config=dims_cfg(32))


def test_sgd_qk_rule_scales_wq_wk_by_a_power_of_the_head_count_only():
  """μP SGD: W_q, W_k get LR × (H/H_base)^sgd_qk_heads_power (docs/mup.md); nothing else moves,
  AdamW has no such factor, the head-dims scheme (H fixed) and the base width are untouched."""
  power = mup.tables.get("mup").sgd_qk_heads_power
  assert power == SGD_QK_HEADS_POWER       # the table's entry, as docs/mup.md derives it
  get = lambda make, d, opt: {name(k): v for k, v in mup.param_groups(
      mup.build_model(make(d), parametrization="mup", base_config=make(32), rngs=nnx.Rngs(0)),
      parametrization="mup", optimizer=opt, base_config=make(32)).items()}
  qk = ("blocks.0.mixer.q_proj.kernel", "blocks.0.mixer.k_proj.kernel")
  sgd = get(heads_cfg, 128, "sgd")                     # 2 → 8 heads: × 4^power
  for key in qk:
    assert sgd[key].cls == "hidden"
    assert sgd[key].lr == pytest.approx(4.0 ** power)
    assert sgd[key].decay == pytest.approx(4.0 ** -power)   # independent decay: 1 / r_p
  assert sgd["blocks.0.mixer.v_proj.kernel"].lr == 1.0
  assert sgd["blocks.0.mixer.q_conv.weight"].lr == 4.0     # the convs keep the input-like rule
  for make, d, opt in ((heads_cfg, 128, "adamw"), (dims_cfg, 128, "sgd"), (heads_cfg, 32, "sgd")):
    groups = get(make, d, opt)
    v = groups["blocks.0.mixer.v_proj.kernel"]
    assert all(groups[key] == v for key in qk), (make.__name__, d, opt)
