"""`gacq sample --compile` against eager sampling, side by side in one run: wall time, images per second and how far
the compiled images are from the eager ones (same seeds, so the same noise).

For each model (`bundled` is the bundled CIFAR-10 model; otherwise a model folder, a `gacq quantize` checkpoint or a
`gacq export` folder) it samples NUM images eagerly and then compiled (`SampleConfig.compile`: torch.compile, and on
CUDA one CUDA graph per batch replayed per step), each into its own folder. Before each timed run one batch of the
same shape is sampled with 2 steps and timed apart (the warm-up: cuDNN's algorithm choice eagerly; torch.compile's
compilation and the graph capture compiled), so the timed run is the steady state; both figures are recorded.

    # on the GPU: the bundled model, a W4A8 fake-quant checkpoint and an int8 export, 5,000 images each
    python benchmarks/compiled_sampling.py --models bundled,runs/q48,runs/e88 --num 5000 --batch-size 1000 \\
        --device cuda --fid --out $OUT/compiled_sampling

Writes OUT/compiled_sampling.json (command, commit, machine, per-model rows) and OUT/compiled_sampling.md.
`--fid` adds each run's FID against the CIFAR-10 training statistics (gacq's own feature network; the json names
it), to see whether the rounding differences move the metric.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def image_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two uint8 image sets of the same noise are apart: mean and largest absolute difference in levels, the
    fraction of values that differ, and the PSNR of b against a (None when they are equal)."""
    d = a.astype(np.int16) - b.astype(np.int16)
    mse = float(np.mean(d.astype(np.float64) ** 2))
    return {"mean_abs_levels": round(float(np.abs(d).mean()), 4), "max_abs_levels": int(np.abs(d).max()),
            "fraction_differing": round(float((d != 0).mean()), 6),
            "psnr_db": round(10 * math.log10(255.0**2 / mse), 2) if mse > 0 else None}


def run_model(spec: str, args, root: Path) -> list[dict]:
    import torch

    from gacq.models import load_model
    from gacq.quant.primitives import use_fused_fake_quant
    from gacq.sampling import SampleConfig, generate, sample

    device = torch.device(args.device)
    loaded = load_model(None if spec == "bundled" else spec, device=device)
    base = SampleConfig(steps=args.steps, num=args.num, batch_size=args.batch_size, seed=args.seed)
    name = Path(spec).name
    rows, images = [], {}
    with use_fused_fake_quant() if device.type == "cuda" else contextlib.nullcontext():
        for mode in ("eager", "compiled"):
            cfg = dataclasses.replace(base, compile=mode == "compiled")
            print(f"[compiled-sampling] {name}, {mode}", flush=True)
            t0 = time.perf_counter()
            generate(loaded, dataclasses.replace(cfg, steps=2), range(min(args.batch_size, args.num)), device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            warmup = time.perf_counter() - t0
            out = root / f"{name}-{mode}"
            meta = sample(loaded, cfg, out, device=device, progress=False)
            images[mode] = np.load(out / "samples.npz")["images"]
            row = {"model": spec, "source": loaded.source, "mode": mode, "num": args.num,
                   "batch_size": args.batch_size, "steps": args.steps, "warmup_seconds": round(warmup, 2),
                   "wall_seconds": meta["wall_seconds_this_run"],
                   "images_per_second": round(args.num / meta["wall_seconds_this_run"], 2)}
            if args.fid:
                from gacq.metrics import evaluate

                m = evaluate(out / "samples.npz", device=device, progress=False)
                row["fid"] = round(m["fid"], 3)
                row["feature_network"] = m["feature_network"]
            rows.append(row)
            print(f"  warm-up {warmup:.1f} s, {row['wall_seconds']:.1f} s, {row['images_per_second']} img/s",
                  flush=True)
    eager, compiled = rows
    compiled["speedup_vs_eager"] = round(eager["wall_seconds"] / compiled["wall_seconds"], 3)
    compiled["difference_from_eager"] = image_difference(images["eager"], images["compiled"])
    return rows


def render(result: dict) -> str:
    fid = any("fid" in r for r in result["rows"])
    net = next((r["feature_network"]["name"] for r in result["rows"] if "feature_network" in r), None)
    lines = ["# Compiled sampling against eager, side by side", "", f"`{result['command']}`", "",
             (f"commit {result['commit']}, {result['machine'].get('gpu') or 'CPU'}, {result['wall_seconds']} s in all; "
              "speedup = eager wall / compiled wall (steady state: the warm-up, a 2-step batch of the same shape that "
              "holds the compilation and graph capture, is timed apart)"), "",
             ("| model | mode | warm-up s | wall s | images/s | speedup | mean abs diff (levels) | max | PSNR dB |"
              + (" FID |" if fid else "")),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if fid else "")]
    for r in result["rows"]:
        d = r.get("difference_from_eager", {})
        psnr = "equal" if d and d["psnr_db"] is None else d.get("psnr_db", "-")
        lines.append(f"| {r['model']} | {r['mode']} | {r['warmup_seconds']} | {r['wall_seconds']} | "
                     f"{r['images_per_second']} | {r.get('speedup_vs_eager', '-')} | {d.get('mean_abs_levels', '-')} | "
                     f"{d.get('max_abs_levels', '-')} | {psnr} |" + (f" {r.get('fid', '-')} |" if fid else ""))
    if fid:
        lines += ["", (f"FID against the CIFAR-10 training statistics on the `{net}` feature network (gacq's own, "
                       "not Inception: not comparable with published FID).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled", help="comma-separated: bundled, or model / checkpoint folders")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fid", action="store_true", help="FID of each run on gacq's CIFAR-10 features")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    specs = [m.strip() for m in args.models.split(",") if m.strip()]
    missing = [m for m in specs if m != "bundled" and not Path(m).is_dir()]
    if missing:  # before any model runs (session 40's call lost a finished model's rows to a missing second one)
        ap.error(f"--models: no such folder(s): {', '.join(missing)}")
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gacq-compiled-") as tmp:
        for spec in specs:
            rows += run_model(spec, args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join(map(shlex.quote, [sys.argv[0], *argv])), "commit": git_commit(),
              "machine": machine_info(), "rows": rows, "wall_seconds": round(time.time() - t_start, 1)}
    write_json(args.out / "compiled_sampling.json", result)
    (args.out / "compiled_sampling.md").write_text(render(result))
    print(f"wrote {args.out / 'compiled_sampling.json'} and {args.out / 'compiled_sampling.md'}")


if __name__ == "__main__":
    main()
