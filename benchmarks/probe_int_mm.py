"""Which `torch._int_mm` shapes and operand layouts this GPU's cuBLAS takes, whether each result is exact,
and how fast each layout runs.

`torch._int_mm(a, b)`, a (M, K) int8, b (K, N) int8 -> (M, N) int32, in two layouts of b:
- "NN": b row-major (K, N) contiguous, what `gacq.export.int8` passes today;
- "NT": b the transposed view of a row-major (N, K) weight, `w.t()` (the layout cuBLAS documents its int8
  tensor-core kernels for).
Each call is checked against a float64 matmul of the same integers (exact: |sums| < 2^53) and timed with CUDA events
(median of 20 after 5 warm-up calls). Shapes: small row counts around cuBLAS's limits, one case that failed in
session 10 (M 546), the attention projections and a 3x3 conv of the `ddpm-cifar10` model at batch 256 as GEMMs,
and 8192^3.

    python benchmarks/probe_int_mm.py --out results/int_mm_probe   # on the GPU; a few seconds

Writes OUT/int_mm_probe.json (command, machine, every case) and OUT/int_mm_probe.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gacq.bench import time_calls
from gacq.utils import atomic_path, write_json

SHAPES = [(17, 72, 72), (24, 72, 72), (546, 72, 72), (552, 72, 72), (1000, 64, 256), (1024, 1152, 128),
          (65536, 256, 256), (65536, 2304, 256), (8192, 8192, 8192)]


def probe(m: int, k: int, n: int, layout: str, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(m * 31 + k * 7 + n)
    a = torch.randint(-128, 128, (m, k), generator=g, device=device, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, device=device, dtype=torch.int8)  # (N, K), a weight's layout
    b = w.t().contiguous() if layout == "NN" else w.t()
    row = {"m": m, "k": k, "n": n, "layout": layout}
    try:
        c = torch._int_mm(a, b)
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        row["error"] = str(e).splitlines()[0][:200]
        return row
    check = slice(0, min(m, 2048))  # float64 reference on at most 2,048 rows (8192^3 in float64 is slow)
    want = a[check].double() @ w.double().t()
    row["exact"] = bool(torch.equal(c[check].double(), want))
    ms = statistics.median(time_calls(lambda: torch._int_mm(a, b), device, 5, 20))
    row["ms"] = round(ms, 4)
    row["tops"] = round(2 * m * k * n / (ms * 1e-3) / 1e12, 2)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_int_mm: needs a CUDA GPU (cuBLAS's int8 GEMM is what it probes)")
    device = torch.device("cuda")
    t0 = time.time()
    rows = [probe(m, k, n, layout, device) for (m, k, n) in SHAPES for layout in ("NN", "NT")]
    for r in rows:
        print(r, flush=True)
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version()},
              "wall_seconds": round(time.time() - t0, 1), "cases": rows}
    lines = ["# torch._int_mm: shapes, layouts, exactness, speed", "", f"`{result['command']}`", "",
             f"{result['machine']['gpu']}, torch {result['machine']['torch']} (CUDA {result['machine']['cuda']}), "
             f"{result['wall_seconds']} s", "", "| M | K | N | layout | exact | ms | TOPS | error |",
             "|---:|---:|---:|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['layout']} | {r.get('exact', '-')} | {r.get('ms', '-')} "
                     f"| {r.get('tops', '-')} | {r.get('error', '')} |")
    write_json(args.out / "int_mm_probe.json", result)
    with atomic_path(args.out / "int_mm_probe.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
