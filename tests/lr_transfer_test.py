"""experiments/lr_transfer.py: the hybrid preset (issue 24) builds the Qwen3-Next layout at every
width, and one of its jobs trains end to end through the trainer's config (tiny, CPU)."""
import dataclasses
import math

import numpy as np
import pytest

from experiments import lr_transfer
from gdn_jax import lr_protocol as lp
from gdn_jax import mup
from gdn_jax.attention import Attention
from gdn_jax.layers import GatedDeltaNet
from gdn_jax.train import config as config_lib

HYBRID = lr_transfer.PRESETS["hybrid"]


def test_the_hybrid_preset_is_the_qwen3_next_layout_in_the_heads_scheme():
  assert HYBRID.scheme == "heads+GGGA" and lr_transfer.PRESETS["paper"].scheme == "paper"
  for width in (HYBRID.base_width, max(HYBRID.widths)):
    c = lr_transfer.model_config(HYBRID, width, {})
    assert c.layer_pattern == "GGGA" and c.attn_output_gate and c.num_layers == 4
    assert c.rope_dim == 8        # Qwen3-Next's partial rotary: a quarter of each head
    assert c.num_heads == width // 32 and c.resolved_attn_head_dim == 32
  job = dict(parametrization="mup", variant="", optimizer="adamw", width=256)
  config = lr_transfer.train_config(HYBRID, job)
  config_lib.validate_config(config)
  model = config_lib.build_model(config, seed=0)
  kinds = [type(b.mixer) for b in model.blocks]
  assert kinds == [GatedDeltaNet] * 3 + [Attention]
  # μP relative to the preset's base: the attention projections are hidden (LR × 1/m, m = 2).
  groups = mup.param_groups(model, parametrization="mup", optimizer="adamw",
                            base_config=config_lib.base_model_config(config))
  attn = {k[3]: g for k, g in groups.items() if k[:3] == ("blocks", 3, "mixer") and
          k[-1] == "kernel"}
  assert sorted(attn) == ["g_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
  assert all(g.cls == "hidden" and math.isclose(g.lr, 0.5) for g in attn.values())


def test_a_hybrid_job_trains_end_to_end_on_the_embedded_corpus():
  tiny = dataclasses.replace(HYBRID, widths=(32, 64), base_width=32, head_dim=16, steps=3,
                             batch=2, seq_len=16, warmup=1, dtype="float32", data="embedded",
                             val_batches=1, max_replicas={})
  job = dict(parametrization="mup", variant="", optimizer="adamw", width=64, seeds=[0],
             log2_lrs=[-8.0, -6.0], phase="fine", lr_overrides=[])
  rows = lr_transfer.run_job(tiny, job, None)
  assert [(r["scheme"], r["width"], r["log2_lr"]) for r in rows] == \
      [("heads+GGGA", 64, -8.0), ("heads+GGGA", 64, -6.0)]
  assert all(r["val_loss"] is not None and 4.0 < r["val_loss"] < 6.5 for r in rows)
  assert all(r["sgd_qk_heads_power"] == -1.0 for r in rows)    # the table the rows were run on


def test_each_data_slice_gets_its_own_results_file_and_mixed_files_are_refused():
  path = lambda **kw: lr_transfer.results_file("/r", "heads", **kw)
  assert path() == path(data_slice="heldout_a") == "/r/lr_transfer_heads.jsonl"
  assert path(data_slice="heldout_b") == "/r/lr_transfer_heads_heldout_b.jsonl"
  assert path(tag="x", data_slice="heldout_b") == "/r/lr_transfer_x.jsonl"
  rows = [dict(data="heldout_a"), dict(data="heldout_a")]
  lr_transfer.check_data(rows, "heldout_a", "f.jsonl")            # same slice: fine
  with pytest.raises(ValueError, match=r"data slice\(s\) \['heldout_a'\].*--tag"):
    lr_transfer.check_data(rows, "heldout_b", "f.jsonl")


def test_the_heads_preset_uses_the_output_norm_eps_that_sgd_needs():
  heads = lr_transfer.PRESETS["heads"]
  c = lr_transfer.model_config(heads, 1024, {})
  assert c.output_norm_eps == 1e-3 and c.num_heads == 32 and c.head_k_dim == 32
  assert lr_transfer.PRESETS["hybrid"].model_overrides.get("output_norm_eps") is None


def test_sgd_runs_of_another_qk_heads_factor_are_refused():
  """A file of SGD runs made before the table's W_q, W_k heads rule (no field: power 0) cannot
  be extended where the factor differs (heads scheme off the base width), and can where it is
  the same (the base width; the paper's family, whose head count is fixed; AdamW)."""
  heads, paper = lr_transfer.PRESETS["heads"], lr_transfer.PRESETS["paper"]
  old = lambda width, opt="sgd", **kw: dict(parametrization="mup", optimizer=opt, width=width, **kw)
  lr_transfer.check_table(heads, [old(128), old(1024, "adamw"),
                                  old(1024, sgd_qk_heads_power=-1.0)], "f.jsonl")
  lr_transfer.check_table(paper, [old(1024)], "f.jsonl")
  with pytest.raises(ValueError, match=r"width 1024 .*\^0; the table now gives \^-1.*q_proj:1"):
    lr_transfer.check_table(heads, [old(128), old(1024)], "f.jsonl")
  lr_transfer.check_table(heads, [dict(old(1024), parametrization="sp")], "f.jsonl")


def test_the_train_tail_metric_fits_the_training_loss_and_writes_its_own_files(tmp_path):
  """--metric=train_tail: the same analysis on train_loss_tail (a curve with another optimum
  here), into files with the suffix, the val files untouched."""
  rows = [dict(kind="run", scheme="heads", parametrization=p, variant="", optimizer="adamw",
               width=w, seed=s, log2_lr=x, phase="fine", data="x",
               val_loss=1.0 + 0.05 * (x + 8) ** 2 + 0.001 * s,
               train_loss_tail=0.9 + 0.05 * (x + 9) ** 2 + 0.001 * s)
          for p in ("mup", "sp") for w in (128, 1024) for s in (0, 1)
          for x in (-11.0, -10.0, -9.0, -8.0, -7.0, -6.0)]
  assert lr_transfer.with_metric(rows, "val") is rows
  prefix = str(tmp_path / "lr_transfer_t")
  val = lr_transfer.write_outputs(rows, prefix, 128)
  tail = lr_transfer.write_outputs(rows, prefix, 128, metric="train_tail")
  opt = lambda s: s["heads/mup/adamw"]["optimum"][1024]["log2_lr"]
  assert abs(opt(val) + 8) < 0.05 and abs(opt(tail) + 9) < 0.05, (opt(val), opt(tail))
  import json
  saved = json.loads((tmp_path / "lr_transfer_t_train_tail.json").read_text())
  assert saved["metric"] == "train_loss_tail" and saved["source"] == "lr_transfer_t.jsonl"
  assert json.loads((tmp_path / "lr_transfer_t.json").read_text())["metric"] == "val_loss"


def test_the_head_sp_row_trains_mup_with_sps_lm_head_and_is_mup_at_the_base_width():
  """`mup+head_sp` (issue 20 item 4): SP's head init (× m^-½), no multiplier, LR × 1/m; every
  other parameter as μP; the identity at the base width (so it shares μP's base runs)."""
  heads = lr_transfer.PRESETS["heads"]
  assert ("mup", "head_sp") in heads.rows
  groups, heads_of = {}, {}
  for width in (128, 256):
    for variant in ("", "head_sp"):
      job = dict(parametrization="mup", variant=variant, optimizer="adamw", width=width)
      config = lr_transfer.train_config(heads, job)
      assert config.parametrization == ("mup_head_sp" if variant else "mup")
      model = config_lib.build_model(config, seed=0)
      groups[width, variant] = mup.param_groups(
          model, parametrization=config.parametrization, optimizer="adamw",
          base_config=config_lib.base_model_config(config))
      heads_of[width, variant] = (np.asarray(model.lm_head.kernel[...]), model.lm_head.multiplier)
  head = ("lm_head", "kernel")
  np.testing.assert_array_equal(heads_of[128, ""][0], heads_of[128, "head_sp"][0])
  assert heads_of[128, "head_sp"][1] == heads_of[128, ""][1] == 1.0
  assert groups[128, "head_sp"][head].lr == groups[128, ""][head].lr == 1.0
  # Width 256 (m = 2): μP's head is the base draw × 1/2 in the forward, LR 1; head_sp's is the
  # draw × 2^-½, no multiplier, LR ½: the same effective update, √2 larger logits at init.
  w_mup, mult_mup = heads_of[256, ""]
  w_sp, mult_sp = heads_of[256, "head_sp"]
  assert mult_mup == 0.5 and mult_sp == 1.0
  np.testing.assert_allclose(w_sp, w_mup * 2 ** -0.5, rtol=1e-6)
  assert groups[256, ""][head].lr == 1.0 and math.isclose(groups[256, "head_sp"][head].lr, 0.5)
  others = [k for k in groups[256, ""] if k != head]
  assert others and all(groups[256, ""][k].lr == groups[256, "head_sp"][k].lr for k in others)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_head_init_row_is_mup_with_its_heads_draw_times_root_m(optimizer):
  """`mup+head_init`: μP's head (1/m multiplier, μP's LR) with its draw × m^½, every other
  parameter as μP; the identity at the base width. Under SGD its effective head (draw ×
  multiplier) and updates are head_sp's; only the raw gradient the clip sees differs (× 1/m)."""
  heads = lr_transfer.PRESETS["heads"]
  out = {}
  for width in (128, 512):
    for variant in ("", "head_init", "head_sp"):
      job = dict(parametrization="mup", variant=variant, optimizer=optimizer, width=width)
      config = lr_transfer.train_config(heads, job)
      model = config_lib.build_model(config, seed=0)
      groups = mup.param_groups(model, parametrization=config.parametrization,
                                optimizer=optimizer, base_config=config_lib.base_model_config(config))
      out[width, variant] = (np.asarray(model.lm_head.kernel[...]), model.lm_head.multiplier,
                             groups)
  head = ("lm_head", "kernel")
  w0, mult0, g0 = out[128, ""]
  w1, mult1, g1 = out[128, "head_init"]
  np.testing.assert_array_equal(w0, w1)
  assert mult0 == mult1 == 1.0 and g0[head].lr == g1[head].lr
  w_mup, mult_mup, g_mup = out[512, ""]                      # m = 4
  w_init, mult_init, g_init = out[512, "head_init"]
  w_sp, mult_sp, g_sp = out[512, "head_sp"]
  assert mult_init == mult_mup == 0.25 and mult_sp == 1.0
  np.testing.assert_allclose(w_init, w_mup * 2.0, rtol=1e-6)
  np.testing.assert_allclose(w_init * mult_init, w_sp * mult_sp, rtol=1e-6)   # SP's logits
  assert all(g_init[k].lr == g_mup[k].lr for k in g_mup)     # μP's LRs, the head's included
  if optimizer == "sgd":   # the effective update (multiplier² × LR) is head_sp's
    assert math.isclose(mult_init ** 2 * g_init[head].lr, mult_sp ** 2 * g_sp[head].lr)


def test_rows_outside_the_preset_run_when_named_and_unknown_rows_are_refused():
  heads = lr_transfer.PRESETS["heads"]
  select = lambda names: lr_transfer.select_rows(heads, names, "heads")
  assert select(None) == heads.rows and ("mup", "head_init") not in heads.rows
  assert select(["mup+head_init", "sp"]) == (("sp", ""), ("mup", "head_init"))
  assert select(["mup+head_sp"]) == (("mup", "head_sp"),)
  with pytest.raises(ValueError, match=r"--rows=mup\+head_nit: no row \['mup\+head_nit'\].*choose"):
    select(["mup+head_nit"])
  assert lp.at_base_width("head_init,embed:x:0.0625") == "embed:x:0.0625"


def test_the_lm_head_init_std_variant_is_a_base_constant_that_mup_keeps():
  """`--lm_head_init_std` (issue 20 item 4): the head's draw at every width; μP's 1/m multiplier
  then shrinks its logits as for the default draw. Not the identity at the base width."""
  heads = lr_transfer.PRESETS["heads"]
  for width, mult in ((128, 1.0), (512, 0.25)):
    job = dict(parametrization="mup", variant="head_std=0.06", optimizer="adamw", width=width,
               model_extra={"lm_head_init_std": 0.06})
    model = config_lib.build_model(lr_transfer.train_config(heads, job), seed=0)
    kernel = np.asarray(model.lm_head.kernel[...])
    assert abs(kernel.std() / 0.06 - 1) < 0.02 and model.lm_head.multiplier == mult
    others = np.asarray(model.embed.embedding[...]).std()
    assert abs(others / 0.02 - 1) < 0.02
  assert lp.at_base_width("head_std=0.06") == "head_std=0.06"


def test_sp_rows_draw_fan_in_and_the_const_init_row_draws_init_std_at_every_width():
  """The `sp` row is TP5's SP (fan-in std relative to the base); `sp+const_init` keeps the
  model's init_std (0.02) at every width, as fla initialises; both are SP at the base width."""
  heads = lr_transfer.PRESETS["heads"]
  assert ("sp", "const_init") in heads.rows and lp.at_base_width("const_init") == ""
  stds = {}
  for width in (128, 512):
    for variant in ("", "const_init"):
      job = dict(parametrization="sp", variant=variant, optimizer="adamw", width=width)
      model = config_lib.build_model(lr_transfer.train_config(heads, job), seed=0)
      stds[width, variant] = (float(np.asarray(model.lm_head.kernel[...]).std()),
                              float(np.asarray(model.blocks[0].mlp.down_proj.kernel[...]).std()))
  assert stds[128, ""] == stds[128, "const_init"]
  for got, want in zip(stds[512, "const_init"], (0.02, 0.02)):
    assert abs(got / want - 1) < 0.02
  for got, const in zip(stds[512, ""], stds[512, "const_init"]):
    assert abs(got / const - 0.5) < 0.01         # (512 / 128)^-½


def test_embedding_lr_scale_is_the_embed_factor_under_its_name():
  """--embedding_lr_scale=C plans the runs keyed `embed:x:C` (those of --lr_override=embed:x:C,
  one set) and trains them with optimizer.embedding_lr_scale = C: the same optimizer groups as
  the override; both flags at once are refused."""
  from absl import flags as absl_flags
  from absl.testing import flagsaver
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS(["lr_transfer"])
  with flagsaver.flagsaver(lm_head_init_std=0.08, embedding_lr_scale=0.0625):
    ab = lr_transfer.ablation()
  assert ab.parts == ("embed:x:0.0625", "head_std=0.08") and ab.lr_overrides == ()
  assert ab.optimizer_extra == (("embedding_lr_scale", 0.0625),)
  with flagsaver.flagsaver(lm_head_init_std=0.08, lr_override=["embed:x:0.0625"]):
    assert lr_transfer.ablation().parts == ab.parts          # one key, one set of runs
  with flagsaver.flagsaver(embedding_lr_scale=0.0625, lr_override=["embed:x:0.0625"]):
    with pytest.raises(ValueError, match="the same factor twice"):
      lr_transfer.ablation()
  heads = lr_transfer.PRESETS["heads"]
  groups = []
  for extra in (dict(optimizer_extra={"embedding_lr_scale": 0.0625}),
                dict(lr_overrides=["embed:x:0.0625"])):
    job = dict(parametrization="mup", variant="embed:x:0.0625", optimizer="sgd", width=256,
               **extra)
    config = lr_transfer.train_config(heads, job)
    config_lib.validate_config(config)
    model = config_lib.build_model(config, seed=0)
    groups.append(mup.param_groups(
        model, parametrization="mup", optimizer="sgd",
        base_config=config_lib.base_model_config(config),
        lr_overrides=config_lib.lr_overrides(config),
        embedding_lr_scale=config_lib.embedding_lr_scale(config)))
  assert groups[0] == groups[1]
  emb = [k for k in groups[0] if k[0] == "embed"]
  assert emb and all(math.isclose(groups[0][k].lr, 0.0625 * 2) for k in emb)   # × m = 2
