"""Checkpoints of a run in its workdir: orbax CheckpointManager + the workdir's config guard.

    workdir/config.json          the run's config; a rerun with a different config is refused
    workdir/checkpoints/<step>/  state/ (params, optimizer state, step, RNG: orbax StandardSave)
                                 data/  (the grain iterator's state: grain's orbax handler)

Saves are asynchronous (the arrays are copied off the accelerator before `save` returns, then
written in a background thread) and atomic: orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import pathlib

import grain
import jax
import orbax.checkpoint as ocp


def check_or_write_config(workdir: str | os.PathLike, config_json: str) -> bool:
  """Writes workdir/config.json, or checks that the one there equals `config_json`.

  Returns True when the workdir already held this config (a rerun). Raises ValueError naming the
  differing keys when it held another one; nothing in the workdir is touched then.
  """
  path = pathlib.Path(workdir) / "config.json"
  new = json.loads(config_json)
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"workdir: {str(path)!r} is not valid JSON ({e}); expected the config "
                       "of the run in this workdir.") from None
    if old != new:
      diffs = _diff(old, new)
      raise ValueError(f"workdir: {str(path.parent)!r} holds a run with a different config "
                       f"({'; '.join(diffs[:8])}); expected the same config to resume, or a new "
                       "--workdir. Nothing was overwritten.")
    return True
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"config.json.tmp{os.getpid()}")
  tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)
  return False


def _diff(old, new, prefix="") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} in the workdir, {new!r} now"]


class Checkpointer:
  """Saves and restores {state pytree, grain iterator} at integer steps under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"checkpoint: `max_to_keep`={max_to_keep!r}; expected an int ≥ 1.")
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator) -> bool:
    """Starts an (async) save of `state` and the iterator's position at `step`."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state at `step`, laid out like `abstract_state` (ShapeDtypeStructs with shardings).

    `data_iterator` is moved to the saved position in place.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with each array's sharding) for `restore`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
