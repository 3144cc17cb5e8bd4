"""gdn_jax.lr_stats: optimum fits, the exact bootstrap over seeds (hand-computed), drift, regret."""
import numpy as np
import pytest

from gdn_jax import lr_stats

GRID = np.arange(-4.0, 0.01, 0.5)          # a ½-log2 grid


def parabolas(centres, grid=GRID, curvature=0.1, offset=1.0):
  return {s: curvature * (grid - c) ** 2 + offset for s, c in enumerate(centres)}


def test_optimum_fits_the_parabola_around_the_best_point():
  assert lr_stats.optimum(GRID, 0.3 * (GRID + 2.3) ** 2)[0] == pytest.approx(-2.3)
  # Far points do not bend the fit: a different curve beyond ±1 log2 of the best is ignored.
  y = 0.3 * (GRID + 2.3) ** 2
  y[GRID > -1.0] = 5.0
  assert lr_stats.optimum(GRID, y)[0] == pytest.approx(-2.3)
  assert lr_stats.optimum(GRID, 0.1 * (GRID + 9) ** 2) == (-4.0, "edge of grid")
  assert lr_stats.optimum(GRID, [np.nan] * len(GRID)) == (None, "all diverged")
  nan_next = 0.3 * (GRID + 2.0) ** 2
  nan_next[GRID >= -1.5] = np.nan                # only the left side is left
  assert lr_stats.optimum(GRID, nan_next) == (-2.0, "too few points")


def test_exact_bootstrap_interval_of_three_seeds_by_hand():
  """Seeds' curves are parabolas of one curvature with vertices c = −2, −1.8, −1.5, so a
  resample's seed-mean has its vertex at the mean of the resampled c. The 27 equally likely
  resamples sorted: −2 (once), −1.9333 (3×), ..., −1.6 (3×), −1.5 (once); numpy's percentile puts
  the 2.5 % point at 0.65 of the way from the first to the second value and the 97.5 % point at
  0.35 of the way from the 26th to the 27th: −2 + 0.65 · 0.2/3 and −1.6 + 0.35 · 0.1."""
  c = (-2.0, -1.8, -1.5)
  s = lr_stats.transfer_summary({128: GRID, 1024: GRID},
                                {128: parabolas(c), 1024: parabolas(np.add(c, 0.3), offset=0.9)})
  assert s["bootstrap_draws"] == 27
  base = s["optimum"][128]
  assert base["log2_lr"] == pytest.approx(np.mean(c))
  assert base["interval"] == pytest.approx((-2 + 0.65 * 0.2 / 3, -1.6 + 0.35 * 0.1))
  # Paired resampling: width 1024's vertices are the same seeds' shifted by 0.3, so every
  # resample's drift is exactly 0.3 (an unpaired bootstrap would give a wide interval).
  assert s["drift_log2"] == pytest.approx(0.3)
  assert s["drift_interval"] == pytest.approx((0.3, 0.3))
  assert s["interval_overlaps_base"] == {128: True, 1024: True}
  # Regret at 1024: the grid point nearest the base optimum −1.7667 is −2.0; the seed-mean curve
  # there is 0.1 (x + 1.4667)² + const, its best grid point −1.5: 0.1 (0.5333² − 0.0333²).
  assert s["transfer_regret"][1024] == pytest.approx(0.1 * ((1.6 / 3) ** 2 - (0.1 / 3) ** 2))
  assert s["transfer_regret"][128] == 0.0
  assert s["best_loss"][1024] < s["best_loss"][128]


def test_divergence_at_one_seed_drops_that_learning_rate():
  losses = parabolas((-2.0, -2.0))
  losses[1] = losses[1].copy()
  losses[1][GRID == -2.0] = np.nan
  s = lr_stats.transfer_summary({64: GRID}, {64: losses})
  assert s["curves"][64]["val_loss"][list(GRID).index(-2.0)] is None
  assert s["optimum"][64]["log2_lr"] == pytest.approx(-2.0)    # fitted through the neighbours


def test_trend_separates_a_trend_from_scatter():
  line = lr_stats.trend({64: -1.0, 128: -1.5, 256: -2.0, 512: -2.5})
  assert line["trend_drift_log2"] == pytest.approx(-1.5) and line["trend_drift_se"] == pytest.approx(0)
  scatter = lr_stats.trend({64: -1.0, 128: -1.6, 256: -1.0, 512: -1.6})
  assert abs(scatter["trend_drift_log2"]) < scatter["trend_drift_se"] * 2


def test_shapes_are_checked():
  with pytest.raises(ValueError, match="one per grid point"):
    lr_stats.transfer_summary({64: GRID}, {64: {0: [1.0, 2.0]}})


def test_best_loss_gap_by_hand():
  """Row a: two seeds whose best losses are 1.0 and 1.4 at one grid point (seed-mean best 1.2);
  row b: three seeds, best 1.0, 1.0 and 1.3 (seed-mean best 1.1), on a different grid. Every
  pair of draws is enumerated: a's 4 resamples give best 1.0, 1.2, 1.2, 1.4; b's 27 give 1.0
  (8×: seed 2 not drawn), 1.1 (12×), 1.2 (6×), 1.3 (1×). Gap a − b = +0.1; its 108 values range
  from −0.3 to +0.4, and the interval comes from exactly those."""
  a = {0: [1.5, 1.0, 1.5], 1: [1.9, 1.4, 1.9]}
  b = {0: [1.0, 1.6], 1: [1.0, 1.6], 2: [1.3, 1.6]}
  g = lr_stats.best_loss_gap(a, b)
  assert g["gap"] == pytest.approx(0.1) and (g["seeds_a"], g["seeds_b"]) == (2, 3)
  best_a = [1.0, 1.2, 1.2, 1.4]
  best_b = [1.0] * 8 + [1.1] * 12 + [1.2] * 6 + [1.3]
  expected = np.subtract.outer(best_a, best_b).ravel()
  assert g["interval"] == pytest.approx((np.percentile(expected, 2.5),
                                         np.percentile(expected, 97.5)))
  assert g["interval"][0] == pytest.approx(-0.2) and g["interval"][1] == pytest.approx(0.4)
  # A diverged point does not count as a best loss; one seed per row gives no interval.
  assert lr_stats.best_loss_gap({0: [np.nan, 1.2]}, {0: [1.0, 1.1]}) == dict(
      gap=pytest.approx(0.2), interval=None, seeds_a=1, seeds_b=1)
  with pytest.raises(ValueError, match="losses_b has no seeds"):
    lr_stats.best_loss_gap(a, {})


def test_best_loss_interval_resamples_seeds():
  s = lr_stats.transfer_summary({64: GRID, 512: GRID},
                                {64: parabolas((-2.0, -2.0), offset=1.0),
                                 512: {0: 0.1 * (GRID + 2) ** 2 + 0.9,
                                       1: 0.1 * (GRID + 2) ** 2 + 0.8}})
  # Resamples' best losses sorted: 0.8, 0.85, 0.85, 0.9; numpy's 2.5 % / 97.5 % points lie at
  # positions 0.075 and 2.925 of 3.
  assert s["best_loss"][512] == pytest.approx(0.85)
  assert s["best_loss_interval"][512] == pytest.approx((0.8 + 0.075 * 0.05, 0.85 + 0.925 * 0.05))
  assert s["best_loss_interval"][64] == pytest.approx((1.0, 1.0))
