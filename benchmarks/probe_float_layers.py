"""Which layers of a quantized checkpoint hurt most? Restore their float weights and resample.

Loads QDIR, switches activation quantization off (weights only), then cumulatively restores the
float weights (from the base model) of the given layer groups and samples the same seeds each time,
reporting PSNR against FP samples of the same noise. A probe, not a method: the reconstructed layers
after a restored one were fitted to its quantized output.

    python benchmarks/probe_float_layers.py --qdir Q --ref S_FP --num 8 --out results/probe \
        --group conv_out --group time_embedding.linear_1,time_embedding.linear_2 --group conv_in
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.models import load_model  # noqa: E402
from gacq.quant.wrap import set_quant_state  # noqa: E402
from gacq.sampling import SampleConfig, generate  # noqa: E402
from gacq.utils import git_commit, machine_info, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qdir", required=True)
    ap.add_argument("--ref", required=True, help="FP sample folder (same seed and sampler)")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--group", action="append", default=[], help="comma-separated layer names, restored cumulatively")
    args = ap.parse_args()
    t0 = time.time()
    meta = json.loads((Path(args.ref) / "meta.json").read_text())
    ref = np.load(Path(args.ref) / "samples.npz")["images"][: args.num].astype(np.float64)
    cfg = SampleConfig(scheduler=meta["scheduler"], steps=meta["steps"], eta=meta["eta"], seed=meta["seed"])
    qmeta = json.loads((Path(args.qdir) / "quant_config.json").read_text())
    fp = load_model(None if qmeta["base_model"].startswith("bundled:") else qmeta["base_model"]).model
    loaded = load_model(args.qdir)
    set_quant_state(loaded.model, weights=True, acts=False)
    rows = []

    def measure(label: str) -> None:
        im = generate(loaded, cfg, range(args.num)).astype(np.float64)
        mse = ((im - ref) ** 2).reshape(len(im), -1).mean(1)
        rows.append({"float_layers": label, "psnr_mean_db": round(float(np.mean(10 * np.log10(255**2 / mse))), 2),
                     "mean_rgb": [round(float(v), 1) for v in im.reshape(-1, im.shape[-1]).mean(0)]})
        print(rows[-1], flush=True)

    measure("none (weights-only quantized)")
    restored: list[str] = []
    for group in args.group:
        for name in group.split(","):
            q = loaded.model.get_submodule(name)
            q.weight.data.copy_(fp.get_submodule(name).weight.data)
            q.w_quant = False
            restored.append(name)
        measure(" + ".join(restored))
    fp_rgb = [round(float(v), 1) for v in ref.reshape(-1, ref.shape[-1]).mean(0)]
    result = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info(),
              "wall_seconds": round(time.time() - t0, 1), "fp_mean_rgb": fp_rgb, "rows": rows}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    lines = [f"# Float-layer probe of {args.qdir} ({args.num} images, weights only)", "",
             f"Command: `{result['command']}`  ", f"Commit: {result['commit']}; wall {result['wall_seconds']} s on "
             f"{result['machine']['cpus']} CPU cores", "", f"FP mean RGB: {fp_rgb}", "",
             "PSNR is pixel-space against FP samples of the same noise (no feature network).", "",
             "| float layers (restored cumulatively) | PSNR vs FP (dB) | mean RGB |", "|---|---|---|"]
    lines += [f"| {r['float_layers']} | {r['psnr_mean_db']} | {r['mean_rgb']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
