"""`gacq bench`: latency per denoising step of the real low-bit backends (gacq.export) against bf16, side by side.

For one model config (random weights: speed does not depend on them) it builds
- the float model in bf16, eager and torch.compile'd (the baselines);
- a W8A8 round-to-nearest fake-quant model (min-max weight grids; activation ranges min-max on
  one random batch, as gacq.quant.wrap does on calibration data), also with its activations quantized by
  the fused sampling kernel (`gacq.quant.triton_fq`, "fused-fq"), and its `int8` export, with its
  fused Triton convolution (on CUDA) and with it off (im2col + torch._int_mm), and with its linears also on the
  Triton kernel ("triton-linears") instead of torch._int_mm, or with torch._int_mm's weight operand row-major
  ("nn-linears"; the default passes it transposed, cuBLAS's fast int8 layout);
- a W4A8 round-to-nearest fake-quant model and its `w4a8` export (packed int4 x int8, fused Triton
  kernel on CUDA), also with its codes unpacked to int8 once per call for the int8 kernel ("unpacked");
- a W4A16 round-to-nearest fake-quant model (weight-only, no calibration) and its `w4a16` export,
  as the backend runs it by default (unpack + dequantize + float op per call) and with its Triton kernel
  ("triton", CUDA; `--kernels` times that kernel per layer);
and times one model call (= one denoising step) at each batch size: CUDA events around each
call, `--warmup` calls first, the median of `--repeats`. Every model runs in `--dtype` (bf16 by
default: float parts, and the fake-quant arithmetic, in bf16; the exported layers keep their
float32 weight scales and int32 accumulation). Fake-quant models run with their weights
quantized once (`frozen_weights`, as `gacq sample` does). With compile on, the exported models
are also timed under torch.compile. It reports ms per step, the ratio to bf16 compiled (bf16
eager without compile), peak CUDA memory of the timed calls, the bytes of the conv/linear
weights as each model stores them and of the whole model, and, from torch.profiler on the float
model (at --dtype, eager) at the largest batch, the share of time in Conv2d, Linear and the rest.

    # on the H100 (minutes; compiling the compiled modes at three batch sizes takes most of it;
    # --modes picks some, so each part fits a 10-minute device call):
    gacq bench --config ddpm-cifar10 --out results/bench_lowbit
    gacq bench --config ddpm-cifar10 --modes int8,w4a8 --no-compile --out results/bench_lowbit_int8
    # CPU smoke test (what tests/test_export.py runs; fp32, as bf16 convs are slow on CPUs):
    gacq bench --config tiny --device cpu --dtype fp32 --batch-sizes 1 --repeats 2 --warmup 1 --no-compile --out /tmp/b

`python benchmarks/bench_lowbit.py ...` runs the same (it calls `main`); `gacq.bench.main(argv)` from Python.
On CUDA every mode is also timed as one CUDA-graph replay per step (`--no-graphs` skips that).
`--sample-steps 100` adds a whole 100-step DDIM loop per mode and batch size. `--kernels` adds every
conv/linear layer timed alone at the largest batch, in float and in each backend, as TFLOPS / TOPS next
to the machine's measured bf16, int8 and FP8 GEMM peaks (`--modes none --kernels`: only that).

Writes OUT/bench_lowbit.json (command, commit, machine, args, results, wall time), OUT/bench_lowbit.md and
OUT/bench_lowbit.png (each mode's speed against the fastest float mode, a panel per batch size; `--plot-from JSON`
redraws it for an earlier run without running anything).
A mode that fails (say torch.compile of an exported model) is recorded with its error, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GacqError
from .export import ExportedLayer, convert
from .export.triton_w4 import TILE_RULES, set_tile_rule
from .models import NAMED_CONFIGS, build_model
from .quant.methods import COMMON_SKIP
from .quant.modules import QuantConv2d, QuantLayer, frozen_weights
from .quant.primitives import use_fused_fake_quant
from .quant.wrap import (
    init_act_quantizers_minmax,
    observe_input_ranges,
    set_quant_state,
    wrap_layers,
)
from .sampling import cuda_graph_replay
from .utils import atomic_path, git_commit, machine_info, save_figure, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------ models ---
def fake_quant(model: nn.Module, wbits: int, abits: int | None, device: torch.device, seed: int,
               token: bool = False, fmt: str = "int", afmt: str | None = None) -> nn.Module:
    """Round-to-nearest W/A fake quantization of a copy of `model` (float32), gacq's common layer set; `token`:
    the Linear layers' inputs dynamic per token (`--act-granularity token`); `fmt`: the grids' number format
    ("fp8": FP8 E4M3, `--format fp8`); `afmt`: the inputs' format where it differs (`--act-format fp8`)."""
    q = copy.deepcopy(model).to(device).float().eval()
    wrap_layers(q, wbits, abits, skip=lambda n, m: n in COMMON_SKIP, dynamic=token, fmt=fmt, afmt=afmt)
    q.to(device)
    for m in q.modules():
        if isinstance(m, QuantLayer):
            m.init_weight("minmax")
    set_quant_state(q, weights=True, acts=False)
    if abits is not None:
        x, t = random_inputs(q, 16, device, seed)
        ranges = observe_input_ranges(q, [(x, t)], lambda m, x_, t_: m(x_, t_))
        init_act_quantizers_minmax(q, ranges)
        set_quant_state(q, weights=True, acts=True)
    return q


