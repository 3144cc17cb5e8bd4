"""experiments.merge_jsonl: the copies' new lines are appended once, in order; a truncated copy
is refused before anything is written."""
import json

import pytest

from experiments import merge_jsonl


def _write(path, rows, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
  return str(path)


def test_new_lines_of_every_copy_are_appended_once_in_order(tmp_path):
  old = [{"run": 0}, {"run": 1}]
  target = _write(tmp_path / "t.jsonl", old)
  a = _write(tmp_path / "a.jsonl", old + [{"run": "a1"}, {"run": "a2"}])
  b = _write(tmp_path / "b.jsonl", old + [{"run": "b1"}, {"run": "a1"}])
  assert merge_jsonl.merge(target, [a, b]) == 3
  lines = [json.loads(line) for line in open(target)]
  assert lines == old + [{"run": "a1"}, {"run": "a2"}, {"run": "b1"}]
  assert merge_jsonl.merge(target, [a, b]) == 0     # idempotent


def test_a_truncated_copy_is_refused_and_nothing_is_written(tmp_path):
  target = _write(tmp_path / "t.jsonl", [{"run": 0}])
  good = _write(tmp_path / "a.jsonl", [{"run": "a1"}])
  cut = _write(tmp_path / "b.jsonl", [{"run": "b1"}], tail='{"run": "b')
  before = open(target).read()
  with pytest.raises(ValueError, match=r"b\.jsonl:2 is not a JSON line"):
    merge_jsonl.merge(target, [good, cut])
  assert open(target).read() == before


def _run_sweep_parallel(tmp_path, jobs):
  """Runs experiments/device/sweep_parallel.sh with a stand-in `python` that appends one line to
  the results file its flags name (`--tag=new` writes to another slice's file, `--tag=none`
  writes nothing), as experiments.lr_transfer would."""
  import os
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "python"
  fake.write_text(
      f"#!{sys.executable}\n"
      "import sys\n"
      "args = dict(a[2:].split('=', 1) for a in sys.argv if a.startswith('--') and '=' in a)\n"
      "tag = args.get('tag', 'heads')\n"
      "print('job', args)\n"
      "if tag != 'none':\n"
      "  name = 'lr_transfer_heads.jsonl' if tag == 'heads' else 'lr_transfer_' + tag + '.jsonl'\n"
      "  open(args['results_dir'] + '/' + name, 'a').write('{\"job\": \"%s\"}\\n' % args['w'])\n")
  fake.chmod(0o755)
  carried = _write(tmp_path / "lr_transfer_heads.jsonl", [{"run": 0}])
  out = tmp_path / "out"
  out.mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), JSONL=carried)
  proc = subprocess.run(["bash", str(repo / "experiments/device/sweep_parallel.sh"), *jobs],
                        env=env, capture_output=True, text=True, timeout=60)
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  return proc, out, files


def test_sweep_parallel_returns_only_changed_copies(tmp_path):
  proc, out, files = _run_sweep_parallel(
      tmp_path, ["0.3 --w=1", "0.3 --w=2 --tag=heads_heldout_b", "0.3 --w=3 --tag=none"])
  assert proc.returncode == 0, proc.stderr
  # Job 1 changed the carried file; job 2 wrote another slice's file; job 3 wrote nothing: the
  # unchanged copies of jobs 2 and 3 do not take up the device tool's 8 returned files.
  assert files == ["log1.txt", "log2.txt", "log3.txt", "r1/lr_transfer_heads.jsonl",
                   "r2/lr_transfer_heads_heldout_b.jsonl"]
  assert (out / "r1/lr_transfer_heads.jsonl").read_text().splitlines()[-1] == '{"job": "1"}'
  assert "8" not in proc.stderr


def test_sweep_parallel_joins_the_logs_of_many_jobs_and_warns_past_eight_files(tmp_path):
  proc, out, files = _run_sweep_parallel(tmp_path, [f"0.1 --w={i}" for i in range(1, 9)])
  assert proc.returncode == 0, proc.stderr
  assert "log.txt" in files and not any(f.startswith("log1") for f in files)
  log = (out / "log.txt").read_text()
  assert all(f"==> job {i}: 0.1 --w={i}" in log for i in range(1, 9))
  assert len(files) == 9 and "at most 7 jobs" in proc.stderr
