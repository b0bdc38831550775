"""GAC's meta-learning settings on real blocks of the bundled model: do the learned weights move,
and does reconstructing with them lower the block's error on held-out trajectories?

For each chosen block of the bundled CIFAR-10 model (weights quantized round-to-nearest
everywhere else, so the block's inputs carry the quantized prefix's error, as in the
baselines), the block is reconstructed (AdaRound, weights only) once per configuration:

- `uniform`: every calibration sample weighted equally (TFMQ-DM's / Q-Diffusion's loss), at
  two reconstruction seeds, so the seed-to-seed spread of the reconstruction itself is visible;
- `gac ...`: GAC's Algorithm 2 with the given meta settings, then the same reconstruction with
  the learned weights.

Measured per configuration: the held-out error (mean per-sample squared error of the block's
output against the FP block, on trajectories of another seed, every recorded step, and per
timestep group), the learned weights' spread (effective sample size / n, min and max relative
to uniform, share of scores never moved), and wall time of the meta-learning.

    python benchmarks/gac_meta_study.py --out results/gac_meta_study --blocks down_blocks.1.resnets.0
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from gacq.diagnostics import _cache, _units
from gacq.models import load_model
from gacq.quant.api import QuantConfig, quantize
from gacq.quant.calib_data import CalibDataConfig, collect, select_from_all
from gacq.quant.gac import GACBlock, GACConfig, step_groups, validation_split
from gacq.quant.recon import ReconConfig, reconstruct_unit, trainable_layers
from gacq.sampling import SampleConfig
from gacq.utils import git_commit, machine_info, write_json

# (label, GACConfig overrides); None: uniform weights
CONFIGS: list[tuple[str, dict | None]] = [
    ("uniform seed 0", None),
    ("uniform seed 1", None),
    ("gac M=100 B=32 adam lr=0.2 (default)", {}),
    ("gac M=400 B=32 adam lr=0.2", {"meta_iters": 400}),
    ("gac M=100 B=32 adam lr=1.0", {"meta_lr": 1.0}),
    ("gac M=100 B=32 sgd lr=1e3", {"meta_optimizer": "sgd", "meta_lr": 1e3}),
    # issue 6's principled fixes for the over-fitting at M=400: the timestep grouping of the
    # validation set (two groups: the fewest the gradient-matching term allows; ten: finer) and a larger
    # validation set
    ("gac M=400 K=2", {"meta_iters": 400, "groups": 2}),
    ("gac M=400 K=10", {"meta_iters": 400, "groups": 10}),
    ("gac M=400 validation 15%", {"meta_iters": 400, "val_fraction": 0.15}),
]


def calibration(loaded, trajectories: int, seed: int, steps: int, record: int, device, batch_size: int = 256,
                progress: bool = False):
    """`record` uniformly spaced steps of `trajectories` float DDIM trajectories (all steps collected first)."""
    cfg = CalibDataConfig(selection="all", n_trajectories=trajectories, seed=seed, batch_size=batch_size)
    full = collect(loaded, SampleConfig(steps=steps, seed=seed), cfg, device=device, progress=progress)
    return select_from_all(full, CalibDataConfig(selection="uniform", n_trajectories=trajectories,
                                                 n_steps=record, seed=seed))


def reset(unit, state: dict) -> None:
    """The block as round-to-nearest initialised it (no rounding variables)."""
    for m in trainable_layers(unit):
        m.adaround = None
    unit.load_state_dict(state)


def weight_stats(w: torch.Tensor, init_share: float, step: torch.Tensor, groups: int) -> dict:
    """Spread of the training samples' weights; `step`: their sampling steps (mean weight per step group)."""
    rel = w.double() * len(w)
    ess = float(1.0 / (w.double() ** 2).sum()) / len(w)
    by_group = [float(rel[mask].mean()) for mask in step_groups(step, groups)]
    return {"ess_over_n": ess, "min_rel": float(rel.min()), "max_rel": float(rel.max()),
            "std_rel": float(rel.std()), "unmoved_share": init_share, "mean_rel_by_group": by_group}


def learn_weights(unit, data, calib, over: dict) -> tuple[torch.Tensor, dict]:
    """GAC's Algorithm 2 on one block's cached `data` with GACConfig overrides `over`, on that
    configuration's own split (its validation fraction and timestep groups). Returns a weight per
    calibration sample (0 for the validation split) and the training weights' spread."""
    cfg = GACConfig(**over)
    train_idx, groups = validation_split(calib.step, cfg.val_fraction, cfg.groups, cfg.seed)
    blk = GACBlock(unit, data, train_idx, groups, cfg)
    try:
        w_train, _ = blk.run()
    finally:
        blk.close()
    unmoved = float((blk.scores.detach() == cfg.init_score).double().mean())
    stats = weight_stats(w_train.cpu(), unmoved, calib.step[train_idx], GACConfig().groups)
    weights = torch.zeros(len(calib), dtype=torch.float64)
    weights[train_idx] = w_train.cpu().double()
    return weights.float(), stats


