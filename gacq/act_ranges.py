"""`gacq ranges`: how the input range of every conv/linear layer moves with the sampling step.

TFMQ-DM's finite set calibration (one activation grid per sampling step) and the outlier handling that
transformers need both start from the same measurement: for each quantizable layer, the range of its input
at each sampling step, against its range over all steps. This module measures it on a calibration set
(`gacq calib --selection all`: every step of the same trajectories) for any diffusers denoiser gacq loads
(UNet2DModel, UNet2DConditionModel, DiT), and writes

- ranges.csv: per layer and step, the input's min, max and the 99.9th percentile of |x|; ranges.json: the
  summary and each layer's all-steps range, per-step widths relative to it, and outlier ratio;
- ranges_heatmap.png: per-step range width over the all-steps width (layers x steps; 1 = the step needs
  the whole range, small = a per-step grid could be that much finer);
- outliers.png: per layer, max |x| over the 99.9th percentile of |x| (all steps): large ratios are the
  outlier channels that make a per-tensor grid coarse;
- ranges.md: the summary, with the command.

Percentiles come from a fixed random subsample of each step's inputs (at most 65,536 values per layer and
step, seeded), so they are estimates; min and max are exact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from .errors import GacqError
from .utils import atomic_path, git_commit, machine_info, write_json

SUBSAMPLE = 65536


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers in module order (a quantized layer once, not the float layer inside it)."""
    from .quant.modules import QuantLayer

    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, QuantLayer))
            and not any(n.startswith(p + ".") for p in quant)]


@torch.no_grad()
def activation_ranges(model: nn.Module, calib, device: torch.device | str = "cpu", max_per_step: int | None = 32,
                      batch_size: int = 64, seed: int = 0) -> dict:
    """Per conv/linear layer and sampling step of `calib`: min, max and the 99.9th percentile of |x| of the
    layer's input (the percentile from a seeded subsample). At most `max_per_step` samples of each step."""
    from .conditioning import model_forward, slice_cond

    device = torch.device(device)
    steps = sorted({int(s) for s in calib.step.tolist()})
    if not steps:
        raise GacqError("the calibration set is empty")
    layers = _layers(model)
    if not layers:
        raise GacqError("the model has no Conv2d or Linear layers to measure")
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    stats = {n: {} for n, _ in layers}
    current: dict = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            s = current.setdefault(name, {"min": math.inf, "max": -math.inf, "abs": []})
            s["min"] = min(s["min"], float(x.min()))
            s["max"] = max(s["max"], float(x.max()))
            flat = x.abs().flatten()
            if flat.numel() > SUBSAMPLE:
                flat = flat[torch.randint(0, flat.numel(), (SUBSAMPLE,), generator=g).to(flat.device)]
            s["abs"].append(flat.cpu())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        for k in steps:
            idx = (calib.step == k).nonzero().flatten()
            if max_per_step is not None:
                idx = idx[:max_per_step]
            current.clear()
            for lo in range(0, len(idx), batch_size):
                sel = idx[lo:lo + batch_size]
                model_forward(model, calib.x[sel].to(device), calib.t[sel].to(device),
                              slice_cond(calib.cond, sel, device))
            for name, s in current.items():
                vals = torch.cat(s["abs"])
                if vals.numel() > SUBSAMPLE:
                    vals = vals[torch.randint(0, vals.numel(), (SUBSAMPLE,), generator=g)]
                stats[name][k] = {"min": s["min"], "max": s["max"],
                                  "p999_abs": float(torch.quantile(vals, 0.999))}
    finally:
        for h in handles:
            h.remove()
    timesteps = {int(s): int(t) for s, t in zip(calib.step.tolist(), calib.t.tolist())}
    out = {"steps": steps, "timesteps": [timesteps[k] for k in steps], "layers": {}}
    for name, per in stats.items():
        if not per:
            continue  # a layer this model's forward does not call
        lo = min(v["min"] for v in per.values())
        hi = max(v["max"] for v in per.values())
        width = hi - lo
        rel = [(per[k]["max"] - per[k]["min"]) / width if width > 0 else 1.0 for k in steps]
        amax = max(abs(lo), abs(hi))
        p999 = max(v["p999_abs"] for v in per.values())
        out["layers"][name] = {"per_step": [per[k] for k in steps], "min": lo, "max": hi,
                               "step_width_over_all": rel, "median_step_width_over_all": float(torch.tensor(rel).median()),
                               "outlier_ratio": amax / p999 if p999 > 0 else math.inf}
    return out


