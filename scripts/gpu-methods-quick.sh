#!/usr/bin/env bash
# Quick side-by-side of the methods on the bundled model (one GPU call): short reconstruction,
# few samples. A smoke measurement to catch bugs (W8A8 far from FP, a method order far from the
# papers'), not the issue's 10k-sample table. Env: N (samples, default 2000), ITERS (AdaRound
# iterations per unit, default 1000), AITERS (act step-size iterations, default 500), TRAJ (256).
# Usage (device): source scripts/gpu-setup.sh; bash scripts/gpu-methods-quick.sh $OUT
set -u
OUT=$1
N=${N:-2000}; ITERS=${ITERS:-1000}; AITERS=${AITERS:-500}; TRAJ=${TRAJ:-256}; DEV=${DEV:-cuda}
R=runs/methods-quick
mkdir -p $R
run() {  # name, then quantize args ("" for FP)
  local name=$1; shift
  local model=""
  if [ $# -gt 0 ]; then
    /usr/bin/time -f "$name quantize_wall %e s" python -m gacq quantize --out $R/$name --calib-trajectories $TRAJ \
      --iters $ITERS --act-iters $AITERS --device $DEV "$@" >> $OUT/quantize.log 2>&1 || { echo "$name quantize FAILED"; return; }
    model="--model $R/$name"
  fi
  python -m gacq sample $model --num $N --batch-size 1000 --steps 100 --out $R/$name-samples --device $DEV >> $OUT/sample.log 2>&1 \
    || { echo "$name sample FAILED"; return; }
  python -m gacq eval --samples $R/$name-samples/samples.npz --json $OUT/$name.json --device $DEV >> $OUT/eval.log 2>&1
  echo "$name $(python -c "import json;d=json.load(open('$OUT/$name.json'));print(f\"fid={d['fid']:.2f} sfid={d['sfid']:.4f} is={d['is_mean']:.3f} p={d['precision']:.3f} r={d['recall']:.3f}\")")"
  [ -f $R/$name/quant_config.json ] && python -c "import json;d=json.load(open('$R/$name/quant_config.json'));print('   wall', d.get('wall_seconds'), 's  peak GPU', d.get('peak_gpu_memory_bytes'))"
}
[ -z "${SKIP_FP:-}" ] && run fp
run rtn_w8a8 --method rtn --wbits 8 --abits 8
run rtn_w4a8 --method rtn --wbits 4 --abits 8
run tfmq_w4a8 --method tfmq --wbits 4 --abits 8
run qdiffusion_w4a8 --method qdiffusion --wbits 4 --abits 8
run ptq4dm_w4a8 --method ptq4dm --wbits 4 --abits 8
