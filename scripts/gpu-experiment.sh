#!/usr/bin/env bash
# Run (or keep polling) `gacq experiment run SPEC --parallel P` in the background on the device
# machine; each call waits up to WAIT seconds, then packs the spec's results folder (cell JSONs,
# grids; never checkpoints or samples) into $OUT/<name>-results.tgz. Rerunning on a fresh machine
# resumes: finished cells are in the results folder (unpack it into the checkout first), and
# unfinished quantizations restart from their last block only while the machine stays warm.
# Usage (device): source scripts/gpu-setup.sh; WAIT=540 bash scripts/gpu-experiment.sh $OUT SPEC [P]
set -u
OUT=$1; SPEC=$2; P=${3:-3}
NAME=$(python -c "import sys; from gacq.experiment import load_spec; print(load_spec(sys.argv[1]).name)" "$SPEC")
RES=$(python -c "import sys; from gacq.experiment import load_spec; print(load_spec(sys.argv[1]).results)" "$SPEC")
WAIT=${WAIT:-540} bash scripts/gpu-bg.sh "$OUT" "exp-$NAME" -- \
  "python -m gacq experiment run $SPEC --parallel $P --quiet > \$JOBOUT/experiment.log 2>&1"
[ -d "$RES" ] && tar czf "$OUT/$NAME-results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
# the per-process logs and GAC's learned per-sample weights (small; the checkpoints stay here)
WORK=$(python -c "import sys; from gacq.experiment import load_spec; print(load_spec(sys.argv[1]).work)" "$SPEC")
[ -d "$WORK" ] && (cd "$WORK" && tar czf "$OUT/$NAME-work-small.tgz" logs $(ls -d q/*/gac q/*/quant_config.json 2>/dev/null))
tail -3 "runs/bg/exp-$NAME/out/experiment.log" 2>/dev/null
