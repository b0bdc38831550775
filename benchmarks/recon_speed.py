"""Speed of block reconstruction and fake-quantized sampling, eager against the fast paths, in one run.

Block reconstruction of a small UNet block is launch-bound: a batch-32 step is hundreds of tiny
kernels. gacq captures the whole step (forward, backward, Adam) as a CUDA graph and replays it
(`ReconConfig.cuda_graph`). Sampling a fake-quantized model re-quantizes every weight at every
step and fake-quantizes each activation in five elementwise passes; gacq quantizes the weights
once per `generate` call and fuses the activation passes with torch.compile. This script times
both paths side by side on the bundled model and checks that they agree:

- per unit (a down resnet, an attention, an up resnet with a concatenated input): AdaRound
  weight reconstruction and activation step-size learning, eager vs graph: ms per iteration,
  final loss, and the share of rounding decisions (hard-rounded integers) that differ;
- sampling W4A8 round-to-nearest: images/s of the float model, the old per-step path and the
  new one, and how many uint8 pixels differ between old and new.

    python benchmarks/recon_speed.py --out results/recon_speed [--iters 500] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.models import load_model  # noqa: E402
from gacq.quant import primitives  # noqa: E402
from gacq.quant import modules as qmodules  # noqa: E402
from gacq.quant.api import QuantConfig, quantize  # noqa: E402
from gacq.quant.calib_data import CalibDataConfig, collect  # noqa: E402
from gacq.quant.recon import (ActReconConfig, ReconConfig, _set_unit_act_quant, capture_unit_io, find_units,  # noqa: E402
                              order_by_execution, reconstruct_acts_unit, reconstruct_unit)
from gacq.quant.wrap import set_quant_state  # noqa: E402
from gacq.sampling import SampleConfig, generate  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def integers(unit) -> dict[str, torch.Tensor]:
    return {n: m.integer_weight().cpu() for n, m in unit.named_modules() if isinstance(m, qmodules.QuantLayer)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="results path without suffix")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--sample-num", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    t_start = time.time()
    loaded = load_model(None, device=device)
    calib = collect(loaded, SampleConfig(steps=100), CalibDataConfig(n_trajectories=args.trajectories, n_steps=20),
                    device=device, progress=False)
    qmodel = quantize(loaded, QuantConfig(method="rtn", wbits=4, abits=8), calib, device=device, progress=False)
    fp = loaded.model
    run = lambda m, lo, hi: m(calib.x[lo:hi].to(device), calib.t[lo:hi].to(device))  # noqa: E731
    order = order_by_execution(qmodel, find_units(qmodel), lambda m: run(m, 0, 1))
    kinds = [n for n, u in order if type(u).__name__ == "ResnetBlock2D"]
    attn = [n for n, u in order if type(u).__name__ == "Attention"]
    picks = [kinds[0]] + attn[:1] + [kinds[-1]]
    rows = []
    for name in picks:
        args_, kwargs, target = capture_unit_io(fp, fp.get_submodule(name), run, len(calib), 256, want_output=True)
        for stage in ("weights", "acts"):
            res = {}
            for mode in ("eager", "graph"):
                m = copy.deepcopy(qmodel)
                unit = m.get_submodule(name)
                if stage == "weights":
                    set_quant_state(m, weights=True, acts=False)
                    cfg = ReconConfig(iters=args.iters, cuda_graph=mode == "graph")
                    stats, wall = timed(lambda: reconstruct_unit(unit, args_, kwargs, target, cfg, device=device),
                                        device)
                else:
                    set_quant_state(m, weights=True, acts=False)
                    _set_unit_act_quant(unit, True)
                    cfg = ActReconConfig(iters=args.iters, cuda_graph=mode == "graph")
                    stats, wall = timed(lambda: reconstruct_acts_unit(unit, args_, kwargs, target, cfg,
                                                                      device=device), device)
                res[mode] = {"wall_s": wall, "loss_before": stats["loss_before"], "loss_after": stats["loss_after"],
                             "ints": integers(unit),
                             "scales": [p.detach().cpu() for p in unit.parameters() if p.requires_grad]}
            ints_e, ints_g = res["eager"].pop("ints"), res["graph"].pop("ints")
            sc_e, sc_g = res["eager"].pop("scales"), res["graph"].pop("scales")
            n_diff = sum(int((ints_e[k] != ints_g[k]).sum()) for k in ints_e)
            n_all = sum(v.numel() for v in ints_e.values())
            sc_rel = max((float(((a - b).abs() / a.abs().clamp_min(1e-12)).max()) for a, b in zip(sc_e, sc_g)),
                         default=0.0)
            row = {"unit": name, "kind": type(qmodel.get_submodule(name)).__name__, "stage": stage,
                   "iters": args.iters, "samples": len(calib),
                   "eager_ms_per_iter": 1000 * res["eager"]["wall_s"] / args.iters,
                   "graph_ms_per_iter": 1000 * res["graph"]["wall_s"] / args.iters,
                   "speedup": res["eager"]["wall_s"] / res["graph"]["wall_s"],
                   "loss_before": res["eager"]["loss_before"],
                   "eager_loss_after": res["eager"]["loss_after"], "graph_loss_after": res["graph"]["loss_after"],
                   "rounding_differs_share": n_diff / max(n_all, 1),
                   "act_scale_max_rel_diff": sc_rel if stage == "acts" else None}
            print(row, flush=True)
            rows.append(row)

    # ------------------------------------------------------------------ sampling ---
    scfg = SampleConfig(steps=args.sample_steps)
    idx = list(range(args.sample_num))
    set_quant_state(qmodel, weights=True, acts=True)
    samples = {}
    timings = {}
    from gacq.models import LoadedModel

    ql = LoadedModel(model=qmodel, scheduler_config=loaded.scheduler_config, source="rtn-w4a8")
    old_frozen = qmodules.frozen_weights
    for label, lm, fast in (("fp", loaded, True), ("w4a8_old_path", ql, False), ("w4a8_new_path", ql, True),
                            ("w4a8_new_path_again", ql, True)):
        primitives.COMPILE_ON_CUDA = fast
        qmodules.frozen_weights = old_frozen if fast else (lambda model: contextlib.nullcontext(model))
        imgs, wall = timed(lambda: generate(lm, scfg, idx, device), device)
        samples[label], timings[label] = imgs, wall
        print(label, f"{wall:.2f} s", flush=True)
    qmodules.frozen_weights = old_frozen
    primitives.COMPILE_ON_CUDA = True
    a, b = samples["w4a8_old_path"].astype(int), samples["w4a8_new_path_again"].astype(int)
    img_steps = args.sample_num * args.sample_steps
    sampling = {"num": args.sample_num, "steps": args.sample_steps,
                "img_steps_per_s": {k: img_steps / v for k, v in timings.items()},
                "note": "w4a8_new_path includes the one-off torch.compile of the fused fake-quant kernel; "
                        "w4a8_new_path_again is the steady state",
                "pixels_differing_old_vs_new": float((a != b).mean()),
                "max_abs_pixel_diff_old_vs_new": int(abs(a - b).max())}
    print(sampling, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info(),
              "wall_seconds": time.time() - t_start, "reconstruction": rows, "sampling": sampling}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    lines = ["# Reconstruction and sampling speed: eager against CUDA graph / fused paths", "",
             f"Bundled model, W4A8 (round-to-nearest start), {len(calib)} calibration samples, batch 32, "
             f"{args.iters} iterations per run. Command: `{result['command']}`; commit {result['commit']}; "
             f"{result['machine'].get('gpu', 'CPU')}, torch {result['machine']['torch']}; wall {result['wall_seconds']:.0f} s.", "",
             "| unit | stage | eager ms/it | graph ms/it | speedup | loss before | loss after (eager) | "
             "loss after (graph) | roundings differing |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['unit']} ({r['kind']}) | {r['stage']} | {r['eager_ms_per_iter']:.2f} | "
                     f"{r['graph_ms_per_iter']:.2f} | {r['speedup']:.1f}x | {r['loss_before']:.4g} | "
                     f"{r['eager_loss_after']:.4g} | {r['graph_loss_after']:.4g} | {r['rounding_differs_share']:.2%} |")
    lines += ["", f"Sampling {args.sample_num} images x {args.sample_steps} DDIM steps (image-steps per second):", "",
              "| path | image-steps/s |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in sampling["img_steps_per_s"].items()]
    lines += ["", f"Old vs new quantized samples: {sampling['pixels_differing_old_vs_new']:.4%} of uint8 values "
              f"differ, by at most {sampling['max_abs_pixel_diff_old_vs_new']}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
