#!/usr/bin/env bash
# The comparison table on the bundled model (issue 5/6/7): for every METHOD given, quantize at
# W4A8 with one shared all-steps calibration set, sample N images (DDIM 100, leading, seed 0,
# as results/fp_fid) from the W4A8 checkpoint and from the same checkpoint with float
# activations (= its W4A32 model: the weight stage runs with float activations), and evaluate
# both against the bundled CIFAR-10 train statistics. Every step is skipped when its output
# exists, so rerunning the same command on a warm machine resumes (quantize resumes per unit).
# Env: N (10000), ITERS (AdaRound iterations per unit, 4000), AITERS (act step-size iterations,
# 1000), TRAJ (256), PRESET (common), WBITS (4), ABITS (8), MODES ("wa w": which models to sample;
# "wa" alone skips the float-activation model).
# Usage (device): source scripts/gpu-setup.sh; bash scripts/gpu-table.sh $OUT tfmq gac ...
set -u
OUT=$1; shift
N=${N:-10000}; ITERS=${ITERS:-4000}; AITERS=${AITERS:-1000}; TRAJ=${TRAJ:-256}; PRESET=${PRESET:-common}
WBITS=${WBITS:-4}; ABITS=${ABITS:-8}; MODES=${MODES:-wa w}
R=runs/table
mkdir -p $R
LOG=$OUT/log-w${WBITS}a${ABITS}-$1.txt
if [ ! -f $R/calib/calib.json ]; then
  python -m gacq calib --selection all --trajectories $TRAJ --out $R/calib --batch-size 256 >> $LOG 2>&1 || { echo "calib FAILED"; exit 1; }
fi
evaluate() {  # samples folder, row name, extra json
  local s=$1 name=$2
  [ -f $s.eval.json ] || python -m gacq eval --samples $s/samples.npz --json $s.eval.json >> $LOG 2>&1 || { echo "$name eval FAILED"; return 1; }
  python - "$s" "$name" "$3" >> $OUT/rows.jsonl <<'PY'
import json, sys
s, name, q = sys.argv[1:4]
ev = json.load(open(s + ".eval.json")); meta = json.load(open(s + "/meta.json"))
qc = json.load(open(q + "/quant_config.json")) if q else {}
m = {k: v for k, v in qc.items() if k != "layers"}
row = {"name": name, "eval": ev, "sample_wall_s": meta.get("wall_seconds_this_run"), "sample_meta": meta,
       "quantize_wall_s": m.get("wall_seconds"), "peak_gpu_memory_bytes": m.get("peak_gpu_memory_bytes"),
       "quant_meta": m}
print(json.dumps(row))
print(f"{name}: FID {ev['fid']:.2f} sFID {ev['sfid']:.4f} IS {ev['is_mean']:.3f} P {ev['precision']:.3f} R {ev['recall']:.3f}"
      f" quantize {m.get('wall_seconds')} s", file=sys.stderr)
PY
}
for METHOD in "$@"; do
  Q=$R/${METHOD}_w${WBITS}a${ABITS}
  if [ ! -f $Q/quant_config.json ]; then
    /usr/bin/time -f "$METHOD quantize %e s, max RSS %M KB" python -m gacq quantize --method $METHOD --preset $PRESET \
      --wbits $WBITS --abits $ABITS --calib $R/calib --iters $ITERS --act-iters $AITERS --out $Q >> $LOG 2>&1 \
      || { echo "$METHOD quantize FAILED"; tail -5 $LOG; continue; }
  fi
  for mode in $MODES; do
    S=$Q-samples-$mode; extra=""; [ $mode = w ] && extra="--float-acts"
    label="${METHOD} W${WBITS}A${ABITS}"; [ $mode = w ] && label="${METHOD} W${WBITS}A32 (W${WBITS}A${ABITS} checkpoint, float acts)"
    if [ ! -f $S/meta.json ]; then
      python -m gacq sample --model $Q $extra --num $N --batch-size 1000 --steps 100 --out $S >> $LOG 2>&1 \
        || { echo "$label sample FAILED"; continue; }
    fi
    evaluate $S "$label" $Q
  done
  tar czf $OUT/${METHOD}_w${WBITS}a${ABITS}.tgz -C $R ${METHOD}_w${WBITS}a${ABITS}/quant_config.json ${METHOD}_w${WBITS}a${ABITS}/recon_log.jsonl \
    ${METHOD}_w${WBITS}a${ABITS}-samples-wa/grid.png ${METHOD}_w${WBITS}a${ABITS}-samples-w/grid.png 2>/dev/null
done
