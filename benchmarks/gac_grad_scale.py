"""How large are GAC's meta-gradients against Adam's epsilon? Why its learned weights barely move.

GAC's default optimiser (lazy Adam, lr 0.2, eps 1e-8) changes a sample's score only when the sample is in the
minibatch. Adam's first step on a score is lr * g / (|g| + eps): a full lr where |g| >> eps, and lr * |g| / eps,
almost nothing, where |g| << eps. The scores' gradient carries the softmax's factor w_i / tau ~ 1 / (N tau), times a
block loss that is tiny at 8 bits; so at W8A8 the gradients may sit below eps (session 18: dit-s6's W8A8 weights did
not move at all, ESS/N 1.000, where W4A8's moved a little).

For each chosen block of the bundled model (weights quantized round-to-nearest elsewhere, as in the baselines,
weights only), at each weight bit width and temperature: GAC's meta-gradient dL/ds over the minibatch of
`--batches` meta-iterations (the default GACConfig; no score is updated, so every minibatch sees the initial
scores, as a first visit does), and the first Adam step it would give, lr * |g| / (|g| + eps).

    python benchmarks/gac_grad_scale.py --out results/gac_grad_scale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gac_meta_study import calibration  # noqa: E402

from gacq.diagnostics import _cache, _units  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.api import QuantConfig, quantize  # noqa: E402
from gacq.quant.gac import GACBlock, GACConfig, validation_split  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402

ADAM_EPS = 1e-8  # torch.optim.SparseAdam's default, which GACBlock.run uses


def grad_stats(unit, data, step: torch.Tensor, cfg: GACConfig, batches: int) -> dict:
    train_idx, groups = validation_split(step, cfg.val_fraction, cfg.groups, cfg.seed)
    blk = GACBlock(unit, data, train_idx, groups, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    it = blk._batches(gen)
    gs = []
    try:
        for _ in range(batches):
            batch = next(it)
            grad, _, _ = blk.meta_grad(batch, blk._val_subsets(gen))
            gs.append(grad[batch].detach().abs().double().cpu())
    finally:
        blk.close()
    g = torch.cat(gs)
    step_size = cfg.meta_lr * g / (g + ADAM_EPS)  # Adam's first step on a score
    q = torch.quantile(g, torch.tensor([0.1, 0.5, 0.9], dtype=g.dtype))
    return {"n_train": len(train_idx), "grads": len(g), "abs_grad_p10": float(q[0]), "abs_grad_median": float(q[1]),
            "abs_grad_p90": float(q[2]), "share_below_eps": float((g < ADAM_EPS).double().mean()),
            "first_step_median": float(step_size.median()), "first_step_mean": float(step_size.mean()),
            "log_weight_change_median": float(step_size.median()) / cfg.tau}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the bundled model)")
    ap.add_argument("--blocks", default="down_blocks.1.resnets.0,up_blocks.2.resnets.1")
    ap.add_argument("--wbits", default="8,4")
    ap.add_argument("--taus", default="1.0,0.2")
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--record", type=int, default=20)
    ap.add_argument("--batches", type=int, default=10, help="meta-iterations (minibatches of 32) per setting")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    t_all, commit = time.time(), git_commit()
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded = load_model(args.model, device=device)
    calib = calibration(loaded, args.trajectories, 0, args.steps, args.record, device)
    fp = loaded.model.eval()
    blocks = [b for b in args.blocks.split(",") if b]
    rows = []
    for wbits in map(int, args.wbits.split(",")):
        q = quantize(loaded, QuantConfig(method="rtn", wbits=wbits, abits=None), device=device, progress=False)
        for name, unit in _units(q, calib, device, blocks):
            data = _cache(q, fp, name, unit, calib, torch.arange(len(calib)), device, 2.0, None)
            with torch.no_grad():  # the block's mean per-sample loss at round-to-nearest
                loss = float(torch.cat([data.per_sample_loss(torch.arange(lo, min(data.n, lo + 128)))
                                        for lo in range(0, data.n, 128)]).mean())
            for tau in map(float, args.taus.split(",")):
                s = grad_stats(unit, data, calib.step, dataclasses.replace(GACConfig(), tau=tau), args.batches)
                rows.append({"block": name, "wbits": wbits, "tau": tau, "block_loss": loss, **s})
                print(f"W{wbits} {name:28s} tau {tau:<4} loss {loss:.3g}  |g| median {s['abs_grad_median']:.3g} "
                      f"below eps {s['share_below_eps']:.2f}  first step {s['first_step_median']:.3g}", flush=True)
                write(rows, args, commit, t_all)
    print(f"wrote {args.out}")
    return 0


def write(rows: list[dict], args, commit: str, t_all: float) -> None:
    res = {"command": "python " + " ".join(sys.argv), "commit": commit, "machine": machine_info(),
           "wall_seconds": round(time.time() - t_all, 1), "adam_eps": ADAM_EPS, "meta_lr": GACConfig().meta_lr,
           "settings": vars(args), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gac_grad_scale.json", res)
    lines = ["# GAC's meta-gradients against Adam's epsilon", "",
             f"Command: `{res['command']}` at commit {commit}, {res['wall_seconds']} s on "
             f"{res['machine'].get('gpu') or 'CPU'}. Bundled model, weights round-to-nearest elsewhere (weights "
             f"only), {args.trajectories} calibration trajectories x {args.record} of {args.steps} DDIM steps; "
             f"{args.batches} minibatches of 32 at the initial (uniform) scores. |g| = |dL/ds| of a minibatch "
             f"sample; first step = Adam's first step on its score, lr x |g| / (|g| + eps), lr {GACConfig().meta_lr}, "
             f"eps {ADAM_EPS:g} (at most lr); its log-weight change is that / tau.", "",
             "| block | W bits | tau | block loss | \\|g\\| p10 | \\|g\\| median | \\|g\\| p90 | share below eps "
             "| first step (median) | log-weight change (median) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['wbits']} | {r['tau']:g} | {r['block_loss']:.3g} | {r['abs_grad_p10']:.3g} "
                     f"| {r['abs_grad_median']:.3g} | {r['abs_grad_p90']:.3g} | {r['share_below_eps']:.2f} "
                     f"| {r['first_step_median']:.3g} | {r['log_weight_change_median']:.3g} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
