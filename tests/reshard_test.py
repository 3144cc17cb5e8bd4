"""Checkpoints that move between device counts and meshes: orbax restores every array into the
new mesh's shardings bit for bit, and a run resumed on another mesh (8 devices → 1 → 8)
follows the uninterrupted run's losses.

The runs need several devices, so they run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (or 1) set before jax starts.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gdn_jax import checkpoint as ckpt
from gdn_jax.data import pipeline
from tests.train_test import REPO, make_token_files


def _run(script: str, num_devices: int, tmp_path, *args: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
         # Runs on the same mesh (the reference and a resumed run) compile once.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         # Compiling the train and eval steps is most of the time: XLA's optimisations would add
         # ~40% and the tiny model needs no speed (every run here compiles with the same options).
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT")[1])


def test_config_guard_lets_the_mesh_change(tmp_path):
  cfg = lambda mesh, lr=1e-3: json.dumps({"mesh": mesh, "optimizer": {"lr": lr}})
  assert ckpt.check_or_write_config(tmp_path, cfg({"data": 4, "model": 2})) is False
  assert ckpt.check_or_write_config(tmp_path, cfg({"data": 1, "model": 1})) is True
  # config.json records the latest layout.
  assert json.loads((tmp_path / "config.json").read_text())["mesh"] == {"data": 1, "model": 1}
  with pytest.raises(ValueError, match=r"optimizer\.lr: 0\.001 in the workdir, 0\.002 now"):
    ckpt.check_or_write_config(tmp_path, cfg({"data": 8, "model": 1}, lr=2e-3))
  assert json.loads((tmp_path / "config.json").read_text())["mesh"] == {"data": 1, "model": 1}


def test_data_state_restores_under_another_process_count(tmp_path):
  paths = make_token_files(tmp_path / "data", num_bytes=20_000)
  make_iter = lambda: pipeline.train_iterator(paths["train"], seq_len=16, batch_size=2, seed=3)
  it = make_iter()
  for _ in range(3):
    next(it)
  saved = tmp_path / "saved"
  saved.mkdir()
  for i in range(2):  # what two processes write (they step together: the same state)
    (saved / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
  restored = ckpt.DataHandler().restore(saved, item=make_iter())
  assert restored.get_state() == it.get_state()
  np.testing.assert_array_equal(next(restored), next(it))
  (saved / "process_1-of-2.json").write_text(json.dumps({"next_index": 9}))
  with pytest.raises(ValueError, match=r"process_0-of-2\.json.*differ; expected process_0-of-1"):
    ckpt.DataHandler().restore(saved, item=make_iter())
  with pytest.raises(ValueError, match="are missing"):
    ckpt.DataHandler().restore(tmp_path / "data", item=make_iter())


# Saves a state sharded on the 4 × 2 mesh, restores it onto 1 device, 2 × 2 and 8 × 1.
_RESTORE_SCRIPT = r"""
import json, sys
import jax, numpy as np
from gdn_jax import checkpoint as ckpt, sharding
from gdn_jax.data import pipeline
from tests.train_test import make_token_files
assert len(jax.devices()) == 8, jax.devices()
tmp = sys.argv[1]
paths = make_token_files(tmp + "/data", num_bytes=20_000)
make_iter = lambda: pipeline.train_iterator(paths["train"], seq_len=16, batch_size=2, seed=3)
rng = np.random.default_rng(0)
normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
mixer = {"q_proj": {"kernel": normal(32, 64)}, "o_proj": {"kernel": normal(64, 32)},
         "A_log": normal(2)}
params = {"embed": {"embedding": normal(256, 32)}, "blocks": {"0": {"mixer": mixer}}}
def state_on(mesh):
  return {"params": jax.device_put(params, sharding.tree_shardings(params, mesh)),
          "step": np.asarray(7, np.int64), "rng": jax.random.key_data(jax.random.key(7))}
it = make_iter()
next(it), next(it)
checkpointer = ckpt.Checkpointer(tmp + "/ckpt")
saved = state_on(sharding.make_mesh(4, 2))
checkpointer.save(7, saved, it)
checkpointer.close()
want_batch = next(it)
out = {}
for name, (data, model, n) in {"1": (1, 1, 1), "2x2": (2, 2, 4), "8x1": (8, 1, 8)}.items():
  target = state_on(sharding.make_mesh(data, model, jax.devices()[:n]))
  it2 = make_iter()
  checkpointer = ckpt.Checkpointer(tmp + "/ckpt")
  got = checkpointer.restore(7, ckpt.abstract_like(target), it2)
  checkpointer.close()
  leaves = lambda tree: jax.tree.leaves(tree["params"])
  out[name] = {
      "equal": all(np.array_equal(a, b)
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved))),
      "same_sharding": all(a.sharding == b.sharding for a, b in zip(leaves(got), leaves(target))),
      "q_spec": list(got["params"]["blocks"]["0"]["mixer"]["q_proj"]["kernel"].sharding.spec),
      "next_batch_equal": bool(np.array_equal(next(it2), want_batch))}
