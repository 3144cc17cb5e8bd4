"""Statistics of learning-rate transfer: optima, intervals over seeds, drift, regret, trend.

The data of one sweep row (a parametrization × optimizer × variant) is, per width w and seed,
the final validation losses on that width's log2-LR grid (NaN = diverged). Everything is computed on
seed-mean curves (a learning rate at which any seed diverged counts as diverged), and the
uncertainty comes from resampling seeds:

  optimum(x, y)      vertex of a least-squares parabola through the grid points within
                     ±`half_width` log2 of the best point (5 points on a ½-log2 grid)
  bootstrap          resample the seeds with replacement — the same draw at every width, since a
                     seed fixes the data order at every width — and recompute each width's
                     optimum and the drift; with ≤ 6 seeds every one of the S^S draws is
                     enumerated (the exact bootstrap distribution), else `draws` random ones
  interval           the central `level` percentile interval of those values
  drift              max − min over widths of the seed-mean optima
  regret             at each width, the seed-mean loss at the grid point nearest the base
                     width's optimum minus that width's best seed-mean loss
  trend              least-squares slope of the optima against log2 width × log2 of the range,
                     with its standard error (max − min grows with noise alone; a slope does not)
  best loss          the minimum of the seed-mean curve, with its bootstrap interval
  loss gap           best loss of row a − best loss of row b at one width (each at its own
                     tuned LR: "is μP at least as good as SP tuned for that width?"); the two
                     rows' seeds are resampled independently (exactly: every pair of draws)

With 3 seeds the 95 % bootstrap interval spans roughly the per-seed optima: honest, and wide.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

EXACT_MAX_SEEDS = 6


def optimum(log2_lrs, losses, *, half_width: float = 1.0) -> tuple[float | None, str]:
  """(optimal log2 LR, how it was found) of one curve; NaN losses count as diverged."""
  xs, ys = np.asarray(log2_lrs, float), np.asarray(losses, float)
  ok = np.isfinite(ys)
  if not ok.any():
    return None, "all diverged"
  i = int(np.argmin(np.where(ok, ys, np.inf)))
  if i == 0 or i == len(xs) - 1:
    return float(xs[i]), "edge of grid"
  near = ok & (np.abs(xs - xs[i]) <= half_width + 1e-9)
  if near.sum() < 3 or not (near[:i].any() and near[i + 1:].any()):
    return float(xs[i]), "too few points"
  a, b, _ = np.polyfit(xs[near], ys[near], 2)
  if a <= 0:
    return float(xs[i]), "not convex"
  return float(np.clip(-b / (2 * a), xs[near].min(), xs[near].max())), "quadratic fit"


def seed_mean(losses_SxL) -> np.ndarray:
  """Mean over seeds (axis 0); NaN where any seed diverged."""
  x = np.asarray(losses_SxL, float)
  with np.errstate(invalid="ignore"):
    return np.where(np.isfinite(x).all(axis=0), x.mean(axis=0), np.nan)


def _draws(num_seeds: int, draws: int, rng) -> np.ndarray:
  if num_seeds <= EXACT_MAX_SEEDS:
    return np.array(list(itertools.product(range(num_seeds), repeat=num_seeds)))
  return rng.integers(0, num_seeds, size=(draws, num_seeds))


def interval(values, level: float = 0.95) -> tuple[float, float] | None:
  """Central percentile interval (None when no value is finite)."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
  if not len(v):
    return None
  lo = 100 * (1 - level) / 2
  return float(np.percentile(v, lo)), float(np.percentile(v, 100 - lo))


def drift(optima: Sequence[float | None]) -> float | None:
  found = [o for o in optima if o is not None]
  return float(max(found) - min(found)) if len(found) > 1 else None


def trend(optima_by_width: Mapping[int, float | None]) -> dict:
  """Least-squares line through the optima against log2 width (see the module docstring)."""
  pts = [(math.log2(w), o) for w, o in sorted(optima_by_width.items()) if o is not None]
  none = dict(trend_log2_per_doubling=None, trend_drift_log2=None, trend_drift_se=None)
  if len(pts) < 2:
    return none
  x, y = np.array(pts).T
  span = x[-1] - x[0]
  slope, intercept = np.polyfit(x, y, 1)
  se = None
  if len(x) > 2:
    resid = y - (slope * x + intercept)
    se = float(np.sqrt(resid @ resid / (len(x) - 2) / np.sum((x - x.mean()) ** 2)) * span)
  return dict(trend_log2_per_doubling=float(slope), trend_drift_log2=float(slope * span),
              trend_drift_se=se)


def _best(curve) -> float:
  curve = np.asarray(curve, float)
  return float(np.nanmin(curve)) if np.isfinite(curve).any() else math.nan


