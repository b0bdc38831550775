"""Per-channel bias of quantized noise predictions: does it explain a colour cast?

Some W3A8 checkpoints of the bundled model sample images with a strong blue cast, and those
have the worst FID (results/grid_colour). A cast is a shift of the image mean per colour
channel, which DDIM can build up from a per-channel mean error of the predicted noise, step after
step (the model then sees its own drifted x_t, so the sign of the final shift is not simply the
sign of one step's error: this script measures the relation rather than assuming it).

For FP DDIM trajectories (teacher forcing: every model sees the same float x_t), this script
measures for each quantized checkpoint and step the error of its noise prediction against the
float model's (`gacq.quant.bias_correction.measure_output_bias`: a checkpoint with per-step
activation sets gets the set of each input's step), split into

    bias[c, step] = mean over samples and pixels of (eps_q - eps_fp) in channel c
    rms[step]     = root mean square of (eps_q - eps_fp) over everything
    gain[step]    = sum((eps_q - eps_fp) * eps_fp) / sum(eps_fp^2): how much more (+) or less (-) of the float
                    prediction the quantized model predicts (a scale error, which a loss of contrast could come from)

and, where a sample grid's colour and contrast are given (`benchmarks/grid_colour.py`'s JSON) and a cell's
FID (the experiment's cell JSONs), relates them across checkpoints (Pearson r over checkpoints).

    python benchmarks/output_bias.py runs/experiments/cifar10-table/q/*w3a8* --out results/output_bias \
        --colours results/grid_colour/grid_colour.json --cells results/experiments/cifar10-table/cells
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.diagnostics import pearson  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.bias_correction import measure_output_bias  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, save_figure, write_json  # noqa: E402
from gac_meta_study import calibration  # noqa: E402  (this script's folder: benchmarks/)

CHANNELS = "RGB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="quantized checkpoint folders (gacq quantize)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default=None, help="the float model (default: each checkpoint's base, the bundled model)")
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps of the float trajectories")
    ap.add_argument("--record", type=int, default=20, help="recorded steps per trajectory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--colours", type=Path, default=None, help="grid_colour.json (benchmarks/grid_colour.py)")
    ap.add_argument("--cells", type=Path, default=None, help="folder of experiment cell JSONs (for FID)")
    args = ap.parse_args(argv)
    t_all = time.time()
    torch.manual_seed(0)

    fp = load_model(args.model)
    fp.model.eval()
    calib = calibration(fp, args.trajectories, args.seed, args.steps, args.record, "cpu", batch_size=args.batch,
                        progress=True)
    steps = sorted(set(calib.step.tolist()))
    print(f"float trajectories: {len(calib.x)} inputs at {len(steps)} steps ({time.time() - t_all:.0f} s)", flush=True)

    colours = json.loads(args.colours.read_text()) if args.colours else None
    fids = {}
    if args.cells:
        for f in sorted(args.cells.glob("*.json")):
            cell = json.loads(f.read_text())
            job = (cell.get("quantize") or {}).get("job")
            if job and not (cell["quantize"].get("float_acts")):
                fids[job] = cell["metrics"]["fid"]

    rows = []
    for qdir in args.checkpoints:
        t0 = time.time()
        q = load_model(str(qdir))
        q.model.eval()
        m = measure_output_bias(q.model, fp.model, calib, args.batch)  # per-step activation sets applied
        bias = torch.stack([m["by_step"][k] for k in steps], dim=1).numpy()
        rms = np.array([m["rms_by_step"][k] for k in steps])
        gain = np.array([m["gain_by_step"][k] for k in steps])
        job = qdir.name
        row = {"checkpoint": job, "bias": bias.tolist(), "rms": rms.tolist(), "gain": gain.tolist(),
               "mean_bias": bias.mean(1).tolist(), "mean_rms": float(rms.mean()), "mean_gain": float(gain.mean()),
               "fid": fids.get(job),
               "seconds": round(time.time() - t0, 1)}
        if colours:
            grid = next((g for g in colours["rows"] if Path(g["grid"]).stem.startswith(job + "_seed")), None)
            if grid:
                row["grid_rgb"] = grid["mean_rgb"]
                if "contrast" in grid:
                    row["grid_contrast"] = grid["contrast"]
        rows.append(row)
        print(f"{job:28s} mean bias R {bias[0].mean():+.4f} G {bias[1].mean():+.4f} B {bias[2].mean():+.4f}  "
              f"rms {rms.mean():.4f}  gain {gain.mean():+.5f}  ({row['seconds']} s)", flush=True)

    # across checkpoints: the blue-minus-red bias of the noise prediction against the grids' blue-minus-red
    # colour and against FID
    br_bias = [r["mean_bias"][2] - r["mean_bias"][0] for r in rows]
    summary = {}
    with_rgb = [(b, r) for b, r in zip(br_bias, rows) if "grid_rgb" in r]
    if len(with_rgb) >= 3:
        summary["r_bias_vs_grid_b_minus_r"] = pearson([b for b, _ in with_rgb],
                                                      [r["grid_rgb"][2] - r["grid_rgb"][0] for _, r in with_rgb])
    with_fid = [(b, r) for b, r in zip(br_bias, rows) if r["fid"] is not None]
    if len(with_fid) >= 3:
        summary["r_abs_bias_vs_fid"] = pearson([abs(b) for b, _ in with_fid], [r["fid"] for _, r in with_fid])
        summary["r_rms_vs_fid"] = pearson([r["mean_rms"] for _, r in with_fid], [r["fid"] for _, r in with_fid])
        summary["r_gain_vs_fid"] = pearson([r["mean_gain"] for _, r in with_fid], [r["fid"] for _, r in with_fid])
    with_contrast = [r for r in rows if "grid_contrast" in r]
    if len(with_contrast) >= 3:
        summary["r_gain_vs_grid_contrast"] = pearson([r["mean_gain"] for r in with_contrast],
                                                     [r["grid_contrast"] for r in with_contrast])

    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    result = {"command": cmd, "commit": git_commit(), "machine": machine_info(),
              "wall_seconds": round(time.time() - t_all, 1), "settings": {k: str(v) for k, v in vars(args).items()},
              "steps": steps, "checkpoints": rows, "summary": summary}
    write_json(args.out / "output_bias.json", result)
    plot(rows, steps, args.out / "output_bias.png")
    lines = ["# Per-channel bias of quantized noise predictions", "",
             f"Command: `{cmd}`; commit {result['commit']}; {result['wall_seconds']} s on "
             f"{result['machine'].get('cpus')} CPUs.", "",
             f"Teacher-forced: {args.trajectories} float DDIM-{args.steps} trajectories (seed {args.seed}), "
             f"{len(steps)} recorded steps each; every model predicts the noise of the same float x_t. "
             "Bias: mean of eps_q - eps_fp per channel, averaged over steps. Gain: the least-squares slope of "
             "eps_q - eps_fp on eps_fp, averaged over steps (+0.01: 1 % more of the float prediction). Grid RGB: mean colour of the cell's sample grid (FP: see results/grid_colour). "
             "FID: cifar10 feature network (hash 4e70bc356286329a, not Inception), from the experiment's cells.", "",
             "| checkpoint | bias R | bias G | bias B | B - R | rms | gain | grid RGB | grid contrast | FID |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, br in zip(rows, br_bias):
        rgb = " ".join(f"{v:.0f}" for v in r["grid_rgb"]) if "grid_rgb" in r else ""
        fid = f"{r['fid']:.2f}" if r["fid"] is not None else ""
        b = r["mean_bias"]
        contrast = f"{r['grid_contrast']:.1f}" if "grid_contrast" in r else ""
        lines.append(f"| {r['checkpoint']} | {b[0]:+.4f} | {b[1]:+.4f} | {b[2]:+.4f} | {br:+.4f} | {r['mean_rms']:.4f} "
                     f"| {r['mean_gain']:+.5f} | {rgb} | {contrast} | {fid} |")
    if summary:
        lines += ["", "Across checkpoints (Pearson r): " + ", ".join(f"{k} = {v:.3f}" for k, v in summary.items()) + "."]
    lines += ["", "![bias per step](output_bias.png)", ""]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], steps: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[1].sharey(axes[0]), axes[2].sharey(axes[0])
    for c, ax in enumerate(axes[:3]):
        for r in rows:
            ax.plot(steps, r["bias"][c], label=r["checkpoint"])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"channel {CHANNELS[c]}: mean eps_q - eps_fp")
        ax.set_xlabel("sampling step (0 = noisiest)")
    for r in rows:
        axes[3].plot(steps, r["gain"], label=r["checkpoint"])
    axes[3].axhline(0, color="k", lw=0.5)
    axes[3].set_title("gain: slope of eps_q - eps_fp on eps_fp")
    axes[3].set_xlabel("sampling step (0 = noisiest)")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
