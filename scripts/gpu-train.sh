#!/usr/bin/env bash
# One device call of training a named config (default dit-s, class-conditional): joins the carried data parts
# into .data/cifar10-mosaic-train.zip when all have arrived (scripts/data-parts.sh), resumes runs/$RUN if it
# exists, and trains until ~55 s before the call's 600 s limit ($1 = seconds this call used before).
# JOIN_ONLY=1 only joins the parts (exit 3 or 4 while they are incomplete or wrong). TRAIN_MIN sets the time
# budget instead (minutes, e.g. in a background job that outlives the call), LOG the log file.
# Env: CONFIG (dit-s), RUN (CONFIG), BATCH (256), LR (3e-4), WARMUP (500), EMA (0.999), DROPOUT (label dropout,
# 0.1; 0 for unconditional configs). The model is not packed here: scripts/model_parts.py cuts a model into float16
# parts that fit a call's returned files (scripts/gpu-dit-call.sh does so for the DiT).
used=${1:-0}
CONFIG=${CONFIG:-dit-s}; RUN=${RUN:-$CONFIG}
DATA=.data/cifar10-mosaic-train.zip
if [ ! -f "$DATA" ]; then
  want=$(sed -n 1p .data/parts/manifest 2>/dev/null); have=$(ls .data/parts/train.zip.part* 2>/dev/null | wc -l)
  if [ -z "$want" ] || [ "$have" -lt "$want" ]; then
    echo "data: ${have} of ${want:-?} parts here; carry the next one (.data/parts/train.zip.partXX)"; exit 3
  fi
  cat .data/parts/train.zip.part* > "$DATA.tmp"
  [ "$(sha256sum < "$DATA.tmp" | cut -d' ' -f1)" = "$(sed -n 2p .data/parts/manifest)" ] \
    || { echo "data: joined parts do not match the manifest's sha256"; rm -f "$DATA.tmp"; exit 4; }
  mv "$DATA.tmp" "$DATA"
fi
[ "${JOIN_ONLY:-0}" = 1 ] && { echo "data: $DATA ready"; exit 0; }
budget=${TRAIN_MIN:-$(python3 -c "print(round(max(0.5, (545 - $used - $SECONDS) / 60), 2))")}
resume=""; [ -f runs/$RUN/ckpt/state.json ] && resume="--resume"
python3 -m gacq train --data "$DATA" --config "$CONFIG" --out runs/$RUN --device cuda --bf16 --compile \
  --batch-size ${BATCH:-256} --lr ${LR:-3e-4} --warmup-steps ${WARMUP:-500} --ema-decay ${EMA:-0.999} \
  --label-dropout ${DROPOUT:-0.1} --time-budget "$budget" --ckpt-every 2500 --log-every 250 $resume \
  > "${LOG:-$OUT/train-$RUN.log}" 2>&1
rc=$?
cp runs/$RUN/log.jsonl runs/$RUN/summary.json "$OUT/" 2>/dev/null
ls runs/$RUN/grids 2>/dev/null | tail -1 | xargs -I{} cp runs/$RUN/grids/{} "$OUT/grid_last.png"
exit $rc
