#!/usr/bin/env bash
# Issue 9 on the GPU: join the training data (or a model trained earlier) as its parts arrive, then one background
# job trains the class-conditional DiT
# (scripts/gpu-train.sh with CONFIG=dit-s, TRAIN_MIN minutes) and runs experiments/dit-cifar10.toml on it; every
# call polls it and packs what is finished. Between the training and the cells the job measures the DiT's input
# ranges per sampling step (`gacq ranges`: adaLN modulation and attention outliers).
#
# Two ways in:
# (a) train here: the training data travels in parts (`bash scripts/data-parts.sh` here; 4 parts at a 57.7 MB
#     checkout, the first with .whl and the manifest), the job trains, then rounds the model to float16 in place and
#     cuts it into 15 MiB parts (scripts/model_parts.py) that come back in the next calls' $OUT (up to 4 a call):
#     the trained model can then be carried into a later session instead of being retrained.
# (b) carry a model trained in an earlier session: here, join what came back and cut parts that fit a call:
#       python scripts/model_parts.py join <folder with model.tar.partNN + manifest.json> runs/dit-s/model
#       python scripts/model_parts.py pack runs/dit-s/model .data/dit-parts --carry
#     then carry .whl and .data/dit-parts/manifest.json in call 1 (a part does not fit beside .whl) and one part a
#     call after that (9 at a 57.7 MB checkout); the job
#     starts (no data, no training) in the call that brings the last. Cells of that model already in the spec's
#     results folder are skipped (the runner checks the weights digest).
# Device, every call: source scripts/gpu-setup.sh; export GACQ_COMMIT=<sha>; bash scripts/gpu-dit-session.sh $OUT
#   later calls carry [] (ignored files stay on the warm machine, the wheels installed under /tmp/site too).
# Every call packs what is finished: $OUT/call.tgz (the results folder as <name>-results.tgz, the logs, the training's
# log and last grid) and model parts not yet sent (model.tar.partNN + manifest.json). Session 16 held results back
# while the job ran (NOPACK=1, after sessions 13 and 15 lost the machine after calls that returned files); its
# training call did return files and the machine stayed warm, then the machine was lost anyway, with the finished
# cells (results/experiments/dit-cifar10-s16). So nothing is held back now (NOPACK=1 still does it).
# Plan (a), about 1,500 of the 1,800 s: the data calls (.whl + manifest + part00, then part01-03: 4 calls at a
# 57.7 MB checkout); `TRAIN_MIN=8 WAIT=560 ...` with the last part (the model is trained once now, so 8 minutes
# rather than sessions 12-16's 5; its parts are cut right after the training and come back from the next call on);
# polls `WAIT=530 ...`, each sent at once with a command fixed in advance; the last one with a WAIT that ends the
# call with a minute of budget to spare (a machine taken back mid-call returns nothing).
# Env: TRAIN_MIN (8), CELLS (default: the spec's cells at its [sample] steps; "" = the whole spec), P (8 processes), WAIT (540 s);
# for a dry run on a CPU: SPEC (a spec whose model is runs/dit-s/model), TRAIN_CMD (instead of the training), DEVICE
# (session 16 ran one of each way in: a 32x32 tiny DiT, four cells).
set -u
OUT=$1
MODEL_PARTS=.data/dit-parts
CARRIED=
if [ -f $MODEL_PARTS/manifest.json ]; then
  python scripts/model_parts.py status $MODEL_PARTS || exit 0
  CARRIED=1
else
  JOIN_ONLY=1 bash scripts/gpu-train.sh || exit 0
fi
SPEC=${SPEC:-experiments/dit-cifar10.toml}
# every session trains another DiT: cells of an earlier session's model must not be taken for this one's (the job
# seeds its results from the spec's folder and skips the cells it finds there)
# (the spec's name, results folder, model, sampler steps and guidance, and its cells at those steps)
read -r NAME RES MODEL STEPS GUIDANCE MAIN < <(python -c "import sys; from gacq.experiment import load_spec; \
  s = load_spec(sys.argv[1]); st = s.sample['steps']; print(s.name, s.results, s.model, st, s.sample['guidance_scale'], \
  ','.join(c.id for c in s.cells if c.steps == st))" "$SPEC")
if [ -z "$CARRIED" ] && [ ! -f "runs/bg/exp-$NAME/pid" ] && ls "$RES"/cells/*.json > /dev/null 2>&1; then
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
if [ -n "$CARRIED" ]; then
  [ -f "$MODEL/model_index.json" ] || [ -f "$MODEL/config.json" ] || python scripts/model_parts.py join $MODEL_PARTS "$MODEL" \
    || { echo "ERROR: could not join the carried model"; exit 1; }
  MAKE="true"
else
  # the trained model is rounded to float16 in place (the cells then use the model that travels) and cut into parts
  MAKE="${TRAIN_CMD:-CONFIG=dit-s TRAIN_MIN=${TRAIN_MIN:-8} LOG=\$JOBOUT/train.log bash scripts/gpu-train.sh} && python \
    scripts/model_parts.py pack $MODEL runs/dit-travel > \$JOBOUT/model-parts.log 2>&1"
fi
PRE="$MAKE && $RANGES" NOPACK=${NOPACK-} CELLS=$CELLS EXTRA="--fused-fake-quant" PACK_Q=0 WAIT=${WAIT:-540} \
  bash scripts/gpu-experiment.sh "$OUT" $SPEC "${P:-8}"
if [ -n "${NOPACK-}" ] && [ ! -f "runs/bg/exp-$NAME/rc" ]; then exit 0; fi
if [ -f "runs/bg/exp-$NAME/rc" ]; then
  mkdir -p "$OUT/dit"
  cp runs/dit-s/log.jsonl runs/dit-s/summary.json "$OUT/dit/" 2>/dev/null
  ls runs/dit-s/grids 2>/dev/null | tail -1 | xargs -I{} cp runs/dit-s/grids/{} "$OUT/dit/grid_last.png"
  [ -d runs/dit-ranges ] && cp -r runs/dit-ranges "$OUT/dit/ranges"
  cp runs/dit-ranges.log "$OUT/dit/" 2>/dev/null
fi
# one file for everything but the model parts (a call returns at most 8 files, 64 MiB in all)
CALL=$(mktemp -d)
(cd "$OUT" && ls -A) | while read -r f; do mv "$OUT/$f" "$CALL/"; done
[ -n "$(ls -A "$CALL")" ] && tar czf "$OUT/call.tgz" -C "$CALL" . && echo "packed: $(ls -A "$CALL" | tr '\n' ' ')"
rm -rf "$CALL"
# the model parts not sent yet, as many as fit beside call.tgz (up to 4 of 15 MiB)
if [ -f runs/dit-travel/manifest.json ]; then
  room=$(( 63 * 1024 * 1024 - $(stat -c %s "$OUT/call.tgz" 2>/dev/null || echo 0) )); n=0
  mkdir -p runs/dit-travel-sent
  for p in runs/dit-travel/model.tar.part*; do
    [ -f "runs/dit-travel-sent/${p##*/}" ] && continue
    size=$(stat -c %s "$p"); { [ "$size" -gt "$room" ] || [ "$n" -ge 6 ]; } && break
    cp "$p" "$OUT/" && touch "runs/dit-travel-sent/${p##*/}"; room=$(( room - size )); n=$(( n + 1 ))
  done
  [ "$n" -gt 0 ] && cp runs/dit-travel/manifest.json "$OUT/"
  echo "model parts: $n sent in this call, $(ls runs/dit-travel-sent | wc -l) of $(ls runs/dit-travel/model.tar.part* | wc -l) in all"
fi
