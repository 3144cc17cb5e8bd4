"""gdn_jax.curvature.head_summary (experiments/qk_curvature.py --per_head): the extreme-value prediction and the per-head
growth it is set against, on synthetic studies with a known answer."""
import numpy as np

from gdn_jax import curvature


def _runs(law, widths=(64, 256), head_dim=16, seeds=(0, 1, 2)):
  rng, runs = np.random.default_rng(0), []
  for w in widths:
    for s in seeds:
      heads = law(rng, w, w // head_dim)
      runs.append(dict(width=w, heads=w // head_dim, seed=s,
                       layers={"0": dict(h_max=float(heads.max()), head_h_max=heads.tolist())}))
  return runs


def test_iid_heads_predict_the_growth_of_the_max_and_keep_the_median():
  """Heads drawn from one Pareto(α = 1) law at every width: the median does not grow, the block's
  max grows like H^(1/α) (2 log2 from 4 to 16 heads), and the prediction from the wide pool sees
  most of it (a finite pool caps the tail)."""
  pareto = lambda rng, w, h: 1.0 + rng.pareto(1.0, size=h)
  summary = curvature.head_summary(_runs(pareto, seeds=range(200)))["0"]
  assert abs(summary["median_head_growth_log2"]) < 0.2
  assert summary["measured_block_growth_log2"] > 1.2
  assert 1.0 < summary["predicted_block_growth_log2"] < 2.2
  assert summary["per_width"][64]["heads"] == 4 and summary["per_width"][256]["n"] == 16 * 200


def test_heads_that_all_grow_with_width_show_it_in_the_median():
  """Every head's curvature ∝ width, no spread: the median grows by log2(256/64) = 2 and the
  extreme-value prediction (a degenerate pool) predicts no growth."""
  same = lambda rng, w, h: np.full(h, w / 64.0)
  summary = curvature.head_summary(_runs(same))["0"]
  assert summary["median_head_growth_log2"] == 2.0
  assert summary["measured_block_growth_log2"] == 2.0
  assert summary["predicted_block_growth_log2"] == 0.0
