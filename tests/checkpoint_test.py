"""Checkpoints: the config guard, save/restore round trips, and exact resume after SIGTERM/SIGKILL
of real `python -m gdn_jax.train` processes (compared with an uninterrupted run)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import checkpoint as ckpt
from gdn_jax.data import pipeline
from tests.train_test import REPO, TINY, make_token_files, read_metrics


def test_config_guard(tmp_path):
  cfg = json.dumps({"a": 1, "b": {"c": 2}})
  assert ckpt.check_or_write_config(tmp_path, cfg) is False
  assert ckpt.check_or_write_config(tmp_path, cfg) is True
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match=r"b\.c: 2 in the workdir, 3 now"):
    ckpt.check_or_write_config(tmp_path, json.dumps({"a": 1, "b": {"c": 3}}))
  assert (tmp_path / "config.json").read_text() == before


def test_a_field_added_later_resumes_runs_without_it_at_its_old_value(tmp_path):
  """`optimizer.embedding_lr_scale` (ADDED_FIELDS): a config.json written before the field
  existed resumes with the value that reproduces it (1.0), and the field is recorded; any other
  value is a different config."""
  old = {"a": 1, "optimizer": {"lr": 0.1}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match=r"optimizer\.embedding_lr_scale: 1\.0 in the workdir, "
                                       r"0\.5 now"):
    ckpt.check_or_write_config(tmp_path, json.dumps(
        {"a": 1, "optimizer": {"lr": 0.1, "embedding_lr_scale": 0.5}}))
  assert json.loads((tmp_path / "config.json").read_text()) == old          # untouched
  new = {"a": 1, "optimizer": {"lr": 0.1, "embedding_lr_scale": 1.0}}
  assert ckpt.check_or_write_config(tmp_path, json.dumps(new)) is True
  assert json.loads((tmp_path / "config.json").read_text()) == new
  assert ckpt.check_or_write_config(tmp_path, json.dumps(new), added_fields=()) is True
  (tmp_path / "config.json").write_text(json.dumps(old))                     # without the rule:
  with pytest.raises(ValueError, match=r"embedding_lr_scale: '<missing>' in the workdir"):
    ckpt.check_or_write_config(tmp_path, json.dumps(new), added_fields=())


def test_save_restore_state_and_iterator(tmp_path):
  paths = make_token_files(tmp_path / "data", num_bytes=20_000)
  make_iter = lambda: pipeline.train_iterator(paths["train"], seq_len=16, batch_size=2, seed=3)
  it = make_iter()
  checkpointer = ckpt.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  states = {}
  for step in (1, 2, 3):
    next(it)
    states[step] = {"w": jnp.full((3, 4), float(step)), "step": np.asarray(step, np.int64),
                    "rng": jax.random.key_data(jax.random.key(step))}
    checkpointer.save(step, states[step], it)
  checkpointer.wait()
  expected_next = next(it)
  assert checkpointer.all_steps() == [2, 3]  # max_to_keep
  it2 = make_iter()
  restored = checkpointer.restore(3, ckpt.abstract_like(states[3]), it2)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, restored, states[3])
  np.testing.assert_array_equal(next(it2), expected_next)


# ---- Subprocess runs: SIGTERM, SIGKILL, exact resume. ----

STEPS = 80


def _cmd(paths, workdir):
  overrides = dict(
      **{"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
         "model.head_k_dim": 16, "model.head_v_dim": 16, "model.chunk_size": 16,
         "model.rule_impl": "chunked", "data.seq_len": 32, "data.batch_size": 4,
         "data.train_path": paths["train"], "data.val_path": paths["val"],
         "optimizer.warmup_steps": 5, "train.num_steps": STEPS, "train.log_every": 1,
         "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 10,
         "train.max_to_keep": 2, "train.sample_tokens": 0})
  return ([sys.executable, "-m", "gdn_jax.train", f"--config={TINY}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


def _start(paths, workdir, log):
  # A shared persistent compilation cache: later runs skip XLA compilation (same executable).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(workdir).parent / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         # Compiling the train and eval steps is most of the time: XLA's optimisations would add
         # ~40% and the tiny model needs no speed (every run here compiles with the same options).
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  return subprocess.Popen(_cmd(paths, workdir), cwd=REPO, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def _last_step(workdir) -> int:
  try:
    return max(read_metrics(workdir), default=0)
  except (FileNotFoundError, json.JSONDecodeError):  # a line being written
    return 0


def _interrupt(proc, workdir, sig, *, min_step, need_checkpoint, log):
  """Sends `sig` once step ≥ min_step is logged (and a committed checkpoint ≥ need_checkpoint)."""
  deadline = time.time() + 600  # generous: CI machines may be loaded
  while time.time() < deadline:
    assert proc.poll() is None, (f"the run ended before it could be interrupted (min_step="
                                 f"{min_step}):\n{log.read_text()[-3000:]}")
    committed = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    if _last_step(workdir) >= min_step and max(committed, default=-1) >= need_checkpoint:
      proc.send_signal(sig)
      return proc.wait(timeout=120)
    time.sleep(0.005)
  raise AssertionError("timed out waiting for the run to progress")


@pytest.mark.slow
def test_sigterm_and_sigkill_resume_exactly(tmp_path):
  paths = make_token_files(tmp_path / "data", num_bytes=60_000)
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  ref = _start(paths, ref_dir, tmp_path / "ref.log")
  # 1) SIGTERM: saves the current step and exits 0.
  proc = _start(paths, run_dir, tmp_path / "run1.log")
  rc = _interrupt(proc, run_dir, signal.SIGTERM, min_step=12, need_checkpoint=10,
                  log=tmp_path / "run1.log")
  log1 = (tmp_path / "run1.log").read_text()
  assert rc == 0, log1
  stopped = int(log1.split("SIGTERM: saved step ")[1].split(";")[0])
  assert stopped < STEPS and (run_dir / "checkpoints" / str(stopped)).is_dir()
  # 2) Rerun resumes there; SIGKILL it mid-run (a save may be in flight).
  proc = _start(paths, run_dir, tmp_path / "run2.log")
  rc = _interrupt(proc, run_dir, signal.SIGKILL, min_step=stopped + 25,
                  need_checkpoint=stopped // 10 * 10 + 20, log=tmp_path / "run2.log")
  assert rc == -signal.SIGKILL, (tmp_path / "run2.log").read_text()[-3000:]
  assert f"resumed from step {stopped} " in (tmp_path / "run2.log").read_text()
  # 3) Rerun resumes from the last committed checkpoint and finishes.
  proc = _start(paths, run_dir, tmp_path / "run3.log")
  assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()
  log3 = (tmp_path / "run3.log").read_text()
  resumed = int(log3.split("resumed from step ")[1].split()[0])
  assert resumed >= stopped // 10 * 10 + 20
  assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()
  # The loss curve (last record per step) equals the uninterrupted run's bit for bit.
  got, want = read_metrics(run_dir), read_metrics(ref_dir)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
  assert [got[s]["grad_norm"] for s in got] == [want[s]["grad_norm"] for s in got]
