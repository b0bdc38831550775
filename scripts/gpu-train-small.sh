#!/usr/bin/env bash
# One device call of the bundled model's training: resumes runs/${RUN:-small} if it exists, trains until
# ~55 s before the call's 600 s limit ($1 = seconds already used by this call), packs the EMA
# model (fp16) and the logs into $OUT. carry: [".whl", ".data"].
# Env: RUN (run folder name), LR, WARMUP, INIT (e.g. "--init-from .init/small_leg1").
used=${1:-0}
budget=$(python3 -c "print(round(max(0.5, (545 - $used - $SECONDS) / 60), 2))")
resume=""; [ -f runs/${RUN:-small}/ckpt/state.json ] && resume="--resume"
python3 -m gacq train --data .data/cifar10-mosaic-train.zip --config small --out runs/${RUN:-small} \
  --batch-size 256 --lr ${LR:-3e-4} --warmup-steps ${WARMUP:-1000} ${INIT:-} --ema-decay 0.9995 --compile \
  --time-budget "$budget" --ckpt-every 2500 --log-every 250 $resume > "$OUT/train.log" 2>&1
cp runs/${RUN:-small}/log.jsonl runs/${RUN:-small}/summary.json "$OUT/" 2>/dev/null
ls runs/${RUN:-small}/grids | tail -1 | xargs -I{} cp runs/${RUN:-small}/grids/{} "$OUT/grid_last.png"
RUN=${RUN:-small} python3 - <<'PY'
import torch, os
from gacq.models import load_model, save_model
m = load_model(f"runs/{os.environ['RUN']}/model")
save_model(m.model, f"runs/{os.environ['RUN']}_fp16", m.scheduler_config, dtype=torch.float16)
PY
bash scripts/pack-out.sh runs/${RUN:-small}_fp16 model_fp16
