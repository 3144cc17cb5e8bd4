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
