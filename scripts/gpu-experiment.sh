#!/usr/bin/env bash
# Run (or keep polling) `gacq experiment run SPEC --parallel P` in the background on the device
# machine; each call waits up to WAIT seconds, then packs into $OUT:
#   <name>-results.tgz     the spec's results folder (cell JSONs, grids);
#   <name>-work-small.tgz  per-process logs, the experiment log, GAC's per-block weights, the GPU monitor;
#   <name>-q.tgz[.partNN]  every finished quantized checkpoint (a few MB each for the bundled
#                          model; split into 15 MB parts when larger).
# Nothing finished is lost when the machine goes back: on the next session, unpack the results
# into the checkout and the checkpoints into the spec's work folder, and carry that folder:
#   tar xzf <name>-results.tgz -C results/experiments
#   mkdir -p runs/experiments/<name> && cat <name>-q.tgz* | tar xz -C runs/experiments/<name>
#   run(..., carry=[".whl", "runs/experiments/<name>/q"])
# The runner then skips finished cells and samples finished checkpoints without requantizing.
# Unfinished quantizations restart from their last block only while the machine stays warm.
# On the device the job writes its cell results under runs/device-results/<name> (seeded from the
# spec's results folder when the job starts), not into the tracked results folder: every device call
# re-copies the working tree, and files in tracked folders that the local checkout lacks are removed,
# which once deleted finished cells of a running job between two calls.
# Usage (device): source scripts/gpu-setup.sh; WAIT=540 bash scripts/gpu-experiment.sh $OUT SPEC [P]
# EXTRA="--fused-fake-quant" adds options to `gacq experiment run` (when the job starts).
# PRE="command" runs first in the same background job (e.g. training the spec's model; the experiment starts
# only when it succeeds), its output in the job's experiment.log.
# NOPACK=1 packs nothing while the job runs (a call returning files has lost the warm machine: gpu-bg.sh).
# CELLS=id,id,... runs only those cells (given when the job starts); PACK_Q=0 skips packing the
# checkpoints (when they were carried in, or can be remade cheaply, e.g. bias-corrected ones).
set -u
OUT=$1; SPEC=$2; P=${3:-3}
spec_field() { python -c "import sys; from gacq.experiment import load_spec; print(getattr(load_spec(sys.argv[1]), sys.argv[2]))" "$SPEC" "$1"; }
NAME=$(spec_field name); RES=$(spec_field results); WORK=$(spec_field work)
# a GPU monitor for the machine's life (utilisation, memory, host memory every 15 s), packed below
mkdir -p runs/bg
if command -v nvidia-smi > /dev/null && [ ! -f runs/bg/gpu-mon.pid ]; then
  setsid nohup bash -c 'while true; do date +%T; nvidia-smi --query-gpu=index,utilization.gpu,memory.used \
    --format=csv,noheader; free -g | sed -n 2p; sleep 15; done' > runs/bg/gpu-mon.txt 2>&1 < /dev/null &
  echo $! > runs/bg/gpu-mon.pid
fi
DEVRES=runs/device-results/$(basename "$RES")
if [ ! -f "runs/bg/exp-$NAME/pid" ]; then
  rm -rf "$DEVRES"; mkdir -p "$DEVRES"; [ -d "$RES" ] && cp -r "$RES/." "$DEVRES/"
fi
WAIT=${WAIT:-540} bash scripts/gpu-bg.sh "$OUT" "exp-$NAME" -- \
  "${PRE:+$PRE >> \$JOBOUT/experiment.log 2>&1 && }python -m gacq experiment run $SPEC --results $DEVRES --parallel $P --quiet ${CELLS:+--cells $CELLS} ${EXTRA:-} >> \$JOBOUT/experiment.log 2>&1"
# NOPACK=1 (see gpu-bg.sh): nothing comes back while the job runs
if [ -n "${NOPACK:-}" ] && [ ! -f "runs/bg/exp-$NAME/rc" ]; then exit 0; fi
# pack snapshots (cells are written while we pack; a live tar once came back empty-handed)
SNAP=$(mktemp -d)
[ -d "$DEVRES" ] && cp -r "$DEVRES" "$SNAP/" && tar czf "$OUT/$NAME-results.tgz" -C "$SNAP" "$(basename "$RES")" \
  || echo "WARNING: could not pack $DEVRES"
if [ -d "$WORK" ]; then
  mkdir -p "$SNAP/small" "$SNAP/q"
  (cd "$WORK" && cp -r --parents $(ls -d logs q/*/gac q/*/quant_config.json 2>/dev/null) "$SNAP/small/" 2>/dev/null)
  mv "$OUT"/job.log "$OUT"/experiment.log "$SNAP/small/" 2>/dev/null
  cp runs/bg/gpu-mon.txt "$SNAP/small/" 2>/dev/null
  tar czf "$OUT/$NAME-work-small.tgz" -C "$SNAP/small" . || echo "WARNING: could not pack the logs of $WORK"
  # finished checkpoints: q/<job>/ holding quant_config.json (written last, by an atomic rename)
  FIN=$(cd "$WORK" && for d in q/*/; do [ -f "$d/quant_config.json" ] && echo "${d%/}"; done)
  [ "${PACK_Q:-1}" = 0 ] && FIN=
  if [ -n "$FIN" ]; then
    (cd "$WORK" && tar czf "$SNAP/q.tgz" $FIN)
    if [ "$(stat -c %s "$SNAP/q.tgz")" -le 15728640 ]; then mv "$SNAP/q.tgz" "$OUT/$NAME-q.tgz"
    else split -b 15M -d "$SNAP/q.tgz" "$OUT/$NAME-q.tgz.part"; fi
    echo "packed finished checkpoints: $(echo $FIN | tr '\n' ' ')"
  fi
fi
rm -rf "$SNAP"
