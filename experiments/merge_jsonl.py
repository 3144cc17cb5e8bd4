"""Appends to a results JSONL the lines that parallel device processes added to their copies.

`experiments/device/sweep_parallel.sh` gives each process a copy of the carried file; each copy
comes back as the original plus that process's new runs. This appends every line of the copies
that the target does not already hold, in order, each once:

  python -m experiments.merge_jsonl experiments/results/lr_transfer_heads.jsonl COPY.jsonl...
"""
import json
import sys


def merge(target: str, copies: list[str]) -> int:
  """Appends the copies' new lines to `target`; returns how many. A line that is not JSON is
  refused (a truncated copy), naming the file and line, before anything is written."""
  with open(target) as f:
    have = {line.rstrip("\n") for line in f if line.strip()}
  new = []
  for path in copies:
    with open(path) as f:
      for i, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip() or line in have:
          continue
        try:
          json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i} is not a JSON line ({e}); expected a complete results "
                           "file: drop the truncated line and merge again") from e
        have.add(line)
        new.append(line)
  if new:
    with open(target, "a") as f:
      f.write("".join(line + "\n" for line in new))
  return len(new)


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  print(f"{merge(argv[0], argv[1:])} new lines appended to {argv[0]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
