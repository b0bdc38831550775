"""Other ways to run a 3x3 conv in 8 bits than gacq's Triton implicit GEMM, timed against cuDNN's bf16 conv.

For each conv shape of the `ddpm-cifar10` UNet at batch 256 (stride 1, padding 1), on channels-last codes:
- `cudnn bf16`: F.conv2d in bf16, channels-last (the baseline every backend is compared with);
- `im2col int8`: the int8 codes (N, H, W, C) padded and unfolded into (M, 9C) rows, k ordered (r, s, c), by one
  strided copy; then `torch._int_mm` with the weight as the transposed view of a row-major (O, 9C) tensor (the "NT"
  layout, 935 TOPS at 8192^3 on the H200: results/int_mm_probe); then a dequantizing epilogue (int32 -> float,
  per-channel scale, bias, bf16) in eager torch. Each part is timed alone and the three together;
- `im2col fp8`: the same unfold on float8 E4M3 codes and `torch._scaled_mm` (Hopper's FP8 tensor cores), which
  writes bf16 with its scales applied (no separate epilogue);
- `cudnn int8`: torch's quantized conv on CUDA (`torch.ops.quantized.conv2d`, cuDNN's int8 conv), if this torch build
  has it; otherwise the error is recorded.
The im2col int8 result is checked against a float64 conv of the same integers (exact). gacq's own Triton kernels on
the same shapes are in results/conv_tiles (benchmarks/tune_conv_tiles.py).

    python benchmarks/probe_conv_paths.py --out results/conv_paths           # on the GPU; about a minute
    python benchmarks/probe_conv_paths.py --out /tmp/cp --device cpu --smoke  # the exactness checks on a CPU

Writes OUT/conv_paths.json (command, machine, every case) and OUT/conv_paths.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gacq.bench import time_calls
from gacq.utils import atomic_path, git_commit, machine_info, write_json

# (C, O, H=W) at batch 256: the tile sweep's stride-1 3x3 shapes
SHAPES = [(128, 128, 32), (256, 256, 16), (512, 256, 16), (256, 256, 8)]
SMOKE = [(8, 16, 6), (16, 8, 5)]


def im2col_codes(codes: torch.Tensor, kh: int = 3, kw: int = 3, pad: int = 1) -> torch.Tensor:
    """(N, H, W, C) codes -> (N*H*W, kh*kw*C) rows, k ordered (r, s, c), for a stride-1 conv with `pad`:
    one zero-padding copy and one strided gather copy (works for any dtype, int8 and float8 included)."""
    n, h, w, c = codes.shape
    p = torch.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=codes.dtype, device=codes.device)
    p[:, pad:pad + h, pad:pad + w] = codes
    sn, sh, sw, sc = p.stride()
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    view = p.as_strided((n, ho, wo, kh, kw, c), (sn, sh, sw, sh, sw, sc))
    return view.reshape(n * ho * wo, kh * kw * c)


def conv_ops(n: int, c: int, o: int, hw: int) -> int:
    return 2 * n * hw * hw * o * c * 9


def probe(c: int, o: int, hw: int, batch: int, device: torch.device, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(c * 131 + o * 7 + hw)
    row = {"c": c, "o": o, "hw": hw, "batch": batch, "ops": conv_ops(batch, c, o, hw)}
    codes = torch.randint(-128, 128, (batch, hw, hw, c), generator=g, device=device, dtype=torch.int8)
    w = torch.randint(-128, 128, (o, c, 3, 3), generator=g, device=device, dtype=torch.int8)
    w_rsc = w.permute(0, 2, 3, 1).reshape(o, 9 * c).contiguous()  # (O, 9C), k = (r, s, c): the NT operand's rows
    scale = torch.rand(o, generator=g, device=device) * 1e-4
    bias = torch.randn(o, generator=g, device=device)
    timed = lambda fn: round(statistics.median(time_calls(fn, device, 3, repeats)), 4)  # noqa: E731
    tflops = lambda ms: round(row["ops"] / (ms * 1e-3) / 1e12, 1)  # noqa: E731

    # exactness of the im2col int8 path against a float64 conv of the same integers (a subset of images on big shapes)
    k = min(batch, 2)
    acc = torch._int_mm(im2col_codes(codes[:k]), w_rsc.t())
    want = F.conv2d(codes[:k].permute(0, 3, 1, 2).double().cpu(), w.double().cpu(), padding=1)
    row["im2col_int8_exact"] = bool(torch.equal(acc.double().cpu(), want.permute(0, 2, 3, 1).reshape(-1, o)))
    if device.type != "cuda":
        return row

    x = (codes.float() * 0.01).to(torch.bfloat16).permute(0, 3, 1, 2)  # channels-last NCHW view
    wb = (w.float() * 0.01).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    row["cudnn_bf16_ms"] = ms = timed(lambda: F.conv2d(x, wb, padding=1))
    row["cudnn_bf16_tflops"] = tflops(ms)

    cols = im2col_codes(codes)
    acc = torch._int_mm(cols, w_rsc.t())
    epilogue = lambda a: (a.float() * scale + bias).to(torch.bfloat16)  # noqa: E731
    row["im2col_ms"] = timed(lambda: im2col_codes(codes))
    row["int_mm_nt_ms"] = ms = timed(lambda: torch._int_mm(cols, w_rsc.t()))
    row["int_mm_nt_tops"] = tflops(ms)
    row["epilogue_ms"] = timed(lambda: epilogue(acc))
    row["im2col_int8_total_ms"] = ms = timed(lambda: epilogue(torch._int_mm(im2col_codes(codes), w_rsc.t())))
    row["im2col_int8_vs_cudnn_bf16"] = round(row["cudnn_bf16_ms"] / ms, 3)

    try:
        f8 = torch.float8_e4m3fn
        codes8, w8 = (codes.float() * 0.05).to(f8), (w_rsc.float() * 0.05).to(f8)
        one = torch.ones((), device=device)
        mm8 = lambda a: torch._scaled_mm(a, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        cols8 = im2col_codes(codes8)
        row["scaled_mm_fp8_ms"] = ms = timed(lambda: mm8(cols8))
        row["scaled_mm_fp8_tflops"] = tflops(ms)
        row["im2col_fp8_total_ms"] = ms = timed(lambda: mm8(im2col_codes(codes8)))
        row["im2col_fp8_vs_cudnn_bf16"] = round(row["cudnn_bf16_ms"] / ms, 3)
    except (RuntimeError, AttributeError, TypeError) as e:
        row["fp8_error"] = str(e).splitlines()[0][:200]

    try:
        qx = torch.quantize_per_tensor(x.float(), 0.01, 0, torch.qint8).contiguous(memory_format=torch.channels_last)
        qw = torch.quantize_per_tensor(w.float() * 0.01, 0.01, 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(qw, None, [1, 1], [1, 1], [1, 1], 1)
        row["cudnn_int8_ms"] = ms = timed(lambda: torch.ops.quantized.conv2d(qx, packed, 0.5, 0))
        row["cudnn_int8_vs_cudnn_bf16"] = round(row["cudnn_bf16_ms"] / ms, 3)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        row["cudnn_int8_error"] = str(e).splitlines()[0][:200]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes at batch 2 (the exactness checks only)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("probe_conv_paths: needs a CUDA GPU for the timings (--device cpu --smoke runs the exactness checks)")
    t0 = time.time()
    shapes, batch = (SMOKE, 2) if args.smoke else (SHAPES, 256)
    rows = []
    for c, o, hw in shapes:
        rows.append(probe(c, o, hw, batch, device, args.repeats))
        print(rows[-1], flush=True)
    machine = {**machine_info(), "cuda": torch.version.cuda}
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "commit": git_commit(), "machine": machine, "device": str(device),
              "wall_seconds": round(time.time() - t0, 1), "cases": rows}
    cols = ["cudnn_bf16_ms", "im2col_ms", "int_mm_nt_ms", "epilogue_ms", "im2col_int8_total_ms",
            "im2col_int8_vs_cudnn_bf16", "im2col_fp8_total_ms", "im2col_fp8_vs_cudnn_bf16", "cudnn_int8_ms",
            "cudnn_int8_vs_cudnn_bf16"]
    lines = ["# 3x3 convs in 8 bits: im2col + cuBLAS int8 / FP8 and cuDNN int8 against cuDNN bf16", "",
             f"`{result['command']}`", "", f"commit {result['commit']}, "
             f"{machine['gpu'] if device.type == 'cuda' else 'CPU'}, torch {machine['torch']}, "
             f"{result['wall_seconds']} s; batch {batch}; ms are medians of {args.repeats} calls; "
             "vs = cuDNN bf16 ms / path ms (above 1: faster than bf16)", "",
             "| C | O | HxW | im2col int8 exact | " + " | ".join(cols) + " | errors |",
             "|---:|---:|---:|---|" + "---:|" * len(cols) + "---|"]
    for r in rows:
        errs = "; ".join(f"{k}: {r[k]}" for k in ("fp8_error", "cudnn_int8_error") if k in r)
        lines.append(f"| {r['c']} | {r['o']} | {r['hw']} | {r['im2col_int8_exact']} | "
                     + " | ".join(str(r.get(k, "-")) for k in cols) + f" | {errs} |")
    write_json(args.out / "conv_paths.json", result)
    with atomic_path(args.out / "conv_paths.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
