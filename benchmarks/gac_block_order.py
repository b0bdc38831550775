"""Block order and GAC: two consecutive blocks of the bundled model, reconstructed in forward order
(as Algorithm 1 and the baselines do) or in reverse, with uniform or GAC-learned sample weights.

Issue 6 lists block order among the principled fixes to try when GAC does not beat TFMQ-DM. Each
block's calibration inputs come from the quantized model as it stands when the block's turn comes
(round-to-nearest weights everywhere else, the blocks reconstructed so far hard-rounded), so the
order decides what the second block is fitted to:

- `forward` (A then B): B is fitted, and GAC learns B's weights, on inputs from the reconstructed A:
  the inputs B sees at inference;
- `reverse` (B then A): B is fitted on inputs from round-to-nearest A, which A's reconstruction then
  changes.

Measured per (weighting, order): the held-out error of each block's output against the FP block, on
trajectories of another seed, after both blocks are reconstructed, with inputs from the final
quantized model (so B's error includes A's). The weights' spread and the mean weight per step
group as in `gac_meta_study.py`.

    python benchmarks/gac_block_order.py --out results/gac_block_order \\
        --blocks down_blocks.1.resnets.0,down_blocks.1.resnets.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gac_meta_study import calibration, held_out_error, learn_weights, reset  # noqa: E402

from gacq.diagnostics import _cache, _units  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.api import QuantConfig, quantize  # noqa: E402
from gacq.quant.gac import GACConfig  # noqa: E402
from gacq.quant.recon import ReconConfig, reconstruct_unit  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402

WEIGHTINGS: dict[str, dict | None] = {"uniform": None, "gac": {}, "gac-M400": {"meta_iters": 400}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the bundled model)")
    ap.add_argument("--blocks", default="down_blocks.1.resnets.0,down_blocks.1.resnets.1",
                    help="two blocks; their execution order is the forward order")
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--trajectories", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--record", type=int, default=20)
    ap.add_argument("--iters", type=int, default=1000, help="AdaRound iterations per reconstruction")
    ap.add_argument("--weightings", default=",".join(WEIGHTINGS), help=f"comma-separated, of: {', '.join(WEIGHTINGS)}")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    names = [b for b in args.blocks.split(",") if b]
    wanted = [w for w in args.weightings.split(",") if w]
    if len(names) != 2 or len(set(names)) != 2:
        raise SystemExit("--blocks takes two different blocks")
    if unknown := [w for w in wanted if w not in WEIGHTINGS]:
        raise SystemExit(f"unknown weighting(s) {unknown}; known: {', '.join(WEIGHTINGS)}")
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
    units = _units(q, calib, device, names)  # execution order: forward
    init = {n: {k: v.clone() for k, v in u.state_dict().items()} for n, u in units}
    result = {"blocks_forward_order": [n for n, _ in units], "settings": vars(args), "commit": commit,
              "rows": []}
    groups = GACConfig().groups
    for wname in wanted:
        for order in ("forward", "reverse"):
            for n, u in units:
                reset(u, init[n])
            seq = units if order == "forward" else units[::-1]
            row = {"weighting": wname, "order": order, "blocks": {}}
            t0 = time.time()
            for n, u in seq:
                data = _cache(q, fp, n, u, calib, torch.arange(len(calib)), device, 2.0, None)
                weights, stats = (None, None)
                if WEIGHTINGS[wname] is not None:
                    weights, stats = learn_weights(u, data, calib, WEIGHTINGS[wname])
                    reset(u, init[n])  # GAC's meta-steps never write theta; reload for certainty
                rec = reconstruct_unit(u, data.args, data.kwargs, data.target, ReconConfig(iters=args.iters, seed=0),
                                       sample_weights=weights, device=device)
                row["blocks"][n] = {"weights": stats, "train_loss_after": rec["loss_after"]}
                del data
            for n, u in units:  # both reconstructed: held-out inputs from the final quantized model
                hdata = _cache(q, fp, n, u, held, torch.arange(len(held)), device, 2.0, None)
                row["blocks"][n]["held_out"] = held_out_error(u, hdata, held.step, groups)
            row["seconds"] = round(time.time() - t0, 1)
            result["rows"].append(row)
            print(f"{wname:16s} {order:8s} " + "  ".join(f"{n} {row['blocks'][n]['held_out']['mean']:.5f}"
                                                           for n, _ in units), flush=True)
            write(result, args, t_all)
    for n, u in units:
        reset(u, init[n])
    write(result, args, t_all)
    print(f"wrote {args.out}")
    return 0


def write(result: dict, args, t_all: float) -> None:
    result.update({"command": "python " + " ".join(sys.argv), "machine": machine_info(),
                   "wall_seconds": round(time.time() - t_all, 1)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gac_block_order.json", result)
    a, b = result["blocks_forward_order"]
    lines = ["# Block order and GAC", "",
             f"Command: `{result['command']}` at commit {result['commit']}, {result['wall_seconds']} s on "
             f"{result['machine'].get('gpu') or 'CPU'} ({result['machine'].get('cpus')} CPUs).", "",
             f"W{args.wbits} weights (round-to-nearest elsewhere); blocks A = `{a}` and B = `{b}` (B runs after A). "
             f"{args.trajectories} calibration trajectories x {args.record} of {args.steps} DDIM steps; held-out error "
             f"on {args.held_out} trajectories of another seed, after both blocks are reconstructed ({args.iters} "
             "AdaRound iterations each), inputs from the final quantized model: mean per-sample squared error of the "
             "block output against the FP block (lower is better); groups are 5 contiguous step ranges, noisiest "
             "first. `forward`: A then B (Algorithm 1, the baselines); `reverse`: B then A.", "",
             "| weighting | order | A held-out | B held-out | B by group | B mean weight by group | s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        ra, rb = r["blocks"][a], r["blocks"][b]
        wb = rb["weights"]
        lines.append(f"| {r['weighting']} | {r['order']} | {ra['held_out']['mean']:.5g} | {rb['held_out']['mean']:.5g} | "
                     + " ".join(f"{v:.4g}" for v in rb["held_out"]["by_group"]) + " | "
                     + (" ".join(f"{v:.2f}" for v in wb["mean_rel_by_group"]) if wb else "") + f" | {r['seconds']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
