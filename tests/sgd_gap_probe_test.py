"""experiments/sgd_gap_probe.py: its variants of the project's μP are that μP at the base width
(the probe compares them at 256 against runs made once at 32) and differ from it when wider; so
are the heads_adamw probe's LR ablations, which scale exactly the parameters they name."""
import functools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import lr_transfer, sgd_gap_probe
from gdn_jax import families, mup
from gdn_jax.model import GatedDeltaNetLM
from gdn_jax.mup import tables
from gdn_jax.train import config as config_lib


@pytest.fixture(autouse=True)
def registered():
  variants = {**sgd_gap_probe.VARIANTS, **sgd_gap_probe.HEAD_VARIANTS,
              **sgd_gap_probe.HEAD_CONST_VARIANTS}
  added = {name: p for name, p in variants.items() if name not in tables.PARAMETRIZATIONS}
  tables.PARAMETRIZATIONS.update(added)   # the library's own (mup_head_sp, ...) stay registered
  yield
  for name in added:
    tables.PARAMETRIZATIONS.pop(name)


@functools.lru_cache(maxsize=None)
def logits(parametrization, width, base=16):
  config = families.paper_config(width, num_layers=1, vocab_size=32)
  model = mup.build_model(config, parametrization=parametrization, optimizer="sgd",
                          base_config=families.paper_config(base, num_layers=1, vocab_size=32),
                          rngs=nnx.Rngs(0))
  out = np.asarray(model(jnp.arange(12).reshape(1, 12) % 32))
  out.flags.writeable = False
  return out


@pytest.mark.parametrize("variant", sorted(sgd_gap_probe.VARIANTS))
def test_variants_are_the_project_mup_at_the_base_width_only(variant):
  np.testing.assert_array_equal(logits(variant, 16), logits("mup", 16))
  if "ro1" in variant:      # the tied read-out's multiplier is the forward change
    assert not np.allclose(logits(variant, 32), logits("mup", 32))
  base = families.paper_config(16, num_layers=1, vocab_size=32)
  groups = lambda p: {g.cls: g.lr for g in mup.param_groups(
      mup.build_model(families.paper_config(32, num_layers=1, vocab_size=32), parametrization=p,
                      optimizer="sgd", base_config=base, rngs=nnx.Rngs(0)),
      parametrization=p, optimizer="sgd", base_config=base).values()}
  if "ab_sp" in variant:    # W_a, W_b (output-like here) get SP's LR 1 instead of μP's × m
    assert groups(variant)["output"] == 1.0 and groups("mup")["output"] == 2.0


# ---- --probe=heads_adamw: the heads scheme under AdamW (issue 20 item 4). ----------------------

HEADS = sgd_gap_probe.PROBES["heads_adamw"]


def probe_groups(probe, width, param, overrides):
  """({dotted path: LR multiplier}, model config) of a probe row's trainer config (shapes only)."""
  config = lr_transfer.train_config(probe.protocol, sgd_gap_probe.job(probe, width, param,
                                                                      overrides))
  config_lib.validate_config(config)
  assert config.optimizer.name == probe.optimizer and config.optimizer.grad_clip == 1.0
  model = config_lib.model_config(config)
  assert model.num_heads * model.head_k_dim == width and not model.tie_embeddings
  shapes = nnx.eval_shape(lambda: GatedDeltaNetLM(model, rngs=nnx.Rngs(0)))
  groups = mup.param_groups(shapes, parametrization=param, optimizer=probe.optimizer,
                            base_config=config_lib.base_model_config(config),
                            lr_overrides=config_lib.lr_overrides(config))
  return {".".join(map(str, k)): g.lr for k, g in groups.items()}, model


def heads_groups(width, param, overrides):
  """{dotted path: LR multiplier} of a heads_adamw row (AdamW without decay)."""
  assert HEADS.protocol.optimizer_settings["adamw"]["weight_decay"] == 0.0
  return probe_groups(HEADS, width, param, overrides)[0]

