"""gdn_jax.lr_protocol: the grids a sweep runs (pilot, ½-log2 grids, extensions) and its analysis,
driven by synthetic results (no training)."""
import dataclasses

import numpy as np
import pytest

from gdn_jax import lr_protocol as lp

P = lp.Protocol(family="paper", widths=(128, 1024), base_width=128, layers=1, steps=10, batch=2,
                seq_len=16, warmup=1, rows=(("paper", ""), ("paper_sp", "")),
                optimizers=("adamw",), seeds=(100, 101, 102), sp_seeds=(100, 101), data="x",
                pilot={"adamw": (-12, -4, 1)})


def rows_for(param, width, phase, seeds, xs, best, variant="", opt="adamw"):
  return [dict(kind="run", scheme="paper", parametrization=param, variant=variant, optimizer=opt,
               width=width, seed=s, log2_lr=float(x), phase=phase,
               val_loss=1.0 + 0.05 * (x - best) ** 2 + 0.001 * i)
          for i, s in enumerate(seeds) for x in xs]


def jobs(rows, protocol=P):
  return [(j["parametrization"], j["width"], j["phase"], tuple(j["seeds"]), tuple(j["log2_lrs"]))
          for j in lp.Plan(protocol, rows).jobs()]


def test_pilots_come_first_then_the_base_grid_around_the_pilot():
  assert jobs([]) == [("paper", 128, "pilot", (100,), tuple(np.arange(-12.0, -3.5, 1.0))),
                      ("paper_sp", 128, "pilot", (100,), tuple(np.arange(-12.0, -3.5, 1.0)))]
  done = (rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -7.3)
          + rows_for("paper_sp", 128, "pilot", (100,), np.arange(-12.0, -3.5), -8.0))
  got = jobs(done)
  # 7 points, ½ log2 apart, around the pilot's fitted optimum (−7.3) rounded to the grid.
  assert got[0] == ("paper", 128, "fine", (100, 101, 102), tuple(np.arange(-9.0, -5.75, 0.5)))
  assert got[1] == ("paper_sp", 128, "fine", (100, 101), tuple(np.arange(-9.5, -6.25, 0.5)))


def test_a_pilot_whose_best_is_at_an_edge_is_extended():
  done = rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -2.0)
  assert jobs(done)[0] == ("paper", 128, "pilot", (100,), (-3.0, -2.0, -1.0))


def test_wider_grids_centre_on_the_base_optimum_sp_rows_are_shifted():
  done = (rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -7.0)
          + rows_for("paper_sp", 128, "pilot", (100,), np.arange(-12.0, -3.5), -8.0)
          + rows_for("paper", 128, "fine", P.seeds, np.arange(-8.5, -5.25, 0.5), -6.8)
          + rows_for("paper_sp", 128, "fine", P.sp_seeds, np.arange(-9.5, -6.25, 0.5), -8.0))
  got = jobs(done)
  # μP row: 5 points around −6.8 → −7.0; SP: 7 points around −8 − 1 · log2(8) = −11.
  assert got == [("paper", 1024, "fine", P.seeds, tuple(np.arange(-8.0, -5.75, 0.5))),
                 ("paper_sp", 1024, "fine", P.sp_seeds, tuple(np.arange(-12.5, -9.25, 0.5)))]
  # A width-1024 grid whose best point is at its right edge gets three more points there.
  more = done + rows_for("paper", 1024, "fine", P.seeds, np.arange(-8.0, -5.75, 0.5), -4.0)
  assert jobs(more)[0] == ("paper", 1024, "fine", P.seeds, (-5.5, -5.0, -4.5))
  # ... at most twice; an interior optimum needs nothing more.
  final = done + rows_for("paper", 1024, "fine", P.seeds, np.arange(-8.0, -3.75, 0.5), -5.1)
  assert all(j[0] != "paper" for j in jobs(final))


