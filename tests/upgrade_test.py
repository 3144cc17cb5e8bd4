"""gdn_jax.train.upgrade: a run directory in the layout before multi_transform resumes after the
upgrade, with the optimizer state moved leaf by leaf and the losses of an uninterrupted run.

The old-layout run is built without the old code: a run of the current trainer is stopped at a
checkpoint, whose optimizer state is rewritten into the tree of the earlier per-leaf chain
(`legacy_optimizer` of tests/mup_optimizer_test.py, with the clipping in front as the old
make_tx had it) and saved with the trainer's own Checkpointer, and whose config.json loses the
four fields added since.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from gdn_jax import checkpoint as ckpt
from gdn_jax import mup
from gdn_jax import train as train_lib
from gdn_jax.data import pipeline
from gdn_jax.train import upgrade
from tests.mup_optimizer_test import legacy_optimizer
from tests.train_test import REPO, make_token_files, read_metrics, tiny_config

STEPS, STOP = 4, 2  # the reference runs 4 steps; the old-layout run stops at its checkpoint 2
QUIET = lambda s: None


def config_for(paths, optimizer):
  c = tiny_config(paths, num_steps=STEPS, checkpoint_every=STOP, max_to_keep=5)
  # A μP base narrower than the model: several groups, so each label's trace is a real part.
  c.mup_base.update(d_model=16, head_k_dim=8, head_v_dim=8)
  c.optimizer.update(name=optimizer)
  c.sp_tied_embedding = False   # the value the upgrade writes (what runs before the field did)
  c.optimizer.sgd_qk_heads_rule = False    # likewise
  if optimizer == "sgd":
    c.optimizer.update(lr=0.05, momentum=0.9)
  return c


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return make_token_files(tmp_path_factory.mktemp("data"), num_bytes=60_000)


@pytest.fixture(scope="module")
def reference(paths, tmp_path_factory):
  """optimizer → the workdir of an uninterrupted run of the current code (checkpoints 2 and 4)."""
  runs = {}

  def get(optimizer):
    if optimizer not in runs:
      workdir = tmp_path_factory.mktemp(f"ref_{optimizer}")
      train_lib.train(config_for(paths, optimizer), str(workdir), log=QUIET)
      runs[optimizer] = workdir
    return runs[optimizer]
  return get


def abstract(config):
  model = nnx.eval_shape(lambda: train_lib.build_model(config))
  _, params = nnx.split(model)
  return model, params


def current_state(workdir, config, step, data_iter):
  """{params, opt_state, step, rng} of a checkpoint in the current layout (moves `data_iter`)."""
  model, params = abstract(config)
  tx = train_lib.make_tx(model, config)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu)
  target = {"params": jax.tree.map(on_cpu, params),
            "opt_state": jax.tree.map(on_cpu, jax.eval_shape(tx.init, params)),
            "step": ckpt.abstract_like({"s": np.asarray(0, np.int64)})["s"],
            "rng": on_cpu(jax.ShapeDtypeStruct((2,), np.uint32))}
  checkpointer = ckpt.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  try:
    return checkpointer.restore(step, target, data_iter)
  finally:
    checkpointer.close()


def data_iterator(config):
  d = config.data
  return pipeline.train_iterator(d.train_path, seed=config.seed, seq_len=d.seq_len,
                                 batch_size=d.batch_size, process_index=0, process_count=1)


def earlier_tx(model, config, *, clip=True):
  """The optimizer before multi_transform (make_tx of f5ff36e: schedule with the peak inside)."""
  o = config.optimizer
  kw = dict(parametrization=config.parametrization, optimizer=o.name,
            base_config=train_lib.base_model_config(config))
  tx = legacy_optimizer(mup.param_groups(model, **kw), optimizer=o.name,
                        learning_rate=train_lib.lr_schedule(config),
                        weight_decay=o.weight_decay, momentum=o.momentum)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if clip else tx


def labels_by_path(model, config):
  labels, _ = mup.param_labels(model, parametrization=config.parametrization,
                               optimizer=config.optimizer.name,
                               base_config=train_lib.base_model_config(config))
  return {mup.key_of(kp): l for kp, l in jax.tree_util.tree_flatten_with_path(labels)[0]}


def groups_of(opt_state):
  """label → that label's chain state inside the current layout's multi_transform."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.MultiTransformState)) if isinstance(s, optax.MultiTransformState)]
  assert len(found) == 1
  return {label: masked.inner_state for label, masked in found[0].inner_states.items()}


