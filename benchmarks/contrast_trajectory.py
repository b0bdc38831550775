"""Where along the sampling trajectory do quantized samples lose their contrast?

The call-sized W4A8 checkpoints sample flatter images than the float model, and FID follows that contrast
(results/grid_contrast_call_sized). Teacher-forced, their noise predictions have no scale error to speak of
(results/output_bias_call_sized: gain within +-0.006), so the loss must build up while a model samples from
its own x_t. This script samples the same images (same per-image noise) from the float model and from each
checkpoint and records, at every DDIM step, the model's predicted clean image
x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (model space, [-1, 1] for the data):

    contrast[step]  mean over images of the per-image standard deviation of x0 (all pixels and channels)
    dist[step]      root mean square of x0 - x0_fp at that step (the float run's prediction from the same noise)

and the final images' contrast in pixel units (0-255, as benchmarks/grid_colour.py computes it).
A look at a few images on the CPU, not a metric.

    python benchmarks/contrast_trajectory.py runs/experiments/cifar10-call-sized/q/*_steps100 --num 32 \
        --out results/contrast_trajectory
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import contrast as image_contrast  # noqa: E402
from gacq.conditioning import predict_eps  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.sampling import SampleConfig, generate, make_scheduler  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, save_figure, write_json  # noqa: E402


def recorder(model, abar: torch.Tensor, store: list):
    """model_fn for `generate`: the model's eps, with its x0 prediction appended to `store` (one per step)."""
    def fn(x, t, cond):
        eps = predict_eps(model, x, t, cond)
        a = abar[t.cpu()].to(x.dtype).view(-1, 1, 1, 1).to(x.device)
        store.append(((x - (1 - a).sqrt() * eps) / a.sqrt()).double().cpu())
        return eps
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="quantized checkpoint folders (gacq quantize)")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    t_all = time.time()
    cfg = SampleConfig(steps=args.steps, seed=args.seed)
    runs, fp_x0 = [], None
    marks = sorted({round(f * (args.steps - 1)) for f in (0, 0.25, 0.5, 0.75, 0.9, 1)})  # steps the tables show
    mid = marks[len(marks) // 2]
    for name, path in [("fp", None)] + [(p.name, str(p)) for p in args.checkpoints]:
        t0 = time.time()
        loaded = load_model(path)
        loaded.model.eval()
        abar = make_scheduler(cfg, loaded.scheduler_config).alphas_cumprod.double()
        x0s: list[torch.Tensor] = []
        images = generate(loaded, cfg, range(args.num), model_fn=recorder(loaded.model, abar, x0s))
        if len(x0s) != args.steps:
            raise SystemExit(f"{name}: recorded {len(x0s)} predictions for {args.steps} steps (guidance is not "
                             "supported here)")
        x0 = torch.stack(x0s)  # (steps, N, C, H, W)
        if fp_x0 is None:
            fp_x0 = x0
        contrast = x0.flatten(2).std(dim=2).mean(dim=1)
        dist = (x0 - fp_x0).pow(2).mean(dim=(1, 2, 3, 4)).sqrt()
        runs.append({"model": name, "contrast": contrast.tolist(), "dist": dist.tolist(),
                     "final_contrast": round(image_contrast(images), 3),
                     "seconds": round(time.time() - t0, 1)})
        print(f"{name:36s} x0 contrast at steps {'/'.join(map(str, marks))}: "
              + " ".join(f"{contrast[i]:.3f}" for i in marks)
              + f"  final {runs[-1]['final_contrast']:.1f}  ({runs[-1]['seconds']} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    commit, machine = git_commit(), machine_info()
    write_json(args.out / "contrast_trajectory.json",
               {"command": cmd, "commit": commit, "machine": machine, "num": args.num, "steps": args.steps,
                "seed": args.seed, "runs": runs, "wall_seconds": round(time.time() - t_all, 1)})
    plot(runs, args.out / "contrast_trajectory.png")
    fp_c = runs[0]["contrast"]
    lines = ["# Contrast of the predicted clean image along the sampling trajectory", "",
             f"Command: `{cmd}`; commit {commit}; {round(time.time() - t_all)} s on "
             f"{machine.get('cpus')} CPUs.", "",
             f"{args.num} images, DDIM {args.steps} steps, sampling seed {args.seed}, the same noise for every model. "
             "x0 contrast: per-image standard deviation of the predicted clean image (model space), averaged; "
             "as a ratio to the float run's at the same step. Final: the samples' pixel standard deviation (0-255).",
             "", "| model | " + " | ".join(f"x0 contrast / FP, step {m}" for m in marks)
             + f" | x0 distance to FP, step {mid} / {args.steps - 1} | final contrast |",
             "| --- |" + " --- |" * (len(marks) + 2)]
    for r in runs:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['contrast'][m] / fp_c[m]:.3f}" for m in marks)
                     + f" | {r['dist'][mid]:.3f} / {r['dist'][-1]:.3f} | {r['final_contrast']:.1f} |")
    lines += ["", "![x0 contrast per step](contrast_trajectory.png)", ""]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    fp = np.array(runs[0]["contrast"])
    for r in runs:
        axes[0].plot(np.array(r["contrast"]) / fp, label=r["model"])
        axes[1].plot(r["dist"], label=r["model"])
    axes[0].set_title("x0 contrast / FP's")
    axes[1].set_title("RMS distance of x0 from FP's")
    for ax in axes:
        ax.set_xlabel("sampling step (0 = noisiest)")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
