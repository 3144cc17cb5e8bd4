"""Data: byte-level tokenizer, the embedded corpus, token-file preparation and the grain pipeline."""