print("RESULT" + json.dumps(out))
"""


def test_restore_onto_other_meshes_is_exact(tmp_path):
  out = _run(_RESTORE_SCRIPT, 8, tmp_path, str(tmp_path))
  for name, result in out.items():
    assert result["equal"], name                 # bit for bit
    assert result["same_sharding"], name         # laid out on the new mesh
    assert result["next_batch_equal"], name      # the data position too
  assert out["1"]["q_spec"] == [None, None]
  assert out["2x2"]["q_spec"] == ["data", "model"]
  assert out["8x1"]["q_spec"] == [None, "data"]  # FSDP on the larger axis


# Runs `train` once per plan entry: [workdir, data, model, num_devices, resume_from or null].
# resume_from deletes the checkpoints after that step first (as if the run had died there).
_TRAIN_SCRIPT = r"""
import json, pathlib, shutil, sys
import jax
from gdn_jax import train
from tests.train_test import tiny_config, read_metrics
paths, plan = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for workdir, data, model, n, resume_from in plan:
  assert len(jax.devices()) >= n, jax.devices()
  if resume_from is not None:
    for d in pathlib.Path(workdir, "checkpoints").iterdir():
      if d.name.isdigit() and int(d.name) > resume_from:
        shutil.rmtree(d)
  c = tiny_config(paths, num_steps=6, checkpoint_every=2, max_to_keep=10)
  c.data.batch_size = 8
  c.mesh.update(data=data, model=model)
  summary = train.train(c, workdir, devices=jax.devices()[:n], log=lambda s: None)
  metrics = read_metrics(workdir)
  out.append({"start": summary["start_step"], "val_loss": summary["val_loss"],
              "q_spec": summary["param_specs"]["blocks.0.mixer.q_proj.kernel"],
              "loss": {s: metrics[s]["loss"] for s in sorted(metrics)}})
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_resume_on_other_device_counts_matches_uninterrupted_run(tmp_path):
  paths = json.dumps(make_token_files(tmp_path / "data", num_bytes=40_000))
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  # 8 devices (4 × 2) train steps 1–6 and save every 2 steps; a process with one device resumes
  # at step 2, then one with 8 devices (4 × 2 again) at step 4. Two meshes only: each costs a
  # compilation (~20 s on 2 cores); 4 × 2 → 2 × 2 and → 8 × 1 are checked above, bit for bit.
  [first] = _run(_TRAIN_SCRIPT, 8, tmp_path, paths, json.dumps([[run, 4, 2, 8, None]]))
  reference, one = _run(_TRAIN_SCRIPT, 1, tmp_path, paths,
                        json.dumps([[ref, 1, 1, 1, None], [run, 1, 1, 1, 2]]))
  [eight] = _run(_TRAIN_SCRIPT, 8, tmp_path, paths, json.dumps([[run, 4, 2, 8, 4]]))
  assert [r["start"] for r in (first, reference, one, eight)] == [0, 0, 2, 4]
  assert [r["q_spec"] for r in (first, one, eight)] == [
      ["data", "model"], [None, None], ["data", "model"]]
  want = reference["loss"]
  assert list(want) == [str(s) for s in range(1, 7)]
  # The last record per step: steps 1–2 on 4 × 2, 3–4 on one device, 5–6 on 4 × 2.
  got = eight["loss"]
  assert got == ({s: first["loss"][s] for s in "12"} | {s: one["loss"][s] for s in "34"}
                 | {s: eight["loss"][s] for s in "56"})
  # Sharded reductions add float32 terms in another order (~1e-7 relative each); a few Adam steps
  # keep the losses within 1e-5 relative (the tolerance of tests/sharding_test.py).
  assert list(got) == list(want)
  assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-5, abs=1e-6)
  assert [first["loss"][s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-5)
  assert eight["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
  print("max relative loss difference:",
        max(abs(got[s] - want[s]) / abs(want[s]) for s in want))
