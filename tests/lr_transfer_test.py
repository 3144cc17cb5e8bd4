"""The LR-transfer analysis: optimum per width, drift, variants kept apart, divergence."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import lr_transfer  # pylint: disable=wrong-import-position


def _rows(variant, optima, *, diverge_at=None, seed=0):
  rows = []
  for width, best in optima.items():
    for x in np.arange(-7.0, 0.5, 1.0):
      loss = 1.0 + 0.05 * (x - best) ** 2 - 0.01 * np.log2(width)
      if diverge_at is not None and x >= diverge_at:
        loss = None
      rows.append(dict(kind="run", scheme="heads", parametrization="mup", optimizer="sgd",
                       width=width, seed=seed, log2_lr=float(x), variant=variant, val_loss=loss))
  return rows


def test_optimum_is_the_vertex_of_the_parabola_through_the_best_point():
  xs = np.arange(-6.0, 0.0)
  assert lr_transfer.optimum(xs, (xs + 2.3) ** 2)[0] == pytest.approx(-2.3)
  assert lr_transfer.optimum(xs, 0.1 * (xs + 9) ** 2) == (-6.0, "edge of grid")
  assert lr_transfer.optimum(xs, [np.nan] * 6) == (None, "all diverged")


def test_analyze_keeps_variants_apart_and_measures_drift(tmp_path):
  rows = (_rows("", {16: -2.0, 32: -3.0, 64: -4.0})
          + _rows("o_eps=0.001", {16: -2.0, 32: -2.2, 64: -2.4}, diverge_at=0.0))
  path = tmp_path / "sweep.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  summary = lr_transfer.analyze(str(path), str(tmp_path / "sweep"))
  assert set(summary) == {"heads/mup/sgd", "heads/mup/sgd[o_eps=0.001]"}
  base, fixed = summary["heads/mup/sgd"], summary["heads/mup/sgd[o_eps=0.001]"]
  assert base["drift_log2"] == pytest.approx(2.0, abs=1e-6)
  assert fixed["drift_log2"] == pytest.approx(0.4, abs=1e-6)
  assert fixed["diverged_runs"] == 3 and base["diverged_runs"] == 0
  assert fixed["wider_is_better"] and not base["wider_is_better"]   # base: loss rises at LR −2
  assert (tmp_path / "sweep.png").exists()
  assert json.loads((tmp_path / "sweep.json").read_text())["summary"].keys() == summary.keys()


def test_per_seed_drift_and_regret(tmp_path):
  # Seed 0: optimum −2 at every width; seed 1: −2, −3, −4. Averaged curves: optima −2, −2.5, −3.
  rows = _rows("", {16: -2.0, 32: -2.0, 64: -2.0}) + _rows("", {16: -2.0, 32: -3.0, 64: -4.0}, seed=1)
  path = tmp_path / "sweep.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = lr_transfer.analyze(str(path), str(tmp_path / "sweep"))["heads/mup/sgd"]
  assert s["drift_log2_per_seed"] == {0: pytest.approx(0.0, abs=1e-6), 1: pytest.approx(2.0, abs=1e-6)}
  assert s["optimum_per_seed"][1][64] == pytest.approx(-4.0)
  assert s["drift_log2"] == pytest.approx(1.0, abs=1e-6)
  # Width 64 averaged: 1 + 0.05·((x+2)² + (x+4)²)/2 − c is 0.10 at the transferred −2, 0.05 at −3.
  assert s["transfer_regret"][16] == pytest.approx(0.0, abs=1e-9)
  assert s["transfer_regret"][64] == pytest.approx(0.05, abs=1e-9)


def test_optimum_trend_separates_a_trend_from_scatter():
  line = lr_transfer.optimum_trend({128: -1.0, 256: -1.4, 512: -1.8, 1024: -2.2})
  assert line["trend_log2_per_doubling"] == pytest.approx(-0.4)
  assert line["trend_drift_log2"] == pytest.approx(-1.2)       # over 3 doublings
  assert line["trend_drift_se"] == pytest.approx(0.0, abs=1e-9)
  # Scatter without a trend: max − min is 0.6, the fitted trend ~0 with a large error.
  scatter = lr_transfer.optimum_trend({128: -1.0, 256: -1.6, 512: -1.0, 1024: -1.6})
  assert abs(scatter["trend_drift_log2"]) < scatter["trend_drift_se"]   # -0.36 ± 0.51
  assert scatter["trend_drift_se"] > 0.3
  assert lr_transfer.optimum_trend({128: -1.0, 256: -2.0})["trend_drift_se"] is None
  assert lr_transfer.optimum_trend({128: None, 256: -2.0})["trend_drift_log2"] is None


def test_analyze_reports_the_trend(tmp_path):
  rows = _rows("", {16: -2.0, 32: -3.0, 64: -4.0})
  path = tmp_path / "sweep.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = lr_transfer.analyze(str(path), str(tmp_path / "sweep"))["heads/mup/sgd"]
  assert s["trend_drift_log2"] == pytest.approx(-2.0, abs=1e-6)
  assert s["trend_log2_per_doubling"] == pytest.approx(-1.0, abs=1e-6)


def test_lr_override_variants_share_the_base_width_runs(tmp_path):
  """LR overrides are 1 at the base width, so an override variant run only at wider widths uses
  the base-width runs of the same variant without overrides (and never those of another)."""
  assert lr_transfer.without_lr_overrides("embed:out:-1,q_proj:-1,o_eps=0.001,clip=1") == \
      "o_eps=0.001,clip=1"
  assert lr_transfer.without_lr_overrides("o_eps=0.001") == "o_eps=0.001"
  # qk_eps changes the base model too: its base-width runs are its own.
  assert lr_transfer.without_lr_overrides("q_proj:-1,o_eps=0.001,qk_eps=1,clip=1") == \
      "o_eps=0.001,qk_eps=1,clip=1"
  rows = (_rows("o_eps=0.001", {16: -2.0, 32: -3.0})
          + _rows("clip=1", {16: -5.0})                     # same base width, other variant
          + _rows("embed:out:-1,o_eps=0.001", {32: -2.5}))
  path = tmp_path / "sweep.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = lr_transfer.analyze(str(path), str(tmp_path / "sweep"), base_width=16)
  ablation = s["heads/mup/sgd[embed:out:-1,o_eps=0.001]"]
  assert ablation["widths"] == [16, 32]
  assert ablation["base_width_runs_from"] == "o_eps=0.001"
  assert ablation["optimum"][16]["log2_lr"] == pytest.approx(-2.0)
  assert ablation["drift_log2"] == pytest.approx(0.5, abs=1e-6)
  assert s["heads/mup/sgd[o_eps=0.001]"]["base_width_runs_from"] is None
  alone = lr_transfer.analyze(str(path), str(tmp_path / "sweep"))   # no base width: no sharing
  assert alone["heads/mup/sgd[embed:out:-1,o_eps=0.001]"]["widths"] == [32]
