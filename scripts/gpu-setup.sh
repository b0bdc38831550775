#!/usr/bin/env bash
# Source this at the start of every device call (carry: .whl and .data):
#   source scripts/gpu-setup.sh
# Installs the carried wheels (diffusers is not on the GPU machine) and gacq itself
# (no deps: torch, numpy, ... are already there), and keeps torch.compile's cache in an
# ignored folder that survives between calls while the machine stays warm.
# A later call on the same warm machine need not carry .whl: the wheels installed under /tmp/site stay. (In
# session 12 .whl was gone from the working tree two calls after it was carried, while data parts carried in the
# same call stayed; cause not found. Sourcing this without .whl then exited the call's shell: rc 1, no output.)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "gpu-setup: installing .whl failed"
elif [ ! -d /tmp/site/diffusers ]; then
  echo "gpu-setup: no .whl here and none installed under /tmp/site: carry .whl in this call"
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor-cache
mkdir -p runs
