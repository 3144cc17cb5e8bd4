"""Data: tokenizer, prepare (folders / .jsonl / embedded corpus), token-file checks, grain pipeline."""
import gzip
import json

import numpy as np
import pytest

from gdn_jax.data import pipeline, prepare, tokenizer


def test_tokenizer_round_trip_and_errors():
  text = "To be, or not to be — ἀρετή\n"
  tokens = tokenizer.encode(text)
  assert tokens.dtype == np.uint8 and list(tokens) == list(text.encode("utf-8"))
  assert tokenizer.decode(tokens) == text
  assert tokenizer.decode(tokens[:-2]).endswith("\ufffd")  # half a character is replaced
  with pytest.raises(ValueError, match="expected byte tokens"):
    tokenizer.decode(np.array([65, 256]))
  with pytest.raises(ValueError, match="expected a str"):
    tokenizer.encode(b"bytes")


def _load(path):
  return np.load(path)


def test_prepare_folder_and_jsonl(tmp_path):
  docs = ["First document.\nTwo lines.", "Second — with UTF-8.", "Third one " * 20]
  folder = tmp_path / "txt"
  (folder / "sub").mkdir(parents=True)
  for i, d in enumerate(docs[:2]):
    (folder / f"{i}.txt").write_text(d, encoding="utf-8")
  with gzip.open(folder / "sub" / "2.txt.gz", "wt", encoding="utf-8") as f:
    f.write(docs[2])
  (folder / "ignored.md").write_text("not text")
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
  expected = "\n\n".join(docs).encode("utf-8")
  for source, out in ((folder, tmp_path / "a"), (jsonl, tmp_path / "b")):
    paths = prepare.write_token_files(prepare.read_documents(source), out, val_fraction=0.25)
    train, val = _load(paths["train"]), _load(paths["val"])
    assert train.dtype == val.dtype == np.uint8
    assert train.tobytes() + val.tobytes() == expected
    assert len(val) == round(0.25 * len(expected))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
  with pytest.raises(ValueError, match="never overwritten"):
    prepare.write_token_files(docs, tmp_path / "a")


def test_prepare_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    list(prepare.read_documents(tmp_path / "missing"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match="line 2 .* no string field 'text'"):
    list(prepare.read_documents(bad))
  with pytest.raises(ValueError, match="val_fraction"):
    prepare.write_token_files(["abc"], tmp_path / "x", val_fraction=1.5)


def test_embedded_corpus_is_the_archive_split(tmp_path):
  paths = prepare.embedded_corpus(tmp_path)
  text = gzip.decompress(prepare.EMBEDDED_CORPUS.read_bytes())
  train, val = _load(paths["train"]), _load(paths["val"])
  assert train.tobytes() + val.tobytes() == text
  assert len(text) > 4_000_000 and 0.04 < len(val) / len(text) < 0.06
  assert prepare.embedded_corpus(tmp_path) == paths  # cached: second call reuses the files


def test_load_tokens_rejects_bad_files(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    pipeline.load_tokens(tmp_path / "nope.npy")
  (tmp_path / "corrupt.npy").write_bytes(b"not an npy file at all")
  with pytest.raises(ValueError, match="corrupt"):
    pipeline.load_tokens(tmp_path / "corrupt.npy")
  np.save(tmp_path / "ints.npy", np.arange(10, dtype=np.int32))
  with pytest.raises(ValueError, match="expected 1-D uint8"):
    pipeline.load_tokens(tmp_path / "ints.npy")
  np.save(tmp_path / "short.npy", np.arange(5, dtype=np.uint8))
  with pytest.raises(ValueError, match="at least 100"):
    pipeline.load_tokens(tmp_path / "short.npy", min_tokens=100)


@pytest.fixture
def token_file(tmp_path):
  # Distinct values per position (mod 256 is fine: we check windows by their start offset).
  tokens = (np.arange(8 * 40 + 1) % 251).astype(np.uint8)
  np.save(tmp_path / "tokens.npy", tokens)
  return tmp_path / "tokens.npy", tokens


def _windows(tokens, T):
  n = (len(tokens) - 1) // T
  return {tuple(tokens[i * T:i * T + T + 1]) for i in range(n)}, n


def test_pipeline_epoch_covers_every_window_once(token_file):
  path, tokens = token_file
  all_windows, n = _windows(tokens, 8)  # 40 windows, 10 batches of 4 per epoch
  it = pipeline.train_iterator(path, seq_len=8, batch_size=4, seed=0)
  epoch = np.concatenate([next(it) for _ in range(n // 4)])
  assert epoch.shape == (n, 9) and epoch.dtype == np.int32
  assert {tuple(r) for r in epoch} == all_windows and len({tuple(r) for r in epoch}) == n
  assert not np.array_equal(epoch, np.stack(sorted(all_windows)))  # shuffled
  second = np.concatenate([next(it) for _ in range(n // 4)])  # reshuffled next epoch
  assert {tuple(r) for r in second} == all_windows and not np.array_equal(second, epoch)


def test_pipeline_determinism_and_resume(token_file):
  path, _ = token_file
  make = lambda seed: pipeline.train_iterator(path, seq_len=8, batch_size=4, seed=seed)
  a, b, c = make(1), make(1), make(2)
  batches_a = [next(a) for _ in range(15)]
  assert all(np.array_equal(x, next(b)) for x in batches_a)
  assert not all(np.array_equal(x, next(c)) for x in batches_a)
  it = make(1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  resumed = make(1)
  resumed.set_state(state)
  for want in batches_a[7:]:
    np.testing.assert_array_equal(next(resumed), want)


def test_pipeline_process_shards_are_disjoint(token_file):
  path, tokens = token_file
  all_windows, n = _windows(tokens, 8)
  seen = []
  for pi in range(2):
    it = pipeline.train_iterator(path, seq_len=8, batch_size=4, seed=0, process_index=pi,
                                 process_count=2)
    seen.append({tuple(r) for _ in range(n // 8) for r in next(it)})
  assert not seen[0] & seen[1] and seen[0] | seen[1] == all_windows
  with pytest.raises(ValueError, match="process_index"):
    pipeline.train_dataset(path, seq_len=8, batch_size=4, seed=0, process_index=2,
                           process_count=2)


def test_val_batches_are_fixed_and_in_order(token_file):
  path, tokens = token_file
  batches = pipeline.val_batches(path, seq_len=8, batch_size=4, num_batches=3)
  assert len(batches) == 3
  for b, batch in enumerate(batches):
    for r, row in enumerate(batch):
      i = b * 4 + r
      np.testing.assert_array_equal(row, tokens[i * 8:i * 8 + 9])
