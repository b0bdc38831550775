#!/usr/bin/env bash
# Issue 9's latent model in one device call: the CIFAR-10 autoencoder (`gacq train-autoencoder`, config ae-f4, 32x32
# -> 8x8x4), then a denoiser on its latents (`gacq train --vae`, config ldm-s), then both packed into 15 MiB float16
# parts (scripts/model_parts.py; the denoiser's folder carries the autoencoder as vae/) that come back in $OUT/ldm/,
# the logs, summaries, reconstructions and last sample grid in $OUT/latent-runs.tgz.
# The training data must be on the machine: carry its parts as for the DiT (scripts/data-parts.sh; this script joins
# them and says which part to carry next). Nothing is quantized here: the latent model is small enough (4M + 3.8M
# parameters, 8x8 latents) for the CPU's quantization and sampling.
# Here afterwards: python scripts/model_parts.py join <returned ldm/ folder> runs/ldm-s/model
# Device: source scripts/gpu-setup.sh; export GACQ_COMMIT=<sha>; AE_MIN=3 LDM_MIN=4 bash scripts/gpu-latent.sh $OUT
# Env: AE_MIN, LDM_MIN (minutes of training; each resumes its run folder when rerun), AE_CONFIG (ae-f4),
# LDM_CONFIG (ldm-s), BATCH (256), DEVICE (cuda), DATA (the joined training zip), EXTRA (more `gacq train` options,
# e.g. --no-bf16 for a CPU dry run).
set -u
OUT=$1
DATA=${DATA:-.data/cifar10-mosaic-train.zip}
[ -e "$DATA" ] || JOIN_ONLY=1 bash scripts/gpu-train.sh || exit 0
DEV=${DEVICE:-cuda}
resume() { [ -f "$1/ckpt/state.json" ] && echo --resume; }
set -o pipefail
python -m gacq train-autoencoder --data "$DATA" --out runs/ae --config "${AE_CONFIG:-ae-f4}" --batch-size "${BATCH:-256}" \
  --lr 1e-3 --warmup-steps 200 --time-budget "${AE_MIN:-3}" --log-every 200 --device "$DEV" $(resume runs/ae) \
  2>&1 | tr '\r' '\n' | grep -v '^autoencoder:' > "$OUT/ae.log" || { echo "autoencoder training failed:"; tail -5 "$OUT/ae.log"; exit 1; }
python -m gacq train --data "$DATA" --out runs/ldm --config "${LDM_CONFIG:-ldm-s}" --vae runs/ae/model \
  --batch-size "${BATCH:-256}" --lr 3e-4 --warmup-steps 500 --ema-decay 0.999 --time-budget "${LDM_MIN:-4}" \
  --ckpt-every 100000 --log-every 250 --device "$DEV" ${EXTRA:-} $(resume runs/ldm) \
  2>&1 | tr '\r' '\n' | grep -v '^training:\|^encoding:' > "$OUT/ldm.log" || { echo "denoiser training failed:"; tail -5 "$OUT/ldm.log"; exit 1; }
R=$(mktemp -d)  # the logs in one file: a call returns at most 8
mv "$OUT/ae.log" "$OUT/ldm.log" "$R/"
cp runs/ae/summary.json "$R/ae-summary.json"; cp runs/ae/log.jsonl "$R/ae-log.jsonl"; cp runs/ae/recon.png "$R/"
cp runs/ldm/summary.json "$R/ldm-summary.json"; cp runs/ldm/log.jsonl "$R/ldm-log.jsonl"
ls runs/ldm/grids | tail -1 | xargs -I{} cp runs/ldm/grids/{} "$R/ldm-grid.png"
tar czf "$OUT/latent-runs.tgz" -C "$R" . && rm -rf "$R"
python scripts/model_parts.py pack runs/ldm/model "$OUT/ldm"
grep -h '"step"' runs/ae/summary.json runs/ldm/summary.json
python -c "import json; s = json.load(open('runs/ae/summary.json')); print('autoencoder PSNR', s['test_psnr_db'], 'dB')"
