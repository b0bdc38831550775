"""Which layer groups of a DiT make W8A8 lossy? Quantize with one group kept in float at a time and compare.

Session 12's DiT-S lost 6.3 FID at W8A8 (TFMQ-DM), where the UNet loses under a point; its input and output layers
were quantized then. This script quantizes a trained DiT with round-to-nearest (method `rtn`, common preset, the
given calibration set) in several variants and samples each from the same noise as the float model
(`gacq.compare.compare`: guided, balanced labels), reporting PSNR against the float samples:

    common            the common preset (input and output layers float)
    io quantized      pos_embed.proj and proj_out_2 quantized as well (the preset of session 12's DiT cells)
    weights only      common at W/A32: what the weights alone cost
    + adaLN float     common, plus every block's timestep-label embedder and adaLN modulation linear and proj_out_1
    + attention float common, plus every block's q, k, v and output projections
    + MLP float       common, plus every block's feed-forward linears

A probe on a model trained here, not a method; RTN with min-max activation ranges (no reconstruction), so it shows
where the rounding error enters, not what a reconstruction method leaves of it.

    python benchmarks/dit_layer_groups.py --model runs/dit-xs/model --calib runs/local/dit-xs-calib \
        --out results/dit_layer_groups --num 64 --steps 50 --guidance-scale 1.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.compare import compare  # noqa: E402
from gacq.models import load_model  # noqa: E402
from gacq.quant.api import QuantConfig, quantize_to_dir  # noqa: E402
from gacq.quant.methods import COMMON_SKIP  # noqa: E402
from gacq.sampling import SampleConfig  # noqa: E402
from gacq.utils import atomic_path, git_commit, machine_info, write_json  # noqa: E402

ADALN = ("*.norm1.linear", "*.norm1.emb.*", "proj_out_1")
ATTN = ("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.attn1.to_out.0")
MLP = ("*.ff.net.0.proj", "*.ff.net.2")


def variants(wbits: int, abits: int) -> list[tuple[str, int, int | None, tuple[str, ...] | None]]:
    return [("common", wbits, abits, None),
            ("io quantized", wbits, abits, ("conv_in", "conv_out")),
            ("weights only", wbits, None, None),
            ("+ adaLN float", wbits, abits, COMMON_SKIP + ADALN),
            ("+ attention float", wbits, abits, COMMON_SKIP + ATTN),
            ("+ MLP float", wbits, abits, COMMON_SKIP + MLP)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained DiT folder")
    ap.add_argument("--calib", required=True, help="calibration folder from `gacq calib --selection all`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", default="W8A8,W4A8", help="comma-separated W<w>A<a>")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="runs/dit_layer_groups", help="checkpoints and samples (43 MB for dit-xs)")
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work)
    t_start = time.time()
    fp = load_model(args.model, device=args.device)
    cfg = SampleConfig(num=args.num, steps=args.steps, batch_size=args.num, guidance_scale=args.guidance_scale)
    rows = []
    for bits in args.bits.split(","):
        w, a = (int(x) for x in bits.strip().upper()[1:].split("A"))
        for name, wb, ab, skip in variants(w, a):
            tag = f"{bits.strip().lower()}_{name.replace('+ ', 'plus_').replace(' ', '_')}"
            t0 = time.time()
            qdir = work / tag
            if not (qdir / "quant_config.json").exists():
                quantize_to_dir(fp, QuantConfig(method="rtn", wbits=wb, abits=ab, skip=skip), qdir, calib=args.calib,
                                device=args.device, progress=False)
            q = load_model(str(qdir), device=args.device)
            rep = compare(fp, q, cfg, work / f"compare_{tag}", device=args.device, metrics=False, label=tag)
            n_float = sum(type(m).__name__ in ("Linear", "Conv2d") for m in q.model.modules())
            rows.append({"bits": bits.strip().upper(), "variant": name, "wbits": wb, "abits": ab,
                         "skip": list(skip) if skip is not None else "recipe", "float_layers": n_float,
                         "psnr_db_mean": rep["psnr_db_mean"], "psnr_db_min": rep["psnr_db_min"],
                         "seconds": round(time.time() - t0, 1)})
            print(f"{rows[-1]['bits']} {name:18s} float layers {n_float:3d}  "
                  f"PSNR {rep['psnr_db_mean']:.2f} dB (min {rep['psnr_db_min']:.2f})", flush=True)
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info(),
           "wall_seconds": round(time.time() - t_start, 1), "model": args.model, "calib": args.calib,
           "sampler": {"steps": args.steps, "num": args.num, "guidance_scale": args.guidance_scale, "seed": 0},
           "rows": rows}
    write_json(out / "dit_layer_groups.json", res)
    lines = [f"# Which layer groups make a DiT's quantization lossy ({args.model})", "",
             f"`{res['command']}` (commit {res['commit']}, {res['machine'].get('gpu') or 'CPU'}, "
             f"{res['wall_seconds']:.0f} s). Round-to-nearest, common preset unless named; {args.num} images, DDIM "
             f"{args.steps} steps, guidance {args.guidance_scale}, the same noise and labels as the float model's. "
             "PSNR of each variant's images against the float model's (higher is closer).", "",
             "| bits | variant | float Conv2d/Linear layers | PSNR mean dB | PSNR min dB |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['bits']} | {r['variant']} | {r['float_layers']} | {r['psnr_db_mean']:.2f} | {r['psnr_db_min']:.2f} |"
              for r in rows]
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
