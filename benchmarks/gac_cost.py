"""What GAC's weight learning costs next to the reconstruction it precedes, in one run.

GAC (method `gac`) is TFMQ-DM plus, for every block, M meta-iterations (method.md, Algorithm 2)
before the same reconstruction. Its extra cost is therefore M x (time of one meta-iteration) per
block, against the baseline's weight stage (I AdaRound iterations) and activation stage (A
step-size iterations). This script measures each of the three per-iteration times on real blocks
of the bundled model, with the CUDA-graph paths gacq uses by default and with eager GAC
meta-iterations for comparison, and prints the ratio of the two methods' per-block costs

    ratio(I, A, M) = (M t_meta + I t_w + A t_a) / (I t_w + A t_a)

at the settings of experiments/cifar10-table.toml (I=4000, A=1000, M=100) and at the papers'
(I=20000, A=5000, M=100). The work both methods share (collecting calibration data, the temporal
block, finite-set calibration, moving data) is left out, so the whole-job ratio is lower than
this one. It also checks that the captured meta-gradient learns the eager weights.

`--end-to-end I A` also times whole `gacq quantize` jobs of tfmq and gac at W4A8 one after the
other in this process (the issue's "in one run"), with I and A iterations. Fewer iterations than
the table's inflate GAC's share, so a ratio measured at small I and A is an upper bound for larger
ones.

    # on the GPU (a few minutes; --end-to-end 1000 250 adds a few more)
    python benchmarks/gac_cost.py --out results/gac_cost [--iters 300] [--meta-iters 30]
    # CPU smoke test
    python benchmarks/gac_cost.py --device cpu --trajectories 4 --iters 3 --meta-iters 2 --units 1 --out /tmp/gc \
        --end-to-end 2 2 --e2e-meta-iters 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.models import load_model  # noqa: E402
from gacq.quant.api import QuantConfig, quantize  # noqa: E402
from gacq.quant.calib_data import CalibDataConfig, collect  # noqa: E402
from gacq.quant.gac import GACBlock, GACConfig, validation_split  # noqa: E402
from gacq.quant.recon import (ActReconConfig, ReconConfig, UnitData, _set_unit_act_quant,  # noqa: E402
                              capture_unit_io, find_units, order_by_execution, reconstruct_acts_unit,
                              reconstruct_unit)
from gacq.quant.wrap import set_quant_state  # noqa: E402
from gacq.sampling import SampleConfig  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402
from recon_speed import timed  # noqa: E402  (this script's folder: benchmarks/)

SETTINGS = {"cifar10-table (I=4000, A=1000, M=100)": (4000, 1000, 100),
            "papers (I=20000, A=5000, M=100)": (20000, 5000, 100)}


def ratio(t_meta: float, t_w: float, t_a: float, i: int, a: int, m: int) -> float:
    base = i * t_w + a * t_a
    return (m * t_meta + base) / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--iters", type=int, default=300, help="AdaRound and step-size iterations timed per unit")
    ap.add_argument("--meta-iters", type=int, default=30, help="GAC meta-iterations timed per unit and mode")
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--units", type=int, default=3, help="how many of: first resnet, first attention, last resnet")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--end-to-end", type=int, nargs=2, metavar=("I", "A"), default=None)
    ap.add_argument("--e2e-meta-iters", type=int, default=100, help="GAC's M in the end-to-end jobs")
    args = ap.parse_args()
    device = torch.device(args.device)
    t_start = time.time()
    loaded = load_model(None, device=device)
    calib = collect(loaded, SampleConfig(steps=100), CalibDataConfig(selection="all", n_trajectories=args.trajectories),
                    device=device, progress=False)
    qmodel = quantize(loaded, QuantConfig(method="rtn", wbits=4, abits=8), calib, device=device, progress=False)
    fp = loaded.model
    run = lambda m, lo, hi: m(calib.x[lo:hi].to(device), calib.t[lo:hi].to(device))  # noqa: E731
    order = order_by_execution(qmodel, find_units(qmodel), lambda m: run(m, 0, 1))
    res = [n for n, u in order if type(u).__name__ == "ResnetBlock2D"]
    attn = [n for n, u in order if type(u).__name__ == "Attention"]
    picks = ([res[0]] + attn[:1] + [res[-1]])[: args.units]
    gcfg = GACConfig(meta_iters=args.meta_iters)
    train_idx, groups = validation_split(calib.step, gcfg.val_fraction, gcfg.groups, gcfg.seed)
    rows = []
    for name in picks:
        a_, kw, target = capture_unit_io(fp, fp.get_submodule(name), run, len(calib), 256, want_output=True)
        row = {"unit": name, "kind": type(qmodel.get_submodule(name)).__name__, "samples": len(calib)}
        # the baseline's two stages, as gacq runs them (CUDA graph on GPUs)
        m = copy.deepcopy(qmodel)
        set_quant_state(m, weights=True, acts=False)
        _, wall = timed(lambda: reconstruct_unit(m.get_submodule(name), a_, kw, target,
                                                 ReconConfig(iters=args.iters), device=device), device)
        row["weights_ms_per_iter"] = 1000 * wall / args.iters
        _set_unit_act_quant(m.get_submodule(name), True)
        _, wall = timed(lambda: reconstruct_acts_unit(m.get_submodule(name), a_, kw, target,
                                                      ActReconConfig(iters=args.iters), device=device), device)
        row["acts_ms_per_iter"] = 1000 * wall / args.iters
        # GAC's meta-iterations, eager and (on GPUs) captured
        learned = {}
        for mode in ("eager", "graph") if device.type == "cuda" else ("eager",):
            m = copy.deepcopy(qmodel)
            set_quant_state(m, weights=True, acts=False)
            unit = m.get_submodule(name)
            blk = GACBlock(unit, UnitData(unit, a_, kw, target, gcfg.p, None, device), train_idx, groups, gcfg,
                           cuda_graph=mode == "graph")
            (w, _), wall = timed(blk.run, device)
            blk.close()
            learned[mode] = w.cpu()
            row[f"meta_{mode}_ms_per_iter"] = 1000 * wall / args.meta_iters
        if "graph" in learned:
            e, g = learned["eager"], learned["graph"]
            row["graph_vs_eager_weights_max_rel_diff"] = float(((g - e).abs() / e.abs()).max())
        t_meta = row.get("meta_graph_ms_per_iter", row["meta_eager_ms_per_iter"])
        row["gac_over_tfmq_per_block"] = {k: ratio(t_meta, row["weights_ms_per_iter"], row["acts_ms_per_iter"], *v)
                                          for k, v in SETTINGS.items()}
        print(row, flush=True)
        rows.append(row)

    e2e = None
    if args.end_to_end:
        i, a = args.end_to_end
        e2e = {"iters": i, "act_iters": a, "meta_iters": args.e2e_meta_iters}
        for method in ("tfmq", "gac"):
            cfg = QuantConfig(method=method, wbits=4, abits=8, recon=ReconConfig(iters=i),
                              act_recon=ActReconConfig(iters=a), gac=GACConfig(meta_iters=args.e2e_meta_iters))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, wall = timed(lambda: quantize(loaded, cfg, calib, device=device, progress=False), device)
            e2e[method] = {"wall_s": wall, "peak_gpu_bytes": torch.cuda.max_memory_allocated()
                           if device.type == "cuda" else None}
            print(method, e2e[method], flush=True)
        e2e["gac_over_tfmq"] = e2e["gac"]["wall_s"] / e2e["tfmq"]["wall_s"]

    result = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info(),
              "wall_seconds": time.time() - t_start, "units": rows, "end_to_end": e2e,
              "settings": {k: dict(zip(("I", "A", "M"), v)) for k, v in SETTINGS.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gac_cost.json", result)
    lines = ["# GAC's cost next to TFMQ-DM's reconstruction", "",
             f"Command: `{result['command']}`; commit {result['commit']}; {result['machine'].get('gpu', 'CPU')}; "
             f"torch {result['machine']['torch']}; wall {result['wall_seconds']:.0f} s. Bundled model, W4A8, "
             f"{len(calib)} calibration samples, batch 32, {args.iters} timed reconstruction iterations and "
             f"{args.meta_iters} meta-iterations per unit.", "",
             "| unit | AdaRound ms/it | step size ms/it | meta eager ms/it | meta graph ms/it | "
             + " | ".join(f"GAC/TFMQ per block, {k}" for k in SETTINGS) + " |",
             "| --- " * (5 + len(SETTINGS)) + "|"]
    for r in rows:
        g = r.get("meta_graph_ms_per_iter")
        lines.append(f"| {r['unit']} ({r['kind']}) | {r['weights_ms_per_iter']:.2f} | {r['acts_ms_per_iter']:.2f} | "
                     f"{r['meta_eager_ms_per_iter']:.2f} | {'' if g is None else f'{g:.2f}'} | "
                     + " | ".join(f"{r['gac_over_tfmq_per_block'][k]:.2f}x" for k in SETTINGS) + " |")
    if any("graph_vs_eager_weights_max_rel_diff" in r for r in rows):
        lines += ["", "Captured against eager meta-gradients, largest relative difference of the learned weights: "
                  + ", ".join(f"{r['unit']} {r['graph_vs_eager_weights_max_rel_diff']:.1e}" for r in rows) + "."]
    lines += ["", "Per-block ratios use the graph meta-iteration time where there is one (GPU), else the eager one. "
              "They leave out the work both methods share, so a whole job's ratio is lower."]
    if e2e:
        lines += ["", f"Whole `quantize` jobs at W4A8 with I={e2e['iters']}, A={e2e['act_iters']}, "
                  f"M={e2e['meta_iters']}, one after the other in this process: tfmq {e2e['tfmq']['wall_s']:.0f} s, gac {e2e['gac']['wall_s']:.0f} s, "
                  f"ratio {e2e['gac_over_tfmq']:.2f}x."]
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
