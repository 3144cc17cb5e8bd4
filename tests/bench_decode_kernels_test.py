"""experiments/bench_decode_kernels.py: its knob grids, and a run of the tiny config end to end on
CPU (kernels interpreted) through its flags, as the GPU call runs it."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

from experiments import bench_decode_kernels as bdk


def test_grids_start_at_the_default_and_hold_no_duplicates():
  from kernels_pallas.config import DecodeConfig
  default = bdk.default_gemv_knobs()
  c = DecodeConfig()
  assert default == dict(block_n=c.gemv_block_n, block_k=c.gemv_block_k,
                         min_programs=c.gemv_min_programs, num_warps=c.gemv_num_warps,
                         num_stages=c.gemv_num_stages)
  grids = {name: bdk.gemv_grid(bdk.Options(grid=name)) for name in ("oat", "small", "full")}
  for grid in grids.values():
    assert grid[0] == default
    assert len({tuple(k.items()) for k in grid}) == len(grid)
  values = {name: getattr(bdk.Options(), name) for name in bdk.GEMV_KNOBS}
  others = sum(len([v for v in vs if v != default[name]]) for name, vs in values.items())
  assert len(grids["oat"]) == 1 + others                       # each knob's other values
  in_product = lambda k: all(k[n] in bdk.SMALL_PRODUCT[n] for n in bdk.GEMV_KNOBS)
  product = [k for k in grids["small"] if in_product(k)]
  assert len(product) == math.prod(len(v) for v in bdk.SMALL_PRODUCT.values()) == 32
  oat_outside = [k for k in grids["oat"] if not in_product(k)]
  assert len(grids["small"]) == len(oat_outside) + 32
  assert len(grids["full"]) == (math.prod(len(v) for v in values.values())
                                + (not all(default[n] in values[n] for n in values)))
  narrowed = bdk.gemv_grid(bdk.Options(block_n=(64,), block_k=(128,), min_programs=(264,),
                                       num_warps=(4,), num_stages=(2, 3)))
  small = dict(block_n=64, block_k=128, min_programs=264, num_warps=4)
  assert default["block_n"] != 64 and default["min_programs"] != 264
  assert narrowed[1:] == [dict(default, block_n=64), dict(default, min_programs=264),
                          dict(default, num_stages=3),                   # one knob at a time
                          dict(small, num_stages=2), dict(small, num_stages=3)]   # the product
  rule = bdk.rule_grid(bdk.Options())
  assert rule[0] == dict(block_v=None, num_warps=4) and len(rule) == 1 + 5 * 4


def test_512m_shapes_and_launches():
  """The kinds' products are the 512M model's (N_in = 9228 as in its profile), and settings
  that launch the same kernel are recognised as such."""
  s = bdk.Shapes.of("512m")
  assert (s.D, s.N_in, s.F, s.vocab, s.H * s.V) == (1024, 9228, 2816, 32000, 3072)
  opts = bdk.Options(layers=0)
  inproj = bdk.make_case("inproj", s, opts, tiny=False)
  assert (inproj.K, inproj.N, inproj.layers) == (1024, 9228, 15)   # ≥ 256 MiB of distinct W
  assert bdk.make_case("head", s, opts, tiny=False).layers == 8
  assert bdk.make_case("rule", s, opts, tiny=False).layers == 171   # 1.5 MiB states
  gateup = bdk.make_case("gateup", s, opts, tiny=False)
  assert not gateup.sum_splits                   # its partials go to the down product at batch 1
  assert bdk.make_case("gateup", s, bdk.Options(batch=2), tiny=False).sum_splits
  knobs = dict(block_n=64, block_k=128, min_programs=256, num_warps=4, num_stages=2)
  assert inproj.launch(knobs) == inproj.launch(dict(knobs, min_programs=264))   # 2 splits
  assert inproj.launch(knobs)["splits"] == 2
  assert inproj.launch(dict(knobs, block_n=128, min_programs=528))["splits"] == 8
  assert inproj.launch(dict(knobs, block_n=3)) is None
  down = bdk.make_case("down_swiglu", s, opts, tiny=False)
  assert down.launch(knobs)["input_splits"] == 4              # the gate/up GEMV's partials
  assert bdk.make_case("gateup_norm", s, opts, False).launch(knobs)["input_splits"] == 24


def _rows_ok(entry, tolerance):
  for row in entry["rows"]:
    if row.get("error"):
      continue
    assert math.isfinite(row["us"]) and row["us"] > 0 and row["gb_s"] > 0, row
    assert row["rel_err"] <= tolerance and not row["wrong"], row


def test_tiny_run_records_every_setting_and_the_bad_one_as_an_error(tmp_path):
  """The tiny config through the command line: every setting of a few kinds is a row with a
  finite time and a small error against the float32 reference, a refused block size is an error
  row (the run goes on), and the JSON and Markdown are written."""
  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "experiments.bench_decode_kernels", "--config=tiny",
         "--kernels=inproj,down_swiglu,gateup_norm,rule", "--grid=oat", "--block_n=16,3",
         "--block_k=64", "--min_programs=4", "--num_warps=4", "--num_stages=2,3",
         "--rule_block_v=8,16", "--rule_num_warps=4", "--compile_workers=2",
         f"--out_dir={tmp_path}", "--tag=t"]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "bench_decode_kernels_cpu_tiny_t.json").read_text())
  md = (tmp_path / "bench_decode_kernels_cpu_tiny_t.md").read_text()
  assert list(res["kinds"]) == ["inproj", "down_swiglu", "gateup_norm", "rule"]
  assert res["bandwidth_GBps"] > 0 and res["jaxlib"] and res["date"]
  for kind, entry in res["kinds"].items():
    assert entry["layers"] == 2 and f"## {kind}" in md
    rows = entry["rows"]
    assert rows[0]["default"] and rows[0]["us"] > 0
    assert entry["xla"]["us"] > 0 and entry["xla"]["rel_err"] <= 1e-2
    _rows_ok(entry, res["options"]["tolerance"])
    if kind == "rule":
      assert [r["knobs"]["block_v"] for r in rows] == [None, 8, 16]
      assert all("error" not in r for r in rows)
      continue
    assert len(rows) == 6                       # default, bn16, bn3, bk64, mp4, st3
    bad = [r for r in rows if r["knobs"]["block_n"] == 3]
    assert len(bad) == 1 and "block_n" in bad[0]["error"] and "us" not in bad[0]
    assert sum("error" in r for r in rows) == 1
    for r in rows:                              # a shared launch shares the numbers
      if "same_launch_as" in r:
        assert r["us"] == rows[r["same_launch_as"]]["us"]
  assert "Errors:" in md and "block_n`=3" in md
  assert "inproj " in proc.stdout and "error: ValueError" in proc.stdout   # a line per row


def test_a_spent_budget_skips_the_kinds_and_still_writes(tmp_path):
  res = bdk.run(bdk.Options(config="tiny", kernels=("inproj", "rule"), time_budget_s=0,
                            out_dir=str(tmp_path)), log=lambda *a: None)
  assert res["kinds"] == {} and len(res["skipped"]) == 2
  assert json.loads((tmp_path / "bench_decode_kernels_cpu_tiny.json").read_text())["skipped"]


def test_unknown_kinds_and_batches_are_refused(tmp_path):
  with pytest.raises(ValueError, match="kernels"):
    bdk.run(bdk.Options(config="tiny", kernels=("inproj", "mlp"), out_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="batch"):
    bdk.run(bdk.Options(config="tiny", batch=9, out_dir=str(tmp_path)))


def test_mosaic_gpu_gemv_rows_for_the_plain_kinds_only(tmp_path):
  """--gemv_impls adds the Mosaic GPU GEMVs (without and with PDL; default tiles, 64 columns,
  fewer programs)
  to the plain and norm GEMV kinds (not the SwiGLU one), as launches of their own; a product it cannot tile (N = 9228 is
  no multiple of 128) gets no launch; an unknown implementation is refused. Through a tiny run:
  its rows are correct against the float32 reference."""
  s = bdk.Shapes.of("512m")
  opts = bdk.Options(gemv_impls=("triton", "mgpu", "mgpu_pdl"), grid="oat", block_n=(64,),
                     block_k=(128,), min_programs=(528,), num_warps=(4,), num_stages=(2,))
  impls = lambda case: [k.get("impl") for k in case.variants(opts)]
  oproj = bdk.make_case("oproj", s, opts, tiny=False)
  assert impls(oproj) == [None, None] + ["mgpu"] * 4 + ["mgpu_pdl"] * 4
  assert impls(bdk.make_case("gateup_norm", s, opts, tiny=False)) == impls(oproj)
  assert impls(bdk.make_case("down_swiglu", s, opts, tiny=False)) == [None, None]
  mgpu = [k for k in oproj.variants(opts) if k.get("impl") == "mgpu_pdl"]
  assert oproj.launch(mgpu[0]) == dict(block_n=128, block_k=128, splits=24, impl="mgpu_pdl")
  assert bdk.make_case("inproj", s, opts, tiny=False).launch(mgpu[0]) is None
  assert bdk.make_case("oproj", s, bdk.Options(batch=2), tiny=False).launch(mgpu[0]) is None
  with pytest.raises(ValueError, match="gemv_impls"):
    bdk.gemv_grid(bdk.Options(gemv_impls=("cutlass",)))
  res = bdk.run(bdk.Options(config="tiny", kernels=("head", "gateup_norm"), grid="oat",
                            block_n=(128,),
                            block_k=(128,), min_programs=(528,), num_warps=(4,),
                            num_stages=(2,), gemv_impls=("mgpu_pdl",), compile_workers=2,
                            out_dir=str(tmp_path)), log=lambda *a: None)
  for kind in ("head", "gateup_norm"):
    rows = res["kinds"][kind]["rows"]
    assert [r["knobs"].get("impl") for r in rows] == [None] + ["mgpu_pdl"] * 4
    _rows_ok(res["kinds"][kind], res["options"]["tolerance"])
    assert all("us" in r for r in rows), rows
