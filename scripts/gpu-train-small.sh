#!/usr/bin/env bash
# One device call of the bundled model's training: resumes runs/small if it exists, trains until
# ~30 s before the call's 600 s limit ($1 = seconds already used by this call), packs the EMA
# model (fp16) and the logs into $OUT. carry: [".whl", ".data"].
used=${1:-0}
budget=$(python3 -c "print(round(max(0.5, (545 - $used - $SECONDS) / 60), 2))")
resume=""; [ -f runs/small/ckpt/state.json ] && resume="--resume"
python3 -m gacq train --data .data/cifar10-mosaic-train.zip --config small --out runs/small \
  --batch-size 256 --lr 3e-4 --warmup-steps 1000 --ema-decay 0.9995 --compile \
  --time-budget "$budget" --ckpt-every 2500 --log-every 250 $resume > "$OUT/train.log" 2>&1
cp runs/small/log.jsonl runs/small/summary.json "$OUT/" 2>/dev/null
ls runs/small/grids | tail -1 | xargs -I{} cp runs/small/grids/{} "$OUT/grid_last.png"
python3 - <<'PY'
import torch, os
from gacq.models import load_model, save_model
m = load_model("runs/small/model")
save_model(m.model, "runs/small_fp16", m.scheduler_config, dtype=torch.float16)
PY
bash scripts/pack-out.sh runs/small_fp16 model_fp16
