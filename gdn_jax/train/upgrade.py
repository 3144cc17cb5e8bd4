"""Upgrade a run directory written before μP became an `optax.multi_transform` (2026-12-06).

(Over 400 lines on purpose: a one-off migration whose docstring states, beside the code, the
exact before/after layout of every optimizer-state tree it rewrites; ~60 lines are that record.)

    python -m gdn_jax.train.upgrade --workdir=W [--keep_old_checkpoints]
    upgrade_workdir(W) -> summary dict

Runs started before that day (commit f5ff36e and earlier) cannot be resumed as they are: their
config.json lacks fields the current configs carry, and their optimizer state is the tree
of the earlier chain. This module rewrites both, in place, so that `gdn-train` with the same
config file resumes them.

config.json: the missing fields are added with the defaults that give the earlier behaviour
(`mixer_output_multiplier` False, `sp_tied_embedding` False, `optimizer.nesterov` False,
`optimizer.weight_decay_convention` "", `optimizer.sgd_qk_heads_rule` False); the file before is
kept as config.json.before-upgrade.

Every checkpoint (not only the latest): `opt_state` goes from the earlier chain (per-leaf μP
multipliers, the schedule with the peak LR inside) to `gdn_jax.train.make_tx`'s
(`[clip]` = `clip_by_global_norm` when grad_clip > 0; EmptyState where no array is kept):

    AdamW before:  ([clip], (scale_by_adam, [decay], scale_by_schedule, scale))
          now:     ([clip], (scale_by_adam, multi_transform{label: (identity, [decay],
                                                                    scale_by_schedule, scale)}))
    SGD   before:  ([clip], ([decay], [trace], scale_by_schedule, scale))
          now:     ([clip], multi_transform{label: ([decay], [trace], scale_by_schedule, scale)})

Nothing is computed, only moved: Adam's (count, mu, nu) become the global `scale_by_adam` state
as they are; every label's `ScaleByScheduleState.count` gets the old schedule's count (the
schedule now has peak 1 and the train step multiplies by the peak LR: same count, same LR);
every label's `TraceState.trace` gets the old trace on that label's parameters, the other leaves
stay the `optax.MaskedNode`s that multi_transform's init puts there. Parameters, step, RNG and
the data iterator's state (`data/`, copied byte for byte) are kept as they are.

Both layouts are built from config.json (the old one with stand-ins of the same state types:
the per-leaf transforms kept no state) and compared with each checkpoint's orbax metadata
before anything is read, so an unknown layout is refused naming what was found, and a
checkpoint already in the current layout is left alone.

Atomic: the upgraded checkpoints are written into `checkpoints.upgrading/`, then config.json is
rewritten, then `checkpoints/` is swapped for it by two renames (`checkpoints.before-upgrade/` is
removed afterwards unless asked to keep it). An upgrade killed at any point leaves either the old
run or the upgraded one; rerunning the command finishes the job (a kill between the two renames
is undone first). Single process: the state is read onto this host's CPU.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from gdn_jax import checkpoint as ckpt
from gdn_jax.train import config as config_lib

# (path in config.json, the value that reproduces a run from before the field existed).
NEW_FIELDS = ((("mixer_output_multiplier",), False),
              (("sp_tied_embedding",), False),
              (("optimizer", "nesterov"), False),
              (("optimizer", "weight_decay_convention"), ""),
              (("optimizer", "sgd_qk_heads_rule"), False))

CONFIG_BACKUP = "config.json.before-upgrade"
UPGRADING = "checkpoints.upgrading"
BEFORE = "checkpoints.before-upgrade"


class UpgradeError(ValueError):
  """A workdir the upgrade cannot or need not convert (the message says which and why)."""


# ---- config.json ----

def _read_config_json(workdir: pathlib.Path) -> dict:
  config = config_lib.read_run_config(workdir, UpgradeError)
  path = workdir / "config.json"
  if not isinstance(config, dict) or not isinstance(config.get("optimizer"), dict):
    raise UpgradeError(f"{str(path)!r} has no `optimizer` section; expected the config that "
                       "gdn_jax.train wrote.")
  return config


def add_missing_fields(config: dict) -> tuple[dict, list[str]]:
  """(config.json's dict with the fields of NEW_FIELDS it lacks set to their defaults, the
  dotted names added)."""
  config = json.loads(json.dumps(config))  # a deep copy
  added = []
  for path, default in NEW_FIELDS:
    node = config
    for key in path[:-1]:
      node = node[key]
    if path[-1] not in node:
      node[path[-1]] = default
      added.append(".".join(path))
  return config, added


# ---- The two optimizer-state layouts, as abstract trees built from the config ----

def earlier_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """A transformation whose state has the tree of the chain before multi_transform (f5ff36e).

  Only the state matters: the per-leaf decay and μP multiplier kept `EmptyState` (stood in for
  by `identity`), and the LR was always a schedule (`ScaleByScheduleState`).
  """
  o = config.optimizer
  empty = optax.identity()
  schedule = optax.scale_by_schedule(lambda count: 1.0)
  decay = [empty] if o.weight_decay else []
  if o.name == "adamw":
    parts = [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), *decay, schedule, empty]
  else:
    parts = [*decay, *([optax.trace(decay=o.momentum)] if o.momentum else []), schedule, empty]
  tx = optax.chain(*parts)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx


def abstract_states(config: ml_collections.ConfigDict):
  """(abstract params, earlier opt_state, current opt_state): shapes only, nothing drawn."""
  try:
    model = nnx.eval_shape(lambda: config_lib.build_model(config, 0))
    _, params = nnx.split(model)
    new = jax.eval_shape(config_lib.make_tx(model, config).init, params)
    old = jax.eval_shape(earlier_tx(config).init, params)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise UpgradeError(f"config.json: the current code cannot build this run's model and "
                       f"optimizer: {e}") from None
  return params, old, new


# ---- Layouts as {orbax key path: "empty" | (shape, dtype)} ----

def _is_empty(x) -> bool:
  return x is None or (isinstance(x, tuple) and len(x) == 0)  # EmptyState, MaskedNode: ()


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def layout(tree) -> dict[tuple, Any]:
  """Key path → "empty" or (shape, dtype); orbax keeps the key paths of jax's tree flattening
  (tuples by index, NamedTuples and dicts by name) and saves empty nodes as None."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)[0]
  return {tuple(_key(k) for k in path): "empty" if _is_empty(leaf)
          else (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def _describe(meta, param_keys: set, depth: int = 0) -> str:
  """A short picture of a saved tree: parameter-shaped subtrees as <params>."""
  if isinstance(meta, dict):
    if param_keys and set(meta) == param_keys:
      return "<params>"
    if depth > 4:
      return "{…}"
    return "{" + ", ".join(f"{k}: {_describe(v, param_keys, depth + 1)}"
                           for k, v in meta.items()) + "}"
  if isinstance(meta, (list, tuple)):
    return "[" + ", ".join(_describe(v, param_keys, depth + 1) for v in meta) + "]"
  if meta is None:
    return "None"
  return f"array{list(getattr(meta, 'shape', ()))}"


def _sub(flat: dict, key: str) -> dict:
  return {p[1:]: v for p, v in flat.items() if p[:1] == (key,)}


def _diff(saved: dict, wanted: dict, n: int = 3) -> str:
  name = lambda p: ".".join(x for x in p if x != "value")
  shape = [f"{name(p)} is {saved[p]} in the checkpoint, {v} in the model"
           for p, v in wanted.items() if p in saved and saved[p] != v]
  missing = [name(p) for p in wanted if p not in saved]
  extra = [name(p) for p in saved if p not in wanted]
  parts = shape[:n] + ([f"not in the checkpoint: {', '.join(missing[:n])}"] if missing else [])
  return "; ".join(parts + ([f"not in the model: {', '.join(extra[:n])}"] if extra else []))


# ---- Checkpoints ----

def _manager(directory: pathlib.Path, *, read_only: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


def classify(meta_tree: dict, params, old, new, where: str) -> str:
  """"old" or "new": which layout checkpoint metadata `meta_tree` has; UpgradeError otherwise."""
  saved = layout(meta_tree)
  missing = [k for k in ("params", "opt_state", "step", "rng") if k not in meta_tree]
  if missing:
    raise UpgradeError(f"{where}: the saved state has {sorted(meta_tree)}, without {missing}; "
                       "expected {params, opt_state, step, rng} as gdn_jax.train saves it.")
  wanted = layout(params)
  if _sub(saved, "params") != wanted:
    raise UpgradeError(f"{where}: the saved parameters do not fit the model that config.json "
                       f"builds ({_diff(_sub(saved, 'params'), wanted)}).")
  opt = _sub(saved, "opt_state")
  if opt == layout(new):
    return "new"
  if opt == layout(old):
    return "old"
  keys = set(meta_tree["params"]) if isinstance(meta_tree["params"], dict) else set()
  found = _describe(meta_tree["opt_state"], keys)
  raise UpgradeError(
      f"{where}: opt_state layout not recognised: found {found[:400]}; expected the earlier "
      f"per-leaf chain {_describe_abstract(old, keys)} or the current one "
      f"{_describe_abstract(new, keys)[:300]} (built from config.json; was it edited?).")


def _describe_abstract(tree, param_keys) -> str:
  def raw(x):  # the tree as orbax's metadata shows it
    if _is_empty(x):
      return None
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      return {f: raw(getattr(x, f)) for f in x._fields}
    if isinstance(x, (tuple, list)):
      return [raw(v) for v in x]
    if isinstance(x, nnx.State) or isinstance(x, dict):
      return {str(k): raw(v) for k, v in x.items()}
    return x
  return _describe(raw(tree), param_keys)


def convert(old_state, new_abstract):
  """The current opt_state from the earlier one (`new_abstract`: its shapes, e.g. from
  `abstract_states`): see the module docstring. Pure data movement."""
  found = {}
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState, optax.TraceState)
  for node in jax.tree.leaves(old_state, is_leaf=lambda x: isinstance(x, kinds)):
    if isinstance(node, kinds):
      if type(node) in found:
        raise UpgradeError(f"the earlier optimizer state holds two {type(node).__name__}s; "
                           "expected one of each.")
      found[type(node)] = node

  def take(kind):
    if kind not in found:
      raise UpgradeError(f"the current optimizer needs a {kind.__name__}, which the earlier "
                         f"state does not hold (it holds {sorted(k.__name__ for k in found)}).")
    return found[kind]

  masked = lambda x: isinstance(x, optax.MaskedNode)

  def fill(node):
    if isinstance(node, optax.ScaleByAdamState):
      return take(optax.ScaleByAdamState)
    if isinstance(node, optax.ScaleByScheduleState):
      return optax.ScaleByScheduleState(count=take(optax.ScaleByScheduleState).count)
    if isinstance(node, optax.TraceState):  # this label's leaves; MaskedNode elsewhere
      return optax.TraceState(trace=jax.tree.map(
          lambda m, x: m if masked(m) else x, node.trace, take(optax.TraceState).trace,
          is_leaf=masked))
    if masked(node):
      return node
    raise UpgradeError(f"the current optimizer state holds a {type(node).__name__} the upgrade "
                       "does not know how to fill; expected Adam, trace and schedule states.")

  new_state = jax.tree.map(fill, new_abstract, is_leaf=lambda x: isinstance(x, kinds) or masked(x))
  if layout(new_state) != layout(new_abstract):
    raise UpgradeError("the converted optimizer state does not have the current layout "
                       f"({_diff(layout(new_state), layout(new_abstract))}).")
  used = {type(n) for n in jax.tree.leaves(new_abstract, is_leaf=lambda x: isinstance(x, kinds))
          if isinstance(n, kinds)}
  if set(found) - used:
    raise UpgradeError(f"the earlier state's {sorted(k.__name__ for k in set(found) - used)} "
                       "has no place in the current optimizer; expected the same optimizer.")
  return new_state


def _restore_target(params, old_opt, meta_tree):
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu)
  return {"params": jax.tree.map(on_cpu, params), "opt_state": jax.tree.map(on_cpu, old_opt),
          # step: an int64 NumPy scalar as the trainer saves it; rng: a jax array.
          "step": ckpt.abstract_like({"s": np.zeros((), meta_tree["step"].dtype)})["s"],
          "rng": on_cpu(meta_tree["rng"])}


def _copy_step(src: pathlib.Path, dst: pathlib.Path):
  """Everything of a step directory but `state/` (data/, orbax's step metadata), as it is."""
  for entry in src.iterdir():
    if entry.name == "state":
      continue
    target = dst / entry.name
    if target.is_dir():
      shutil.rmtree(target)
    if entry.is_dir():
      shutil.copytree(entry, target)
    else:
      shutil.copy2(entry, target)


def _recover(workdir: pathlib.Path) -> str | None:
  """Finishes or undoes an upgrade that was killed; returns what it did."""
  live, before, upgrading = (workdir / "checkpoints", workdir / BEFORE, workdir / UPGRADING)
  note = None
  if not live.exists() and before.is_dir():  # killed between the two renames: undo the first
    before.rename(live)
    note = f"restored {live} from {before} (an earlier upgrade was killed mid-swap)"
  if upgrading.exists():
    shutil.rmtree(upgrading)
  return note


def _saved_layouts(live: pathlib.Path, params, old, new) -> dict[int, tuple[str, dict]]:
  """{step: ("old" | "new", its metadata tree)} of every checkpoint under `live`."""
  if not live.is_dir():
    return {}
  reader = _manager(live, read_only=True)
  try:
    out = {}
    for step in sorted(reader.all_steps()):
      where = f"checkpoint {step} in {str(live)!r}"
      try:
        meta = reader.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises several types)
        raise UpgradeError(f"{where}: its metadata does not read ({str(e)[:200]}); expected an "
                           "orbax checkpoint written by gdn_jax.train.") from None
      out[step] = (classify(meta, params, old, new, where), meta)
    return out
  finally:
    reader.close()