def best_loss_gap(losses_a: Mapping[int, Sequence[float]], losses_b: Mapping[int, Sequence[float]],
                  *, level: float = 0.95, draws: int = 4000, seed: int = 0) -> dict:
  """Best seed-mean loss of row a minus row b's at one width, each on its own LR grid.

  Args:
    losses_a, losses_b: {seed: losses on that row's grid} (NaN = diverged). The rows may have
      different seeds and grids. The interval resamples each row's seeds independently; with
      ≤ 6 seeds per row every pair of draws is enumerated.
  """
  rows = []
  for name, losses in (("losses_a", losses_a), ("losses_b", losses_b)):
    if not losses:
      raise ValueError(f"best_loss_gap: {name} has no seeds; expected {{seed: losses}}.")
    rows.append(np.asarray([losses[s] for s in sorted(losses)], float))
  a, b = rows
  gap = _best(seed_mean(a)) - _best(seed_mean(b))
  rng = np.random.default_rng(seed)
  best_a = [_best(seed_mean(a[d])) for d in _draws(len(a), draws, rng)]
  best_b = [_best(seed_mean(b[d])) for d in _draws(len(b), draws, rng)]
  if len(a) > EXACT_MAX_SEEDS or len(b) > EXACT_MAX_SEEDS:
    n = min(len(best_a), len(best_b))
    gaps = np.asarray(best_a[:n]) - np.asarray(best_b[:n])
  else:
    gaps = np.subtract.outer(best_a, best_b).ravel()
  return dict(gap=float(gap), interval=interval(gaps, level) if len(a) > 1 and len(b) > 1
              else None, seeds_a=len(a), seeds_b=len(b))


def transfer_summary(log2_lrs: Mapping[int, Sequence[float]],
                     losses: Mapping[int, Mapping[int, Sequence[float]]], *, level: float = 0.95,
                     draws: int = 4000, half_width: float = 1.0, seed: int = 0) -> dict:
  """Optima with intervals, drift with interval, regret, best loss and trend of one sweep row.

  Args:
    log2_lrs: width → the sorted log2 LR grid of that width.
    losses: width → {seed: losses on that grid} (NaN = diverged). The smallest width is the
      base. Point estimates use every seed of a width; the bootstrap resamples the seeds run at
      every width (paired), and gives no intervals with fewer than two of them.
  """
  widths = sorted(losses)
  if not widths:
    raise ValueError("transfer_summary: no widths.")
  table = {w: {s: np.asarray(v, float) for s, v in losses[w].items()} for w in widths}
  for w in widths:
    for s, v in table[w].items():
      if v.shape != (len(log2_lrs[w]),):
        raise ValueError(f"transfer_summary: width {w} seed {s} has {v.shape[0]} losses for "
                         f"{len(log2_lrs[w])} learning rates; expected one per grid point.")
  common = sorted(set.intersection(*(set(table[w]) for w in widths)))
  rng = np.random.default_rng(seed)
  curves = {w: seed_mean([table[w][s] for s in sorted(table[w])]) for w in widths}
  opt = {w: optimum(log2_lrs[w], curves[w], half_width=half_width) for w in widths}
  samples = {w: [] for w in widths}
  best_samples = {w: [] for w in widths}
  drifts = []
  if len(common) >= 2:
    for draw in _draws(len(common), draws, rng):
      picked = [common[i] for i in draw]
      resampled = {w: seed_mean([table[w][s] for s in picked]) for w in widths}
      found = {w: optimum(log2_lrs[w], resampled[w], half_width=half_width)[0] for w in widths}
      for w in widths:
        samples[w].append(found[w])
        best_samples[w].append(_best(resampled[w]))
      drifts.append(drift(list(found.values())))
  base = widths[0]
  base_opt = opt[base][0]
  regret, at_transfer = {}, {}
  if base_opt is not None:
    for w in widths:
      xs, ys = np.asarray(log2_lrs[w]), curves[w]
      j = int(np.argmin(np.abs(xs - base_opt)))
      at_transfer[w] = float(ys[j])
      if np.isfinite(ys).any():
        regret[w] = float(ys[j] - np.nanmin(ys))
  best = {w: _best(curves[w]) for w in widths if np.isfinite(curves[w]).any()}
  intervals = {w: interval(samples[w], level) for w in widths}
  base_iv = intervals[base]
  overlap = {w: (iv is not None and base_iv is not None and iv[0] <= base_iv[1]
                 and base_iv[0] <= iv[1]) for w, iv in intervals.items()}
  vals = [at_transfer.get(w) for w in widths]
  edges = lambda w: [log2_lrs[w][0], log2_lrs[w][-1]]
  return dict(
      widths=widths, seeds={w: sorted(table[w]) for w in widths}, bootstrap_seeds=common,
      optimum={w: dict(log2_lr=opt[w][0], how=opt[w][1], interval=intervals[w],
                       edge_fraction=(float(np.mean([x in edges(w) for x in samples[w]]))
                                      if samples[w] else None))
               for w in widths},
      drift_log2=drift([opt[w][0] for w in widths]),
      drift_interval=interval(drifts, level), interval_level=level,
      bootstrap_draws=len(drifts), interval_overlaps_base=overlap,
      **trend({w: opt[w][0] for w in widths}),
      loss_at_transferred_lr=at_transfer, transfer_regret=regret, best_loss=best,
      best_loss_interval={w: interval(best_samples[w], level) for w in widths},
      wider_is_better=bool(all(v is not None and np.isfinite(v) for v in vals)
                           and all(a > b for a, b in zip(vals, vals[1:]))),
      curves={w: dict(log2_lr=list(map(float, log2_lrs[w])),
                      val_loss=[None if not np.isfinite(y) else float(y) for y in curves[w]])
              for w in widths})