def test_wide_jobs_split_into_parts_of_whole_lr_points_that_resume():
  """max_job_runs: a grid longer than one device call runs as parts (all seeds of each LR point),
  and a finished part is not planned again."""
  done = (rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -7.0)
          + rows_for("paper_sp", 128, "pilot", (100,), np.arange(-12.0, -3.5), -8.0)
          + rows_for("paper", 128, "fine", P.seeds, np.arange(-8.5, -5.25, 0.5), -6.8)
          + rows_for("paper_sp", 128, "fine", P.sp_seeds, np.arange(-9.5, -6.25, 0.5), -8.0))
  split = dataclasses.replace(P, max_job_runs={1024: 4})
  got = jobs(done, split)
  mup = [j for j in got if j[0] == "paper"]
  sp = [j for j in got if j[0] == "paper_sp"]
  # μP: 5 points × 3 seeds → one point per part; SP: 7 points × 2 seeds → two points per part.
  assert [j[4] for j in mup] == [(x,) for x in np.arange(-8.0, -5.75, 0.5)]
  assert [j[4] for j in sp] == [(-12.5, -12.0), (-11.5, -11.0), (-10.5, -10.0), (-9.5,)]
  assert all(len(j[3]) * len(j[4]) <= 4 for j in got) and {j[3] for j in mup} == {P.seeds}
  # Unsplit, the same runs (the base width is never split: its width has no cap).
  whole = jobs(done)
  assert sorted(x for j in got if j[0] == "paper" for x in j[4]) == list(whole[0][4])
  # The first μP part done: the rest is planned, not it.
  part = rows_for("paper", 1024, "fine", P.seeds, [-8.0], -6.8)
  assert [j[4] for j in jobs(done + part, split) if j[0] == "paper"] == [
      (x,) for x in np.arange(-7.5, -5.75, 0.5)]
  assert lp.split_job(dict(seeds=[1, 2], log2_lrs=[0.0, 1.0]), None)[0]["log2_lrs"] == [0.0, 1.0]


def test_fixed_grids_and_ablations():
  fixed = dataclasses.replace(P, grid={"adamw": (-3, -1, 1)}, rows=(("mup", ""),))
  plan = lp.Plan(fixed, [], lp.Ablation(("o_eps=0.001",), (("output_norm_eps", 1e-3),)))
  got = plan.jobs()
  assert [(j["width"], j["log2_lrs"], j["variant"]) for j in got] == \
      [(128, [-3.0, -2.0, -1.0], "o_eps=0.001"), (1024, [-3.0, -2.0, -1.0], "o_eps=0.001")]
  assert got[0]["model_extra"] == {"output_norm_eps": 1e-3}


def test_analyze_uses_fine_runs_and_shares_base_runs_of_lr_override_variants():
  base = rows_for("mup", 128, "fine", (0, 1, 2), np.arange(-4.0, 0.1, 0.5), -2.0)
  pilot = rows_for("mup", 128, "pilot", (0,), np.arange(-6.0, 0.1, 1.0), -5.0)   # ignored
  wide = rows_for("mup", 1024, "fine", (0, 1, 2), np.arange(-4.0, 0.1, 0.5), -2.5)
  over = rows_for("mup", 1024, "fine", (0, 1, 2), np.arange(-4.0, 0.1, 0.5), -2.0,
                  variant="q_proj:-1")
  s = lp.analyze(base + pilot + wide + over, base_width=128)
  assert set(s) == {"paper/mup/adamw", "paper/mup/adamw[q_proj:-1]"}
  plain, fixed = s["paper/mup/adamw"], s["paper/mup/adamw[q_proj:-1]"]
  assert plain["drift_log2"] == pytest.approx(0.5, abs=1e-6)
  assert fixed["drift_log2"] == pytest.approx(0.0, abs=1e-6)
  assert fixed["base_width_runs_from"] == "" and plain["runs"] == 54
  assert plain["bootstrap_draws"] == 27
  table = lp.markdown_table(s)
  assert "| mup | adamw | 128: -2.00 [" in table and "| mup+q_proj:-1 | adamw |" in table