def kernels_off(model: nn.Module) -> nn.Module:
    """An export with its Triton kernels off: w4a16 unpacks + dequantizes + runs the float op per
    call; int8 convs run im2col + torch._int_mm + separate (de)quantization passes."""
    from gacq.export.int8 import Int8Layer
    from gacq.export.w4a16 import W4A16Layer

    for m in model.modules():
        if isinstance(m, (W4A16Layer, Int8Layer)):
            m.use_kernel = False
    return model


def kernels_on(model: nn.Module) -> nn.Module:
    """A w4a16 export with its Triton kernel on (the backend's default dequantizes per call and runs cuDNN)."""
    from gacq.export.w4a16 import W4A16Layer

    for m in model.modules():
        if isinstance(m, W4A16Layer):
            m.use_kernel = True
    return model


def unpack_int8(model: nn.Module) -> nn.Module:
    """A w4a8 export whose layers unpack their int4 codes to int8 once per call and run the int8 kernel."""
    from gacq.export.int8 import W4A8Layer

    for m in model.modules():
        if isinstance(m, W4A8Layer):
            m.unpack_for_kernel = True
    return model


def fp8_variant(model: nn.Module, **switches) -> nn.Module:
    """An fp8 export with `FP8Layer` switches set on every layer, e.g. compile_fuses_quantize=False (under
    torch.compile the eager path's Triton quantize kernel inside the conv's custom op, not torch ops inductor fuses
    into the input's producer), cublas_pointwise=True (1x1 stride-1 convs through cuBLAS's FP8 GEMM) or
    channels_last_out=True (the compiled convs write channels-last outputs) or precise_acc=True (the FP8 products
    promoted into the float32 accumulator after each K block)."""
    from gacq.export.fp8 import FP8Layer

    for m in model.modules():
        if isinstance(m, FP8Layer):
            for name, value in switches.items():
                setattr(m, name, value)
    return model


def triton_linears(model: nn.Module) -> nn.Module:
    """An int8 export whose linears also run the fused Triton kernel (as 1x1 convs over 1x1 images) instead of
    `torch._int_mm` (935 TOPS at 8192^3 on the H200 in its default "nt" layout, results/int_mm_probe)."""
    from gacq.export.int8 import Int8Layer

    for m in model.modules():
        if isinstance(m, Int8Layer) and not m.is_conv:
            m.kernel_linears = True
    return model


def token_kernels(model: nn.Module, on: bool = True) -> nn.Module:
    """An int8 / W4A8 export whose linears with dynamic per-token inputs run `triton_int8.int8_linear_dynamic`
    (each row's grid and codes in one kernel, per-row scales in the GEMM's epilogue; the default since session 18)
    or, with `on` False, the torch path (row min/max, grid, codes and dequantization as separate passes)."""
    from gacq.export.int8 import Int8Layer

    for m in model.modules():
        if isinstance(m, Int8Layer):
            m.kernel_dynamic = on
    return model


def nn_linears(model: nn.Module) -> nn.Module:
    """An int8 export whose linears call `torch._int_mm` with a row-major (K, O) weight ("nn") instead of the
    default transposed view of a row-major (O, K) one ("nt"): `Int8Part.int_mm_layout`."""
    from gacq.export.int8 import Int8Layer

    for m in model.modules():
        if isinstance(m, Int8Layer) and not m.is_conv:
            for part in m.parts:
                part.int_mm_layout = "nn"
    return model


