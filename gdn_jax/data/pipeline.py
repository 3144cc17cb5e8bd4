"""grain input pipeline: memory-mapped tokens → windows of seq_len + 1 → shuffled batches.

    tokens [N] (uint8 .npy, memory-mapped)  →  window i = tokens[i·T : i·T + T + 1],  i < (N−1)//T
    → this process' windows (i ≡ process_index mod process_count)
    → shuffled (seed, reshuffled every epoch) → repeated → batches [B_local, T + 1]

Inputs are window[:, :-1] and targets window[:, 1:]. The iterator is a grain `DatasetIterator`
whose whole state is the index of the next batch, so `get_state`/`set_state` (or grain's orbax
handlers `grain.checkpoint.CheckpointSave/Restore`) resume it exactly. Validation batches are the
first windows in order (no shuffle), the same at every evaluation.
"""
from __future__ import annotations

import os
import pathlib

import grain
import numpy as np

from gdn_jax.data import tokenizer


def load_tokens(path: str | os.PathLike, *, min_tokens: int = 2) -> np.ndarray:
  """A memory-mapped 1-D uint8 token file, validated (missing, corrupt, too short → ValueError)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"data: token file {str(path)!r} does not exist; expected a .npy made by "
                     "`python -m gdn_jax.data.prepare`.")
  try:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # a bad header, a truncated body, a pickle: all mean "corrupt".
    raise ValueError(f"data: token file {str(path)!r} is corrupt or not a .npy array ({e}); "
                     "expected a 1-D uint8 .npy from `python -m gdn_jax.data.prepare`.") from None
  if tokens.ndim != 1 or tokens.dtype != np.uint8:
    raise ValueError(f"data: token file {str(path)!r} holds {tokens.dtype} of shape "
                     f"{tokens.shape}; expected 1-D uint8 byte tokens (vocab "
                     f"{tokenizer.VOCAB_SIZE}).")
  if tokens.size < min_tokens:
    raise ValueError(f"data: token file {str(path)!r} has {tokens.size} tokens; expected at "
                     f"least {min_tokens} (one batch of windows).")
  return tokens


class WindowSource:
  """Random-access source of non-overlapping windows of T + 1 tokens (targets overlap by one)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    self.num_windows = (len(tokens) - 1) // seq_len

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def _check(name, value, low=1):
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f"data: `{name}`={value!r}; expected an int ≥ {low}.")


def train_dataset(path, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Endless shuffled batches [batch_size, seq_len + 1] int32 of this process' windows.

  `batch_size` is per process (the global batch divided by the process count).
  """
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("process_count", process_count)):
    _check(name, value)
  if not 0 <= process_index < process_count:
    raise ValueError(f"data: `process_index`={process_index!r}; expected an int in "
                     f"[0, {process_count}).")
  tokens = load_tokens(path, min_tokens=seq_len * batch_size * process_count + 1)
  ds = grain.MapDataset.source(WindowSource(tokens, seq_len))
  ds = ds[process_index::process_count]
  return ds.seed(seed).shuffle().repeat().batch(batch_size, drop_remainder=True)


def train_iterator(path, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator over `train_dataset(path, **kwargs)`."""
  return iter(train_dataset(path, **kwargs).to_iter_dataset())


def val_batches(path, *, seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                process_count: int = 1) -> list[np.ndarray]:
  """The first num_batches · batch_size windows of this process, in order: fixed eval batches."""
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("num_batches", num_batches)):
    _check(name, value)
  tokens = load_tokens(path, min_tokens=seq_len * batch_size * process_count + 1)
  ds = grain.MapDataset.source(WindowSource(tokens, seq_len))[process_index::process_count]
  ds = ds.batch(batch_size, drop_remainder=True)
  return [ds[i] for i in range(min(num_batches, len(ds)))]
