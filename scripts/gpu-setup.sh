#!/usr/bin/env bash
# Source this at the start of every device call (carry: .whl and .data):
#   source scripts/gpu-setup.sh
# Installs the carried wheels (diffusers is not on the GPU machine) and gacq itself
# (no deps: torch, numpy, ... are already there), and keeps torch.compile's cache in an
# ignored folder that survives between calls while the machine stays warm.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor-cache
mkdir -p runs
set +e