def write_ranges(result: dict, out_dir: str | Path, meta: dict) -> dict:
    """ranges.json, ranges.csv, ranges_heatmap.png, outliers.png and ranges.md in `out_dir`; the summary."""
    import csv
    import io

    from .diagnostics import _ticks
    from .plots import figure as _figure, save_png as _save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result["layers"])
    rel = torch.tensor([result["layers"][n]["step_width_over_all"] for n in names])
    med = [result["layers"][n]["median_step_width_over_all"] for n in names]
    ratios = [result["layers"][n]["outlier_ratio"] for n in names]
    summary = {**meta, "layers": len(names), "steps": len(result["steps"]),
               "median_step_width_over_all": float(torch.tensor(med).median()),
               "layers_below_half": sum(m < 0.5 for m in med),
               "outlier_ratio_median": float(torch.tensor(ratios).median()),
               "outlier_ratio_max": {"layer": names[max(range(len(names)), key=lambda i: ratios[i])],
                                     "ratio": max(ratios)}}
    # per-step values go to the CSV; the JSON keeps the summary and each layer's aggregates
    per_layer = {n: {k: v for k, v in lay.items() if k != "per_step"} for n, lay in result["layers"].items()}
    write_json(out / "ranges.json", {**summary, "steps_list": result["steps"], "timesteps": result["timesteps"],
                                     "layers_detail": per_layer})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "step", "timestep", "min", "max", "p999_abs", "step_width_over_all"])
    for n in names:
        lay = result["layers"][n]
        for k, t, s, r in zip(result["steps"], result["timesteps"], lay["per_step"], lay["step_width_over_all"]):
            w.writerow([n, k, t, f"{s['min']:.6g}", f"{s['max']:.6g}", f"{s['p999_abs']:.6g}", f"{r:.4f}"])
    with atomic_path(out / "ranges.csv") as tmp:
        tmp.write_text(buf.getvalue())

    fig = _figure(8, max(4.0, 0.12 * len(names) + 1.5))
    ax = fig.add_subplot(111)
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=5)
    _ticks(ax, result["timesteps"], "x")
    ax.set_xlabel("sampling step (timestep)")
    ax.set_title("input range width per step / over all steps", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save_png(fig, out / "ranges_heatmap.png")

    order = sorted(range(len(names)), key=lambda i: -ratios[i])[:30]
    fig = _figure(8, 0.18 * len(order) + 1.5)
    ax = fig.add_subplot(111)
    ax.barh(range(len(order)), [ratios[i] for i in order])
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([names[i] for i in order], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("max |x| / 99.9th percentile of |x| (all steps)")
    ax.set_title(f"the {len(order)} layers with the largest input outliers", fontsize=9)
    _save_png(fig, out / "outliers.png")

    lines = ["# Activation ranges per sampling step", "", f"`{meta.get('command', '')}`", "",
             f"commit {meta.get('commit')}, {meta.get('device')}, {meta.get('wall_seconds')} s; model {meta.get('model')}; "
             f"{len(names)} conv/linear layers, {len(result['steps'])} sampling steps, at most "
             f"{meta.get('max_per_step')} calibration samples per step.", "",
             f"- Median over layers of the median step's range width over the all-steps width: "
             f"{summary['median_step_width_over_all']:.3f}; {summary['layers_below_half']} of {len(names)} layers have a "
             "median step range under half of their all-steps range.",
             f"- Input outliers, max |x| over the 99.9th percentile of |x|: median {summary['outlier_ratio_median']:.2f}, "
             f"largest {summary['outlier_ratio_max']['ratio']:.2f} ({summary['outlier_ratio_max']['layer']}).",
             "", "![ranges](ranges_heatmap.png)", "", "![outliers](outliers.png)", ""]
    with atomic_path(out / "ranges.md") as tmp:
        tmp.write_text("\n".join(lines))
    return summary


def ranges(model_spec: str | None, calib_folder: str | Path, out_dir: str | Path, max_per_step: int | None = 32,
           device: torch.device | str = "cpu", command: str = "") -> dict:
    """Load the model and calibration set, measure, write; the CLI's `gacq ranges`."""
    from .models import load_model
    from .quant.calib_data import CalibrationSet

    t0 = time.time()
    calib = CalibrationSet.load(calib_folder)
    loaded = load_model(model_spec, device=device, act_quant=False)
    result = activation_ranges(loaded.model, calib, device, max_per_step)
    meta = {"command": command, "commit": git_commit(), "machine": machine_info(), "device": str(device),
            "model": loaded.source, "calibration": str(calib_folder), "max_per_step": max_per_step,
            "wall_seconds": round(time.time() - t0, 1)}
    return write_ranges(result, out_dir, meta)


__all__ = ["activation_ranges", "ranges", "write_ranges"]
