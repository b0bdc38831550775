#!/usr/bin/env bash
# Issue 9 on the GPU in self-contained device calls: nothing is left on the machine for a later call (it goes back
# 30 s after a call returns, and sessions 12-16 lost every background job that counted on the next call finding it).
#
#   train: trains `dit-s6` for TRAIN_MIN minutes on the carried CIFAR-10 zip, rounds it to float16 in place and
#          returns it in 15 MiB parts ($OUT/model/), then runs the cheap cells (FP at every step count, RTN) and the
#          trained DiT's input ranges per sampling step, until the deadline.
#   cells: joins the carried parts (.data/dit-s6-parts) into the very model the train call left, and runs CELLS
#          (default: the quantized cells at the spec's 50 steps) in parallel until the deadline.
# Each call returns $OUT/call.tgz: what it wrote to the spec's results folder (finished cells only: a cell's JSON is
# written last; unpack with scripts/gpu-unpack.sh),
# the runner's and the cells' logs, GAC's per-block weights, a GPU monitor; train also the training log and grid.
# Cells unfinished at the deadline lose their samples (the machine is gone; say so in the note); their finished
# checkpoints, or a stopped quantization's resume points, come back (below).
#
# Here, before a call: bash scripts/gpu-dit-stash.sh out    (takes the bundled UNet, its test-split statistics and
# results/ other than this spec's folder out of the working tree so that .whl + data or model fit; `in` restores)
#   train call: carry [".whl", ".data/cifar10-mosaic-train.zip"]   (cp ../shared/data/cifar10-mosaic/train.zip there)
#   cells call: carry [".whl", ".data/dit-s6-parts"]   (the parts and manifest.json the train call returned), or,
#               with `MODELS=keep bash scripts/gpu-dit-stash.sh out`, carry [".whl"]: the parts in models/dit-s6-cifar10
# Device: source scripts/gpu-setup.sh; export GACQ_COMMIT=<sha>; bash scripts/gpu-dit-call.sh train|cells $OUT
# Session 17: a train call (6 min of training) then a cells call (FP + tfmq/gac W4A8, 302 s). The model is in
# models/dit-s6-cifar10 since, so a later session needs only cells calls, e.g. (MODELS=keep stash, carry [".whl"]):
#   DEADLINE=470 CELLS=tfmq_w8a8_steps50_seed0,gac_w8a8_steps50_seed0,rtn_w8a8_steps50_seed0,rtn_w8a8_tok_steps50_seed0
#   DEADLINE=470 CELLS=<the fp/tfmq/gac cells at 5, 10 and 20 steps>      (`gacq experiment list` prints the ids)
# Other specs: SPEC=experiments/cifar10-call-sized.toml (the bundled UNet's few-step rows and GAC ablations at
# call-sized iterations; `UNET=keep bash scripts/gpu-dit-stash.sh out results/experiments/cifar10-call-sized`, so that
# its finished cells travel and are skipped; carry [".whl"]).
# DEADLINE must end before the device call's own limit (the run tool's limit_s: timeout_s, or less when less device time
# is left; a cold start is paid from the same budget): a call cut by that limit returns only its last pack (made every
# PACK_EVERY = 30 s; before session 21 it returned nothing, and session 20 lost a call so).
# Checkpoints: a call returns the quantized checkpoints it finished for cells it did not ($OUT/q/q.tgz.*); carried
# back as .data/q.tgz (carry [".whl", ".data/q.tgz"]) a cells call unpacks them into the work folder and those cells only
# sample (their recorded quantization time is the checkpoint's own). A quantization stopped at the deadline returns
# its resume points the same way (q/JOB.recon-ckpt, 1.5-3 MB for the bundled UNet since session 28), and the call
# that carries them goes on from its last finished unit (its calibration set is collected again from the same seed,
# and must come out the same: the resume points record its digest). Sample shards do not travel.
# Cells of more than 10,000 samples (a spec's [sample] num = 50000) sample in parts of 5,000 whose feature statistics
# come back in $OUT/p/parts.tgz.* (finished parts only); scripts/gpu-unpack.sh joins them into .data/parts, and a
# later call that carries .data/parts (carry [".whl", ".data/parts"], with .data/q.tgz where the checkpoints travel
# too) samples only the parts still missing. A call returns at most 8 files of 16 MiB, 64 MiB in all: q's parts,
# call.tgz and p's parts share that.
# PARTS (`gacq experiment run --parts`, e.g. 8-10 or none) samples only those parts of such cells, so that a call
# need not carry the earlier parts' statistics (2.1 MB a part: three cells' 21 parts did not fit beside the bundled
# UNet and .whl in the 64 MiB a call carries); its parts come back as above, and `gacq experiment run` here, with
# every part's statistics in the work folder (scripts/gpu-unpack.sh), merges and evaluates the cells on the CPU.
# PARTS=none quantizes only. Per cell: PARTS='CELL=6-10; CELL2=1-4' (cells not named sample nothing), as
# `gacq experiment plan SPEC -n N` prints it with CELLS from the parts already here.
# Env: TRAIN_MIN (6), DEADLINE (seconds into the call when the cells are stopped and packed: 545), CELLS, P (8),
#      SPEC (experiments/dit-s6-cifar10.toml), DEVICE (cuda); a CPU dry run: TRAIN_CMD, DEVICE=cpu, SPEC.
set -u
MODE=$1; OUT=$2
DEADLINE=${DEADLINE:-545}
SPEC=${SPEC:-experiments/dit-s6-cifar10.toml}
DEVICE=${DEVICE:-cuda}
read -r NAME RES WORK MODEL STEPS GUIDANCE < <(python -c "import sys; from gacq.experiment import load_spec; \
  s = load_spec(sys.argv[1]); print(s.name, s.results, s.work, s.model, s.sample['steps'], s.sample['guidance_scale'])" "$SPEC")
