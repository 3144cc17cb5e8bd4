#!/usr/bin/env bash
# Packs wheels too large for one device call (docs/training.md, "Triton ≥ 3.7.1 for fla's training
# rows"): installs them into one folder here (no deps; name each one), strips their shared
# libraries, drops the paths in $DROP (space-separated, relative to the folder), and writes the
# folder as tar | xz split into parts of PART_MB megabytes: OUT.part00, OUT.part01, ... $PYTHON
# (default python3) must be a Python 3.12, as on the GPU machine (e.g. the repo's .venv/bin/python).
#
#   DROP="triton/backends/nvidia/lib/cupti triton/backends/nvidia/bin/ptxas-blackwell" \
#     experiments/device/pack_carry.sh /tmp/triton371 25 triton-3.7.1-*.whl
#
# Carry one part per call (each in its own git-ignored folder) and copy it to /tmp on the machine;
# in the last call, on the same warm machine, unpack and put the folder first on PYTHONPATH:
#
#   mkdir -p /tmp/carry && cat /tmp/parts/OUT.part* | xz -d | tar -x -C /tmp/carry
#   export PYTHONPATH=/tmp/carry:$PYTHONPATH
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: [DROP='path ...'] $0 OUT PART_MB WHEEL..." >&2
  exit 2
fi
out=$1 part_mb=$2
shift 2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$@"
for p in ${DROP:-}; do rm -rf "${tmp:?}/site/$p"; done
find "$tmp/site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
tar -C "$tmp/site" -cf - . | xz -T0 -9 | split -b "${part_mb}M" -d - "$out.part"
ls -l "$out".part*
