"""Colour cast and contrast of sampled images, from the sample grids `gacq sample` / `gacq experiment` write.

For each grid image (8 x 8 tiles of 32 x 32 with 2-pixel gaps, as gacq's `grid.png` and the experiment
runner's grids/<cell>.jpg), the mean R, G, B over the 64 tiles, the share of tiles whose mean blue exceeds
their mean red by more than 10 (of 255), and the contrast: the standard deviation of each tile's pixels
(all three channels), averaged over the tiles. It compares a quantized model's colours with the float
model's from the same sampling noise (the grids are the first 64 samples of each cell). With --cells, each
grid's FID is read from <cells>/<grid name>.json (the experiment runner's cell result) and the Spearman
rank correlation of FID with contrast is reported (scipy). 64 images per grid (JPEG grids are lossy):
a look at the samples, not a metric.

    python benchmarks/grid_colour.py results/experiments/cifar10-table/grids/*.png --out results/grid_colour
    python benchmarks/grid_colour.py results/experiments/cifar10-call-sized/grids/*steps100*.jpg \
        --cells results/experiments/cifar10-call-sized/cells --out results/grid_contrast_call_sized
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import contrast  # noqa: E402
from gacq.utils import atomic_path, git_commit, write_json  # noqa: E402


def tiles(path: Path, n: int = 8, size: int = 32, gap: int = 2) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    if a.shape[:2] != (gap + n * (size + gap),) * 2:
        raise SystemExit(f"{path}: {a.shape[1]}x{a.shape[0]} is not an {n}x{n} grid of {size}-pixel tiles")
    step = size + gap
    return np.stack([a[gap + i * step:gap + i * step + size, gap + j * step:gap + j * step + size]
                     for i in range(n) for j in range(n)])


def _label(p: Path, grids: list[Path]) -> str:
    """A grid's name in the table: its file name, or its folder's where grids share a file name (`gacq sample`'s
    grid.png)."""
    return p.parent.name if sum(g.stem == p.stem for g in grids) > 1 else p.stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--cells", type=Path, help="folder of cell results (<grid name>.json): adds each grid's FID")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    rows = []
    for p in args.grids:
        t = tiles(p)
        per = t.mean(axis=(1, 2))  # (64, 3)
        row = {"grid": str(p), "mean_rgb": per.mean(0).round(2).tolist(),
               "blue_dominant_share": float((per[:, 2] > per[:, 0] + 10).mean()),
               "contrast": round(contrast(t), 3)}
        if args.cells is not None:
            cell = args.cells / f"{p.stem}.json"
            if not cell.is_file():
                raise SystemExit(f"{p}: no cell result {cell} (drop --cells, or point it at the grids' cells folder)")
            m = json.loads(cell.read_text())["metrics"]
            net = m.get("feature_network", {})
            row["fid"], row["features"] = m["fid"], f"{net.get('name')} (hash {net.get('hash')})"
        rows.append(row)
    corr = None
    if args.cells is not None and len(rows) >= 3:
        rho, pval = spearmanr([r["fid"] for r in rows], [r["contrast"] for r in rows])
        corr = {"spearman_fid_contrast": round(float(rho), 4), "p_value": round(float(pval), 4), "n": len(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    commit = git_commit()  # once, before this run's own outputs make the tree dirty
    write_json(args.out / "grid_colour.json", {"command": cmd, "commit": commit, "rows": rows, "correlation": corr})
    fid = args.cells is not None
    lines = ["# Colour cast and contrast of the sample grids", "", f"Command: `{cmd}`; commit {commit}.", "",
             "Contrast: each tile's pixel standard deviation (0-255), averaged over the 64 tiles."
             + (f" FID: the cell's, on its `{rows[0]['features']}` features." if fid and rows else ""), "",
             "| grid | mean R | mean G | mean B | tiles with B > R + 10 | contrast |" + (" FID |" if fid else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if fid else "")]
    for r in sorted(rows, key=lambda r: r["fid"]) if fid else rows:
        lines.append(f"| {_label(Path(r['grid']), args.grids)} | " + " | ".join(f"{v:.1f}" for v in r["mean_rgb"])
                     + f" | {r['blue_dominant_share']:.0%} | {r['contrast']:.1f} |" + (f" {r['fid']:.2f} |" if fid else ""))
    if corr:
        lines += ["", f"Spearman rank correlation of FID with contrast over the {corr['n']} grids: "
                  f"{corr['spearman_fid_contrast']:+.2f} (p = {corr['p_value']:.3f})."]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