def _convert_checkpoints(live, upgrading, saved, params, old, new, log):
  """Writes every step of `live` with the current opt_state into `upgrading`."""
  reader, writer = _manager(live, read_only=True), _manager(upgrading, read_only=False)
  try:
    for step, (_, meta) in sorted(saved.items()):
      state = reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_restore_target(params, old, meta))))["state"]
      state["opt_state"] = convert(state["opt_state"], new)
      writer.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
      writer.wait_until_finished()
      _copy_step(live / str(step), upgrading / str(step))
      log(f"checkpoint {step}: optimizer state converted")
  finally:
    writer.close()
    reader.close()
  for entry in live.iterdir():  # anything at the top of checkpoints/ that is not a step
    if not (upgrading / entry.name).exists():
      (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, upgrading / entry.name)


def upgrade_workdir(workdir, *, keep_old_checkpoints: bool = False,
                    log=lambda s: None) -> dict[str, Any]:
  """Upgrades config.json and every checkpoint of `workdir` in place (module docstring).

  Returns {"workdir", "config_fields_added", "config_backup", "steps", "optimizer",
  "old_checkpoints"}. Raises UpgradeError (a ValueError), with nothing changed, when the
  workdir, its config.json or a checkpoint's layout is unusable, or when the checkpoints are
  already in the current layout and config.json lacks none of NEW_FIELDS. Checkpoints in the
  current layout whose config.json lacks some (a run started after the optimizer's change but
  before a newer field) are left alone and only the fields are added ("steps" is then []).
  """
  workdir = pathlib.Path(workdir).absolute()
  config_json = _read_config_json(workdir)
  if jax.process_count() != 1:
    raise UpgradeError(f"jax.process_count()={jax.process_count()}; expected 1 (run the "
                       "upgrade once, on one host).")
  upgraded_json, added = add_missing_fields(config_json)
  config = ml_collections.ConfigDict(upgraded_json)
  try:
    config_lib.validate_config(config)
  except ValueError as e:
    raise UpgradeError(f"{workdir / 'config.json'}: {e}") from None
  params, old, new = abstract_states(config)

  recovered = _recover(workdir)
  if recovered:
    log(recovered)
  live, before, upgrading = workdir / "checkpoints", workdir / BEFORE, workdir / UPGRADING
  saved = _saved_layouts(live, params, old, new)
  kinds = {step: kind for step, (kind, _) in saved.items()}
  if kinds and set(kinds.values()) == {"new"}:
    if not added:
      raise UpgradeError(f"the checkpoints in {str(live)!r} (steps {sorted(kinds)}) are already "
                         "in the current layout; nothing to do (nothing was changed).")
    saved = {}   # only config.json lacks fields: add them, leave the checkpoints alone
  if len(set(kinds.values())) > 1:
    raise UpgradeError(f"the checkpoints in {str(live)!r} mix layouts ({kinds}); expected all "
                       "from before the upgrade. Remove the steps you do not need and rerun.")
  if saved and before.exists():
    raise UpgradeError(f"{str(before)!r} exists (kept by an earlier upgrade); move it away and "
                       "rerun (nothing was changed).")

  if saved:
    _convert_checkpoints(live, upgrading, saved, params, old, new, log)
  backup = None
  if added:
    backup = workdir / CONFIG_BACKUP
    if not backup.exists():  # a rerun after a killed upgrade keeps the first backup
      shutil.copy2(workdir / "config.json", backup)
    ckpt._write_json(workdir / "config.json", upgraded_json)
    log(f"config.json: added {', '.join(added)} (before: {backup})")
  if saved:  # the swap: a kill between the renames is undone by the next run (_recover)
    live.rename(before)
    upgrading.rename(live)
    if not keep_old_checkpoints:
      shutil.rmtree(before)
  return {"workdir": str(workdir), "config_fields_added": added,
          "config_backup": str(backup) if backup else None, "steps": sorted(saved),
          "optimizer": config.optimizer.name,
          "old_checkpoints": str(before) if saved and keep_old_checkpoints else None}


# ---- Command line ----

def main(argv):
  from gdn_jax.train.cli import cli_main  # pylint: disable=import-outside-toplevel
  summary = cli_main(argv, lambda f: upgrade_workdir(
      f.workdir, keep_old_checkpoints=f.keep_old_checkpoints, log=print))
  print(json.dumps(summary), flush=True)


def define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "Run directory of gdn_jax.train written before "
                      "2026-12-06 (config.json, checkpoints/).")
  flags.DEFINE_bool("keep_old_checkpoints", False, f"Keep the checkpoints as they were in "
                    f"<workdir>/{BEFORE}/.")
  flags.mark_flags_as_required(["workdir"])


def cli():
  from absl import app
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
