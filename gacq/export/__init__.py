"""Real low-bit inference for gacq's quantized checkpoints (issue 8).

    QDIR (fake-quant checkpoint) --load_quantized--> fake-quant model --convert(backend)--> low-bit model
                                  export(QDIR, backend, OUT): convert + check + OUT/export.json
    (the check, `compare_outputs` + `check_failures`: each exported layer on its fake-quant layer's inputs, and the
    whole model on random inputs against fake quant and against a float64 run of it)

Backends (`BACKENDS`):
- `int8`: int8 weights x int8 activations, exact int32 GEMM (`torch._int_mm`); on CUDA convolutions
  run as one fused Triton kernel (`triton_int8`), elsewhere as im2col + the same GEMM; W <= 8, A <= 8
  (module `int8`).
- `w4a8`: int4 weights packed two per byte x int8 activations, the same exact integer arithmetic;
  on CUDA convs and linears run the fused Triton kernel, which unpacks the codes in its K loop
  (module `int8`).
- `w4a16`: int4 weights packed two per byte, dequantized at call time for the float conv/linear (on
  CUDA, with `W4A16Layer.use_kernel`, a Triton GEMM dequantizes them tile by tile instead: `triton_w4`,
  convs as an implicit GEMM; slower than dequantize + cuDNN in session 10's measurement); inputs as in
  the fake-quant model (module `w4a16`).
- `fp8`: FP8 E4M3 weights x FP8 E4M3 activations for checkpoints quantized with `--format fp8`: one
  `torch._scaled_mm` per linear (float32 accumulation); convs on CUDA as two Triton kernels (codes into a padded
  channels-last buffer, then an implicit GEMM: `triton_fp8`), elsewhere as im2col + `torch._scaled_mm` (module `fp8`).
Layers a backend cannot run stay on a dense path with the fake-quant weight, counted in the
report and in one warning.

Example:
    >>> from gacq.export import export, load_exported
    >>> info = export("runs/q_w8a8", "int8", "runs/q_w8a8.int8")
    >>> model = load_exported("runs/q_w8a8.int8", device="cuda")
"""

from .base import DenseConv2d, DenseLinear, ExportedLayer, pack_int4, unpack_int4
from .convert import (
    BACKENDS,
    Backend,
    ExportReport,
    apply_step,
    convert,
    convert_loaded,
    auto_backend,
    get_backend,
    step_hook,
)
from .folder import (
    EXPORT_FILE,
    check_failures,
    compare_outputs,
    example_inputs,
    export,
    load_exported,
    read_export_info,
)
from .fp8 import FP8Conv2d, FP8Linear
from .int8 import Int8Conv2d, Int8Linear, W4A8Conv2d, W4A8Linear, int_mm
from .w4a16 import W4A16Conv2d, W4A16Linear

__all__ = [
    "BACKENDS",
    "EXPORT_FILE",
    "Backend",
    "DenseConv2d",
    "DenseLinear",
    "ExportReport",
    "ExportedLayer",
    "FP8Conv2d",
    "FP8Linear",
    "Int8Conv2d",
    "Int8Linear",
    "W4A8Conv2d",
    "W4A8Linear",
    "W4A16Conv2d",
    "W4A16Linear",
    "apply_step",
    "check_failures",
    "compare_outputs",
    "convert",
    "convert_loaded",
    "example_inputs",
    "export",
    "auto_backend",
    "get_backend",
    "int_mm",
    "load_exported",
    "pack_int4",
    "read_export_info",
    "step_hook",
    "unpack_int4",
]
