"""Byte-level tokenizer: a token is one byte of the UTF-8 encoding (vocabulary 256, no merges).

No dependency and no unknown tokens; decoding replaces bytes that do not form valid UTF-8 (a model
may sample half a multi-byte character) with U+FFFD.
"""
from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
  """str → uint8 tokens [N] (its UTF-8 bytes)."""
  if not isinstance(text, str):
    raise ValueError(f"encode: `text` is a {type(text).__name__}; expected a str.")
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens) -> str:
  """Integer tokens in [0, 256) → str (invalid UTF-8 sequences become U+FFFD)."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
    raise ValueError(f"decode: `tokens` span [{tokens.min()}, {tokens.max()}]; expected byte "
                     f"tokens in [0, {VOCAB_SIZE}).")
  return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
