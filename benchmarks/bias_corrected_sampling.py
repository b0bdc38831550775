"""Does removing the per-channel bias of a quantized model's noise prediction remove its colour cast?

`benchmarks/output_bias.py` measures, teacher-forced on float trajectories, the mean error of a
checkpoint's noise prediction per colour channel at recorded sampling steps. This script samples
the same images (same per-sample noise) four ways on this machine:

    fp          the float model
    quantized   the checkpoint as it is
    corrected   the checkpoint with that bias subtracted from its noise prediction at every step
                (each step uses the bias of the nearest recorded step at or before it)
    folded      what `gacq quantize --bias-correction` ships: one bias per channel (the mean over the
                recorded steps) folded into the last layer (`gacq.quant.bias_correction.fold_output_bias`)

and reports each set's mean RGB, contrast, pixel PSNR against the float images, and a grid of the sets
(rows of 8: fp, quantized, corrected, folded).
A quick hypothesis test on a few images, not a metric: FID needs thousands of samples.

    python benchmarks/bias_corrected_sampling.py runs/experiments/cifar10-table/q/gac_w3a8_cs1_steps100 \
        --bias results/output_bias/output_bias.json --num 32 --out results/bias_corrected_sampling
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import contrast, psnr  # noqa: E402
from gacq.conditioning import predict_eps  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.bias_correction import fold_output_bias  # noqa: E402
from gacq.sampling import SampleConfig, generate, make_scheduler  # noqa: E402
from gacq.utils import git_commit, image_grid, machine_info, save_image, write_json  # noqa: E402


def corrected_fn(model, bias: torch.Tensor, rec_steps: list[int], timesteps: list[int]):
    """model_fn for `generate`: eps - bias[step], the step found from the timestep."""
    step_of = {t: i for i, t in enumerate(timesteps)}

    def fn(x, t, cond):
        i = step_of[int(t[0])]
        j = max(bisect.bisect_right(rec_steps, i) - 1, 0)
        return predict_eps(model, x, t, cond) - bias[:, j].to(x.dtype).view(1, -1, 1, 1)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--bias", required=True, type=Path, help="output_bias.json with this checkpoint")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    t_all = time.time()
    rec = json.loads(args.bias.read_text())
    row = next((r for r in rec["checkpoints"] if r["checkpoint"] == args.checkpoint.name), None)
    if row is None:
        raise SystemExit(f"{args.bias} has no bias for {args.checkpoint.name}; run benchmarks/output_bias.py on it")
    if int(rec["settings"]["steps"]) != args.steps:
        raise SystemExit(f"{args.bias} was measured on {rec['settings']['steps']}-step trajectories, not {args.steps}")
    bias = torch.tensor(row["bias"], dtype=torch.float64)  # (C, recorded steps)

    cfg = SampleConfig(steps=args.steps, seed=args.seed)
    fp = load_model(None)
    q = load_model(str(args.checkpoint))
    timesteps = [int(t) for t in make_scheduler(cfg, q.scheduler_config).timesteps]
    images, seconds = {}, {}
    qf = load_model(str(args.checkpoint))
    fold_output_bias(qf.model, bias.mean(1))
    for name, loaded, fn in [("fp", fp, None), ("quantized", q, None),
                             ("corrected", q, corrected_fn(q.model, bias, rec["steps"], timesteps)),
                             ("folded", qf, None)]:
        t0 = time.time()
        images[name] = generate(loaded, cfg, range(args.num), model_fn=fn)
        seconds[name] = round(time.time() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    rows = {k: {"mean_rgb": v.reshape(-1, 3).mean(0).round(2).tolist(),
                "psnr_vs_fp_db": float(np.mean(np.minimum(psnr(images["fp"], v), 99.0))),
                "contrast": round(contrast(v), 3),  # as benchmarks/grid_colour.py's
                "seconds": seconds[k]}
            for k, v in images.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(np.concatenate([images[k][:8] for k in ("fp", "quantized", "corrected", "folded")]), ncols=8),
               args.out / f"{args.checkpoint.name}.png")
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    result = {"command": cmd, "commit": git_commit(), "machine": machine_info(), "checkpoint": str(args.checkpoint),
              "num": args.num, "steps": args.steps, "seed": args.seed, "sets": rows,
              "wall_seconds": round(time.time() - t_all, 1)}
    write_json(args.out / f"{args.checkpoint.name}.json", result)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
