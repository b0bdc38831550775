"""Which part of a quantized UNet takes the samples' contrast away?

The call-sized W4A8 checkpoints sample flatter images than the float model, and FID follows that contrast
(results/grid_contrast_call_sized); output bias correction fixes their colour but not the contrast
(results/bias_corrected_sampling). This script samples the same images (same per-image noise) from:

    fp              the float model
    quantized       the checkpoint as it is
    all float       the checkpoint with every part put back to float (a check: it must give fp's images)
    acts float      weights quantized, every layer's input (and attention) in float
    weights float   the float weights, activations quantized
    float <part>    one part of the model (a top-level child: conv_in, time_embedding, mid_block, conv_out, ...;
                    or one element of a list child: down_blocks.0, up_blocks.2, ...) put back to float, weights
                    and activations; the rest quantized

With --within PART the single-part runs are the layers of that part instead, one at a time, each with weights and
input back to float and then with its weights alone (a quantized conv or linear; an attention module's own
quantizers, of its q/k/v and softmax, count as one layer).

It reports each run's final contrast (per-image pixel standard deviation, 0-255, as benchmarks/grid_colour.py
computes it), the share of the contrast gap it recovers, (c - c_quantized) / (c_fp - c_quantized), and the RMS
pixel distance of its images from fp's. Putting a part back to float copies the float model's weights into its
quantized layers and turns their weight and input quantization off (and that of the part's attention).
A look at a few images on the CPU, not a metric.

    python benchmarks/contrast_by_part.py runs/experiments/cifar10-call-sized/q/gac_w4a8_tau0.5_steps100 \
        --num 16 --out results/contrast_by_part
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import contrast as image_contrast  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.attention import attention_quantizers  # noqa: E402
from gacq.quant.wrap import quant_layers  # noqa: E402
from gacq.sampling import SampleConfig, generate  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, save_figure, write_json  # noqa: E402


def part_of(model: nn.Module, name: str, within: str | None = None) -> str:
    """The part a module belongs to: its top-level child, or that child's element where the child is a list; a
    module inside `within` is a part of its own."""
    if within is not None and name.startswith(within + "."):
        return name
    head = name.split(".")
    return ".".join(head[:2]) if len(head) > 1 and isinstance(getattr(model, head[0], None), nn.ModuleList) \
        else head[0]


def parts(model: nn.Module, within: str | None = None) -> list[str]:
    """The parts holding quantized layers or attention quantizers, in module order (with `within`: only the layers
    of that part)."""
    names = [n for n, _ in quant_layers(model)] + [n for n, _ in attention_quantizers(model)]
    found = list(dict.fromkeys(part_of(model, n, within) for n in sorted(names, key=_module_order(model))))
    if within is None:
        return found
    inner = [p for p in found if p.startswith(within + ".")]
    if not inner:
        raise SystemExit(f"--within {within}: no quantized layer inside it; parts: {', '.join(parts(model))}")
    return inner


def _module_order(model: nn.Module):
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return lambda n: order.get(n, len(order))


def to_float(qmodel: nn.Module, fp_model: nn.Module, chosen: list[str], weights: bool = True,
             acts: bool = True, within: str | None = None) -> int:
    """Put the chosen parts of `qmodel` (as `parts(qmodel, within)` names them) back to float (weights from
    `fp_model`, inputs unquantized); returns how many quantized layers changed."""
    fp = dict(fp_model.named_modules())
    inside = [(n, m) for n, m in quant_layers(qmodel) if part_of(qmodel, n, within) in chosen]
    for name, m in inside:
        if weights:
            ref = fp.get(name)
            if ref is None or ref.weight.shape != m.weight.shape:
                raise SystemExit(f"the float model has no layer {name} of shape {tuple(m.weight.shape)}: pass the "
                                 "model the checkpoint was quantized from (--float)")
            if m.smooth is not None:
                raise SystemExit(f"{name} is smoothed (its weight holds W * s); this script does not restore it")
            with torch.no_grad():
                m.weight.copy_(ref.weight)
            m.frozen_weight = None
            m.w_quant = False
        if acts:
            m.a_quant = False
    if acts:
        for name, proc in attention_quantizers(qmodel):
            if part_of(qmodel, name, within) in chosen:
                proc.quant = False
    return len(inside)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a quantized checkpoint folder (gacq quantize)")
    ap.add_argument("--float", dest="float_model", default=None,
                    help="the float model it was quantized from (default: the bundled model)")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--within", default=None,
                    help="one part (e.g. up_blocks.3): the single-part runs are its layers, one at a time")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if not (args.checkpoint / "quant_config.json").exists():
        raise SystemExit(f"{args.checkpoint} is not a quantized checkpoint folder (no quant_config.json)")
    t_all = time.time()
    cfg = SampleConfig(steps=args.steps, seed=args.seed)
    fp_loaded = load_model(args.float_model)
    fp_loaded.model.eval()
    probe = load_model(str(args.checkpoint)).model
    all_parts = parts(probe)
    variants = [("fp", None), ("quantized", ([], True, True)), ("all float", (all_parts, True, True)),
                ("acts float", (all_parts, False, True)), ("weights float", (all_parts, True, False))]
    if args.within is None:
        variants += [(f"float {p}", ([p], True, True)) for p in all_parts]
    else:
        variants += [(f"float {args.within}", ([args.within], True, True))]
        for p in parts(probe, args.within):  # each layer: weights and inputs, then its weights alone
            variants += [(f"float {p}", ([p], True, True, args.within)),
                         (f"float {p} weights", ([p], True, False, args.within))]
    runs, fp_images = [], None
    for label, how in variants:
        t0 = time.time()
        if how is None:
            loaded, changed = fp_loaded, 0
        else:
            loaded = load_model(str(args.checkpoint))
            loaded.model.eval()
            changed = to_float(loaded.model, fp_loaded.model, *how)
        with torch.no_grad():
            images = generate(loaded, cfg, range(args.num))
        if fp_images is None:
            fp_images = images
        dist = float(np.sqrt(((images.astype(np.float64) - fp_images) ** 2).mean()))
        runs.append({"variant": label, "float_layers": changed, "contrast": round(image_contrast(images), 3),
                     "rms_to_fp": round(dist, 3), "seconds": round(time.time() - t0, 1)})
        print(f"{label:28s} contrast {runs[-1]['contrast']:6.2f}  rms to fp {dist:6.2f}  ({runs[-1]['seconds']} s)",
              flush=True)
    c_fp, c_q = runs[0]["contrast"], runs[1]["contrast"]
    for r in runs:
        r["recovered"] = round((r["contrast"] - c_q) / (c_fp - c_q), 3) if c_fp != c_q else None

    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    commit, machine = git_commit(), machine_info()
    write_json(args.out / "contrast_by_part.json",
               {"command": cmd, "commit": commit, "machine": machine, "checkpoint": str(args.checkpoint),
                "float_model": args.float_model or "bundled", "num": args.num, "steps": args.steps,
                "seed": args.seed, "runs": runs, "wall_seconds": round(time.time() - t_all, 1)})
    plot(runs, args.out / "contrast_by_part.png")
    lines = ["# Which part of the quantized model takes the contrast away", "",
             f"Command: `{cmd}`; commit {commit}; {round(time.time() - t_all)} s on {machine.get('cpus')} CPUs.", "",
             f"Checkpoint `{args.checkpoint}`; {args.num} images, DDIM {args.steps} steps, sampling seed {args.seed}, "
             "the same noise for every run. Contrast: the images' pixel standard deviation (0-255), averaged. "
             "Recovered: (contrast - quantized's) / (fp's - quantized's). RMS to fp: pixel distance (0-255) from the "
             "float model's images.", "",
             "| run | float layers | contrast | recovered | RMS to fp |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        rec = "-" if r["recovered"] is None else f"{r['recovered']:.2f}"
        lines.append(f"| {r['variant']} | {r['float_layers']} | {r['contrast']:.2f} | {rec} | {r['rms_to_fp']:.2f} |")
    lines += ["", "![contrast recovered per part](contrast_by_part.png)", ""]
    with atomic_path(args.out / "README.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in runs if r["variant"] != "fp" and r["recovered"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    ax.barh([r["variant"] for r in rows][::-1], [r["recovered"] for r in rows][::-1])
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.set_xlabel("share of the contrast gap to fp recovered (1 = fp's contrast)")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
