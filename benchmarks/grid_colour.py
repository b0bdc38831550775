"""Colour cast of sampled images, from the sample grids `gacq sample` / `gacq experiment` write.

For each grid PNG (8 x 8 tiles of 32 x 32 with 2-pixel gaps, as gacq's `grid.png`), the mean
R, G, B over the 64 tiles and the share of tiles whose mean blue exceeds their mean red by more
than 10 (of 255). It compares a quantized model's colours with the float model's from the same
sampling noise (the grids are the first 64 samples of each cell).

    python benchmarks/grid_colour.py results/experiments/cifar10-table/grids/*.png --out results/grid_colour
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.utils import atomic_path, git_commit, write_json  # noqa: E402


def tiles(path: Path, n: int = 8, size: int = 32, gap: int = 2) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    if a.shape[:2] != (gap + n * (size + gap),) * 2:
        raise SystemExit(f"{path}: {a.shape[1]}x{a.shape[0]} is not an {n}x{n} grid of {size}-pixel tiles")
    step = size + gap
    return np.stack([a[gap + i * step:gap + i * step + size, gap + j * step:gap + j * step + size]
                     for i in range(n) for j in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    rows = []
    for p in args.grids:
        t = tiles(p)
        per = t.mean(axis=(1, 2))  # (64, 3)
        rows.append({"grid": str(p), "mean_rgb": per.mean(0).round(2).tolist(),
                     "blue_dominant_share": float((per[:, 2] > per[:, 0] + 10).mean())})
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    commit = git_commit()  # once, before this run's own outputs make the tree dirty
    write_json(args.out / "grid_colour.json", {"command": cmd, "commit": commit, "rows": rows})
    lines = ["# Colour cast of the sample grids", "", f"Command: `{cmd}`; commit {commit}.", "",
             "| grid | mean R | mean G | mean B | tiles with B > R + 10 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {Path(r['grid']).stem} | " + " | ".join(f"{v:.1f}" for v in r["mean_rgb"])
              + f" | {r['blue_dominant_share']:.0%} |" for r in rows]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
