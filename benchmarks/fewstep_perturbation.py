"""Does any perturbation of the noise prediction lower a few-step DDIM sampler's FID on the bundled model?

Session 20's few-step W4A8 cells (experiments/cifar10-call-sized.toml) gave a lower FID than the float model at 5
and 20 DDIM steps (5: FP 104.10, tfmq 87.49, gac 74.53; 20: FP 54.32, tfmq 51.38, gac 52.14) but not at 10. One
reading: a 5-step deterministic sampler's images are over-smoothed, and an error in the noise prediction that adds
detail or changes contrast moves them towards the data. This script tests that reading without any quantized
checkpoint: it samples the bundled float model from the same initial noise with its noise prediction perturbed in
two simple ways,

    noise r    eps + r * rms(eps) * z, z ~ N(0, 1) drawn fresh per step (seeded), r relative to eps's rms per image
    scale s    eps * s (an error that shrinks or grows the prediction uniformly)

and measures each set's FID (and sFID, precision, recall) on gacq's `cifar10` features against the bundled
training-set statistics. Every set has the same sample count and the same initial noise, so the sets compare with
each other; the FID of a few thousand samples is biased upwards and does not compare with the 10,000-sample cells.

    python benchmarks/fewstep_perturbation.py --steps 5,20 --noise 0.05,0.1,0.2 --scale 0.95,1.05 --num 2000 \
        --out results/fewstep_perturbation
    # CPU smoke test
    python benchmarks/fewstep_perturbation.py --steps 2 --noise 0.1 --scale 0.9 --num 20 --out /tmp/fsp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.conditioning import predict_eps  # noqa: E402
from gacq.metrics import evaluate  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.sampling import SampleConfig, generate  # noqa: E402
from gacq.utils import atomic_path, git_commit, image_grid, machine_info, save_image, write_json  # noqa: E402


def perturbed_fn(model, kind: str, value: float, seed: int):
    """model_fn for `gacq.sampling.generate`: the float noise prediction, perturbed. The noise is drawn from a
    generator seeded once per batch, so a set is reproducible and its draws differ between steps."""
    gen = torch.Generator().manual_seed(seed)

    def fn(x, t, cond):
        eps = predict_eps(model, x, t, cond)
        if kind == "scale":
            return eps * value
        rms = eps.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        return eps + value * rms * torch.randn(eps.shape, generator=gen).to(eps)
    return fn


def parse_floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="5,20", help="comma-separated DDIM step counts")
    ap.add_argument("--noise", default="0.05,0.1,0.2", help="relative noise levels r")
    ap.add_argument("--scale", default="0.95,1.05", help="scale factors s")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.num < 2:
        raise SystemExit("--num must be at least 2 (the metrics need a covariance)")
    t_all = time.time()
    torch.set_grad_enabled(False)
    loaded = load_model(None)
    sets = [("fp", 1.0)] + [("noise", r) for r in parse_floats(args.noise)] + \
        [("scale", s) for s in parse_floats(args.scale)]
    rows, grids = [], []
    for steps in [int(v) for v in args.steps.split(",")]:
        cfg = SampleConfig(steps=steps, seed=args.seed)
        for kind, value in sets:
            label = "fp" if kind == "fp" else f"{kind} {value:g}"
            t0 = time.time()
            parts = []
            for b0 in tqdm(range(0, args.num, args.batch), desc=f"{steps} steps, {label}", leave=False):
                idx = range(b0, min(b0 + args.batch, args.num))
                fn = None if kind == "fp" else perturbed_fn(loaded.model, kind, value, args.seed * 100003 + b0)
                parts.append(generate(loaded, cfg, idx, model_fn=fn))
            images = np.concatenate(parts)
            sample_s = time.time() - t0
            m = evaluate(images, progress=False)
            rows.append({"steps": steps, "kind": kind, "value": value, "label": label, "fid": m["fid"],
                         "sfid": m["sfid"], "precision": m["precision"], "recall": m["recall"],
                         "is_mean": m["is_mean"], "n": m["samples"]["n"], "sample_seconds": round(sample_s, 1)})
            grids.append(images[:8])
            print(f"{steps} steps, {label}: FID {m['fid']:.2f}  sFID {m['sfid']:.4f}  P {m['precision']:.3f}  "
                  f"R {m['recall']:.3f}  ({sample_s:.0f} s)", flush=True)
            feature = m["feature_network"]
    args.out.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(np.concatenate(grids), ncols=8), args.out / "grids.png")
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    result = {"command": cmd, "commit": git_commit(), "machine": machine_info(), "feature_network": feature,
              "num": args.num, "seed": args.seed, "rows": rows, "wall_seconds": round(time.time() - t_all, 1)}
    write_json(args.out / "fewstep_perturbation.json", result)
    lines = ["# A few-step sampler's FID under perturbed noise predictions (bundled model)", "",
             f"Command: `{cmd}`; commit {result['commit']}; {result['machine'].get('gpu') or 'CPU'}; "
             f"{result['wall_seconds']} s. {args.num} samples per set (same initial noise in every set), DDIM eta 0, "
             f"seed {args.seed}. Features: `{feature['name']}` ({feature['hash']}): {feature['note']}. FID from "
             f"{args.num} samples is biased upwards: compare the rows with each other only.", "",
             "| steps | noise prediction | FID | sFID | precision | recall | IS |", "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['label']} | {r['fid']:.2f} | {r['sfid']:.4f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['is_mean']:.3f} |" for r in rows]
    lines += ["", "`noise r`: eps + r * rms(eps) * z with fresh Gaussian z per step; `scale s`: eps * s. "
              "[grids.png](grids.png): the first 8 images of each set, one row per set in the table's order."]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
