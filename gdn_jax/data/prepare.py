"""Token files: text → uint8 `.npy` files (train.npy, val.npy) that the pipeline memory-maps.

    python -m gdn_jax.data.prepare --input=DIR_OF_TXT|FILE.jsonl|FILE.txt[.gz] --output_dir=OUT \
        [--text_field=text] [--val_fraction=0.05]

Documents (the .txt files of a folder in sorted order, or the lines of a .jsonl) are byte-encoded
and joined by a blank line; the last `val_fraction` of the bytes is the validation split (a cut at
the end keeps every validation window unseen in training). Existing token files are never
overwritten. The embedded corpus (`corpus/shakespeare.txt.gz`) goes through the same code and is
cached under $XDG_CACHE_HOME/gdn_jax/ (default ~/.cache/gdn_jax/).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from gdn_jax.data import tokenizer

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
EMBEDDED_CORPUS = CORPUS_DIR / "shakespeare.txt.gz"
SEPARATOR = "\n\n"


def _read_text(path: pathlib.Path) -> str:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    return f.read()


def read_documents(input_path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
  """The documents of a folder of .txt(.gz) files, a .txt(.gz) file, or a .jsonl(.gz) file."""
  path = pathlib.Path(input_path)
  if not path.exists():
    raise ValueError(f"prepare: `input`={str(path)!r} does not exist; expected a folder of .txt "
                     "files, a .txt file or a .jsonl file.")
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.name.endswith((".txt", ".txt.gz")))
    if not files:
      raise ValueError(f"prepare: `input`={str(path)!r} holds no .txt or .txt.gz files.")
    for p in files:
      yield _read_text(p)
  elif path.name.endswith((".jsonl", ".jsonl.gz")):
    for i, line in enumerate(_read_text(path).splitlines()):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"prepare: line {i + 1} of {str(path)!r} is not valid JSON ({e}); "
                         "expected one JSON object per line.") from None
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"prepare: line {i + 1} of {str(path)!r} has no string field "
                         f"{text_field!r}; expected objects like {{{text_field!r}: '...'}}.")
      yield record[text_field]
  elif path.name.endswith((".txt", ".txt.gz")):
    yield _read_text(path)
  else:
    raise ValueError(f"prepare: `input`={str(path)!r}; expected a folder, a .txt(.gz) file or a "
                     ".jsonl(.gz) file.")


def _save_atomic(path: pathlib.Path, tokens: np.ndarray):
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    np.save(f, tokens)
  os.replace(tmp, path)  # a reader never sees half a file


def write_token_files(documents, output_dir: str | os.PathLike, *, val_fraction: float = 0.05,
                      source: str = "") -> dict[str, pathlib.Path]:
  """Encodes and splits documents into output_dir/{train,val}.npy (uint8) + meta.json."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"prepare: `val_fraction`={val_fraction!r}; expected a float in (0, 1).")
  out = pathlib.Path(output_dir)
  paths = {"train": out / "train.npy", "val": out / "val.npy"}
  existing = [str(p) for p in paths.values() if p.exists()]
  if existing:
    raise ValueError(f"prepare: {existing} already exist; expected a fresh `output_dir` (token "
                     "files are never overwritten).")
  tokens = tokenizer.encode(SEPARATOR.join(documents))
  n_val = int(round(len(tokens) * val_fraction))
  if n_val < 2 or len(tokens) - n_val < 2:
    raise ValueError(f"prepare: the corpus has {len(tokens)} bytes; too few to split with "
                     f"`val_fraction`={val_fraction}.")
  out.mkdir(parents=True, exist_ok=True)
  _save_atomic(paths["val"], tokens[-n_val:])
  _save_atomic(paths["train"], tokens[:-n_val])
  meta = {"source": source, "tokenizer": "bytes", "vocab_size": tokenizer.VOCAB_SIZE,
          "train_tokens": len(tokens) - n_val, "val_tokens": n_val, "val_fraction": val_fraction}
  (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  return paths


def embedded_corpus(cache_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """Paths of the embedded corpus' token files, prepared on first use (keyed by its SHA-256)."""
  digest = hashlib.sha256(EMBEDDED_CORPUS.read_bytes()).hexdigest()[:16]
  if cache_dir is None:
    cache_dir = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    cache_dir = cache_dir / "gdn_jax"
  out = pathlib.Path(cache_dir) / f"shakespeare-{digest}"
  paths = {"train": out / "train.npy", "val": out / "val.npy"}
  if not all(p.exists() for p in paths.values()):
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    write_token_files(read_documents(EMBEDDED_CORPUS), tmp, source=str(EMBEDDED_CORPUS))
    try:
      os.replace(tmp, out)  # atomic; a concurrent first use may have won the race
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  return paths


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    paths = write_token_files(read_documents(f.input, f.text_field), f.output_dir,
                              val_fraction=f.val_fraction, source=str(f.input))
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  for split, p in paths.items():
    print(f"{split}: {p} ({np.load(p, mmap_mode='r').size:,} tokens)")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("input", None, "Folder of .txt files, a .txt file or a .jsonl file.")
  flags.DEFINE_string("output_dir", None, "Where train.npy / val.npy / meta.json go.")
  flags.DEFINE_string("text_field", "text", "Field holding the text in .jsonl records.")
  flags.DEFINE_float("val_fraction", 0.05, "Fraction of the bytes (at the end) kept for validation.")
  flags.mark_flags_as_required(["input", "output_dir"])
  app.run(main)