def random_inputs(model: nn.Module, batch: int, device: torch.device, seed: int = 0, dtype=torch.float32):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device, dtype), t.to(device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the conv/linear weights as stored (exported layers: codes, scales, offsets)."""
    total = 0
    for m in model.modules():
        if isinstance(m, ExportedLayer):
            total += m.weight_bytes()
        elif isinstance(m, (nn.Conv2d, nn.Linear, QuantLayer)):
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ timing ---
def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


class _Range:
    """Forward hooks that open a profiler range per Conv2d / Linear call (exported layers by their kind)."""

    def __init__(self, model: nn.Module):
        self.stack, self.handles = [], []
        for m in model.modules():
            kind = self.kind(m)
            if kind:
                self.handles.append(m.register_forward_pre_hook(lambda mod, a, k=kind: self.enter(k)))
                self.handles.append(m.register_forward_hook(lambda mod, a, o: self.exit()))

    @staticmethod
    def kind(m: nn.Module) -> str | None:
        if isinstance(m, (nn.Conv2d, QuantConv2d)) or (isinstance(m, ExportedLayer) and m.is_conv):
            return "conv2d"
        if isinstance(m, (nn.Linear, QuantLayer, ExportedLayer)):
            return "linear"
        return None

    def enter(self, kind: str) -> None:
        if not self.stack:  # nested layers count once
            cm = torch.profiler.record_function(f"bench::{kind}")
            cm.__enter__()
            self.stack.append(cm)
        else:
            self.stack.append(None)

    def exit(self) -> None:
        cm = self.stack.pop()
        if cm is not None:
            cm.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_time_share(model: nn.Module, inputs, device: torch.device) -> dict[str, float]:
    """Share of one forward's time in Conv2d, Linear and other ops (torch.profiler, device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ranges = _Range(model)
    try:
        with torch.no_grad():
            model(*inputs)  # warm
            with profile(activities=acts) as prof:
                with torch.profiler.record_function("bench::forward"):
                    model(*inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    finally:
        ranges.remove()

    def span(e) -> float:  # inclusive time of a range: its kernels' device time on CUDA, CPU time otherwise
        if device.type == "cuda":
            return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
        return float(e.cpu_time_total)

    spans = {e.key: span(e) for e in prof.key_averages() if e.key.startswith("bench::")}
    total, conv, lin = (spans.get(f"bench::{k}", 0.0) for k in ("forward", "conv2d", "linear"))
    if total <= 0:
        return {}
    return {"conv2d": round(conv / total, 4), "linear": round(lin / total, 4),
            "other": round(max(0.0, 1 - (conv + lin) / total), 4), "profiled_ms": round(total / 1e3, 3)}


# -------------------------------------------------------------------- main ---
def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="ddpm-cifar10", choices=sorted(NAMED_CONFIGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="1,64,256", help="comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes")
    ap.add_argument("--no-graphs", action="store_true",
                    help="skip the CUDA-graph replay of each mode (on CUDA every mode is also timed as one graph)")
    ap.add_argument("--sample-steps", type=int, default=0,
                    help="also time a whole DDIM sampling loop of this many steps per mode and batch size (model "
                         "calls, CUDA-graph replays where graphs are on, and the scheduler's update); 0: off")
    ap.add_argument("--kernels", action="store_true",
                    help="also time every conv/linear layer alone at the largest batch, in bf16 and in each backend, "
                         "as TFLOPS/TOPS, next to the machine's measured bf16, int8 and FP8 GEMM peaks (CUDA)")
    ap.add_argument("--modes", default="",
                    help="comma-separated substrings: run only the modes whose label contains one (e.g. 'bf16,int8'); "
                         "one ending in '$' only the mode of exactly that label (e.g. 'fp8 FP8 compiled$', none of "
                         "its variants); the float compiled baseline is always kept for the ratios")
    ap.add_argument("--tile-rules", default=TILE_RULES[0],
                    help="comma-separated tile rules of the Triton low-bit kernels (gacq.export.triton_w4.TILE_RULES: "
                         "small-m, the default, no-small-m, small-m-splitk, small-m-masked: the int8 / W4A8 convs "
                         "without the halo path, and small-m-kmajor: their K-major weight copy); each int8 / w4a8 / "
                         "Triton mode runs once per rule, side by side, labelled ' tiles=RULE' for a rule other than "
                         "the default")
    ap.add_argument("--profile", action="store_true",
                    help="also record each mode's kernels at each batch size with torch.profiler (3 calls, no CUDA "
                         "graph): the device time of all its kernels per call and the costliest ones (CPU: its ops)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="the results folder (required unless --plot-from)")
    ap.add_argument("--plot-from", type=Path, default=None, metavar="JSON",
                    help="run nothing: redraw bench_lowbit.png next to this bench_lowbit.json of an earlier run")
    args = ap.parse_args(argv)
    if args.plot_from is not None:
        try:
            png = plot_file(args.plot_from)
        except GacqError as e:
            ap.error(str(e))
        print(f"wrote {png}" if png else f"{args.plot_from}: no timed rows to plot", flush=True)
        return
    if args.out is None:
        ap.error("--out is required (or --plot-from JSON to redraw an earlier run's plot)")
    args.command = " ".join([prog or "python " + sys.argv[0], shlex.join(sys.argv[1:] if argv is None else argv)])
    t_start = time.time()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its note on casting UNet2DModel with .to(dtype) is noise here
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    torch.manual_seed(args.seed)
    fp = build_model(args.config).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # (label, builder): built lazily, one at a time, so peak memory is per mode
    fq8 = lambda: fake_quant(fp, 8, 8, device, args.seed)
    fq4 = lambda: fake_quant(fp, 4, None, device, args.seed)
    fq48 = lambda: fake_quant(fp, 4, 8, device, args.seed)
    fqf8 = lambda: fake_quant(fp, 8, 8, device, args.seed, fmt="fp8")
    fq4f8 = lambda: fake_quant(fp, 4, 8, device, args.seed, afmt="fp8")  # int4 weights, FP8 inputs
    fp8x = lambda **switches: fp8_variant(convert(fqf8(), "fp8")[0], **switches)  # FP8Layer switches
    modes = [
        (f"{args.dtype} eager", lambda: copy.deepcopy(fp), False),
        ("fake-quant W8A8", fq8, False),
        ("fake-quant W8A8 fused-fq", fq8, False),  # activations through gacq.quant.triton_fq (CUDA)
        ("int8 W8A8", lambda: convert(fq8(), "int8")[0], False),  # fused Triton convs (CUDA)
        ("int8 W8A8 im2col", lambda: kernels_off(convert(fq8(), "int8")[0]), False),
        ("int8 W8A8 triton-linears", lambda: triton_linears(convert(fq8(), "int8")[0]), False),
        ("int8 W8A8 nn-linears", lambda: nn_linears(convert(fq8(), "int8")[0]), False),
        # dynamic per-token Linear inputs: the linears on the torch path (row min/max, one grid per row), then on
        # the fused Triton kernel (the export's default)
        ("fake-quant W8A8 token", lambda: fake_quant(fp, 8, 8, device, args.seed, token=True), False),
        # the same through the per-token fused fake quantizer (`triton_fq.fake_quantize_rows_fused`, CUDA)
        ("fake-quant W8A8 token fused-fq", lambda: fake_quant(fp, 8, 8, device, args.seed, token=True), False),
        ("int8 W8A8 token", lambda: token_kernels(convert(fake_quant(fp, 8, 8, device, args.seed, token=True),
                                                          "int8")[0], on=False), False),
        ("int8 W8A8 token triton", lambda: token_kernels(convert(fake_quant(fp, 8, 8, device, args.seed, token=True),
                                                                  "int8")[0]), False),
        ("fake-quant W4A8", fq48, False),
        ("w4a8 W4A8", lambda: convert(fq48(), "w4a8")[0], False),  # fused Triton conv/linear (CUDA)
        ("w4a8 W4A8 unpacked", lambda: unpack_int8(convert(fq48(), "w4a8")[0]), False),
        ("fake-quant W4A16", fq4, False),
        ("w4a16 W4A16", lambda: convert(fq4(), "w4a16")[0], False),  # dequantize per call + cuDNN (the default)
        ("w4a16 W4A16 triton", lambda: kernels_on(convert(fq4(), "w4a16")[0]), False),  # the Triton kernel (CUDA)
        ("fake-quant FP8", fqf8, False),
        ("fp8 FP8", lambda: convert(fqf8(), "fp8")[0], False),  # torch._scaled_mm; convs: Triton (CUDA) or im2col
        ("fake-quant W4xFP8", fq4f8, False),
        ("fp8 W4xFP8", lambda: convert(fq4f8(), "fp8")[0], False),
        ("w4fp8 W4xFP8", lambda: convert(fq4f8(), "w4fp8")[0], False),  # the same, int4 packed, unpacked per call
    ]
    if not args.no_compile:
        modes.insert(1, (modes[0][0].replace("eager", "compiled"), lambda: copy.deepcopy(fp), True))
        modes += [("int8 W8A8 compiled", lambda: convert(fq8(), "int8")[0], True),
                  ("w4a8 W4A8 compiled", lambda: convert(fq48(), "w4a8")[0], True),
                  ("w4a16 W4A16 compiled", lambda: convert(fq4(), "w4a16")[0], True),
                  ("fp8 FP8 compiled", lambda: convert(fqf8(), "fp8")[0], True),
                  ("fp8 FP8 compiled triton-quantize", lambda: fp8x(compile_fuses_quantize=False), True),
                  ("fp8 FP8 compiled 1x1-cublas", lambda: fp8x(cublas_pointwise=True), True),
                  ("fp8 FP8 compiled nhwc-out", lambda: fp8x(channels_last_out=True), True),
                  ("fp8 FP8 compiled precise-acc", lambda: fp8x(precise_acc=True), True),
                  ("fp8 W4xFP8 compiled", lambda: convert(fq4f8(), "fp8")[0], True),
                  ("w4fp8 W4xFP8 compiled", lambda: convert(fq4f8(), "w4fp8")[0], True)]

    if args.modes:
        wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
        labels = [m[0] for m in modes]
        # a name ending in "$" matches that mode alone, e.g. 'fp8 FP8 compiled$' without its variants
        modes = [m for i, m in enumerate(modes) if i == 1 and not args.no_compile
                 or any(m[0] == w[:-1] if w.endswith("$") else w in m[0] for w in wanted)]
        if not modes and not args.kernels:
            ap.error(f"--modes {args.modes!r} matches no mode; the modes are: {', '.join(labels)}")
    rules = [r.strip() for r in args.tile_rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in TILE_RULES]
    if bad or not rules:
        ap.error(f"--tile-rules {args.tile_rules!r}: unknown rule(s) {', '.join(bad) or '(none given)'}; "
                 f"the rules are: {', '.join(TILE_RULES)}")
    # each Triton low-bit mode once per tile rule; the others (float, fake quant, cuDNN dequantize) once
    modes = [(label + ("" if rule == TILE_RULES[0] else f" tiles={rule}"), build, compiled, rule)
             for label, build, compiled in modes
             for rule in (rules if label.startswith(("int8", "w4a8")) or "triton" in label else [TILE_RULES[0]])]
    graphs = device.type == "cuda" and not args.no_graphs

    results = []
    share = None
    kernels = None
    for label, build, compiled, rule in modes:
        print(f"[bench] {label}", flush=True)
        set_tile_rule(rule)  # read when a kernel is launched (and captured with it into a CUDA graph)
        try:
            model = build().to(device, dtype).eval()
        except Exception as e:  # noqa: BLE001 (a mode that cannot be built is recorded; the others still run)
            results.append({"mode": label, "error": f"{type(e).__name__}: {e}"})
            continue
        wbytes, mbytes = weight_bytes(model), model_bytes(model)
        if label.endswith("eager") and share is None:
            share = layer_time_share(model, random_inputs(model, max(batch_sizes), device, args.seed, dtype), device)
        fn_model = compile_fresh(model) if compiled else model
        freeze = frozen_weights(model) if any(isinstance(m, QuantLayer) for m in model.modules()) \
            else contextlib.nullcontext()
        fused = use_fused_fake_quant() if label.endswith("fused-fq") else contextlib.nullcontext()
        with torch.no_grad(), freeze, fused:
            for bs in batch_sizes:
                x, t = random_inputs(model, bs, device, args.seed, dtype)
                call = functools.partial(fn_model, x, t)
                base = {"mode": label, "batch": bs, "weight_bytes": wbytes, "model_bytes": mbytes}
                row = timed_row(dict(base), lambda: call, device, args)
                results.append(row)
                if args.profile and "error" not in row:
                    row["profile"] = top_kernels(call, device)
                if args.sample_steps and "error" not in row:
                    row.update(time_sampling(fn_model, x, device, args.sample_steps, graph=False))
                if graphs and "error" not in row:
                    grow = timed_row({**base, "mode": f"{label} + CUDA graph"},
                                     lambda: cuda_graph_replay(call, device), device, args)
                    if args.sample_steps and "error" not in grow:
                        grow.update(time_sampling(fn_model, x, device, args.sample_steps, graph=True))
                    results.append(grow)
                # after each batch size, not each mode: a device call's time limit that stops a mode mid-way
                # keeps the batch sizes it finished (session 38: a mode's rows at batch 1 and 64 were in the log only)
                write_results(args, results, share, t_start, kernels)
        del model, fn_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    set_tile_rule(TILE_RULES[0])  # the default again, also after a mode that failed to build

    if args.kernels:
        print("[bench] kernels: each layer alone", flush=True)
        kernels = kernel_report(fp, {"int8": lambda: convert(fq8(), "int8")[0],
                                     "w4a8": lambda: convert(fq48(), "w4a8")[0],
                                     "w4a16": lambda: kernels_on(convert(fq4(), "w4a16")[0]),
                                     "fp8": lambda: convert(fqf8(), "fp8")[0],
                                     "w4fp8": lambda: convert(fq4f8(), "w4fp8")[0]},
                                args, device, dtype, max(batch_sizes))
    write_results(args, results, share, t_start, kernels)


def compile_fresh(model: nn.Module, backend: str = "inductor"):
    """torch.compile(model) with one static graph per batch size, after emptying Dynamo's cache. Dynamo keeps at most
    `recompile_limit` (8) graphs per code object and every mode compiles the same UNet forward, so without the reset
    the graphs past that limit ran eager, with a log warning only (session 35 on the H100: `w4fp8 W4xFP8 compiled` at
    batch 256, after three compiled modes at two batch sizes, ran eager group norms in 1,892 launches a call)."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False, backend=backend)


def timed_row(row: dict, make_call, device: torch.device, args) -> dict:
    """`row` with the timing of the call `make_call()` returns (median, min and all of `args.repeats` calls after
    `args.warmup`) and, on CUDA, the peak memory from making it on; a mode that fails (say torch.compile of an
    exported layer, or a CUDA-graph capture of a call that syncs with the host) is recorded with its error."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fn = make_call()
        fn()  # the first call: torch.compile's compilation, a CUDA graph's capture, Triton's kernel builds
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        times = time_calls(fn, device, args.warmup, args.repeats)
        row.update(ms_median=statistics.median(times), ms_min=min(times), ms_all=[round(v, 4) for v in times])
        if device.type == "cuda":
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    except Exception as e:  # noqa: BLE001 (recorded; the other modes still run)
        row["error"] = f"{type(e).__name__}: {e}"
    first = f"(first call {row['first_call_s']:.1f} s) " if "first_call_s" in row else ""
    print(f"  {row['mode']}, batch {row['batch']}: {row.get('ms_median', float('nan')):.3f} ms {first}"
          f"{row.get('error', '')[:200]}", flush=True)
    return row


def gemm_peaks(device: torch.device, n: int = 8192) -> dict:
    """The machine's measured dense GEMM throughput at n x n x n: bf16 matmul (TFLOPS), int8 `torch._int_mm`
    (TOPS; `int8_tops` with both operands row-major, `int8_nt_tops` with a transposed second operand) and FP8 E4M3 `torch._scaled_mm` (TFLOPS, where the GPU has it). Each entry is a number or the error."""
    peaks: dict[str, Any] = {"n": n}
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    one = torch.ones((), device=device)
    cases = {"bf16_tflops": lambda: a @ b,
             "int8_tops": lambda: torch._int_mm(a8, b8),
             # the second operand as the transposed view of a row-major (N, K) weight: the layout cuBLAS's int8
             # tensor-core kernels are documented for (session 10: the row-major "NN" case measured 126 TOPS)
             "int8_nt_tops": lambda: torch._int_mm(a8, b8.t()),
             "fp8_e4m3_tflops": lambda: torch._scaled_mm(f8a, f8b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)}
    a8 = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
    b8 = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
    try:
        f8a = a.to(torch.float8_e4m3fn)
        f8b = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand, as _scaled_mm needs
    except Exception as e:  # noqa: BLE001 (no FP8 dtype in this torch)
        cases.pop("fp8_e4m3_tflops")
        peaks["fp8_e4m3_tflops"] = f"{type(e).__name__}: {e}"
    for key, fn in cases.items():
        try:
            ms = statistics.median(time_calls(fn, device, 3, 10))
            peaks[key] = round(2 * n ** 3 / (ms * 1e-3) / 1e12, 1)
        except Exception as e:  # noqa: BLE001 (recorded)
            peaks[key] = f"{type(e).__name__}: {e}"
    return peaks


def layer_dims(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """(M, N, K) of a conv/linear layer as a GEMM: output rows, output channels, reduction length."""
    if isinstance(layer, nn.Conv2d):
        n, _, ho, wo = y.shape
        return n * ho * wo, layer.out_channels, layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return x.numel() // layer.in_features, layer.out_features, layer.in_features


def kernel_report(fp: nn.Module, builders: dict, args, device: torch.device, dtype: torch.dtype, batch: int) -> dict:
    """Every Conv2d / Linear of `fp` timed alone on its own input at `batch` (captured from one forward of the
    float model in `dtype`): the float layer (cuDNN / cuBLAS) and each backend's exported layer, as ms and as
    achieved TFLOPS / TOPS (2 M N K / time). Layers a backend keeps in float (gacq's common skip set) are
    timed as they run there and marked. Totals sum the layers; `peaks` are the machine's dense GEMM peaks."""
    ref = copy.deepcopy(fp).to(device, dtype).eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=name: inputs.setdefault(n, a[0].detach()))
             for name, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        ref(*random_inputs(ref, batch, device, args.seed, dtype))
    for h in hooks:
        h.remove()
    variants = {args.dtype: ref}
    for name, build in builders.items():
        try:
            variants[name] = build().to(device, dtype).eval()
        except Exception as e:  # noqa: BLE001 (recorded; the others still run)
            variants[name] = f"{type(e).__name__}: {e}"
    rows, totals = [], {v: 0.0 for v in variants}
    with torch.no_grad():
        for name, x in inputs.items():
            layer = ref.get_submodule(name)
            m, n, k = layer_dims(layer, x, layer(x))
            row = {"layer": name, "kind": "conv2d" if isinstance(layer, nn.Conv2d) else "linear", "M": m, "N": n, "K": k}
            for v, model in variants.items():
                if isinstance(model, str):
                    continue
                mod = model.get_submodule(name)
                ms = statistics.median(time_calls(functools.partial(mod, x), device, args.warmup, args.repeats))
                row[f"{v}_ms"] = round(ms, 4)
                # four significant digits, not three decimals: a tiny layer on a loaded CPU runs at under one
                # GOPS, which three decimals of TOPS rounded to 0 (a test's flake in session 38)
                row[f"{v}_tops"] = float(f"{2 * m * n * k / (ms * 1e-3) / 1e12:.4g}")
                if v != args.dtype and not isinstance(mod, ExportedLayer):
                    row[f"{v}_float"] = True
                totals[v] += ms
            rows.append(row)
    return {"batch": batch, "peaks": gemm_peaks(device) if device.type == "cuda" else "not measured on the CPU",
            "variants": {v: (m if isinstance(m, str) else "ok") for v, m in variants.items()},
            "total_ms": {v: round(t, 3) for v, t in totals.items()}, "layers": rows}


# What a kernel (CUDA) or op (CPU) is, by its name, for the bound a faster GEMM can give (`kernel_class`):
# inductor's pointwise / reduction kernels first (their names list the ops they fused, "convolution" among them)
_FUSED_PREFIXES = ("triton_poi", "triton_red", "triton_per")
_ATTENTION = ("sdpa", "flash", "fmha", "scaled_dot_product", "efficient_attention")
# cuBLAS / cuDNN / CUTLASS GEMMs and implicit-GEMM convolutions, inductor's GEMM templates, gacq's Triton GEMMs and
# their split-K epilogues
_GEMM_CUDA = ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "triton_tem", "_conv_kernel", "_w4a16_kernel",
              "_int8_epilogue", "_int8_splitk_epilogue")
_GEMM_CPU = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
             "aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::addmm", "aten::mm", "aten::bmm",
             "aten::matmul", "aten::linear", "aten::_int_mm", "aten::_scaled_mm", "aten::baddbmm"}


def kernel_class(name: str) -> str:
    """'gemm' (matrix products and convolutions), 'attention' (fused attention kernels) or 'other' (norms,
    activations, additions, copies, quantization), read off a CUDA kernel's or a CPU op's name. A heuristic: names
    are the libraries' (cuBLAS, cuDNN, CUTLASS, inductor, gacq's Triton kernels), and one of a new library may land
    in 'other'."""
    low = name.lower()
    if low.startswith(_FUSED_PREFIXES):
        return "other"
    if any(k in low for k in _ATTENTION):
        return "attention"
    if name in _GEMM_CPU or (not name.startswith("aten::") and any(k in low for k in _GEMM_CUDA)):
        return "gemm"
    return "other"


def gemm_bound(by_class: dict[str, float], factor: float = 2.0) -> float | None:
    """How much faster a call could get at most if its GEMM time alone ran `factor` times faster (Amdahl):
    total / (total - gemm + gemm / factor)."""
    total = sum(by_class.values())
    gemm = by_class.get("gemm", 0.0)
    if total <= 0:
        return None
    return total / (total - gemm + gemm / factor)


def top_kernels(call, device: torch.device, calls: int = 3, top: int = 8) -> dict:
    """`calls` calls of `call` under torch.profiler, after one unrecorded call: on CUDA the device time of all
    kernels per call (what a CUDA graph's replay cannot go below) and the `top` kernels by their own device time;
    on the CPU the same for the ops' own CPU time. `by_class`: the time per call of all kernels by `kernel_class`,
    and `bound_2x_gemm`: at most how much faster the call gets with GEMMs twice as fast (`gemm_bound`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    call()
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: -getattr(e, attr))
    by_class = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        by_class[kernel_class(e.key)] += getattr(e, attr) / calls / 1e3
    bound = gemm_bound(by_class)
    return {"what": "CUDA kernels" if cuda else "CPU ops", "calls": calls,
            "ms_per_call": round(sum(getattr(e, attr) for e in events) / calls / 1e3, 4),
            "launches_per_call": round(sum(e.count for e in events) / calls, 1),
            "by_class": {k: round(v, 4) for k, v in by_class.items()},
            "bound_2x_gemm": None if bound is None else round(bound, 3),
            "top": [{"name": e.key[:120], "ms_per_call": round(getattr(e, attr) / calls / 1e3, 4),
                     "launches_per_call": round(e.count / calls, 1)} for e in events[:top]]}


def time_sampling(model, x: torch.Tensor, device: torch.device, steps: int, graph: bool) -> dict:
    """One DDIM sampling loop of `steps` steps from x's shape (eta 0, the default DDPM noise schedule), timed
    whole: the model call per step (one CUDA-graph replay per step when `graph`: the step's x and timestep are
    copied into the captured call's static inputs) and the scheduler's update. Seconds, or the error."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(x.shape, generator=g).to(device, x.dtype)
    step_fn = model
    if graph:
        x_in = torch.zeros_like(x)
        t_in = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        out = {}

        def call():
            out["eps"] = model(x_in, t_in)

        replay = cuda_graph_replay(call, device)

        def step_fn(xs, ts):
            x_in.copy_(xs)
            t_in.copy_(ts)
            replay()
            return out["eps"]
    try:
        def loop():
            xs = sample.clone()
            for t in sched.timesteps:
                eps = step_fn(xs, torch.full((x.shape[0],), int(t), device=device, dtype=torch.long))
                eps = eps.sample if hasattr(eps, "sample") else eps
                eps = eps[:, :xs.shape[1]]  # learned-variance models: the noise half
                xs = sched.step(eps, t, xs).prev_sample
            return xs

        ms = time_calls(loop, device, warmup=1, repeats=1)[0]
        return {"sample_steps": steps, "sample_seconds": round(ms / 1e3, 4)}
    except Exception as e:  # noqa: BLE001 (recorded with the row)
        return {"sample_steps": steps, "sample_error": f"{type(e).__name__}: {e}"}


LOWBIT_PREFIXES = ("int8", "w4a8", "w4a16", "fp8", "w4fp8", "fake-quant")  # rows that are never a float baseline


def add_best_float_ratio(results: list[dict]) -> None:
    """`speedup_vs_best_float`: the fastest float row at the same batch (eager or compiled, with or without a
    CUDA graph) over the row's time. The compiled baseline alone flatters the backends where a CUDA graph
    makes bf16 faster still (the small model at batch 256 on the H200: 11.3 ms compiled, 5.4 ms with a graph)."""
    best: dict[int, float] = {}
    for r in results:
        if "ms_median" in r and not r["mode"].startswith(LOWBIT_PREFIXES):
            best[r["batch"]] = min(best.get(r["batch"], float("inf")), r["ms_median"])
    for r in results:
        if "ms_median" in r and r["batch"] in best:
            r["speedup_vs_best_float"] = round(best[r["batch"]] / r["ms_median"], 3)


def write_results(args, results: list[dict], share, t_start: float, kernels: dict | None = None) -> None:
    """Ratios against the float compiled baseline, then JSON + markdown (called after every batch size of every
    mode, so a run cut short by a time limit keeps what it measured)."""
    base_label = next((r["mode"] for r in results if "compiled" in r["mode"] and "ms_median" in r
                       and not r["mode"].startswith(LOWBIT_PREFIXES)), results[0]["mode"] if results else None)
    base = {r["batch"]: r["ms_median"] for r in results if r["mode"] == base_label and "ms_median" in r}
    for r in results:
        if "ms_median" in r and r["batch"] in base:
            r["speedup_vs_baseline"] = round(base[r["batch"]] / r["ms_median"], 3)
    add_best_float_ratio(results)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": args.command, "commit": git_commit(), "machine": machine_info(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "command"},
              "baseline": base_label, "layer_time_share": share, "results": results, "kernels": kernels,
              "wall_seconds": round(time.time() - t_start, 1)}
    write_json(out / "bench_lowbit.json", result)
    with atomic_path(out / "bench_lowbit.md") as tmp:  # a time limit may stop the run mid-write
        tmp.write_text(render_markdown(result))
    png = plot_results(result, out / "bench_lowbit.png")
    print(f"wrote {out / 'bench_lowbit.json'} and {out / 'bench_lowbit.md'}" + (f" and {png}" if png else ""),
          flush=True)


def plot_results(res: dict, path: Path) -> Path | None:
    """`res`'s timings as a picture: one panel per batch size, a bar per timed mode of its speed against the fastest
    float row at that batch (`speedup_vs_best_float`: right of the line at 1 is faster than every float mode), the
    CUDA-graph rows dark, the others light. None (nothing drawn) when no row has that ratio."""
    rows = [r for r in res["results"] if "speedup_vs_best_float" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    per = {b: [r for r in rows if r["batch"] == b] for b in batches}
    height = 0.8 + 0.28 * max(len(v) for v in per.values())
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), height), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rs = per[b]
        vals = [r["speedup_vs_best_float"] for r in rs]
        colors = ["#1f4e79" if "CUDA graph" in r["mode"] else "#9dc3e6" for r in rs]
        ax.barh(range(len(rs)), vals, color=colors)
        ax.set_yticks(range(len(rs)), [r["mode"] for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=6)
        ax.set_xlim(0, max(1.2, max(vals) * 1.2))
        ax.set_xlabel("speed vs the fastest float mode (higher is faster)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"batch {b}", fontsize=8)
    where = res["machine"].get("gpu", "CPU")
    fig.suptitle(f"gacq bench: {res['args']['config']}, {where}, commit {str(res.get('commit'))[:7]}", fontsize=8)
    return save_figure(fig, path, dpi=120)


def plot_file(json_path: str | Path) -> Path | None:
    """Redraw bench_lowbit.png next to a bench_lowbit.json written by `gacq bench` (say, an older run's)."""
    json_path = Path(json_path)
    try:
        res = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GacqError(f"{json_path} cannot be read as a `gacq bench` result: {e}") from e
    if not isinstance(res, dict) or "results" not in res or "machine" not in res:
        raise GacqError(f"{json_path} is not a `gacq bench` result (no 'results' / 'machine')")
    return plot_results(res, json_path.with_suffix(".png"))


def render_markdown(res: dict) -> str:
    where = res["machine"].get("gpu", "CPU")
    lines = [f"# Low-bit backends: latency per denoising step ({res['args']['config']}, {where})", "",
             f"`{res['command']}`", "",
             (f"commit {res['commit']}, torch {res['machine']['torch']}, {res['wall_seconds']} s"
              + (f"; ratio = {res['baseline']} ms / mode ms (higher is faster)" if res["baseline"] else "")
              + "; vs best float = the fastest float row at that batch (any mode, CUDA graph or not) ms / mode ms"),
             ""]
    if res["results"]:
        lines += ["| mode | batch | ms/step (median) | ratio | vs best float | sample s | peak memory MB | weight MB | "
                  "model MB | first call s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steps = res["args"].get("sample_steps") or 0
    for r in res["results"]:
        if "ms_median" not in r:
            lines.append(f"| {r['mode']} | {r.get('batch', '')} | error: {r.get('error', '')[:80]} | | | | | | | |")
            continue
        mem = f"{r['peak_memory_bytes'] / 2**20:.1f}" if "peak_memory_bytes" in r else "-"
        samp = f"{r['sample_seconds']:.3f}" if "sample_seconds" in r else \
            ("error" if "sample_error" in r else "-")
        lines.append(f"| {r['mode']} | {r['batch']} | {r['ms_median']:.3f} | {r.get('speedup_vs_baseline', '-')} | "
                     f"{r.get('speedup_vs_best_float', '-')} | "
                     f"{samp} | {mem} | {r['weight_bytes'] / 2**20:.3f} | {r['model_bytes'] / 2**20:.3f} | "
                     f"{r.get('first_call_s', '-')} |")
    if steps:
        lines += ["", f"sample s: one whole DDIM sampling loop of {steps} steps (model calls and scheduler updates)."]
    if any("first_call_s" in r for r in res["results"]):
        lines += ["", "first call s: the wall time of a mode's first call at that batch size, before the warm-up calls: "
                  "it holds torch.compile's compilation (compiled modes, per batch size), a CUDA graph's capture and "
                  "Triton's kernel builds."]
    profiled = [r for r in res["results"] if "profile" in r]
    if profiled:
        lines += ["", "## Where the time goes (--profile: torch.profiler, 3 calls without a CUDA graph)", "",
                  f"Per call: the {profiled[0]['profile']['what']}' own time summed, their number, and the costliest. "
                  "GEMM / attention / other: that time split by kernel name (`bench.kernel_class`: matrix products and "
                  "convolutions; fused attention; the rest). 2x-GEMM bound: the most a call could gain if its GEMMs "
                  "alone ran twice as fast (8-bit tensor cores' limit against 16-bit), total / (total - GEMM / 2).",
                  "", "| mode | batch | ms per call | launches | GEMM / attention / other ms | 2x-GEMM bound "
                  "| costliest (ms per call, launches) |",
                  "|---|---:|---:|---:|---|---:|---|"]
        for r in profiled:
            p = r["profile"]
            top = "; ".join(f"`{t['name'][:60]}` {t['ms_per_call']:.3f} ({t['launches_per_call']:g})"
                            for t in p["top"][:4])
            split = " / ".join(f"{p['by_class'][k]:.3f}" for k in ("gemm", "attention", "other")) \
                if "by_class" in p else "-"
            bound = f"{p['bound_2x_gemm']:.2f}x" if p.get("bound_2x_gemm") else "-"
            lines.append(f"| {r['mode']} | {r['batch']} | {p['ms_per_call']:.3f} | {p['launches_per_call']:g} "
                         f"| {split} | {bound} | {top} |")
    kern = res.get("kernels")
    if kern:
        vs = [v for v, state in kern["variants"].items() if state == "ok"]
        lines += ["", f"## Each layer alone at batch {kern['batch']}", "",
                  f"Machine peaks (dense {kern['peaks']['n']}^3 GEMMs): " + ", ".join(
                      f"{k} {v}" for k, v in kern["peaks"].items() if k != "n") if isinstance(kern["peaks"], dict)
                  else f"Machine peaks: {kern['peaks']}.", "",
                  "Sum over layers, ms: " + ", ".join(f"{v} {kern['total_ms'][v]}" for v in vs) + ".", "",
                  "| layer | M | N | K | " + " | ".join(f"{v} ms | {v} T(FL)OPS" for v in vs) + " |",
                  "|---|---:|---:|---:|" + "---:|---:|" * len(vs)]
        for r in kern["layers"]:
            cells = []
            for v in vs:
                mark = " (float)" if r.get(f"{v}_float") else ""
                cells.append(f"{r[f'{v}_ms']:.4f}{mark} | {r[f'{v}_tops']:.2f}")
            lines.append(f"| {r['layer']} | {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    share = res.get("layer_time_share")
    if share:
        lines += ["", (f"Time share of the {res['results'][0]['mode']} model at the largest batch (torch.profiler): "
                       f"Conv2d {share['conv2d']:.0%}, Linear {share['linear']:.0%}, other {share['other']:.0%}.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(prog="python -m gacq.bench")
