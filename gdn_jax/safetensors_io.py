"""Read and write safetensors files with NumPy (no `safetensors` or torch dependency).

    read(path) -> (tensors: dict[str, np.ndarray], metadata: dict[str, str])
    write(path, tensors, metadata=None)
    read_checkpoint(directory) -> (tensors, metadata)     model.safetensors, or the shards named
                                                          by model.safetensors.index.json
    write_checkpoint(directory, tensors, metadata=None, max_shard_bytes=None)

The format (huggingface/safetensors, docs "Format"):

    8 bytes       N, the header's length, an unsigned little-endian 64-bit integer
    N bytes       a UTF-8 JSON object: {name: {"dtype": "F32", "shape": [..],
                  "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}} (optional key),
                  padded with spaces
    the rest      the tensors' bytes, C order, little-endian; offsets are relative to here

Reading memory-maps the file: the arrays returned are read-only views (no copy until used).
BF16 maps to `ml_dtypes.bfloat16` (a jax dependency). A sharded checkpoint is the Hugging Face
layout: model-0000i-of-0000n.safetensors files and an index {"metadata": {"total_size": bytes},
"weight_map": {name: file}}.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2 ** 20   # the reference implementation's limit


class SafetensorsError(ValueError):
  """A file or tensor that is not valid safetensors (the message names it and why)."""


def _dtype_name(array: np.ndarray, name: str) -> str:
  dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
  for candidate, st_name in _NAMES.items():
    if dtype == candidate:
      return st_name
  raise SafetensorsError(f"tensor {name!r} has dtype {array.dtype}; expected one of "
                         f"{sorted(str(d) for d in _NAMES)} (safetensors "
                         f"{', '.join(DTYPES)}).")


def _header(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None):
  """(header bytes padded to a multiple of 8, tensors in file order). Wider dtypes first, then by
  name (as the reference writer), so every tensor starts at a multiple of its item size."""
  if metadata is not None and not (isinstance(metadata, dict) and all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
    raise SafetensorsError(f"`metadata`={metadata!r}; expected a dict of str to str.")
  arrays = {}
  for name, value in tensors.items():
    if not isinstance(name, str) or name == "__metadata__":
      raise SafetensorsError(f"tensor name {name!r}; expected a str other than '__metadata__'.")
    arrays[name] = np.asarray(value)
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  header, offset = {}, 0
  for name in order:
    array = arrays[name]
    header[name] = {"dtype": _dtype_name(array, name), "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return raw, [(name, arrays[name]) for name in order]


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None):
  """Writes `tensors` (name → array) to one safetensors file, atomically (temp file + rename)."""
  raw, ordered = _header(tensors, metadata)
  path = pathlib.Path(path)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for _, array in ordered:
      little = array.astype(array.dtype.newbyteorder("<"), copy=False)
      f.write(np.ascontiguousarray(little).tobytes())
  os.replace(tmp, path)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(name → read-only array, the `__metadata__` dict or {}) of one safetensors file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SafetensorsError(f"{str(path)!r} not found; expected a .safetensors file.")
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(f"{str(path)!r}: header length {n} for a file of {size} bytes; "
                             "expected a safetensors file (8-byte length, JSON header, data).")
    try:
      header = json.loads(f.read(n).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{str(path)!r}: the header is not UTF-8 JSON ({e}).") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{str(path)!r}: the header is a {type(header).__name__}; expected "
                           "a JSON object.")
  metadata = header.pop("__metadata__", None) or {}
  data_size = size - 8 - n
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,))
          if data_size else np.zeros((0,), np.uint8))
  tensors, spans = {}, []
  for name, info in header.items():
    where = f"{str(path)!r}: tensor {name!r}"
    try:
      dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{where} has header entry {info!r}; expected dtype (one of "
                             f"{list(DTYPES)}), shape and data_offsets [begin, end].") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if not (0 <= begin <= end <= data_size and end - begin == nbytes):
      raise SafetensorsError(f"{where} has data_offsets [{begin}, {end}] for shape "
                             f"{list(shape)} {info['dtype']} ({nbytes} bytes); expected a span "
                             f"of that length within the {data_size} data bytes.")
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
    spans.append((begin, end, name))
  covered = 0
  for begin, end, name in sorted(spans):
    if begin != covered:
      raise SafetensorsError(f"{str(path)!r}: tensor {name!r} starts at byte {begin}; expected "
                             f"{covered} (tensors must tile the data without gaps or overlaps).")
    covered = end
  if covered != data_size:
    raise SafetensorsError(f"{str(path)!r}: the tensors cover {covered} of {data_size} data "
                           "bytes; expected all of them.")
  return tensors, dict(metadata)


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray],
                                                           dict[str, str]]:
  """All tensors of a Hugging Face checkpoint directory: the shards listed by
  model.safetensors.index.json when it exists, else model.safetensors. Every tensor the index
  names must be in its shard, and no shard may hold a tensor the index does not name."""
  directory = pathlib.Path(directory)
  index = directory / INDEX_FILE
  if not index.is_file():
    if not (directory / SINGLE_FILE).is_file():
      raise SafetensorsError(f"{str(directory)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}; "
                             "expected a Hugging Face safetensors checkpoint.")
    return read(directory / SINGLE_FILE)
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise SafetensorsError(f"{str(index)!r} is not an index ({type(e).__name__}: {e}); "
                           'expected {"weight_map": {tensor: file}}.') from None
  tensors, metadata = {}, {}
  for file in files:
    shard, shard_metadata = read(directory / file)
    metadata.update(shard_metadata)
    for name, array in shard.items():
      if weight_map.get(name) != file:
        raise SafetensorsError(f"{str(directory / file)!r} holds tensor {name!r}, which "
                               f"{INDEX_FILE} maps to {weight_map.get(name)!r}; expected "
                               "every tensor in the shard the index names.")
      tensors[name] = array
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise SafetensorsError(f"{INDEX_FILE} maps tensor {missing[0]!r} to "
                           f"{weight_map[missing[0]]!r}, which does not hold it.")
  return tensors, metadata


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None,
                     max_shard_bytes: int | None = None) -> list[pathlib.Path]:
  """Writes model.safetensors, or (when the tensors exceed `max_shard_bytes`) shards
  model-0000i-of-0000n.safetensors (tensors in name order, a new shard when the next one would
  overflow; a tensor larger than the limit gets a shard of its own) and the index. Returns the
  files written. A directory that already holds a checkpoint is refused (old and new files would
  mix)."""
  directory = pathlib.Path(directory)
  old = sorted(directory.glob("model*.safetensors*")) if directory.is_dir() else []
  if old:
    raise SafetensorsError(f"{str(directory)!r} already holds {old[0].name}; expected a "
                           "directory without a checkpoint (nothing was written).")
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {name: np.asarray(value) for name, value in tensors.items()}
  total = sum(a.nbytes for a in arrays.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    write(directory / SINGLE_FILE, arrays, metadata)
    return [directory / SINGLE_FILE]
  if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
    raise SafetensorsError(f"`max_shard_bytes`={max_shard_bytes!r}; expected a positive int or "
                           "None (one file).")
  shards, size = [[]], 0
  for name in sorted(arrays):
    if shards[-1] and size + arrays[name].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += arrays[name].nbytes
  paths, weight_map = [], {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write(directory / file, {n: arrays[n] for n in names}, metadata)
    weight_map.update({n: file for n in names})
    paths.append(directory / file)
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return paths + [directory / INDEX_FILE]
