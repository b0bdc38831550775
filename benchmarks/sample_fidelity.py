"""Fidelity of quantized samples to full-precision samples drawn from the same noise.

A cheap check of a quantized model beside FID: with the same seeds, the FP and quantized samplers start
from the same noise, so the per-image PSNR between the two sample sets measures how far quantization
moves the generated images (higher is closer). It says nothing about sample quality or diversity on its own.

    python benchmarks/sample_fidelity.py --ref S_FP --out results/rtn_fidelity S_Q1 S_Q2 ...

--pair A:B (repeatable; A and B are sample folders named among the positional ones) adds the paired
per-image difference PSNR(A) - PSNR(B): its mean, a 95% Student-t interval of the mean and the
number of images A has closer to FP. The images are paired by their noise, so the interval is over images
of one sampling seed, not over quantization runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.report import paired_difference  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (N, H, W, C)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def image_pair(a: str, b: str, pa: np.ndarray, pb: np.ndarray) -> dict:
    """Per-image PSNR(a) - PSNR(b), paired by image (`gacq.report.paired_difference`): mean, 95% Student-t interval
    of the mean (None with one image), images with a closer to FP."""
    p = paired_difference(dict(enumerate(pa.tolist())), dict(enumerate(pb.tolist())))
    lo_hi = None if p["interval"] is None else [round(v, 3) for v in p["interval"]]
    return {"a": a, "b": b, "n": len(p["diffs"]), "mean_db": round(p["mean"], 3), "ci95_db": lo_hi,
            "a_closer": sum(d > 0 for d in p["diffs"])}


def _interval(lo_hi: list[float] | None) -> str:
    return "" if lo_hi is None else f"{lo_hi[0]:+.2f} to {lo_hi[1]:+.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="sample folder of the FP model")
    ap.add_argument("--out", required=True, help="results path without suffix")
    ap.add_argument("--times", help="optional file of 'name seconds' lines to include")
    ap.add_argument("--command", default="", help="the commands that produced the sample folders")
    ap.add_argument("--pair", action="append", default=[], metavar="A:B",
                    help="paired per-image PSNR difference of sample folders A and B (both among SAMPLES)")
    ap.add_argument("samples", nargs="+")
    args = ap.parse_args()
    pairs = [tuple(p.split(":")) for p in args.pair]
    for p in pairs:
        if len(p) != 2 or not set(p) <= set(args.samples):
            raise SystemExit(f"--pair {':'.join(p)}: give A:B with A and B among the sample folders {args.samples}")
    ref_meta = json.loads((Path(args.ref) / "meta.json").read_text())
    ref = np.load(Path(args.ref) / "samples.npz")["images"]
    rows, per_image = [], {}
    for s in args.samples:
        meta = json.loads((Path(s) / "meta.json").read_text())
        for key in ("seed", "steps", "scheduler", "eta", "num"):
            if meta[key] != ref_meta[key]:
                raise SystemExit(f"{s}: {key} differs from the reference ({meta[key]} vs {ref_meta[key]})")
        p = per_image[s] = psnr(np.load(Path(s) / "samples.npz")["images"], ref)
        rows.append({"samples": s, "model": meta["model"], "psnr_mean_db": round(float(p.mean()), 2),
                     "psnr_median_db": round(float(np.median(p)), 2), "psnr_min_db": round(float(p.min()), 2)})
    times = {}
    if args.times:
        for line in Path(args.times).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                times[parts[0]] = float(parts[1])
    result = {"command": args.command, "this_script": "python " + " ".join(sys.argv), "commit": git_commit(),
              "machine": machine_info(), "reference": args.ref, "num": ref_meta["num"], "seed": ref_meta["seed"],
              "sampler": f"{ref_meta['scheduler']} {ref_meta['steps']} steps eta {ref_meta['eta']}",
              "rows": rows, "pairs": [image_pair(a, b, per_image[a], per_image[b]) for a, b in pairs],
              "wall_seconds": times}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    lines = [f"# Fidelity of quantized samples to FP samples (same noise), {result['num']} images",
             "", f"Sampler: {result['sampler']}, seed {result['seed']}. Metric: per-image PSNR against the FP "
             "sample from the same noise (higher = closer to FP), in pixel space: no feature network is involved. Not a quality metric (FID is).", "",
             f"Commands: `{args.command}`  ", f"This table: `{result['this_script']}`  ",
             f"Commit: {result['commit']}; machine: {result['machine']['cpus']} CPU cores, torch {result['machine']['torch']}",
             "", "| model | mean PSNR (dB) | median | min |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['psnr_mean_db']} | {r['psnr_median_db']} | {r['psnr_min_db']} |" for r in rows]
    if result["pairs"]:
        lines += ["", "Paired by image (the same noise): PSNR(A) − PSNR(B), its mean and a 95% Student-t interval "
                  "over the images (one sampling seed), and the images A has closer to FP.", "",
                  "| A | B | mean difference (dB) | 95% interval | A closer |", "|---|---|---|---|---|"]
        lines += [f"| {d['a']} | {d['b']} | {d['mean_db']:+.2f} | {_interval(d['ci95_db'])} "
                  f"| {d['a_closer']} of {d['n']} |" for d in result["pairs"]]
    if times:
        lines += ["", "Wall times (s): " + ", ".join(f"{k} {v}" for k, v in times.items())]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
