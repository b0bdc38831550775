"""Tile sweep of the implicit-GEMM conv kernels (int8 W8A8, W4A8, W4A16, FP8) on the `ddpm-cifar10` model's conv shapes,
against cuDNN's bf16 conv of the same shape, so `triton_w4.tiles` can be chosen from measurements.

For each shape (batch 256 at the model's resolutions, or --batch) and each kernel it times every (BLOCK_M, BLOCK_N, BLOCK_K,
num_warps, num_stages) in the grid below (CUDA events, median of 10 after 3 warm-up calls; a config that fails to
compile or run is recorded with its error), checks the fastest against the default tiles' output (the integer
kernels: equal up to the epilogue's float rounding), and reports TOPS / TFLOPS (2 operations per multiply-add) and the
ratio to cuDNN bf16. Random inputs and weights: speed does not depend on the values.

The int8 and W4A8 kernels run both ways by default (--halo both): the halo path (`int8_conv2d`'s default: the input
codes in a buffer padded with the code of 0.0, input tiles loaded without bounds masks) and the masked path
(`halo=False`: each tap masked and selected), each swept over the grid as its own row (the `halo` column), and the halo
row gets the masked row's default and best times divided by its own (`halo_vs_masked`: > 1, the halo path faster).
--halo on / off sweeps one of them.

    python benchmarks/tune_conv_tiles.py --out results/conv_tiles          # GPU; about 2-4 minutes
    python benchmarks/tune_conv_tiles.py --out /tmp/t --grid quick         # fewer configs
    python benchmarks/tune_conv_tiles.py --out /tmp/t --grid quick --halo on   # only the halo path (half the time)
    python benchmarks/tune_conv_tiles.py --out /tmp/t --grid fp8 --kernels fp8-gemm   # the FP8 GEMM alone, wider
    python benchmarks/tune_conv_tiles.py --out /tmp/t --batch 1 --grid small-m   # batch 1: few output rows (M = H*W),
        # so the large tiles leave most of the GPU's SMs idle; small-m tries tiles of 16-64 rows
    TRITON_INTERPRET=1 python benchmarks/tune_conv_tiles.py --out /tmp/t --grid smoke   # CPU smoke test

Writes OUT/conv_tiles.json (command, machine, every timing) and OUT/conv_tiles.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gacq.bench import time_calls
from gacq.utils import atomic_path, write_json

# (C, O, H=W, kernel, stride) of ddpm-cifar10's convs at 32x32 input, batch 256
SHAPES = [(128, 128, 32, 3, 1), (256, 256, 16, 3, 1), (512, 256, 16, 3, 1), (256, 256, 8, 3, 1),
          (256, 256, 16, 1, 1), (128, 128, 32, 3, 2)]
BATCH = 256
KERNELS = ("int8", "w4a8", "w4a16", "fp8", "fp8-gemm")


def configs(grid: str) -> list[tuple[int, int, int, int, int]]:
    if grid == "smoke":  # the default tiles of the interpreter, and one 16-row tile (the small-m grid's smallest)
        return [(32, 32, 32, 4, 2), (16, 32, 32, 2, 2)]
    if grid == "small-m":
        blocks = [(16, 32, 64), (16, 64, 64), (32, 32, 64), (32, 64, 64), (64, 64, 64), (32, 128, 64), (64, 128, 64),
                  (16, 64, 128), (32, 64, 128), (16, 128, 128), (64, 64, 128)]  # K blocks of 128: half the K loop
        # (FP8: one byte an element, as int8); 64 rows: the smallest M of a Hopper wgmma, which FP8 needs
        return [(*b, w, 3) for b, w in itertools.product(blocks, [2, 4])]
    if grid == "fp8":  # larger K blocks (one byte an element) and deeper pipelines
        blocks = [(128, 128, 128), (128, 256, 128), (256, 128, 128), (64, 256, 128), (128, 256, 64), (128, 128, 256)]
        return [(*b, w, s) for b, w, s in itertools.product(blocks, [4, 8], [3, 4])]
    blocks = [(128, 128, 64), (128, 128, 128), (128, 256, 64), (256, 128, 64), (64, 128, 128), (128, 64, 128)]
    warps, stages = {"quick": ([8], [3]), "default": ([4, 8], [3]), "full": ([4, 8], [2, 3, 4])}[grid]
    return [(*b, w, s) for b, w, s in itertools.product(blocks, warps, stages)]


def kernels(c: int, o: int, k: int, stride: int, device: torch.device, halo: str = "both",
            only: set[str] | None = None):
    """{(name, halo): fn(x, block, warps, stages)} for one conv shape, random weights; halo None for W4A16, True /
    False (as `halo` asks) for int8 and W4A8; FP8 (`triton_fp8.fp8_conv2d`: the halo path only, K-major weight, its
    own quantize kernel; float32 accumulation, so Triton pipelines its wgmma) as ("fp8", True), and its GEMM alone on
    codes quantized beforehand (what runs under torch.compile, where the quantization fuses into the op producing x)
    as ("fp8-gemm", True); `only`: these kernel names."""
    from gacq.export.base import pack_int4
    from gacq.export.triton_fp8 import fp8_conv2d, fp8_conv2d_codes, fp8_halo_codes
    from gacq.export.triton_int8 import int8_conv2d
    from gacq.export.triton_w4 import w4a16_conv2d

    kk = c * k * k
    g = torch.Generator(device=device).manual_seed(0)
    w8 = torch.randint(-100, 100, ((kk + 7) // 8 * 8, (o + 7) // 8 * 8), generator=g, device=device,
                       dtype=torch.int8)
    codes = torch.randint(0, 16, (o, kk), generator=g, device=device)
    packed = pack_int4(codes)
    w_scale = torch.rand(o, generator=g, device=device) * 1e-3
    w_zero = torch.full((o,), 8, device=device, dtype=torch.int32)
    row = torch.zeros(o, device=device, dtype=torch.int32)
    # a zero point off the centre (128): the border's code is -15, not 0, so the halo / masked comparison sees it
    a_scale, a_zero = torch.tensor([0.02], device=device), torch.tensor([113.0], device=device)
    bias = torch.zeros(o, device=device)
    geo = ((k, k), (stride, stride), (k // 2, k // 2), (1, 1))

    def int8(x, block=None, warps=None, stages=None, aligned=None, halo=True):
        return int8_conv2d(x, w8, kk, o, w_scale, None, row, bias, a_scale, a_zero, 0, 255, 128, *geo,
                           block=block, num_warps=warps, num_stages=stages, aligned=aligned, halo=halo)

    def w4a8(x, block=None, warps=None, stages=None, halo=True):
        return int8_conv2d(x, packed, kk, o, w_scale, None, row, bias, a_scale, a_zero, 0, 255, 128, *geo,
                           w_zero=w_zero, block=block, num_warps=warps, num_stages=stages, halo=halo)

    wf8 = torch.zeros(((o + 15) // 16 * 16, (kk + 15) // 16 * 16), device=device, dtype=torch.float8_e4m3fn)
    wf8[:o, :kk] = (torch.randn(o, kk, generator=g, device=device) * 50).to(torch.float8_e4m3fn)

    def fp8(x, block=None, warps=None, stages=None):
        return fp8_conv2d(x, wf8, kk, o, w_scale, bias, a_scale, *geo, block=block, num_warps=warps, num_stages=stages)

    cache = {}

    def fp8_gemm(x, block=None, warps=None, stages=None):  # the GEMM alone, on x's codes quantized once
        if cache.get("x") is not x:
            cache.update(x=x, q=fp8_halo_codes(x, a_scale, geo[2]))
        return fp8_conv2d_codes(cache["q"], wf8, kk, o, w_scale, bias, a_scale, *geo, x.dtype, block=block,
                                num_warps=warps, num_stages=stages)

    def w4a16(x, block=None, warps=None, stages=None):
        return w4a16_conv2d(x, packed, w_scale, w_zero, (o, c, k, k), bias, geo[1], geo[2], geo[3],
                            block=block, num_warps=warps, num_stages=stages)

    ways = {"both": (True, False), "on": (True,), "off": (False,)}[halo]
    out = {}
    for name, fn in (("int8", int8), ("w4a8", w4a8)):
        for h in ways:
            out[name, h] = lambda x, *a, _fn=fn, _h=h, **kw: _fn(x, *a, halo=_h, **kw)
    out = {**out, ("w4a16", None): w4a16, ("fp8", True): fp8, ("fp8-gemm", True): fp8_gemm}
    return {key: fn for key, fn in out.items() if only is None or key[0] in only}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", choices=["quick", "default", "full", "small-m", "fp8", "smoke"], default="default",
                   help="quick: 6 tile shapes at 8 warps, 3 stages; default: 4 and 8 warps; full: also 2 and 4 stages; "
                        "small-m: 11 tile shapes of 16-64 rows at 2 and 4 warps (for small batches); "
                        "fp8: 6 tile shapes with K blocks of 64-256 at 4 and 8 warps, 3 and 4 stages; "
                        "smoke: one tiny shape and two configs in Triton's interpreter (TRITON_INTERPRET=1, CPU; the test)")
    p.add_argument("--halo", choices=["both", "on", "off"], default="both",
                   help="int8 and W4A8: sweep the halo path (on, int8_conv2d's default), the masked path (off, "
                        "halo=False) or both, side by side (default)")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"comma-separated: which of {', '.join(KERNELS)} to sweep (fp8-gemm: the FP8 conv's GEMM "
                        "alone, on codes quantized beforehand)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"images per conv call (default {BATCH}; the smoke grid 2)")
    args = p.parse_args(argv)
    only = {k.strip() for k in args.kernels.split(",") if k.strip()}
    if not only or only - set(KERNELS):
        p.error(f"--kernels {args.kernels!r}: the kernels are {', '.join(KERNELS)}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    smoke = args.grid == "smoke"
    if not torch.cuda.is_available() and not smoke:
        sys.exit("tune_conv_tiles: needs a CUDA GPU (it times compiled Triton kernels); --grid smoke runs on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True

    # the smoke grid runs the code paths in the interpreter, where a time means nothing: one call per timing there
    # (3 + 10 calls made the test's two sweeps 310 s of CPU, session 51)
    warmup, repeats = (0, 1) if smoke else (3, 10)

    def time_ms(fn) -> float:  # CUDA events on the GPU; perf_counter in the interpreter's smoke test
        return statistics.median(time_calls(fn, device, warmup, repeats))
    t0 = time.time()
    rows = []
    batch, dtype = (2, torch.float32) if smoke else (BATCH, torch.bfloat16)
    batch = args.batch or batch

    def write() -> dict:  # after every kernel, so a run cut by its time limit keeps what it measured
        result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                  "machine": {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                              else "cpu (Triton interpreter)", "torch": torch.__version__,
                              "python": platform.python_version()},
                  "wall_seconds": round(time.time() - t0, 1), "rows": rows}
        lines = [f"# Implicit-GEMM conv kernels: tile sweep at batch {batch}", "", f"`{result['command']}`", "",
                 f"{result['machine']['gpu']}, torch {result['machine']['torch']}, {result['wall_seconds']} s", "",
                 "| C | O | HxW | k | stride | kernel | halo | cuDNN bf16 TFLOPS | default T/s | "
                 "default, per-element taps T/s | best T/s | best tiles (M, N, K), warps, stages | best / cuDNN | "
                 "best = default output | halo / masked speed, default, best |",
                 "|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|---|---|"]
        for r in rows:
            if "summary" not in r:
                continue
            s, b = r["summary"], r["summary"]["best"] or {}
            hm = s.get("halo_vs_masked") or {}
            halo = {True: "on", False: "off"}.get(s.get("halo"), "-")
            lines.append(f"| {s['c']} | {s['o']} | {s['hw']} | {s['k']} | {s['stride']} | {s['kernel']} | {halo} | "
                         f"{s['cudnn_bf16_tflops']} | {s['default_tops']} | {s.get('general_taps_tops', '-')} | "
                         f"{b.get('tops', '-')} | "
                         f"{b.get('block', '-')}, {b.get('warps', '-')}, {b.get('stages', '-')} | {b.get('vs_cudnn', '-')} | "
                         f"{s.get('best_matches_default', '-')} | "
                         f"{hm.get('default', '-')}, {hm.get('best', '-')} |")
        write_json(args.out / "conv_tiles.json", result)
        with atomic_path(args.out / "conv_tiles.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        return result

    for (c, o, hw, k, stride) in ([(32, 16, 6, 3, 1)] if smoke else SHAPES):
        x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
        wb = torch.randn(o, c, k, k, device=device, dtype=dtype)
        ho = (hw + 2 * (k // 2) - k) // stride + 1
        ops = 2 * batch * ho * ho * o * c * k * k
        bf16 = time_ms(lambda: F.conv2d(x, wb, None, stride, k // 2))
        shape = {"c": c, "o": o, "hw": hw, "k": k, "stride": stride, "ops": ops, "cudnn_bf16_ms": round(bf16, 4),
                 "cudnn_bf16_tflops": round(ops / bf16 / 1e9, 1)}
        print(shape, flush=True)
        halo_rows = {}  # kernel name -> (its halo summary, its halo default output)
        for (name, halo), fn in kernels(c, o, k, stride, device, args.halo, only).items():
            default = fn(x)
            best = None
            default_ms = time_ms(lambda: fn(x))
            for cfg in configs(args.grid):
                r = {**shape, "kernel": name, "halo": halo, "block": cfg[:3], "warps": cfg[3], "stages": cfg[4]}
                try:
                    ms = time_ms(lambda: fn(x, cfg[:3], cfg[3], cfg[4]))
                    r.update(ms=round(ms, 4), tops=round(ops / ms / 1e9, 1), vs_cudnn=round(bf16 / ms, 3))
                    if smoke:  # every config's output, not only the fastest's (the tiles must not change it)
                        r["matches_default"] = bool(torch.allclose(fn(x, cfg[:3], cfg[3], cfg[4]).float(),
                                                                   default.float(), rtol=1e-2, atol=1e-2))
                    if best is None or ms < best["ms"]:
                        best = r
                except Exception as e:  # noqa: BLE001 (recorded: too much shared memory, ...)
                    r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(r)
            summary = {**shape, "kernel": name, "halo": halo, "default_ms": round(default_ms, 4),
                       "default_tops": round(ops / default_ms / 1e9, 1), "best": best}
            if name == "int8":  # the default tiles with the per-element tap arithmetic: what alignment gains
                general_ms = time_ms(lambda: fn(x, aligned=False))
                summary["general_taps_tops"] = round(ops / general_ms / 1e9, 1)
                summary["general_taps_equal"] = bool(torch.equal(fn(x, aligned=False), default))
            if best is not None:
                got = fn(x, best["block"], best["warps"], best["stages"])
                summary["best_matches_default"] = bool(torch.allclose(got.float(), default.float(), rtol=1e-2,
                                                                      atol=1e-2))
            if halo:
                halo_rows[name] = (summary, default)
            elif name in halo_rows:  # the masked row after the halo row: their speeds side by side, in the halo row
                hs, hy = halo_rows[name]
                # the same integers: equal (compiled, the two kernels' epilogues may contract differently: an ulp)
                summary["same_as_halo"] = bool(torch.equal(default, hy))
                hs["halo_vs_masked"] = {"default": round(default_ms / hs["default_ms"], 3),
                                        "best": round(best["ms"] / hs["best"]["ms"], 3)
                                        if best is not None and hs["best"] is not None else None}
            rows.append({"summary": summary})
            print(f"  {name}{'' if halo is None else ' halo' if halo else ' masked'}: default "
                  f"{summary['default_tops']} T/s, best "
                  f"{best and (best['block'], best['warps'], best['stages'], best['tops'])}", flush=True)
            write()
    return write()


if __name__ == "__main__":
    main()