RUN=$(dirname "$MODEL")  # the training run's folder (gacq train writes the model to RUN/model)
LOGS=$(mktemp -d)
touch "$LOGS/.start"  # what this call writes is newer: only that is packed (a machine may hold an earlier call's files)
mkdir -p runs "$OUT"
if command -v nvidia-smi > /dev/null; then
  (while true; do date +%T; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; sleep 15; done) \
    > "$LOGS/gpu-mon.txt" 2>&1 &
  MON=$!
fi
cells_of() {  # the spec's cell ids that match a grep -E pattern
  python -m gacq experiment list "$SPEC" | awk '{print $2}' | grep -E "$1" | paste -sd, -
}
run_cells() {  # run the given cells until the deadline
  local left=$(( DEADLINE - SECONDS ))
  [ "$left" -gt ${MINLEFT:-30} ] || { echo "no time left for cells $1"; return 1; }
  echo "cells $1: $left s left"
  # in a process group of its own, which the deadline stops whole: `timeout` alone stops only the runner, and its
  # cell processes then ran on past the call's end (session 17's train call returned none of its cells)
  # --deadline: the runner starts no part of a cell sampled in parts that it cannot finish in time, and ends early
  # (the call returns sooner and spends less device time); the kill below stays for everything else
  setsid python -m gacq experiment run "$SPEC" --parallel "${P:-8}" --quiet --cells "$1" \
    --fused-fake-quant --deadline $(( left > 10 ? left - 10 : 0 )) ${PARTS:+--parts "$PARTS"} \
    >> "$LOGS/experiment.log" 2>&1 &
  local pid=$! end=$(( SECONDS + left ))
  local packed=$SECONDS
  while kill -0 $pid 2>/dev/null && [ $SECONDS -lt $end ]; do
    sleep 2
    if [ $(( SECONDS - packed )) -ge "${PACK_EVERY:-30}" ]; then pack; packed=$SECONDS; fi
  done
  if kill -0 $pid 2>/dev/null; then
    echo "deadline: stopping the cells at ${SECONDS}s"
    kill -TERM -- -$pid 2>/dev/null; sleep 5; kill -KILL -- -$pid 2>/dev/null
  fi
  wait $pid
  echo "experiment rc $? at ${SECONDS}s"
}
# pack: what the call has finished so far into $OUT, replacing the last pack; run_cells packs every PACK_EVERY
# seconds and once more at the end, so a call cut by its limit (session 21's third call) still returns what it had.
#  - $OUT/call.tgz: finished cells, logs (the runner's, each cell process's), GAC's per-block weights, the monitor;
#    only files written since the call began (session 20's machine held other specs' cells and logs from earlier
#    calls in the same folders). Unpack here with scripts/gpu-unpack.sh.
#  - $OUT/q/q.tgz.aa, .ab, ...: the finished checkpoints (made here or carried in) whose cells did not finish, in
#    parts of at most 15 MiB (a returned file is at most 16 MiB; session 21's one 30 MB q.tgz did not come back),
#    at most 44 MiB in all (a call returns 64 MiB). Here: scripts/gpu-q-carry.sh joins them; a later call carries (some of) them
#    as .data/q.tgz (the working tree travels in 64 MiB: about four W4 checkpoints of the bundled UNet beside .whl).
pack() {
  [ -d "$RES" ] && mkdir -p "$LOGS/results" && (cd "$RES" && find . -type f -newer "$LOGS/.start" \
    -exec cp --parents {} "$LOGS/results/" \;)
  [ -d "$WORK" ] && (cd "$WORK" && find logs q -type f -newer "$LOGS/.start" \( -path 'logs/*' -o -path 'q/*/gac/*' \
    -o -path 'q/*/quant_config.json' \) -exec cp --parents {} "$LOGS/" \; 2>/dev/null)
  python - "$SPEC" > "$LOGS/q-carry.new" <<'PY' || echo "listing the checkpoints to carry failed"
import sys
from gacq.experiment import _done, load_spec, quant_job_of
spec = load_spec(sys.argv[1])
jobs, sig, total = [], [], 0
for job in dict.fromkeys(quant_job_of(spec, c)[0] for c in spec.cells if not _done(spec, c)):  # spec order
    if job is None:
        continue
    d, r = spec.work / "q" / job, spec.work / "q" / f"{job}.recon-ckpt"
    # a finished checkpoint, else the resume points of a quantization stopped at the deadline (compact since
    # session 28: 1.5-3 MB a job for the bundled UNet), from which a later call's quantization goes on
    d = d if (d / "quant_config.json").exists() else r if r.is_dir() and any(r.glob("*unit_*.safetensors")) else None
    if d is not None:
        files = [f for f in d.rglob("*") if f.is_file() and not f.name.endswith(".tmp")]
        size = sum(f.stat().st_size for f in files)
        if total + size <= 44 << 20:
            jobs.append(f"q/{d.name}"); total += size
            sig.append(f"#{d.name} {len(files)} {max(f.stat().st_mtime for f in files)}")  # repack when it grows
if jobs:  # nothing at all when none (a lone newline made the tests below pack an empty tar)
    print("\n".join(jobs + sig))
PY
  if ! cmp -s "$LOGS/q-carry.new" "$LOGS/q-carry.txt"; then
    mv "$LOGS/q-carry.new" "$LOGS/q-carry.txt"
    rm -rf "$OUT/q.tmp" && mkdir -p "$OUT/q.tmp"
    if [ -s "$LOGS/q-carry.txt" ]; then
      tar czf - --exclude='.*.tmp' -C "$WORK" $(grep -v '^#' "$LOGS/q-carry.txt") | split -b 15M - "$OUT/q.tmp/q.tgz."
    fi
    rm -rf "$OUT/q" && mv "$OUT/q.tmp" "$OUT/q"
  fi
  # the feature statistics of the parts of cells sampled in parts (`gacq.experiment._sample_in_parts`) made in this
  # call, in parts of at most 15 MiB ($OUT/p/parts.tgz.*, a few MB a part): a later call that carries them
  # (.data/parts, joined here by scripts/gpu-unpack.sh) samples only the parts without statistics
  if [ -d "$WORK/parts" ]; then
    # not those carried in (.data/parts: the machine that made them returned them already)
    (cd "$WORK" && find parts -type f -newer "$LOGS/.start" ! -name '.*' | sort) | while read -r f; do
      [ -e ".data/$f" ] || echo "$f"; done > "$LOGS/parts.new"
    if ! cmp -s "$LOGS/parts.new" "$LOGS/parts.txt"; then
      mv "$LOGS/parts.new" "$LOGS/parts.txt"
      rm -rf "$OUT/p.tmp" && mkdir -p "$OUT/p.tmp"
      if [ -s "$LOGS/parts.txt" ]; then
        tar czf - -C "$WORK" -T "$LOGS/parts.txt" | split -b 15M - "$OUT/p.tmp/parts.tgz."
      fi
      rm -rf "$OUT/p" && mv "$OUT/p.tmp" "$OUT/p"
    fi
  fi
  tar czf "$OUT/call.tgz.tmp" --exclude=./.start --exclude=./q-carry.new --exclude=./parts.new -C "$LOGS" . \
    && mv "$OUT/call.tgz.tmp" "$OUT/call.tgz"
  if [ "${1:-}" = final ]; then
    [ -s "$LOGS/q-carry.txt" ] && echo "checkpoints to carry: $(grep -v '^#' "$LOGS/q-carry.txt" | tr '\n' ' ')($(du -ch "$OUT"/q/q.tgz.* \
      | tail -1 | cut -f1)): here bash scripts/gpu-q-carry.sh FILES_AT/q [JOB ...]"
    echo "packed at ${SECONDS}s: $(ls "$LOGS" | tr '\n' ' ')"
  fi
}
case $MODE in
  train)
    DATA=.data/cifar10-mosaic-train.zip
    [ -f "$DATA" ] || [ -n "${TRAIN_CMD:-}" ] || { echo "ERROR: carry $DATA"; exit 1; }
    ${TRAIN_CMD:-python -m gacq train --data $DATA --config dit-s6 --out $RUN --device cuda --bf16 --compile \
      --batch-size 256 --lr 3e-4 --warmup-steps 500 --ema-decay 0.999 --label-dropout 0.1 \
      --time-budget ${TRAIN_MIN:-6} --ckpt-every 100000 --log-every 250} > "$LOGS/train.log" 2>&1 \
      || { echo "ERROR: training failed"; tail -20 "$LOGS/train.log"; DEADLINE=0; }
    echo "trained at ${SECONDS}s"
    cp $RUN/log.jsonl $RUN/summary.json "$LOGS/" 2>/dev/null
    ls $RUN/grids 2>/dev/null | tail -1 | xargs -I{} cp $RUN/grids/{} "$LOGS/grid_last.png"
    if [ "$DEADLINE" -gt 0 ] && python scripts/model_parts.py pack "$MODEL" runs/dit-s6-parts > "$LOGS/model-parts.log" 2>&1; then
      mkdir -p "$OUT/model" && cp runs/dit-s6-parts/* "$OUT/model/"
    else
      echo "ERROR: packing the model failed"; cat "$LOGS/model-parts.log"
    fi
    # the trained DiT's input ranges per sampling step (32 guided trajectories), beside the cheap cells
    RPID=
    if [ "$DEADLINE" -gt 0 ] && [ "${RANGES:-1}" = 1 ]; then
      setsid bash -c "timeout 150 python -m gacq calib --model $MODEL --selection all --trajectories 32 --steps $STEPS \
        --guidance-scale $GUIDANCE --out runs/dit-ranges-calib --device $DEVICE && timeout 150 python -m gacq ranges \
        --model $MODEL --calib runs/dit-ranges-calib --device $DEVICE --out $LOGS/ranges --max-per-step 16" \
        > "$LOGS/ranges.log" 2>&1 &
      RPID=$!
    fi
    run_cells "${CELLS:-$(cells_of '^(fp|rtn)_')}"
    [ -n "$RPID" ] && kill -- -$RPID 2>/dev/null
    ;;
  cells)
    # finished checkpoints an earlier call returned ($OUT/q/q.tgz.*, joined here and carried as .data/q.tgz): those
    # cells only sample
    if [ -f .data/q.tgz ]; then
      mkdir -p "$WORK" && tar xzf .data/q.tgz -C "$WORK" --skip-old-files && echo "carried checkpoints: $(tar tzf \
        .data/q.tgz | grep -c '/quant_config.json$')"
    fi
    # part statistics of cells sampled in parts, made by earlier calls (.data/parts: scripts/gpu-unpack.sh joins a
    # call's $OUT/p there): those parts are not sampled again
    if [ -d .data/parts ]; then
      mkdir -p "$WORK/parts" && cp -rnp .data/parts/. "$WORK/parts/" && echo "carried part statistics: $(find \
        .data/parts -name 'stats_*.npz' | wc -l)"
    fi
    # a spec without `model` (None) uses the bundled UNet (keep it in the tree: UNET=keep with gpu-dit-stash.sh)
    if [ "$MODEL" != None ] && [ ! -f "$MODEL/config.json" ] && [ ! -f "$MODEL/model_index.json" ]; then
      MPARTS=.data/dit-s6-parts; [ -f $MPARTS/manifest.json ] || MPARTS=models/dit-s6-cifar10
      python scripts/model_parts.py join $MPARTS "$MODEL" || { echo "ERROR: could not join the model"; exit 1; }
    fi
    run_cells "${CELLS:-$(cells_of "^(tfmq|gac)_.*_steps${STEPS}_")}"
    ;;
  *) echo "usage: gpu-dit-call.sh train|cells OUT"; exit 2 ;;
esac
[ -n "${MON:-}" ] && kill $MON 2>/dev/null
pack final
ls -l "$OUT"; [ ! -d "$OUT/model" ] || ls -l "$OUT/model"
