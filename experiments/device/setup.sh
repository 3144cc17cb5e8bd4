#!/usr/bin/env bash
# Sourced at the start of a device-tool call (docs/training.md, "GPU runs"): installs the carried
# wheels the GPU image lacks (grain, ml_collections, ...) into /tmp/site and unpacks the carried
# token files (.data/<slice>/*.npy.gz) next to themselves.
set -u
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
for f in .data/*/*.npy.gz; do
  [ -e "$f" ] && [ ! -e "${f%.gz}" ] && gunzip -k "$f"
done
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
