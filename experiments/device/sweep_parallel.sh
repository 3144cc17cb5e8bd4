#!/usr/bin/env bash
# Runs several `experiments.lr_transfer` invocations side by side on one GPU, for a device call.
# Small widths are launch-bound, so processes sharing the device finish far sooner than one after
# another; and flags such as --lm_head_init_std hold for a whole invocation, so two values need two.
#
#   TIMEOUT=540 JSONL=experiments/results/lr_transfer_heads.jsonl \
#     experiments/device/sweep_parallel.sh \
#       "0.5  --preset=heads --rows=sp --optimizers=sgd --widths=1024" \
#       "0.2  --preset=heads --rows=mup --optimizers=adamw --widths=128 --lm_head_init_std=0.16"
#
# Each JOB is "MEM_FRACTION FLAGS...": its own process under XLA_PYTHON_CLIENT_MEM_FRACTION, with
# its own results folder $OUT/rN holding a copy of $JSONL, so no two processes append to one file
# and each plans from the runs already there. Logs go to $OUT/logN.txt; at the end only the JSONL
# files that a process changed or created stay in $OUT/rN: the device tool returns at most 8 files,
# so copies identical to the carried $JSONL (a process that wrote to another slice's file, or
# nothing) are deleted, and the logs are joined into $OUT/log.txt when there are more than 4 jobs.
# Merge the JSONL files on this machine, before the next call carries $JSONL again (a process plans
# only from what its copy holds, and would redo the runs of the last call otherwise):
#   python -m experiments.merge_jsonl experiments/results/<file>.jsonl /work/.device/.../r*/*.jsonl
# Source experiments/device/setup.sh first (wheels, data); --data_dir defaults to .data.
set -u
if [ $# -lt 1 ] || [ -z "${JSONL:-}" ] || [ ! -f "$JSONL" ]; then
  echo "usage: JSONL=<carried results file> [TIMEOUT=s] $0 'MEM_FRACTION FLAGS...' ..." >&2
  exit 2
fi
n=0
pids=()
for job in "$@"; do
  n=$((n + 1))
  frac=${job%% *}
  flags=${job#* }
  mkdir -p "$OUT/r$n"
  cp "$JSONL" "$OUT/r$n/"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac timeout "${TIMEOUT:-540}" \
      python -m experiments.lr_transfer --data_dir=.data $flags --results_dir="$OUT/r$n" \
      > "$OUT/log$n.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
find "$OUT" -path "$OUT/r*" -type f ! -name '*.jsonl' -delete
base=$(basename "$JSONL")
for i in $(seq 1 "$n"); do
  if cmp -s "$JSONL" "$OUT/r$i/$base"; then rm -f "$OUT/r$i/$base"; fi
done
tail -n 4 "$OUT"/log*.txt
if [ "$n" -gt 4 ]; then
  for i in $(seq 1 "$n"); do echo "==> job $i: ${*:$i:1}"; cat "$OUT/log$i.txt"; done \
      > "$OUT/log.txt" && rm -f "$OUT"/log[0-9]*.txt
fi
returned=$(find "$OUT" -type f | wc -l)
if [ "$returned" -gt 8 ]; then
  echo "sweep_parallel.sh: $returned files under \$OUT but the device tool returns 8, and \$OUT" \
       "is emptied before the next call: run at most 7 jobs a call." >&2
fi
exit $status