def of_type(tree, kind):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def param_leaves(tree) -> dict:
  """Parameter path → array ('value' of the nnx variables dropped), MaskedNodes left out."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
  return {mup.key_of(kp): x for kp, x in flat if not isinstance(x, optax.MaskedNode)}


def to_earlier_layout(state, model, config, *, clip=True):
  """The current opt_state rewritten into the earlier chain's tree: Adam's moments and count as
  they are, the schedule count of any label (all equal), the trace assembled from the labels'."""
  tx = earlier_tx(model, config, clip=clip)
  old = jax.eval_shape(tx.init, state["params"])
  groups = groups_of(state["opt_state"])
  counts = {int(s.count) for g in groups.values() for s in of_type(g, optax.ScaleByScheduleState)}
  assert len(counts) == 1
  traces = {}  # parameter path → its label's trace (each parameter in exactly one label)
  for g in groups.values():
    for trace in of_type(g, optax.TraceState):
      for path, x in param_leaves(trace.trace).items():
        assert path not in traces
        traces[path] = x
  labels = labels_by_path(model, config)

  def fill(node):
    if isinstance(node, optax.ScaleByAdamState):
      return of_type(state["opt_state"], optax.ScaleByAdamState)[0]
    if isinstance(node, optax.ScaleByScheduleState):
      return optax.ScaleByScheduleState(count=of_type(
          groups[sorted(groups)[0]], optax.ScaleByScheduleState)[0].count)
    if isinstance(node, optax.TraceState):
      assert set(traces) == set(labels)
      return optax.TraceState(trace=jax.tree_util.tree_map_with_path(
          lambda kp, _: traces[mup.key_of(kp)], node.trace))
    raise AssertionError(type(node))
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState, optax.TraceState)
  return jax.tree.map(fill, old, is_leaf=lambda x: isinstance(x, kinds))


