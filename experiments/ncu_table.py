"""Per-kernel table from an Nsight Compute CSV: where one forward+backward's GPU time goes, kernel by kernel.

Profile one call of a benchmark row (only the kernels between cudaProfilerStart/Stop), then tabulate:

  ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
      --section LaunchStats --csv --page details --log-file /tmp/pallas.csv \\
      python experiments/bench_kernels.py --shapes=16,4096,16,128,128 --impls=pallas \\
      --repeats=1 --errors=false --profile_once --out=/tmp/unused.json
  python experiments/ncu_table.py --csv=/tmp/pallas.csv --out=experiments/results/ncu_pallas.md

Columns: duration (µs, at the clocks the GPU ran, not locked), compute (SM) and memory throughput as % of
peak, DRAM throughput %, achieved occupancy %, registers per thread, grid and block. A kernel bound by
neither compute nor memory (both low) is latency-bound: too few warps in flight, or a serial chain.
"""
import csv
import io
import json
import os

from absl import app, flags

_TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
               "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
_COLUMNS = {  # our key: ncu metric name (SpeedOfLight, Occupancy and LaunchStats sections)
    "duration_us": "Duration",
    "sm_pct": "Compute (SM) Throughput",
    "mem_pct": "Memory Throughput",
    "dram_pct": "DRAM Throughput",
    "occupancy_pct": "Achieved Occupancy",
    "registers": "Registers Per Thread",
}


def _number(text: str) -> float:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return float("nan")


def parse(text: str) -> list[dict]:
  """Kernel launches in profiling order: name, grid, block and the `_COLUMNS` metrics."""
  start = text.find('"ID"')
  if start < 0:
    raise ValueError("--csv: no ncu CSV header (\"ID\",...) found; profile with "
                     "`--csv --page details --log-file FILE`.")
  launches: dict[str, dict] = {}
  for row in csv.DictReader(io.StringIO(text[start:])):
    if not row.get("ID") or not row["ID"].isdigit():
      continue
    k = launches.setdefault(row["ID"], dict(id=int(row["ID"]), name=row["Kernel Name"],
                                            grid=row["Grid Size"], block=row["Block Size"]))
    for key, metric in _COLUMNS.items():
      # (MemoryWorkloadAnalysis has a "Memory Throughput" in bytes/s too: take the percentage)
      if row["Metric Name"] == metric and (not key.endswith("_pct") or row["Metric Unit"] == "%"):
        value = _number(row["Metric Value"])
        if key == "duration_us":
          value *= _TIME_UNITS.get(row["Metric Unit"], float("nan"))
        k[key] = value
  return sorted(launches.values(), key=lambda k: k["id"])


def markdown(launches: list[dict], title: str) -> str:
  total = sum(k.get("duration_us", 0.0) for k in launches)
  lines = [title, "", f"{len(launches)} kernels, {total / 1e3:.3f} ms of kernel time in all", "",
           "| # | kernel | µs | % of all | SM % | mem % | DRAM % | occupancy % | regs | grid | block |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda k, key: f"{k[key]:.1f}" if key in k else "-"
  for i, k in enumerate(launches):
    name = k["name"] if len(k["name"]) <= 60 else k["name"][:57] + "..."
    share = 100 * k.get("duration_us", 0.0) / total if total else 0.0
    lines.append(f"| {i} | `{name}` | {fmt(k, 'duration_us')} | {share:.1f} | {fmt(k, 'sm_pct')} | "
                 f"{fmt(k, 'mem_pct')} | {fmt(k, 'dram_pct')} | {fmt(k, 'occupancy_pct')} | "
                 f"{k.get('registers', 0):.0f} | {k['grid']} | {k['block']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  csv_path, out = flags.FLAGS.csv, flags.FLAGS.out
  with open(csv_path) as f:
    launches = parse(f.read())
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  md = markdown(launches, flags.FLAGS.title or f"Nsight Compute: {os.path.basename(csv_path)}")
  with open(out, "w") as f:
    f.write(md)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(dict(source=os.path.basename(csv_path), kernels=launches), f, indent=1)
  print(md)


if __name__ == "__main__":  # flags only as a script: the tests import this beside bench_kernels
  flags.DEFINE_string("csv", None, "ncu --csv --page details output (--log-file).", required=True)
  flags.DEFINE_string("out", None, "Markdown path (a .json goes beside it).", required=True)
  flags.DEFINE_string("title", "", "First line of the Markdown.")
  app.run(main)