def test_analyze_judges_each_mup_row_against_its_sp():
  xs = np.arange(-4.0, 0.1, 0.5)
  rows = (rows_for("paper", 128, "fine", (0, 1, 2), xs, -2.0)
          + rows_for("paper", 128, "fine", (0, 1, 2), xs, -2.0, variant="mixer_out")
          + rows_for("paper_sp", 128, "fine", (0, 1), xs, -2.0))
  for r in rows:                       # SP 0.01 better at its best point, μP+mixer_out 0.02 worse
    r["val_loss"] += {"paper_sp": -0.01, "paper": 0.0}.get(r["parametrization"], 0.0) + (
        0.02 if r["variant"] == "mixer_out" else 0.0)
  s = lp.analyze(rows, base_width=128)
  plain, mixer = s["paper/paper/adamw"], s["paper/paper/adamw[mixer_out]"]
  assert plain["loss_vs_sp"]["against"] == mixer["loss_vs_sp"]["against"] == "paper/paper_sp/adamw"
  # Seeds add 0.001 × index: μP's mean offset 0.001, SP's 0.0005.
  assert plain["loss_vs_sp"]["by_width"][128]["gap"] == pytest.approx(0.01 + 0.0005)
  assert mixer["loss_vs_sp"]["by_width"][128]["gap"] == pytest.approx(0.03 + 0.0005)
  assert "loss_vs_sp" not in s["paper/paper_sp/adamw"]
  table = lp.markdown_loss_table(s)
  assert "| paper+mixer_out | adamw | 128 | 1.0210 [" in table and "+0.0305 [" in table


def test_a_variant_that_is_the_identity_at_the_base_width_plans_on_the_base_rows_runs():
  assert lp.at_base_width("sp_tied,q_proj:-1,o_eps=0.001") == "o_eps=0.001"
  assert lp.at_base_width("mixer_out") == lp.at_base_width("head_sp") == ""
  assert lp.at_base_width("embed:x:0.125,q_proj:-1") == "embed:x:0.125"   # changes the base
  assert lp.at_base_width("x:-1,embed:out:-1") == ""          # a power form, whatever its NAME
  rows = dataclasses.replace(P, rows=(("paper", ""), ("paper", "sp_tied")))
  done = (rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -7.0)
          + rows_for("paper", 128, "fine", P.seeds, np.arange(-8.5, -5.25, 0.5), -6.8))
  plan = [(j["variant"], j["width"], tuple(j["log2_lrs"])) for j in lp.Plan(rows, done).jobs()]
  # No base-width job for the variant: its wide grid centres on the plain row's base optimum.
  assert plan == [("", 1024, tuple(np.arange(-8.0, -5.75, 0.5))),
                  ("sp_tied", 1024, tuple(np.arange(-8.0, -5.75, 0.5)))]
  # A variant with base-width runs of its own keeps using them.
  own = done + rows_for("paper", 128, "pilot", (100,), np.arange(-12.0, -3.5), -5.0,
                        variant="sp_tied")
  assert ("sp_tied", 128) in [(j["variant"], j["width"]) for j in lp.Plan(rows, own).jobs()]


def test_analyze_also_judges_mup_against_the_const_init_sp_row():
  """μP rows get `loss_vs_const_init_sp` against sp+const_init (whose base-width runs are SP's),
  beside `loss_vs_sp` against TP5's fan-in SP; each where that row has the width."""
  xs = np.arange(-4.0, 0.1, 0.5)
  rows = (rows_for("mup", 128, "fine", (0, 1, 2), xs, -2.0)
          + rows_for("mup", 1024, "fine", (0, 1, 2), xs, -2.0)
          + rows_for("sp", 128, "fine", (0, 1), xs, -2.0)
          + rows_for("sp", 1024, "fine", (0, 1), xs, -3.0, variant="const_init"))
  for r in rows:                       # the constant-init SP 0.02 better than μP at 1024
    r["val_loss"] -= 0.02 if r["variant"] == "const_init" else 0.0
  s = lp.analyze(rows, base_width=128)
  mup = s["paper/mup/adamw"]
  assert mup["loss_vs_sp"]["by_width"].keys() == {128}
  const = mup["loss_vs_const_init_sp"]
  assert const["against"] == "paper/sp/adamw[const_init]"
  assert const["by_width"].keys() == {128, 1024}
  assert const["by_width"][1024]["gap"] == pytest.approx(0.02 + 0.0005)
  assert const["by_width"][128]["gap"] == pytest.approx(0.0005)      # SP's own base runs
  assert "loss_vs_const_init_sp" not in s["paper/sp/adamw"]
  table = lp.markdown_loss_table(s)
  assert "| mup | adamw | 1024 | 1.0010 [" in table and "+0.0205 [" in table
  assert table.count("| sp+const_init |") == 2


