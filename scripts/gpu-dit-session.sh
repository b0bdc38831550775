#!/usr/bin/env bash
# Issue 9 in one GPU session (the 35M DiT cannot travel between sessions: see experiments/dit-cifar10.toml):
# join the training data as its parts arrive, then one background job trains the class-conditional DiT
# (scripts/gpu-train.sh with CONFIG=dit-s, TRAIN_MIN minutes) and runs experiments/dit-cifar10.toml on it; every
# call polls it and packs what is finished. Between the training and the cells the job measures the DiT's input
# ranges per sampling step (`gacq ranges`: adaLN modulation and attention outliers).
#
# Here first: bash scripts/data-parts.sh   (4 parts at a 54 MiB checkout; the first travels with .whl)
# Device, every call: source scripts/gpu-setup.sh; export GACQ_COMMIT=<sha>; bash scripts/gpu-dit-session.sh $OUT
#   carry: call 1 [".whl", ".data/parts/manifest", ".data/parts/train.zip.part00"], call 2 [".data/parts/train.zip.part01"],
#   and so on, one part per call (the job starts in the call that brings the last), later calls [] (ignored files
#   stay on the warm machine; the wheels installed under /tmp/site too).
# Nothing comes back while the job runs (NOPACK=1 by default: a long call returning files lost the warm machine in
# sessions 13 and 15; see scripts/gpu-bg.sh); the call that finds the job finished packs everything. A last call
# before the budget runs out packs what is there with NOPACK= (empty) and a WAIT that ends the call with a minute of
# budget to spare (a machine taken back mid-call returns nothing). Session 15's plan for the next session, about
# 1,500 of the 1,800 s: the data calls; call 4 `TRAIN_MIN=5 WAIT=540 ...`; poll `WAIT=530 ...`; last poll
# `NOPACK= WAIT=<budget_left - 90> ...`; each poll sent at once, with no reading in between.
# Env: TRAIN_MIN (8), CELLS (default: the spec's cells at its [sample] steps; "" = the whole spec), P (8 processes), WAIT (540 s);
# for a dry run on a CPU: SPEC (a spec whose model is runs/dit-s/model), TRAIN_CMD (instead of the training), DEVICE
# (session 15 ran one with NOPACK: a 32x32 tiny DiT, four cells incl. rtn W8A8 per token; the first call returned
# nothing, the poll that found the job finished packed the cells, grids and ranges).
set -u
OUT=$1
JOIN_ONLY=1 bash scripts/gpu-train.sh || exit 0
SPEC=${SPEC:-experiments/dit-cifar10.toml}
# every session trains another DiT: cells of an earlier session's model must not be taken for this one's (the job
# seeds its results from the spec's folder and skips the cells it finds there)
# (the spec's name, results folder, model, sampler steps and guidance, and its cells at those steps)
read -r NAME RES MODEL STEPS GUIDANCE MAIN < <(python -c "import sys; from gacq.experiment import load_spec; \
  s = load_spec(sys.argv[1]); st = s.sample['steps']; print(s.name, s.results, s.model, st, s.sample['guidance_scale'], \
  ','.join(c.id for c in s.cells if c.steps == st))" "$SPEC")
if [ ! -f "runs/bg/exp-$NAME/pid" ] && ls "$RES"/cells/*.json > /dev/null 2>&1; then
  echo "ERROR: $RES already holds cells of an earlier session's DiT; move them to a folder of their own" \
       "(e.g. git mv $RES $RES-s12) before this session trains another"; exit 1
fi
CELLS=${CELLS-$MAIN}
# right after the training, beside the experiment's calibration (session 12 scheduled it after the cells and ran out
# of GPU time first; session 13 moved it off the critical path, in the background, its log runs/dit-ranges.log):
# the trained DiT's input ranges per sampling step on 32 guided trajectories (`gacq ranges`; about a minute)
RANGES="{ (timeout 200 python -m gacq calib --model $MODEL --selection all --trajectories 32 --steps $STEPS \
  --guidance-scale $GUIDANCE --out runs/dit-ranges-calib --device ${DEVICE:-cuda} && timeout 300 python -m gacq ranges \
  --model $MODEL --calib runs/dit-ranges-calib --device ${DEVICE:-cuda} --out runs/dit-ranges \
  --max-per-step 16 || echo 'ranges: failed (the cells go on)') > runs/dit-ranges.log 2>&1 & }"
PRE="${TRAIN_CMD:-CONFIG=dit-s TRAIN_MIN=${TRAIN_MIN:-8} LOG=\$JOBOUT/train.log bash scripts/gpu-train.sh} && $RANGES" \
  NOPACK=${NOPACK-1} CELLS=$CELLS EXTRA="--fused-fake-quant" PACK_Q=0 WAIT=${WAIT:-540} bash scripts/gpu-experiment.sh "$OUT" $SPEC "${P:-8}"
if [ -n "${NOPACK-1}" ] && [ ! -f "runs/bg/exp-$NAME/rc" ]; then exit 0; fi
mkdir -p "$OUT/dit"
cp runs/dit-s/log.jsonl runs/dit-s/summary.json "$OUT/dit/" 2>/dev/null
ls runs/dit-s/grids 2>/dev/null | tail -1 | xargs -I{} cp runs/dit-s/grids/{} "$OUT/dit/grid_last.png"
[ -d runs/dit-ranges ] && cp -r runs/dit-ranges "$OUT/dit/ranges"
cp runs/dit-ranges.log "$OUT/dit/" 2>/dev/null
tar czf "$OUT/dit.tgz" -C "$OUT" dit && rm -rf "$OUT/dit"
