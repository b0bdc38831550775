"""Does activation smoothing (SmoothQuant, `gacq quantize --smooth ALPHA`) recover a DiT's 8-bit activation loss?

The dit-xs probes (results/dit_layer_groups) found that at W8A8 the activations cost most of the loss (weights alone:
45.1 dB PSNR against the float samples; W8A8 37.6 dB), most of it the MLP's, and that reconstruction (tfmq, gac)
does not change it. This script quantizes a model at each smoothing strength alpha (and without smoothing), samples
each checkpoint from the same noise and labels as the float model (`gacq.compare.compare`) and reports PSNR against
the float samples:

    python benchmarks/smooth_sweep.py --model runs/dit-xs/model --calib runs/local/dit-xs-calib \
        --out results/smooth_sweep --alphas none,0.25,0.5,0.75 --bits W8A8,W4A8 --num 64 --steps 50 --guidance-scale 1.5

`--method` (rtn by default) and `--iters` / `--act-iters` choose the quantization; `--layers` restricts smoothing to
fnmatch patterns (default: every Linear layer with a quantized input). `--granularities tensor,token` also sweeps the
Linear inputs' grid (`--act-granularity`: calibrated per tensor, or dynamic per token). A probe on models trained here.
Writes OUT/smooth_sweep.json and OUT/smooth_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import compare  # noqa: E402
from gacq.experiment import parse_bits  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.api import QuantConfig, quantize_to_dir  # noqa: E402
from gacq.quant.recon import ActReconConfig, ReconConfig  # noqa: E402
from gacq.sampling import SampleConfig  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration folder from `gacq calib --selection all`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--alphas", default="none,0.25,0.5,0.75", help="comma-separated; 'none' = no smoothing")
    ap.add_argument("--bits", default="W8A8,W4A8")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--act-iters", type=int, default=100)
    ap.add_argument("--granularities", default="tensor", help="comma-separated act granularities: tensor, token")
    ap.add_argument("--layers", default=None, help="comma-separated fnmatch patterns of the layers to smooth")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="runs/smooth_sweep")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    layers = tuple(args.layers.split(",")) if args.layers else None
    t_start, commit = time.time(), git_commit()  # the code this run starts with
    fp = load_model(args.model, device=args.device)
    cfg = SampleConfig(num=args.num, steps=args.steps, batch_size=args.num, guidance_scale=args.guidance_scale)
    rows = []
    for bits in args.bits.split(","):
        w, a = parse_bits(bits)
        for al, gran in [(al, g.strip()) for g in args.granularities.split(",") for al in args.alphas.split(",")]:
            alpha = None if al.strip() == "none" else float(al)
            tag = f"{args.method}_{bits.strip().lower()}_smooth{al.strip()}" + ("" if gran == "tensor" else f"_{gran}")
            t0 = time.time()
            qdir = work / tag
            if not (qdir / "quant_config.json").exists():
                quantize_to_dir(fp, QuantConfig(method=args.method, wbits=w, abits=a, smooth=alpha, smooth_layers=layers,
                                                act_granularity=gran, recon=ReconConfig(iters=args.iters),
                                                act_recon=ActReconConfig(iters=args.act_iters),
                                                recon_checkpoints=str(qdir) + ".recon-ckpt"),
                                qdir, calib=args.calib, device=args.device, progress=False)
            meta = json.loads((qdir / "quant_config.json").read_text())
            q = load_model(str(qdir), device=args.device)
            rep = compare(fp, q, cfg, work / f"compare_{tag}", device=args.device, metrics=False, label=tag)
            sm = meta.get("smoothing") or {}
            rows.append({"bits": bits.strip().upper(), "method": args.method, "alpha": alpha, "act_granularity": gran,
                         "smoothed_layers": sm.get("layers", 0), "max_scale_spread": sm.get("max_scale_spread"),
                         "psnr_db_mean": rep["psnr_db_mean"], "psnr_db_min": rep["psnr_db_min"],
                         "quantize_seconds": meta.get("wall_seconds"), "seconds": round(time.time() - t0, 1)})
            print(f"{rows[-1]['bits']} {gran:6s} alpha {al.strip():5s} smoothed {rows[-1]['smoothed_layers']:3d}  "
                  f"PSNR {rep['psnr_db_mean']:.2f} dB (min {rep['psnr_db_min']:.2f})", flush=True)
    res = {"command": "python " + " ".join(sys.argv), "commit": commit, "machine": machine_info(),
           "wall_seconds": round(time.time() - t_start, 1), "model": args.model, "calib": args.calib,
           "method": args.method, "smooth_layers": list(layers) if layers else "every Linear with a quantized input",
           "sampler": {"steps": args.steps, "num": args.num, "guidance_scale": args.guidance_scale, "seed": 0},
           "rows": rows}
    write_json(out / "smooth_sweep.json", res)
    lines = [f"# Activation smoothing sweep ({args.model}, {args.method})", "",
             f"`{res['command']}` (commit {res['commit']}, {res['machine'].get('gpu') or 'CPU'}, "
             f"{res['wall_seconds']:.0f} s). {args.num} images, DDIM {args.steps} steps, guidance "
             f"{args.guidance_scale}, the same noise and labels as the float model's; PSNR of each checkpoint's images "
             "against the float model's (higher is closer). alpha: SmoothQuant's migration strength (none: off). "
             "inputs: the Linear layers' input grids (tensor: calibrated per tensor; token: dynamic per token).", "",
             "| bits | inputs | alpha | smoothed layers | max s / min s (widest layer) | PSNR mean dB | PSNR min dB | quantize s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['bits']} | {r.get('act_granularity', 'tensor')} | {r['alpha'] if r['alpha'] is not None else 'none'} | {r['smoothed_layers']} | "
              f"{r['max_scale_spread'] if r['max_scale_spread'] is not None else '-'} | {r['psnr_db_mean']:.2f} | "
              f"{r['psnr_db_min']:.2f} | {r['quantize_seconds']} |" for r in rows]
    with atomic_path(out / "smooth_sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'smooth_sweep.md'}")


if __name__ == "__main__":
    main()
