#!/usr/bin/env bash
# Several table cells at once on one GPU (issue 7: small models leave the H100 mostly idle).
# Each argument is METHOD:WBITS:ABITS; the cells share one calibration set (made first) and
# run as separate processes through scripts/gpu-table.sh (same env knobs: N, ITERS, AITERS,
# TRAJ, PRESET, MODES). Quantize wall times in the rows are then measured under contention.
# Usage (device): source scripts/gpu-setup.sh; bash scripts/gpu-cells.sh $OUT gac:4:8 tfmq:3:8 ...
set -u
OUT=$1; shift
R=runs/table; mkdir -p $R
if [ ! -f $R/calib/calib.json ]; then
  python -m gacq calib --selection all --trajectories ${TRAJ:-256} --out $R/calib --batch-size 256 \
    > $OUT/log-calib.txt 2>&1 || { echo "calib FAILED"; exit 1; }
fi
for cell in "$@"; do
  IFS=: read -r m w a <<< "$cell"
  WBITS=$w ABITS=$a bash scripts/gpu-table.sh $OUT $m &
done
wait
