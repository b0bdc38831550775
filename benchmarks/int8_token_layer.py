"""Layer-level timing of int8 Linears with dynamic per-token inputs on a GPU (issues 8/9).

For the Linear shapes of the `dit-s6` / `dit-s` DiT (hidden 384: attention 384->384, MLP 384->1536 and 1536->384) at
256 tokens per image and several batch sizes, side by side in one run (medians of `triton.testing.do_bench`):

- bf16 `F.linear` (the float reference),
- the int8 export's torch path for per-token inputs (`Int8Layer`, `use_kernel = False`: quantize rows in torch,
  `torch._int_mm`, rescale),
- the Triton path (`Int8Layer.kernel_dynamic = True`: `triton_int8.int8_linear_dynamic`).

Also checks, per shape, that the Triton output matches the torch path within 2 float32 ulps at the output's scale
(tests/triton_w4_checks.py's GPU rule). Writes JSON and a markdown table to OUT.

    python benchmarks/int8_token_layer.py OUT [--batches 1,64,256]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gacq.export.int8 import to_int8  # noqa: E402
from gacq.quant.modules import QuantLinear  # noqa: E402
from gacq.utils import git_commit  # noqa: E402

SHAPES = [("attn q/k/v/out", 384, 384), ("mlp up", 384, 1536), ("mlp down", 1536, 384)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batches", default="1,64,256")
    args = ap.parse_args()
    import triton.testing

    dev = torch.device("cuda")
    rows = []
    t0 = time.time()
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        q = QuantLinear(nn.Linear(k, n), 8, 8, False, a_dynamic=True)
        q.init_weight("mse")
        q.w_quant, q.a_quant = True, True
        ex = to_int8(q).to(dev)
        w16 = q.weight.detach().to(dev, torch.bfloat16)
        b16 = q.bias.detach().to(dev, torch.bfloat16)
        for b in map(int, args.batches.split(",")):
            m = 256 * b
            x = torch.randn(m, k, device=dev)
            x16 = x.bfloat16()
            with torch.no_grad():
                ex.kernel_dynamic, ex.use_kernel = True, True
                assert ex.kernel_applies(x), (name, m)
                y = ex(x)
                t_triton = triton.testing.do_bench(lambda: ex(x), return_mode="median")
                ex.use_kernel = False
                want = ex(x)
                t_torch = triton.testing.do_bench(lambda: ex(x), return_mode="median")
                t_bf16 = triton.testing.do_bench(lambda: F.linear(x16, w16, b16), return_mode="median")
            err = float((y - want).abs().max())
            tol = 2 * torch.finfo(torch.float32).eps * max(1.0, float(want.abs().max()))
            flops = 2 * m * k * n
            rows.append({"layer": name, "in": k, "out": n, "batch": b, "rows": m, "bf16_ms": t_bf16,
                         "int8_torch_ms": t_torch, "int8_triton_ms": t_triton,
                         "triton_tops": flops / t_triton / 1e9, "bf16_tflops": flops / t_bf16 / 1e9,
                         "max_abs_diff_vs_torch": err, "tolerance": tol, "within_tolerance": err <= tol})
            print(f"{name:15s} B={b:4d} bf16 {t_bf16:.4f} ms  int8 torch {t_torch:.4f}  triton {t_triton:.4f}  "
                  f"diff {err:.2e} (tol {tol:.2e})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "host": platform.node(),
            "wall_seconds": round(time.time() - t0, 1), "rows": rows}
    (out / "token_layer.json").write_text(json.dumps(meta, indent=1))
    lines = [f"`{meta['command']}` at {meta['commit']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']};"
             " medians of triton.testing.do_bench, float32 inputs (bf16 for the bf16 row), 256 tokens per image.", "",
             "| layer | batch | rows | bf16 ms | int8 torch ms | int8 Triton ms | Triton speed-up over torch | over bf16 |"
             " within 2 ulp |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} ({r['in']}->{r['out']}) | {r['batch']} | {r['rows']} | {r['bf16_ms']:.4f} | "
                     f"{r['int8_torch_ms']:.4f} | {r['int8_triton_ms']:.4f} | "
                     f"{r['int8_torch_ms'] / r['int8_triton_ms']:.2f}x | "
                     f"{r['bf16_ms'] / r['int8_triton_ms']:.2f}x | {r['within_tolerance']} |")
    (out / "token_layer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
