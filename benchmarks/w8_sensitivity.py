"""Does the one-step error of the noise prediction say which layers of a quantized checkpoint to give 8-bit weights?

Session 26 found that 8-bit weights in three 1x1 shortcut convs bring W4A8 checkpoints of the bundled model to FP's
FID (results/experiments/cifar10-call-sized, the `_w8sc3` cells). This script asks whether a cheap, teacher-forced
measurement would have found those layers: for each chosen low-bit layer of the checkpoint in turn it gives that layer
alone 8-bit weights (`gacq.quant.api.set_w8_layers`: the float weight rounded to nearest, the rest unchanged) and
measures the noise prediction against the float model's on calibration samples (`measure_output_bias`: each sample's
per-step activation set applied). Per layer: the mean squared error relative to the checkpoint's own (below 1: the
layer at 8 bits helps), the scale error (gain: the least-squares slope of the error on the float prediction, mean
over steps) and the per-channel mean error (the colour offset). Teacher-forced: one step from the float model's
trajectory, not a sampled trajectory.

    python benchmarks/w8_sensitivity.py runs/experiments/cifar10-call-sized/q/tfmq_w4a8_cs2_steps100 \
        --layers 'up_blocks.3.*' --trajectories 16 --out results/w8_sensitivity/tfmq_w4a8_cs2_steps100
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.models import load_model  # noqa: E402
from gacq.quant.api import config_from_json, set_w8_layers  # noqa: E402
from gacq.quant.bias_correction import measure_output_bias  # noqa: E402
from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect  # noqa: E402
from gacq.quant.wrap import quant_layers  # noqa: E402
from gacq.sampling import SampleConfig  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, save_figure, write_json  # noqa: E402


def summarise(m: dict) -> dict:
    """measure_output_bias's result -> mean squared error (count-weighted over steps), mean gain, bias."""
    n = sum(m["count"].values())
    mse = sum(m["rms_by_step"][k] ** 2 * c for k, c in m["count"].items()) / n
    gain = sum(m["gain_by_step"][k] * c for k, c in m["count"].items()) / n
    return {"mse": mse, "gain": gain, "bias": [float(b) for b in m["bias"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a quantized checkpoint folder (gacq quantize)")
    ap.add_argument("--float", dest="float_model", default=None,
                    help="the float model it was quantized from (default: the bundled CIFAR-10 model)")
    ap.add_argument("--layers", nargs="*", default=["*"], help="fnmatch patterns of the low-bit layers to try")
    ap.add_argument("--calib", type=Path, default=None, help="a calibration folder (gacq calib); else collected")
    ap.add_argument("--trajectories", type=int, default=16, help="trajectories to collect when --calib is not given")
    ap.add_argument("--record-steps", type=int, default=10, help="uniformly spaced steps recorded per trajectory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--together", action="store_true",
                    help="also measure every chosen layer at 8-bit weights at once (the `together` entry)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(args.seed)
    fp = load_model(args.float_model)
    q = load_model(str(args.checkpoint))
    fsc = getattr(q.model, "gacq_fsc", None)
    if args.calib is not None:
        calib = CalibrationSet.load(args.calib)
    else:  # along the sampler of the checkpoint's per-step sets, where it has them
        smp = (fsc.sampler if fsc is not None else None) or {}
        cfg = SampleConfig(scheduler=smp.get("scheduler", "ddim"), steps=int(smp.get("steps", 100)),
                           timestep_spacing=smp.get("timestep_spacing", "leading"), seed=args.seed)
        calib = collect(fp, cfg, CalibDataConfig(selection="uniform", n_trajectories=args.trajectories,
                                                 n_steps=args.record_steps, seed=args.seed), progress=True)
    init = config_from_json(json.loads((args.checkpoint / "quant_config.json").read_text())["config"]) \
        .spec().weight_init  # the recipe's grid search, as w8_checkpoint uses
    names = [n for n, m in quant_layers(q.model)
             if m.weight_quantizer.bits < 8 and any(fnmatch.fnmatchcase(n, p) for p in args.layers)]
    if not names:
        print(f"no low-bit layer of {args.checkpoint} matches {args.layers}", file=sys.stderr)
        return 2

    def measure() -> dict:
        return summarise(measure_output_bias(q.model, fp.model, calib, args.batch_size))

    base = measure()
    rows = []

    def at_8_bits(chosen: list[str]) -> dict:
        old = set_w8_layers(q.model, fp.model, chosen, init)
        r = measure()
        for n, m in old.items():  # undo
            q.model.set_submodule(n, m)
        return {**r, "mse_ratio": r["mse"] / base["mse"]}

    for name in tqdm(names, desc="layers at 8 bits", unit="layer"):
        rows.append({"layer": name, **at_8_bits([name])})
    together = {"layers": names, **at_8_bits(names)} if args.together else None
    result = {"checkpoint": str(args.checkpoint), "float_model": args.float_model or "bundled",
              "calibration": str(args.calib) if args.calib else {"trajectories": args.trajectories,
                                                                 "record_steps": args.record_steps, "seed": args.seed},
              "samples": len(calib), "weight_init": init, "base": base, "rows": rows, "together": together,
              "command": "python benchmarks/w8_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": git_commit(), "machine": machine_info(), "wall_seconds": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "w8_sensitivity.json", result)

    ordered = sorted(rows, key=lambda r: r["mse_ratio"])
    lines = [f"# One layer at 8-bit weights: teacher-forced error of {args.checkpoint.name}", "",
             f"`{result['command']}`", "",
             f"Commit {result['commit'][:7]}, {result['wall_seconds']:.0f} s, {len(calib)} calibration samples. "
             "MSE ratio: the noise prediction's mean squared error against the float model with the layer at 8 bits, "
             "over the checkpoint's own (below 1: it helps); gain: the error's least-squares slope on the float "
             "prediction (mean over steps); bias: the per-channel mean error (R, G, B).", "",
             f"Checkpoint as it is: MSE {base['mse']:.3e}, gain {base['gain']:+.4f}, bias "
             f"({', '.join(f'{b:+.4f}' for b in base['bias'])})", "",
             "| layer | MSE ratio | gain | bias R | bias G | bias B |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['mse_ratio']:.4f} | {r['gain']:+.4f} | "
              + " | ".join(f"{b:+.4f}" for b in r["bias"]) + " |" for r in ordered]
    if together is not None:
        lines += ["", f"All {len(names)} at once: MSE ratio {together['mse_ratio']:.4f}, gain {together['gain']:+.4f}, "
                  f"bias ({', '.join(f'{b:+.4f}' for b in together['bias'])})"]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    ax.barh([r["layer"] for r in rows][::-1], [r["mse_ratio"] for r in rows][::-1],
            color=["tab:red" if r["mse_ratio"] > 1 else "tab:blue" for r in rows][::-1])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("noise-prediction MSE with the layer at 8-bit weights / the checkpoint's")
    ax.set_title(args.checkpoint.name, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, args.out / "w8_sensitivity.png")
    print("\n".join(lines[-len(ordered) - (2 if together is not None else 0):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
