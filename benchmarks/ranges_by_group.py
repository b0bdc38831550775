"""`gacq ranges` output summarised per layer group (the same layer in every block), with a per-step plot.

A transformer repeats one block, so its per-layer heatmap is easier to read folded over the blocks: group
`transformer_blocks.3.attn1.to_q` with every other block's `attn1.to_q` (the block index becomes `*`), then per
group and sampling step take the median over its layers of the step's range width over the layer's all-steps width
(1: this step alone spans the whole range; small: a per-step grid would be much finer) and of the outlier ratio
max |x| / 99.9th percentile of |x|.

    python benchmarks/ranges_by_group.py results/act_ranges_dit_xs
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.utils import atomic_path, write_json  # noqa: E402


def group_of(layer: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", layer, count=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ranges", help="a `gacq ranges --out` folder (ranges.csv)")
    args = ap.parse_args()
    root = Path(args.ranges)
    rows = list(csv.DictReader(open(root / "ranges.csv")))
    steps = sorted({int(r["step"]) for r in rows})
    timesteps = {int(r["step"]): int(r["timestep"]) for r in rows}
    width = defaultdict(lambda: defaultdict(list))  # group -> step -> widths of its layers
    ratio = defaultdict(lambda: defaultdict(list))
    layers = defaultdict(set)
    for r in rows:
        g, s = group_of(r["layer"]), int(r["step"])
        layers[g].add(r["layer"])
        width[g][s].append(float(r["step_width_over_all"]))
        p = float(r["p999_abs"])
        ratio[g][s].append(max(abs(float(r["min"])), abs(float(r["max"]))) / p if p > 0 else float("nan"))
    groups = sorted(width, key=lambda g: np.median([np.median(width[g][s]) for s in steps]))
    summary = []
    for g in groups:
        w = np.array([np.median(width[g][s]) for s in steps])
        o = np.array([np.nanmedian(ratio[g][s]) for s in steps])
        summary.append({"group": g, "layers": len(layers[g]), "width_median": float(np.median(w)),
                        "width_min": float(w.min()), "width_min_step": steps[int(w.argmin())],
                        "width_first_step": float(w[0]), "width_last_step": float(w[-1]),
                        "outlier_ratio_median": float(np.nanmedian(o)), "outlier_ratio_max": float(np.nanmax(o)),
                        "per_step_width": w.round(4).tolist()})
    res = {"source": str(root), "steps": steps, "timesteps": [timesteps[s] for s in steps], "groups": summary}
    write_json(root / "groups.json", res)
    lines = [f"# Input ranges per layer group ({root})", "",
             f"`python benchmarks/ranges_by_group.py {root}`: the layers of `ranges.csv` folded over the blocks "
             "(block index = `*`). Width: median over the group's layers of a step's input range over the layer's "
             "all-steps range. Outlier ratio: max |x| / 99.9th percentile of |x|, median over the layers, per step.",
             "", "| group | layers | width: median step | narrowest step (step) | first step | last step | "
             "outlier ratio: median step | largest step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| `{s['group']}` | {s['layers']} | {s['width_median']:.3f} | {s['width_min']:.3f} "
                     f"({s['width_min_step']}) | {s['width_first_step']:.3f} | {s['width_last_step']:.3f} | "
                     f"{s['outlier_ratio_median']:.2f} | {s['outlier_ratio_max']:.2f} |")
    lines += ["", "![per-step width per group](groups_width.png)", ""]
    with atomic_path(root / "groups.md") as tmp:
        tmp.write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, s in enumerate(summary):  # tab20 and alternating dashes: a transformer has a dozen groups
        ax.plot(steps, s["per_step_width"], label=s["group"], lw=1.4, color=plt.cm.tab20(i % 20),
                ls="-" if i % 2 == 0 else "--")
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_ylabel("step range / all-steps range (median over the group)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Input range per sampling step, per layer group")
    fig.tight_layout()
    with atomic_path(root / "groups_width.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print("\n".join(lines[4:4 + len(summary) + 2]))
    print(f"wrote {root / 'groups.md'}, groups.json, groups_width.png")


if __name__ == "__main__":
    main()