def make_old_run(reference_dir, workdir, config, *, clip=True):
  """`reference_dir` as the code before the upgrade would have left it at step STOP."""
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(workdir / "checkpoints")
  (workdir / "metrics.jsonl").unlink()
  data_iter = data_iterator(config)
  state = current_state(reference_dir, config, STOP, data_iter)
  model, _ = abstract(config)
  old = dict(state, opt_state=to_earlier_layout(state, model, config, clip=clip))
  checkpointer = ckpt.Checkpointer(workdir / "checkpoints", async_save=False)
  checkpointer.save(STOP, old, data_iter)
  checkpointer.close()
  config_json = json.loads((workdir / "config.json").read_text())
  del config_json["mixer_output_multiplier"], config_json["sp_tied_embedding"]
  del config_json["optimizer"]["nesterov"], config_json["optimizer"]["weight_decay_convention"]
  del config_json["optimizer"]["sgd_qk_heads_rule"]
  (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
  return state, old


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_old_run_resumes_after_upgrade(tmp_path, paths, reference, optimizer):
  config = config_for(paths, optimizer)
  ref_dir, workdir = reference(optimizer), tmp_path / "old"
  before, old = make_old_run(ref_dir, workdir, config)
  data_files = lambda: {f.name: f.read_bytes()
                        for f in (workdir / "checkpoints" / str(STOP) / "data").iterdir()}
  data_before = data_files()
  old_config = (workdir / "config.json").read_text()
  with pytest.raises(ValueError, match="different config"):  # why the upgrade is needed
    train_lib.train(config, str(workdir), log=QUIET)

  if optimizer == "sgd":  # an upgrade killed between its two renames is undone, then redone
    (workdir / "checkpoints").rename(workdir / upgrade.BEFORE)
    (workdir / upgrade.UPGRADING).mkdir()
  keep = optimizer == "adamw"
  summary = upgrade.upgrade_workdir(workdir, keep_old_checkpoints=keep)
  assert summary["steps"] == [STOP] and summary["optimizer"] == optimizer
  assert (workdir / upgrade.BEFORE / str(STOP) / "state").is_dir() == keep
  if keep:
    assert summary["old_checkpoints"] == str(workdir / upgrade.BEFORE)
    shutil.rmtree(workdir / upgrade.BEFORE)
  assert summary["config_fields_added"] == ["mixer_output_multiplier", "sp_tied_embedding",
                                            "optimizer.nesterov",
                                            "optimizer.weight_decay_convention",
                                            "optimizer.sgd_qk_heads_rule"]
  assert (workdir / upgrade.CONFIG_BACKUP).read_text() == old_config
  assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json())
  assert not (workdir / upgrade.UPGRADING).exists()
  assert data_files() == data_before

  # (b) The upgraded state: the old one's arrays, leaf by leaf, in the current tree.
  data_iter = data_iterator(config)
  after = current_state(workdir, config, STOP, data_iter)
  assert int(data_iter.get_state()["next_index"]) == STOP  # the data position kept
  for key in ("params", "step", "rng"):
    assert_trees_equal(after[key], old[key])
  model, _ = abstract(config)
  groups = groups_of(after["opt_state"])
  assert len(groups) >= 3
  old_count = of_type(old["opt_state"], optax.ScaleByScheduleState)[0].count
  for label, chain in groups.items():
    (schedule,) = of_type(chain, optax.ScaleByScheduleState)
    np.testing.assert_array_equal(schedule.count, old_count)
    assert int(schedule.count) == STOP
  if optimizer == "adamw":
    (adam,) = of_type(after["opt_state"], optax.ScaleByAdamState)
    assert_trees_equal(adam, of_type(old["opt_state"], optax.ScaleByAdamState)[0])
    assert not of_type(after["opt_state"], optax.TraceState)
  else:
    old_trace = param_leaves(of_type(old["opt_state"], optax.TraceState)[0].trace)
    labels = labels_by_path(model, config)
    for label, chain in groups.items():
      (trace,) = of_type(chain, optax.TraceState)
      mine = param_leaves(trace.trace)  # this label's parameters only; MaskedNode elsewhere
      assert set(mine) == {p for p, l in labels.items() if l == label}
      for path, x in mine.items():
        np.testing.assert_array_equal(x, old_trace[path])
  # ... which is the state the uninterrupted run had at that step, bit for bit.
  assert_trees_equal(after["opt_state"], before["opt_state"])

  # (c) The resumed run's losses equal the uninterrupted run's. Tolerance 0: the upgrade moves
  # arrays without arithmetic (checked bit for bit above) and a resume on CPU replays the same
  # compiled step on the same inputs, so nothing can differ by rounding (checkpoint_test: resume
  # is bit-exact).
  summary = train_lib.train(config, str(workdir), log=QUIET)
  assert summary["start_step"] == STOP and summary["step"] == STEPS
  got, want = read_metrics(workdir), read_metrics(ref_dir)
  assert sorted(got) == list(range(STOP + 1, STEPS + 1))
  assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
  assert [got[s]["grad_norm"] for s in got] == [want[s]["grad_norm"] for s in got]

  # Upgrading again: the checkpoints are in the current layout; nothing is touched.
  snapshot = (workdir / "config.json").read_bytes()
  with pytest.raises(upgrade.UpgradeError, match="already in the current layout"):
    upgrade.upgrade_workdir(workdir)
  assert (workdir / "config.json").read_bytes() == snapshot


