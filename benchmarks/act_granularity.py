"""How much of an 8-bit input's rounding error would finer activation grids remove? Per layer, on real inputs.

For each selected layer of a float model, its inputs on calibration samples are fake-quantized to 8 bits
(asymmetric, min-max) at several granularities, and the relative error of the layer's output,
||(Q(x) - x) W^T||^2 / ||x W^T||^2, is reported for each:

    global      one range over every sample and step (what round-to-nearest's static per-tensor grid does)
    per-step    one range per sampling step (TFMQ-DM's finite-set calibration, ideal: measured on the same data)
    per-token   a range per token, computed at run time (dynamic quantization; not in gacq)
    per-channel a range per input channel (not an int8 GEMM layout: the ideal of what smoothing aims at)
    smooth a    SmoothQuant at strength a (`gacq quantize --smooth a`): x / s on one per-tensor range, s from these inputs
    clip p      one global range clipped at the p / 1-p quantiles

The errors are measured on the same samples the ranges come from (an optimistic bound for the static grids).

    python benchmarks/act_granularity.py --model runs/dit-xs/model --calib runs/local/dit-xs-calib \
        --layers '*.ff.net.0.proj,*.ff.net.2,*.attn1.to_q' --out results/smooth_sweep/granularity
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.conditioning import model_forward, slice_cond  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.calib_data import CalibrationSet  # noqa: E402
from gacq.quant.smooth import smoothing_scales  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> torch.Tensor:
    s = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--layers", default="*.ff.net.0.proj,*.ff.net.2,*.attn1.to_q", help="fnmatch patterns (Linear layers)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--clip", type=float, default=1e-4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    model = load_model(args.model).model.eval()
    cs = CalibrationSet.load(args.calib)
    idx = torch.randperm(len(cs), generator=torch.Generator().manual_seed(0))[: args.samples]
    pats = args.layers.split(",")
    xs: dict[str, list[torch.Tensor]] = {}
    weights = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in pats):
            weights[n] = m.weight.detach().double()
            m.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(a[0].detach()))
    if not weights:
        raise SystemExit(f"no Linear layer matches {args.layers}")
    steps = cs.step[idx]
    with torch.no_grad():
        for i in range(0, len(idx), 128):
            j = idx[i:i + 128]
            model_forward(model, cs.x[j], cs.t[j], slice_cond(cs.cond, j, "cpu"))
    b = args.bits
    rows = []
    for n, w in weights.items():
        x = torch.cat(xs[n]).double()  # (samples, tokens, channels)
        y = x @ w.T

        def rel(xq: torch.Tensor) -> float:
            return float(((xq @ w.T - y).pow(2).mean() / y.pow(2).mean()).item())

        flat = x.reshape(-1, x.shape[-1])
        per_step = torch.empty_like(x)
        for k in steps.unique():
            sel = steps == k
            per_step[sel] = fake_quant(x[sel], x[sel].min(), x[sel].max(), b)
        s = smoothing_scales(flat.abs().amax(0), w, args.alpha)
        xs_ = x / s
        q = flat.flatten()[:: max(1, flat.numel() // 2_000_000)].float()
        lo, hi = torch.quantile(q, torch.tensor([args.clip, 1 - args.clip])).double()
        cmax = flat.abs().amax(0)
        rows.append({"layer": n, "channel max / median": float(cmax.max() / cmax.median()),
                     "global": rel(fake_quant(x, x.min(), x.max(), b)), "per-step": rel(per_step),
                     "per-token": rel(fake_quant(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), b)),
                     "per-channel": rel(fake_quant(x, flat.amin(0), flat.amax(0), b)),
                     f"smooth {args.alpha}": rel(fake_quant(xs_, xs_.min(), xs_.max(), b) * s),
                     f"clip {args.clip}": rel(fake_quant(x, lo, hi, b))})
        print(n, {k: f"{v:.2e}" for k, v in rows[-1].items() if k != "layer"}, flush=True)
    cols = [k for k in rows[0] if k not in ("layer", "channel max / median")]
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info(),
           "wall_seconds": round(time.time() - t0, 1), "bits": b, "samples": len(idx), "rows": rows}
    out = Path(args.out)
    write_json(out / "act_granularity.json", res)
    lines = [f"# {b}-bit input grids at several granularities ({args.model})", "",
             f"`{res['command']}` (commit {res['commit']}, CPU, {res['wall_seconds']:.0f} s, {len(idx)} calibration "
             "samples). Relative output error ||(Q(x) - x) W^T||^2 / ||x W^T||^2 of each layer (lower is better); "
             "channel max / median: the widest input channel's max |x| over the median channel's; the last row, the geometric mean of each column over the layers divided by `global`'s.", "",
             "| layer | channel max / median | " + " | ".join(cols) + " |", "| --- | ---: |" + " ---: |" * len(cols)]
    lines += [f"| {r['layer']} | {r['channel max / median']:.2f} | " + " | ".join(f"{r[c]:.2e}" for c in cols) + " |"
              for r in rows]
    gm = {c: torch.tensor([r[c] / r["global"] for r in rows]).log().mean().exp().item() for c in cols}
    lines.append("| geometric mean / global | | " + " | ".join(f"{gm[c]:.2f}" for c in cols) + " |")
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
