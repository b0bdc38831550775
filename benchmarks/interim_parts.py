"""Interim metrics of cells sampled in parts (`gacq experiment run --parts`) before all their parts are in.

A cell of more than 10,000 samples is drawn in parts of 5,000 images, each reduced to its feature statistics at once;
`gacq experiment run` (and `gacq stats --merge`) merges them only when the whole run is in. This script merges the
first K parts of each cell named, the same K for every cell (so their FIDs are at one sample count and comparable
with each other), and evaluates them against the bundled CIFAR-10 training statistics:

    python benchmarks/interim_parts.py --parts runs/experiments/cifar10-table-50k/parts \
        --cells fp_steps100_seed0,gac_w4a8_steps100_seed0,tfmq_w4a8_steps100_seed0 \
        --out results/experiments/cifar10-table-50k/interim/s42

K defaults to the longest run of parts from the first that every cell has. The first K parts are images
0 .. K x 5,000 - 1 of each run: a run of their own with the same noise, so they are what sampling K x 5,000 images
would have given. Precision and recall use the run's precision/recall subset that falls in those parts (about K / 10
of its 10,000 features for 50,000-sample runs). These are interim figures, not the table's: FID falls as the sample
count grows (biased upwards at fewer samples), so they compare only with each other, never with a 50,000-sample FID.

Writes OUT/interim_parts.json (every metric, each cell's parts and their commits and machines, the command, the
commit, the machine, the wall time) and OUT/interim_parts.md (a table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.errors import GacqError  # noqa: E402
from gacq.experiment import part_run  # noqa: E402
from gacq.metrics.evaluate import evaluate  # noqa: E402
from gacq.metrics.stats import load_stats, merge_stats  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402


def prefix_count(folder: Path) -> int:
    """How many parts from the first (stats_0000.npz on) `folder` holds without a gap."""
    k = 0
    while (folder / f"stats_{k:04d}.npz").exists():
        k += 1
    return k


def first_parts(folder: Path, k: int):
    """The statistics of parts 0 .. k-1 of the run in `folder`, merged as the run of their k x part-size images."""
    parts = [load_stats(folder / f"stats_{i:04d}.npz") for i in range(k)]
    n = sum(p.n for p in parts)
    # the parts say they belong to the whole run (n_total): here they are a run of their own, the first n images
    parts = [dataclasses.replace(p, meta={**p.meta, "part": {**p.meta["part"], "n_total": n}}) for p in parts]
    return merge_stats(parts, source=f"the first {k} parts ({n} images) of {folder.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", required=True, help="the spec's parts folder (a subfolder per cell)")
    ap.add_argument("--cells", required=True, help="comma-separated cell ids")
    ap.add_argument("--k", type=int, default=None, help="parts per cell (default: the most every cell has)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    root = Path(args.parts)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    missing = [c for c in cells if not (root / c).is_dir()]
    if missing:
        sys.exit(f"error: no parts folder for {missing} in {root}")
    have = {c: prefix_count(root / c) for c in cells}
    k = args.k or min(have.values())
    short = {c: n for c, n in have.items() if n < k}
    if k < 1 or short:
        sys.exit(f"error: {k} parts wanted, but the cells have {have} parts from the first on")
    rows = []
    for c in cells:
        metas = [json.loads((root / c / f"meta_{i:04d}.json").read_text()) for i in range(k)]
        try:
            res = evaluate(first_parts(root / c, k), progress=False)
        except GacqError as e:
            sys.exit(f"error: {c}: {e}")
        rows.append({"cell": c, "parts": k, "parts_in_folder": have[c], "metrics": res,
                     "part_runs": [{**part_run(i, m), "compile": m.get("compile")} for i, m in enumerate(metas)]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = rows[0]["metrics"]["feature_network"]
    doc = {"command": " ".join(["python", *sys.argv]), "commit": git_commit(), "machine": machine_info(),
           "wall_seconds": round(time.time() - t0, 1), "feature_network": net, "rows": rows}
    write_json(out / "interim_parts.json", doc)
    lines = [(f"Interim: the first {k} parts ({rows[0]['metrics']['samples']['n']} samples) of each cell, on "
              f"{net['name']} features (hash {net['hash']}; {net['note']}). Comparable with each other only: not "
              "with a cell's figure at its full sample count."), "",
             f"    {doc['command']}", "",
             f"Commit {doc['commit']}, {doc['wall_seconds']} s on the CPU.", "",
             "| cell | samples | FID | sFID | IS | precision | recall |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['cell']} | {m['samples']['n']} | {m['fid']:.2f} | {m['sfid']:.4f} | {m['is_mean']:.3f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} |")
    with atomic_path(out / "interim_parts.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
