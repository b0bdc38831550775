"""Write the bundled model's card and results/bundled_model.{json,md} from its training logs.

    python scripts/model_card.py --model gacq/assets/cifar10-small \
        --leg LOG1.jsonl:SUMMARY1.json:"COMMAND1" --leg LOG2.jsonl:SUMMARY2.json:"COMMAND2" \
        --grid GRID.png --sample-meta samples/demo/meta.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gacq.utils import git_commit, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--leg", action="append", required=True, help="LOG.jsonl:SUMMARY.json:COMMAND")
    ap.add_argument("--grid", required=True)
    ap.add_argument("--sample-meta", required=True)
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    model, results = Path(args.model), Path(args.results)
    legs, offset_img, offset_s = [], 0, 0.0
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, spec in enumerate(args.leg, 1):
        log_path, summary_path, command = spec.split(":", 2)
        rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
        summary = json.loads(Path(summary_path).read_text())
        ax.plot([(offset_img + r["images_seen"]) / 1e6 for r in rows], [r["loss"] for r in rows], label=f"leg {k}")
        legs.append({"leg": k, "command": command, "steps": summary["step"], "images_seen": summary["images_seen"],
                     "train_seconds": summary["train_seconds_total"], "commit": summary.get("commit"),
                     "device": summary["machine"].get("gpu", summary["device"]),
                     "final_loss": rows[-1]["loss"], "median_images_per_s":
                     sorted(r["images_per_s"] for r in rows)[len(rows) // 2]})
        offset_img += summary["images_seen"]
        offset_s += summary["train_seconds_total"]
    ax.set_xlabel("images seen (millions)")
    ax.set_ylabel("training loss (eps MSE, 250-step mean)")
    ax.set_ylim(0.025, 0.045)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    results.mkdir(exist_ok=True)
    fig.savefig(results / "bundled_model_loss.png", dpi=120)
    shutil.copy(args.grid, model / "grid.png")
    shutil.copy(args.grid, results / "bundled_model_grid.png")
    meta = json.loads(Path(args.sample_meta).read_text())
    cpu = {"command": "gacq sample --num 16 --out samples/demo", "images": meta["shape"][0], "steps": meta["steps"],
           "scheduler": meta["scheduler"], "wall_seconds": meta["wall_seconds_this_run"],
           "machine": meta["machine"], "commit": meta["commit"]}
    total = {"images_seen": offset_img, "gpu_train_seconds": round(offset_s, 1)}
    write_json(results / "bundled_model.json", {"legs": legs, "total": total, "cpu_sampling": cpu,
                                                 "written_by": "python " + " ".join(sys.argv), "commit": git_commit()})
    leg_rows = "\n".join(
        f"| {g['leg']} | {g['steps']:,} | {g['images_seen'] / 1e6:.2f}M | {g['train_seconds'] / 60:.1f} | "
        f"{g['median_images_per_s']:.0f} | {g['final_loss']:.4f} | `{g['command']}` |" for g in legs)
    table = ("| leg | steps | images | GPU min | images/s | final loss | command |\n|---|---|---|---|---|---|---|\n"
             + leg_rows)
    cpu_line = (f"CPU sampling (`{cpu['command']}`): {cpu['images']} images x {cpu['steps']} {cpu['scheduler'].upper()} "
                f"steps in {cpu['wall_seconds']:.1f} s on {cpu['machine']['cpus']} CPU cores "
                f"(torch {cpu['machine']['torch']}, commit {cpu['commit']}).")
    md = f"""# Bundled model: training record

Written by `{"python " + " ".join(sys.argv)}`.

Trained on an {legs[0]['device']}; {total['images_seen'] / 1e6:.2f}M images seen in
{total['gpu_train_seconds'] / 60:.1f} GPU minutes of training calls (compilation and checkpoints included).

{table}

![loss](bundled_model_loss.png)

{cpu_line}

![samples](bundled_model_grid.png)
"""
    (results / "bundled_model.md").write_text(md)
    card = f"""# cifar10-small: the bundled CIFAR-10 diffusion model

A DDPM (epsilon-prediction) `UNet2DModel` trained by gacq on CIFAR-10 32x32, stored as a diffusers
DDPM pipeline folder (`unet/` fp16 safetensors, `scheduler/`). `gacq` commands use it when `--model` is
omitted; `diffusers.DDPMPipeline.from_pretrained` reads it too.

- **Architecture**: gacq config `small` = the DDPM CIFAR-10 UNet (Ho et al. 2020, 2 res blocks per level,
  attention at 16x16, dropout 0.1) with base 64 channels instead of 128: channels (64, 128, 128, 128),
  8,952,067 parameters. Weights: the EMA (decay 0.9995) of the training weights, stored in fp16 (18 MB).
- **Noise schedule**: T = 1000, linear betas 1e-4 to 0.02 (the DDPM CIFAR-10 setup).
- **Data**: the 50,000 CIFAR-10 training images (the JPEG redistribution, decoded from the mosaic zip),
  random horizontal flips.
- **Training**: AdamW (betas 0.9/0.999, no weight decay), batch 256, gradient clipping at 1.0, bf16
  autocast, torch.compile; {total['images_seen'] / 1e6:.2f}M images ({total['images_seen'] / 50000:.0f} epochs) in
  {total['gpu_train_seconds'] / 60:.1f} GPU minutes on an H100, in {len(legs)} legs:

{table}

  Leg 2 started from leg 1's EMA weights with a fresh optimizer (`--init-from`): the full leg-1 checkpoint
  (weights, EMA and optimizer, 144 MB) could not leave the GPU machine, whose calls return at most 64 MB.
  This is far less training than the original DDPM (800k steps of batch 128, about 100M images), so
  expect a weaker model than the published one.
- **Quality**: no FID yet (gacq's evaluation is issue 4); see the grid below (DDIM 50 steps, 64 samples,
  written by the last training checkpoint).
- **Sampling cost**: {cpu_line}

![samples](grid.png)
"""
    (model / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()
