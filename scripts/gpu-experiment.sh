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
# pack a snapshot (cells are written while we pack; a live tar once came back empty-handed)
SNAP=$(mktemp -d)
[ -d "$RES" ] && cp -r "$RES" "$SNAP/" && tar czf "$OUT/$NAME-results.tgz" -C "$SNAP" "$(basename "$RES")" \
  || echo "WARNING: could not pack $RES"
# the per-process logs and GAC's learned per-sample weights (small; the checkpoints stay here):
# resume folders' q/<job>.recon-ckpt/gac/*.safetensors and finished jobs' gac_weights.safetensors
WORK=$(python -c "import sys; from gacq.experiment import load_spec; print(load_spec(sys.argv[1]).work)" "$SPEC")
if [ -d "$WORK" ]; then
  (cd "$WORK" && cp -r --parents logs $(ls -d q/*/gac q/*/quant_config.json q/*/gac_weights.safetensors \
    2>/dev/null) "$SNAP/" && tar czf "$OUT/$NAME-work-small.tgz" -C "$SNAP" logs q) \
    || echo "WARNING: could not pack the logs and GAC weights of $WORK"
fi
rm -rf "$SNAP"
tail -3 "runs/bg/exp-$NAME/out/experiment.log" 2>/dev/null