def test_sp_rows_use_mups_base_width_runs_where_they_have_none():
  """At the base width μP and SP are one model: an SP row without base-width runs of its own
  (e.g. with a new base constant) uses μP's runs of the same variant, planned once, under μP's
  name and with μP's seeds; an SP row's own runs still come first."""
  both = dataclasses.replace(P, rows=(("mup", ""), ("sp", "")))
  # A fresh sweep: only μP plans the base width (no second, identical pilot).
  assert jobs([], both) == [("mup", 128, "pilot", (100,), tuple(np.arange(-12.0, -3.5, 1.0)))]
  pilot = rows_for("mup", 128, "pilot", (100,), np.arange(-12.0, -3.5), -7.3)
  assert [j[:4] for j in jobs(pilot, both)] == [("mup", 128, "fine", P.seeds)]
  done = pilot + rows_for("mup", 128, "fine", P.seeds, np.arange(-9.0, -5.75, 0.5), -7.0)
  # Both rows' wide grids centre on μP's base optimum (SP's shifted by its slope, −1 · 3).
  assert jobs(done, both) == [("mup", 1024, "fine", P.seeds, tuple(np.arange(-8.0, -5.75, 0.5))),
                              ("sp", 1024, "fine", P.sp_seeds, tuple(np.arange(-11.5, -8.25, 0.5)))]
  # An SP row alone (`--rows=sp`) plans μP's base runs itself, with μP's seeds.
  alone = dataclasses.replace(P, rows=(("sp", ""),))
  assert jobs([], alone) == [("mup", 128, "pilot", (100,), tuple(np.arange(-12.0, -3.5, 1.0)))]
  assert [j[:4] for j in jobs(pilot, alone)] == [("mup", 128, "fine", P.seeds)]
  assert [j[:2] for j in jobs(done, alone)] == [("sp", 1024)]
  # SP's own base-width runs win over μP's.
  own = done + rows_for("sp", 128, "pilot", (100,), np.arange(-12.0, -3.5), -9.0)
  assert ("sp", 128, "fine", P.sp_seeds) in [j[:4] for j in jobs(own, alone)]
  # The paper's pair is not declared one model at the base width: each plans its own.
  assert {j[0] for j in jobs([])} == {"paper", "paper_sp"}


def test_analyze_gives_an_sp_row_without_base_runs_mups():
  xs = np.arange(-4.0, 0.1, 0.5)
  rows = [dict(r, scheme="heads") for r in
          rows_for("mup", 128, "fine", (0, 1, 2), xs, -2.0, variant="head_std=0.08")
          + rows_for("mup", 1024, "fine", (0, 1, 2), xs, -2.0, variant="head_std=0.08")
          + rows_for("sp", 1024, "fine", (0, 1), xs - 3.0, -5.0, variant="head_std=0.08")]
  s = lp.analyze(rows, base_width=128)
  sp = s["heads/sp/adamw[head_std=0.08]"]
  assert sp["base_width_runs_from"] == "mup+head_std=0.08" and sp["runs"] == 27 + 18
  assert sp["drift_log2"] == pytest.approx(3.0, abs=1e-6)
  assert s["heads/mup/adamw[head_std=0.08]"]["base_width_runs_from"] is None
  assert s["heads/mup/adamw[head_std=0.08]"]["loss_vs_sp"]["by_width"][128]["gap"] == \
      pytest.approx(0.0)