def test_heads_adamw_rows_are_the_identity_at_the_base_width_and_ablate_at_256():
  assert HEADS.protocol.base_width == 32 and HEADS.out.endswith("gap_probe_heads_adamw_cpu.jsonl")
  assert sgd_gap_probe.PROBES["paper_sgd"].out == sgd_gap_probe.OUT   # the default is unchanged
  assert {(w, p) for w, p, _ in HEADS.rows} == {
      (32, "sp"), (32, "mup"), (256, "sp"), (256, "mup"), (256, "mup_head_sp"),
      (256, "mup_head_init"), (32, "mup_head_c3"), (256, "mup_head_c3"), (32, "mup_head_c8"),
      (256, "mup_head_c8"), (32, "mup_head_c16"), (256, "mup_head_c16"), (256, "sp_head_c3")}
  plain = {w: heads_groups(w, "mup", ()) for w in (32, 256)}
  assert set(plain[32].values()) == {1.0} and heads_groups(32, "sp", ()) == plain[32]
  expected = {   # the LR multiplier each ablation gives at 256 (m = 8) over plain μP's
      sgd_gap_probe.VECTORS: lambda k: 1 / 8 if any(
          n in k for n in ("norm", "conv", "A_log", "dt_bias")) and "o_norm" not in k else 1,
      sgd_gap_probe.HIDDEN: lambda k: 8 ** 0.38 if "_proj" in k else 1,
      sgd_gap_probe.EMBED: lambda k: 1 / 8 if k.startswith("embed") else 1}
  vec, emb = expected[sgd_gap_probe.VECTORS], expected[sgd_gap_probe.EMBED]
  expected[sgd_gap_probe.VECTORS + sgd_gap_probe.EMBED] = lambda k: vec(k) * emb(k)
  ablations = [ov for w, p, ov in HEADS.rows if ov and p == "mup"]
  assert sorted(ablations) == sorted(expected)
  for overrides in ablations:
    assert heads_groups(32, "mup", overrides) == plain[32], overrides
    wide = heads_groups(256, "mup", overrides)
    ratios = {k: wide[k] / plain[256][k] for k in wide}
    assert any(r != 1 for r in ratios.values()), overrides
    for k, r in ratios.items():
      assert math.isclose(r, expected[overrides](k)), (overrides, k, r)


@pytest.mark.parametrize("variant", sorted(sgd_gap_probe.HEAD_VARIANTS))
def test_head_variants_change_only_the_read_out_and_only_when_wider(variant):
  """mup_head_sp: SP's head (init × m^-½, multiplier 1, LR × 1/m); mup_head_init: μP's head (1/m
  multiplier, LR 1) with init × m^½. Both are μP at the base width (16 → 16) and elsewhere."""
  def build(p, width):
    base = families.heads_config(16, head_dim=8, vocab_size=32, num_layers=1)
    model = mup.build_model(families.heads_config(width, head_dim=8, vocab_size=32, num_layers=1),
                            parametrization=p, optimizer="adamw", base_config=base,
                            rngs=nnx.Rngs(0))
    groups = mup.param_groups(model, parametrization=p, optimizer="adamw", base_config=base)
    return model, {".".join(map(str, k)): g.lr for k, g in groups.items()}
  for width, m in ((16, 1), (64, 4)):
    (mv, lv), (mm, lm) = build(variant, width), build("mup", width)
    std = lambda model: float(jnp.std(model.lm_head.kernel[...]))
    head_sp = variant == "mup_head_sp"
    assert math.isclose(std(mv) / std(mm), (m ** -0.5 if head_sp else m ** 0.5), rel_tol=1e-5)
    assert mv.lm_head.multiplier == (1.0 if head_sp else mm.lm_head.multiplier)
    assert mm.lm_head.multiplier == 1 / m
    assert math.isclose(lv["lm_head.kernel"], lm["lm_head.kernel"] / (m if head_sp else 1))
    assert {k: v for k, v in lv.items() if k != "lm_head.kernel"} == {
        k: v for k, v in lm.items() if k != "lm_head.kernel"}


@pytest.mark.parametrize("variant, c", [("mup_head_c3", 3), ("mup_head_c8", 8), ("sp_head_c3", 3)])
def test_head_constant_rows_scale_the_head_draw_at_every_width_and_nothing_else(variant, c):
  """*_head_cN: the trainer's model with its LM head × N, at the base width too (a base constant,
  not the identity there); the plain parametrization's every other parameter and multiplier."""
  build = sgd_gap_probe._scaled_head_builder(config_lib.build_model)
  plain = variant.split("_head_")[0]
  variant_rows = [ov for w, p, ov in HEADS.rows if p == variant]
  for width in (32, 256):
    job = lambda p: sgd_gap_probe.job(HEADS, width, p, variant_rows[0])
    got = build(lr_transfer.train_config(HEADS.protocol, job(variant)), 0)
    want = build(lr_transfer.train_config(HEADS.protocol, job(plain)), 0)
    assert got.lm_head.multiplier == want.lm_head.multiplier
    flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
    g, w = flat(got), flat(want)
    for path in g:
      scale = c if path == ("lm_head", "kernel") else 1
      np.testing.assert_allclose(g[path][...], w[path][...] * scale, rtol=1e-6, err_msg=str(path))


# ---- --probe=heads_sgd: the heads scheme under SGD against TP5's SP (issue 20 item 4). ---------

HEADS_SGD = sgd_gap_probe.PROBES["heads_sgd"]


def sgd_groups(width, param, overrides):
  """{dotted path: SGD LR multiplier} of a heads_sgd row (momentum 0.9), and its model config."""
  assert HEADS_SGD.protocol.optimizer_settings["sgd"]["momentum"] == 0.9
  return probe_groups(HEADS_SGD, width, param, overrides)