def test_a_current_layout_run_without_a_newer_field_gets_only_the_field(tmp_path, paths,
                                                                         reference):
  """A run of the current optimizer layout whose config.json predates `sgd_qk_heads_rule`:
  the upgrade adds the field with the value that reproduces it (False), leaves every checkpoint
  byte for byte, and the run then resumes with that config."""
  config = config_for(paths, "sgd")
  workdir = tmp_path / "run"
  shutil.copytree(reference("sgd"), workdir)
  config_json = json.loads((workdir / "config.json").read_text())
  del config_json["optimizer"]["sgd_qk_heads_rule"]
  (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
  checkpoints = lambda: {p: p.read_bytes() for p in (workdir / "checkpoints").rglob("*")
                         if p.is_file()}
  before = checkpoints()
  summary = upgrade.upgrade_workdir(workdir)
  assert summary["config_fields_added"] == ["optimizer.sgd_qk_heads_rule"]
  assert summary["steps"] == [] and checkpoints() == before
  assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json())
  with pytest.raises(upgrade.UpgradeError, match="already in the current layout"):
    upgrade.upgrade_workdir(workdir)               # now complete: nothing left to do
  assert train_lib.train(config, str(workdir), log=QUIET)["step"] == STEPS


def test_errors(tmp_path, paths, reference):
  with pytest.raises(upgrade.UpgradeError, match="is not a directory"):
    upgrade.upgrade_workdir(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(upgrade.UpgradeError, match="config.json' not found"):
    upgrade.upgrade_workdir(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text("{")
  with pytest.raises(upgrade.UpgradeError, match="not valid JSON"):
    upgrade.upgrade_workdir(tmp_path / "empty")

  # A layout it does not know (the old chain without the clipping config.json asks for): the
  # error shows what was found; nothing changes.
  config = config_for(paths, "adamw")
  workdir = tmp_path / "odd"
  make_old_run(reference("adamw"), workdir, config, clip=False)
  snapshot = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  with pytest.raises(upgrade.UpgradeError,
                     match=r"opt_state layout not recognised: found \[\{count: array\[\], "
                           r"mu: <params>, nu: <params>\}, None, \{count: array\[\]\}, None\]"):
    upgrade.upgrade_workdir(workdir)
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == snapshot

  # The command line: one line `error: ...`, exit status 1.
  result = subprocess.run([sys.executable, "-m", "gdn_jax.train.upgrade",
                           f"--workdir={reference('adamw')}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: the checkpoints in")
  assert "already in the current layout" in result.stderr


@pytest.mark.parametrize("optimizer, weight_decay, grad_clip, momentum", [
    ("adamw", 0.1, 1.0, 0.0), ("adamw", 0.0, 0.0, 0.0), ("adamw", 0.1, 0.0, 0.0),
    ("sgd", 0.1, 1.0, 0.9), ("sgd", 0.0, 0.0, 0.9), ("sgd", 0.1, 1.0, 0.0)])
def test_layouts_of_every_optimizer_variant(paths, optimizer, weight_decay, grad_clip, momentum):
  """The earlier layout the upgrade expects is the legacy chain's for each variant (decay, clip,
  momentum on or off), and the conversion lands on make_tx's tree (shapes only)."""
  config = config_for(paths, optimizer)
  config.optimizer.update(weight_decay=weight_decay, grad_clip=grad_clip, momentum=momentum)
  model, params = abstract(config)
  legacy = jax.eval_shape(earlier_tx(model, config, clip=bool(grad_clip)).init, params)
  _, old, new = upgrade.abstract_states(config)
  assert upgrade.layout(old) == upgrade.layout(legacy)
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), legacy)
  assert upgrade.layout(upgrade.convert(zeros, new)) == upgrade.layout(new)
  assert upgrade.layout(old) != upgrade.layout(new)
