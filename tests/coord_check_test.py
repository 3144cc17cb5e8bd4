"""Coordinate check (CPU, widths 64…512): μP activations stay flat in width, SP's grow.

Scheme "heads" (heads grow at head dim 8), one block, 3 steps at a large LR on a fixed Markov
batch, 2 seeds. Pass criteria (issue 4): every μP activation has |log2–log2 slope| ≤ 0.15 at
steps t ≥ 2; SP has a slope ≥ 0.4 for the logits or a hidden activation.

Under SGD the μP table's W_q, W_k rule, LR × (H/H_base)^-1 (an edge rule, docs/mup.md), makes
q and k move less from init as heads are added: their slope is negative by design; every other
activation stays flat, and without the rule (`lr_overrides` undoing it) q, k are flat too.

Why t ≥ 2: μP's read-out multiplier 1/m makes the logits at init Θ(m^-1/2) by design (slope −1/2
at t = 0, the infinite-width limit is 0); after one step the learned Θ(1) part does not dominate
yet at width 64 (slope ≈ −0.2 at t = 1), after two it does. docs/mup.md discusses this.
"""
import dataclasses

import jax
import numpy as np
import pytest

from gdn_jax import coord_check as cc_lib

CC = cc_lib.CoordCheckConfig(scheme="heads", base_width=64, head_dim=8, num_layers=1, batch=4,
                             seq_len=32, steps=3, vocab_size=16, chunk_size=16)
LR = {"adamw": 1e-2, "sgd": 0.5}
HIDDEN = ("q", "k", "v", "mixer_out", "mlp_out", "block_out", "o")
# μP's widths: 256 adds a compiled train step (~10 s) and no power to discriminate. The slopes at
# 64, 128, 512 (seed means) are within 0.01 of the 4-width fit's (worst 0.13 AdamW, 0.14 SGD;
# SP's slope is ≥ 2), and the fit still spans 3 octaves.
MU_WIDTHS = (64, 128, 512)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Each width compiles its own train step (most of this file's time): XLA's optimisations would
  take ~40% of it and the tiny programs need no speed. The slopes agree with the optimised run's
  to 1e-6."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_mup_is_flat_and_sp_grows(optimizer):
  mu = cc_lib.coord_check(MU_WIDTHS, CC, parametrization="mup", optimizer=optimizer,
                          learning_rate=LR[optimizer], seeds=(0, 1))
  qk = ("q", "k") if optimizer == "sgd" else ()
  worst, where = cc_lib.max_abs_slope(mu, first_step=2, exclude=qk)
  print(f"μP/{optimizer}: worst |slope| {worst:.3f} at {where} (bound 0.15)")
  assert worst <= 0.15, f"μP/{optimizer}: |slope| {worst:.2f} at {where}"
  if optimizer == "sgd":
    # The rule's price, as predicted: q and k change less from init with more heads ...
    for name in ("L0.q", "L0.k"):
      print(f"μP/sgd: delta slope of {name} {mu['slopes']['delta'][name][-1]:.3f} "
            "(expected in [-1, -0.05])")
      assert -1.0 <= mu["slopes"]["delta"][name][-1] <= -0.05, (name, mu["slopes"]["delta"][name])
    # ... and the table without the rule is flat in q and k too (TP5's limit-correct table).
    tp5 = cc_lib.coord_check(MU_WIDTHS, dataclasses.replace(
        CC, lr_overrides=("q_proj:1", "k_proj:1")), parametrization="mup", optimizer="sgd",
        learning_rate=LR["sgd"], seeds=(0, 1))
    worst, where = cc_lib.max_abs_slope(tp5, first_step=2)
    print(f"μP/sgd without the q/k rule: worst |slope| {worst:.3f} at {where} (bound 0.15)")
    assert worst <= 0.15, f"μP/sgd without the q/k rule: |slope| {worst:.2f} at {where}"
  # Sanity of the measurement itself: every activation was recorded and training moved them.
  assert {"logits", "L0.q", "L0.S", "L0.beta", "L0.g", "L0.o"} <= set(mu["size"])
  assert all(mu["size"]["logits"][i][-1] > 1.5 * mu["size"]["logits"][i][0]
             for i in range(len(MU_WIDTHS)))

  sp = cc_lib.coord_check((64, 512), CC, parametrization="sp", optimizer=optimizer,
                          learning_rate=LR[optimizer], seeds=(0,))
  slopes = sp["slopes"]["size"]
  grow = max(max(slopes["logits"][1:]),
             *(max(s[1:]) for n, s in slopes.items() if n.split(".")[-1] in HIDDEN))
  print(f"SP/{optimizer}: largest slope {grow:.2f} (bound ≥ 0.4)")
  assert grow >= 0.4, f"SP/{optimizer}: largest slope only {grow:.2f}"


def test_slope_fit_and_config_errors():
  assert cc_lib.fit_slope([64, 128, 256], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
  assert cc_lib.fit_slope([64, 256], [3.0, 3.0]) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="scheme"):
    cc_lib.CoordCheckConfig(scheme="depth")
  with pytest.raises(ValueError, match="width"):
    cc_lib.width_config(100, CC)
  paper = cc_lib.width_config(128, cc_lib.CoordCheckConfig(scheme="paper", vocab_size=16))
  assert (paper.num_heads, paper.head_k_dim, paper.head_v_dim, paper.tie_embeddings) == \
      (6, 16, 32, True)


def test_paper_recipe_runs_with_the_mixer_output_multiplier():
  """The coordinate check trains the paper's recipe (its own init per optimizer); with the
  mixer-output multiplier the mixer's output at init shrinks by d0/d exactly (the forward is
  linear in W_o's output), the rest of the block's input is the same.

  The comparison is at init (t = 0), so the plain model only records it (steps=0: no train step
  to compile); the scaled one also trains a step."""
  cc = cc_lib.CoordCheckConfig(scheme="paper", base_width=64, num_layers=1, batch=2, seq_len=16,
                               steps=1, vocab_size=16, chunk_size=16)
  plain = cc_lib.run_width(128, dataclasses.replace(cc, steps=0), parametrization="paper",
                           optimizer="sgd", learning_rate=0.1)[0]
  scaled = cc_lib.run_width(128, cc.__class__(**{**cc.__dict__, "mixer_output_multiplier": True}),
                            parametrization="paper", optimizer="sgd", learning_rate=0.1)[0]
  assert len(scaled["loss"]) == 1 and np.isfinite(scaled["loss"][0])  # it trained
  assert scaled["delta"]["L0.mixer_out"][1] > 0
  assert scaled["size"]["L0.mixer_out"][0] == pytest.approx(plain["size"]["L0.mixer_out"][0] / 2,
                                                            rel=1e-4)
  assert scaled["size"]["L0.q"][0] == pytest.approx(plain["size"]["L0.q"][0], rel=1e-6)
