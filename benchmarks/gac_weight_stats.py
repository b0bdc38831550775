"""Statistics of GAC's learned per-sample weights, block by block.

Reads the weights of a finished checkpoint (QDIR/gac_weights.safetensors) or of an unfinished
run's resume folder (QDIR.recon-ckpt/gac/<block>.safetensors) and reports, per block: the
effective sample size relative to the training samples, the smallest and largest weight relative
to uniform, and the share of samples sitting exactly at the most common weight (samples whose
score never moved: under the first, dense-Adam implementation those were the samples no minibatch
visited). With --steps S, the weight vector is read as S recorded sampling steps of equal size
(the order of gacq's calibration sets: step-major) and the mean relative weight per step is plotted.

    python benchmarks/gac_weight_stats.py runs/table/gac_w4a8.recon-ckpt --steps 20 --out results/gac_weights_x
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from gacq.utils import git_commit, write_json


def load_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "gac_weights.safetensors").exists():
        from gacq.quant.checkpoint import load_gac_weights

        return {k: v.double() for k, v in load_gac_weights(src / "gac_weights.safetensors")[0].items()}
    files = sorted((src / "gac").glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no GAC weights in {src} (gac_weights.safetensors or gac/*.safetensors)")
    return {f.stem: load_file(str(f))["weights"].double() for f in files}


def block_stats(w: torch.Tensor, steps: int | None) -> dict:
    train = w > 0  # validation samples carry weight 0
    n = int(train.sum())
    rel = w[train] * n  # 1 = uniform over the training samples
    p = w[train] / w[train].sum()
    vals, counts = torch.unique(rel.float(), return_counts=True)
    out = {"n_train": n, "n_validation": int((~train).sum()), "ess_over_n": float(1.0 / (p * p).sum() / n),
           "min_rel": float(rel.min()), "max_rel": float(rel.max()), "std_rel": float(rel.std()),
           "modal_rel": float(vals[counts.argmax()]), "modal_share": float(counts.max() / n)}
    if steps:
        if len(w) % steps:
            raise SystemExit(f"{len(w)} weights do not split into {steps} equal steps")
        full = w * n
        per = full.view(steps, -1)
        mask = train.view(steps, -1)
        out["mean_rel_per_step"] = [float(per[k][mask[k]].mean()) for k in range(steps)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="QDIR or QDIR.recon-ckpt")
    ap.add_argument("--steps", type=int, default=None, help="recorded sampling steps of the weight subset")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="", help="provenance to store with the numbers")
    a = ap.parse_args(argv)
    t0 = time.time()
    weights = load_weights(a.src)
    stats = {k: block_stats(v, a.steps) for k, v in weights.items()}
    order = None
    log = a.src / "recon_log.jsonl"
    if log.exists():  # execution order of the blocks
        order = [json.loads(line)["unit"] for line in log.read_text().splitlines() if '"weights"' in line]
        stats = {k: stats[k] for k in order if k in stats} | {k: v for k, v in stats.items() if k not in order}
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"source": str(a.src), "blocks": stats, "note": a.note, "command": " ".join(["python"] + sys.argv),
           "commit": git_commit(), "wall_seconds": round(time.time() - t0, 2)}
    write_json(a.out / "gac_weight_stats.json", res)
    lines = [f"# GAC learned weights: {a.src}", "", a.note, "", f"Command: `{res['command']}`", "",
             "| block | ESS/n | min | max | std | modal weight | share at modal |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, s in stats.items():
        lines.append(f"| {k} | {s['ess_over_n']:.3f} | {s['min_rel']:.3f} | {s['max_rel']:.2f} | {s['std_rel']:.3f} | "
                     f"{s['modal_rel']:.3f} | {s['modal_share']:.2f} |")
    lines += ["", "Weights relative to uniform over the training samples (1 = uniform)."]
    if a.steps:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = torch.tensor([s["mean_rel_per_step"] for s in stats.values()])
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(stats) + 1.5))
        im = ax.imshow(m.log2().numpy(), cmap="coolwarm", vmin=-2, vmax=2, aspect="auto")
        ax.set_yticks(range(len(stats)), list(stats), fontsize=7)
        ax.set_xlabel("recorded sampling step (0 = first, noisiest)")
        ax.set_title("mean learned weight per step, log2 relative to uniform")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(a.out / "mean_weight_per_step.png", dpi=110)
        lines += ["", "![mean weight per step](mean_weight_per_step.png)"]
    (a.out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
