"""Checkpoints of a run in its workdir: orbax CheckpointManager + the workdir's config guard.

    workdir/config.json          the run's config; a rerun with a different config is refused
    workdir/checkpoints/<step>/  state/ (params, optimizer state, step, RNG: orbax StandardSave)
                                 data/  (the grain iterator's state: grain's orbax handler)

Saves are asynchronous (the arrays are copied off the accelerator before `save` returns, then
written in a background thread) and atomic: orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest one.

Another mesh or device count: `restore` reads every array straight into the sharding of its
target (the ShapeDtypeStructs of `abstract_like`, built from the new mesh's arrays), whatever
mesh wrote it; orbax reads only the slices each device needs, so 8 devices → 1, 1 → 8 and
4×2 → 2×2 need no conversion step. The saved arrays come back bit for bit. The config guard lets
the layout (`LAYOUT_KEYS`) change between reruns. The grain state is one file per process; with
one process (any number of devices) it is the same file; `DataHandler` also restores it under
another process count.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


# Top-level config keys that say where a run executes, not what it computes: a rerun may change
# them (its checkpoint restores onto the new mesh; the losses agree to float rounding).
LAYOUT_KEYS = ("mesh",)

# Config fields added after runs were started, each with the value that reproduces those runs:
# a config.json without the field compares as if it held that value, so the runs resume (and
# config.json is rewritten with the field).
ADDED_FIELDS = ((("optimizer", "embedding_lr_scale"), 1.0),
                (("model", "lm_head_init_std"), 0.0),
                (("model", "loss_chunk_size"), 0),
                (("model", "fuse_projections"), False),
                (("model", "conv_impl"), "xla"),
                (("model", "rule_kernel_config"), ""))


def _with_added_fields(config, added):
  """`config` (a config.json dict) with every missing field of `added` set to its value."""
  config = json.loads(json.dumps(config))
  for path, value in added:
    node = config
    for key in path[:-1]:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] not in node:
      node[path[-1]] = value
  return config


def check_or_write_config(workdir: str | os.PathLike, config_json: str, *,
                          layout_keys: tuple[str, ...] = LAYOUT_KEYS,
                          added_fields=ADDED_FIELDS) -> bool:
  """Writes workdir/config.json, or checks that the one there equals `config_json`.

  Returns True when the workdir already held this config (a rerun). Keys in `layout_keys` may
  differ: config.json is then rewritten with the new layout (it records the latest run's). A
  field of `added_fields` missing from either config counts as its listed value.
  Raises ValueError naming the differing keys when any other key differs; nothing in the
  workdir is touched then.
  """
  path = pathlib.Path(workdir) / "config.json"
  new = json.loads(config_json)
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"workdir: {str(path)!r} is not valid JSON ({e}); expected the config "
                       "of the run in this workdir.") from None
    strip = lambda c: ({k: v for k, v in c.items() if k not in layout_keys}
                       if isinstance(c, dict) else c)
    before, after = (strip(_with_added_fields(c, added_fields)) for c in (old, new))
    if before != after:
      diffs = _diff(before, after)
      raise ValueError(f"workdir: {str(path.parent)!r} holds a run with a different config "
                       f"({'; '.join(diffs[:8])}); expected the same config to resume (the "
                       f"layout {', '.join(layout_keys)} may change), or a new --workdir. "
                       "Nothing was overwritten.")
    if old != new:
      _write_json(path, new)
    return True
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_json(path, new)
  return False


def _write_json(path: pathlib.Path, obj):
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def _diff(old, new, prefix="") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} in the workdir, {new!r} now"]


class DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler, which also restores under another process count.

  grain writes one `process_<i>-of-<n>.json` per process and reads back only this process' own
  file, so a multi-host run restarted on a different number of hosts could not resume. Our
  iterator's state is the index of the next batch, the same integer on every process (they step
  together), so any saved file gives the position: it is used when the saved files agree, and
  the restore fails naming them when they do not. (The windows a process reads depend on the
  process count in `gdn_jax.data.pipeline`, so across process counts the position is kept but
  not the order of the examples that follow it.)
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = pathlib.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item)
    files = sorted(pathlib.Path(directory).glob("process_*-of-*.json"))
    states = {json.dumps(json.loads(f.read_text()), sort_keys=True) for f in files}
    if len(states) != 1:
      raise ValueError(f"checkpoint: {str(directory)!r} holds data-iterator states "
                       f"{[f.name for f in files]} that {'differ' if files else 'are missing'}; "
                       f"expected {own.name}, or files of another process count that agree.")
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


# orbax picks an item's handler by the type of its args: ours need their own args types.
@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


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
                       "data": DataHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator) -> bool:
    """Starts an (async) save of `state` and the iterator's position at `step`."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataSave(data_iterator)),
        force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state at `step`, laid out like `abstract_state` (ShapeDtypeStructs with shardings).

    `data_iterator` is moved to the saved position in place.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataRestore(data_iterator)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with each array's sharding) for `restore`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