def held_out_error(unit, data, step: torch.Tensor, groups: int) -> dict:
    with torch.no_grad():
        per = torch.cat([data.per_sample_loss(torch.arange(lo, min(data.n, lo + 128), device=data.device)).cpu()
                         for lo in range(0, data.n, 128)])
    by_group = [float(per[mask].mean()) for mask in step_groups(step, groups)]
    return {"mean": float(per.mean()), "by_group": by_group}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the bundled model)")
    ap.add_argument("--blocks", default="down_blocks.1.resnets.0,up_blocks.2.resnets.1")
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=32, help="trajectories (another seed) for the held-out error")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--record", type=int, default=20)
    ap.add_argument("--iters", type=int, default=1000, help="AdaRound iterations per reconstruction")
    ap.add_argument("--configs", default="", help="comma-separated indices into the config list (default: all)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    t_all = time.time()
    commit = git_commit()  # at the start: the tree may change during a long run
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded = load_model(args.model, device=device)
    calib = calibration(loaded, args.trajectories, 0, args.steps, args.record, device)
    held = calibration(loaded, args.held_out, 1, args.steps, args.record, device)
    print(f"calibration sets: {len(calib)} + {len(held)} held-out samples ({time.time() - t_all:.0f} s)", flush=True)
    q = quantize(loaded, QuantConfig(method="rtn", wbits=args.wbits, abits=None), device=device, progress=False)
    fp = loaded.model.eval()
    gcfg = GACConfig()
    chosen = [c for i, c in enumerate(CONFIGS) if not args.configs or str(i) in args.configs.split(",")]
    blocks = [b for b in args.blocks.split(",") if b]
    result = {"blocks": {}, "settings": vars(args), "configs": [c[0] for c in chosen], "commit": commit}
    for name, unit in _units(q, calib, device, blocks):
        data = _cache(q, fp, name, unit, calib, torch.arange(len(calib)), device, 2.0, None)
        hdata = _cache(q, fp, name, unit, held, torch.arange(len(held)), device, 2.0, None)
        init = copy.deepcopy(unit.state_dict())
        rows = []
        for label, over in chosen:
            reset(unit, init)
            t0 = time.time()
            weights, stats, meta_s = None, None, 0.0
            if over is not None:
                weights, stats = learn_weights(unit, data, calib, over)
                meta_s = time.time() - t0
                reset(unit, init)  # GAC's meta-steps never write theta; reload for certainty
            seed = 1 if label == "uniform seed 1" else 0
            rec = reconstruct_unit(unit, data.args, data.kwargs, data.target,
                                   ReconConfig(iters=args.iters, seed=seed), sample_weights=weights, device=device)
            err = held_out_error(unit, hdata, held.step, gcfg.groups)
            rows.append({"config": label, "gac": over, "weights": stats, "meta_seconds": round(meta_s, 1),
                         "recon_seconds": round(time.time() - t0 - meta_s, 1),
                         "train_loss_after": rec["loss_after"], "held_out": err})
            print(f"{name:32s} {label:40s} held-out {err['mean']:.5f}  "
                  + (f"ESS/n {stats['ess_over_n']:.3f} rel [{stats['min_rel']:.2f}, {stats['max_rel']:.2f}]"
                     if stats else ""), flush=True)
            result["blocks"][name] = rows
            write(result, args, t_all)  # after every configuration: a long run keeps what it measured
        reset(unit, init)
    write(result, args, t_all)
    print(f"wrote {args.out}")
    return 0


def write(result: dict, args, t_all: float) -> None:
    result.update({"command": "python " + " ".join(sys.argv), "machine": machine_info(),
                   "wall_seconds": round(time.time() - t_all, 1)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gac_meta_study.json", result)
    lines = ["# GAC meta-learning settings on real blocks", "",
             f"Command: `{result['command']}` at commit {result['commit']}, {result['wall_seconds']} s on "
             f"{result['machine'].get('gpu') or 'CPU'} ({result['machine'].get('cpus')} CPUs).", "",
             f"W{args.wbits} weights (round-to-nearest elsewhere), {args.trajectories} calibration trajectories x "
             f"{args.record} of {args.steps} DDIM steps, held-out error on {args.held_out} trajectories of another "
             f"seed; {args.iters} AdaRound iterations per reconstruction. Held-out error: mean per-sample squared "
             "error of the block output against the FP block (lower is better); groups are 5 contiguous step "
             "ranges, noisiest first.", ""]
    for name, rows in result["blocks"].items():
        lines += [f"## {name}", "", "| config | held-out | by group | ESS/n | min..max rel | unmoved | mean weight by group "
                  "| meta s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            w = r["weights"]
            grp = " ".join(f"{v:.4g}" for v in r["held_out"]["by_group"])
            lines.append(f"| {r['config']} | {r['held_out']['mean']:.5g} | {grp} | "
                         + (f"{w['ess_over_n']:.3f} | {w['min_rel']:.2f}..{w['max_rel']:.2f} | "
                            f"{w['unmoved_share']:.2f} | "
                            + " ".join(f"{v:.2f}" for v in w.get("mean_rel_by_group", [])) + f" | {r['meta_seconds']} |"
                            if w else "| | | | |"))
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