def test_heads_sgd_rows_are_the_identity_at_the_base_width_and_ablate_one_class_at_256():
  assert HEADS_SGD.out.endswith("gap_probe_heads_sgd_cpu.jsonl") and HEADS_SGD.optimizer == "sgd"
  plain = {w: sgd_groups(w, "mup", ())[0] for w in (32, 256)}
  _, model = sgd_groups(256, "mup", ())
  assert model.output_norm_eps == 1e-3 and model.num_heads == 16    # the heads preset's SGD eps
  assert set(plain[32].values()) == {1.0} and sgd_groups(32, "sp", ())[0] == plain[32]
  # μP SGD at 256 (m = 8): the embedding's LR × m (input class), the head's × m (output class)
  assert plain[256]["embed.embedding"] == 8 and plain[256]["lm_head.kernel"] == 8
  expected = {   # each ablation's LR multiplier at 256 over plain μP's
      sgd_gap_probe.VECTORS: lambda k: 1 / 8 if any(
          n in k for n in ("norm", "conv", "A_log", "dt_bias")) and "o_norm" not in k else 1,
      sgd_gap_probe.SGD_HIDDEN: lambda k: 8 ** -0.62 if "_proj" in k else 1,
      sgd_gap_probe.EMBED: lambda k: 1 / 8 if k.startswith("embed") else 1,
      ("embed:out:-0.5",): lambda k: 8 ** -0.5 if k.startswith("embed") else 1}
  ablations = [ov for w, p, ov in HEADS_SGD.rows
               if ov and p == "mup" and w == 256 and ":x:" not in ov[0]]
  assert sorted(ablations) == sorted(expected)
  # The base-constant row (embedding LR × 1/8 at every width) is new only at the base width; at
  # 256 it is the EMBED ablation's model and LRs.
  assert (32, "mup", ("embed:x:0.125",)) in HEADS_SGD.rows
  const = sgd_groups(32, "mup", ("embed:x:0.125",))[0]
  assert const == {k: v / 8 if k.startswith("embed") else v for k, v in plain[32].items()}
  assert sgd_groups(256, "mup", ("embed:x:0.125",))[0] == sgd_groups(256, "mup",
                                                                     sgd_gap_probe.EMBED)[0]
  assert (256, "mup", ("embed:x:0.0625",)) in HEADS_SGD.rows
  assert sgd_groups(256, "mup", ("embed:x:0.0625",))[0] == {
      k: v / 16 if k.startswith("embed") else v for k, v in plain[256].items()}
  for overrides in ablations:
    assert sgd_groups(32, "mup", overrides)[0] == plain[32], overrides
    wide = sgd_groups(256, "mup", overrides)[0]
    ratios = {k: wide[k] / plain[256][k] for k in wide}
    assert any(r != 1 for r in ratios.values()), overrides
    for k, r in ratios.items():
      assert math.isclose(r, expected[overrides](k)), (overrides, k, r)


def test_summarize_finds_each_rows_optimum_and_the_drift_from_the_jsonl(tmp_path):
  """Parabolas with known vertices (−1 at the base, −2.5 wide; the wide row on a coarser grid,
  per-seed offsets) come back as the optima, the drift as their distance; a seed missing from
  one row is an error naming the pair."""
  path = tmp_path / "probe.jsonl"
  lines = []
  for seed, shift in ((0, 0.00), (1, 0.01), (2, -0.02)):
    for x in [-4 + 0.5 * i for i in range(11)]:
      lines.append(dict(parametrization="mup", variant="", width=32, seed=seed, log2_lr=x,
                        val_loss=2.0 + shift + 0.1 * (x + 1) ** 2))
    for x in (-4.0, -3.0, -2.0, -1.0, 0.0):
      lines.append(dict(parametrization="mup", variant="embed:out:-1", width=256, seed=seed,
                        log2_lr=x, val_loss=1.9 + shift + 0.1 * (x + 2.5) ** 2))
  lines.append(dict(parametrization="mup", variant="embed:out:-1", width=256, seed=3,
                    log2_lr=-2.0, val_loss=None))                # a seed only one row has
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  pair = [("pair", ("mup", "", 32), ("mup", "embed:out:-1", 256))]
  (row,) = sgd_gap_probe.summarize(str(path), pair)
  sm = row["summary"]
  assert row["seeds"] == [0, 1, 2] and row["grids"][256] == [-4.0, -3.0, -2.0, -1.0, 0.0]
  assert math.isclose(sm["optimum"][32]["log2_lr"], -1.0, abs_tol=1e-6)
  assert math.isclose(sm["optimum"][256]["log2_lr"], -2.5, abs_tol=1e-6)
  assert math.isclose(sm["drift_log2"], 1.5, abs_tol=1e-6)
  assert math.isclose(sm["best_loss"][256], 1.9 + 0.1 * 0.25 - 0.01 / 3, abs_tol=1e-6)
  with pytest.raises(ValueError, match="pair"):
    sgd_gap_probe.summarize(str(path), pair, seeds=[0, 3])
