"""The `int8` backend: int8 weights x int8 activations -> int32 GEMM (`torch._int_mm`), W <= 8 bits, A <= 8 bits.

The fake-quant layer computes, per output channel o (weight grid sw[o], zw[o]; input grid sa, za,
read from the act quantizer at call time):

    y[n, o] = sa * sw[o] * S[n, o] + b[o],    S = sum_k (Xq[n, k] - za) (Wq[o, k] - zw[o])

with unsigned codes Xq, Wq in 0..2^bits - 1, so the centred values span up to [-255, 255], too wide
for int8. Both sides are therefore shifted by integer centres into int8:

    X8 = Xq - ca   (ca = 128 for an unsigned 8-bit grid, else 0),   da = ca - za
    W8 = Wq - cw   (cw[o] = zw[o] when the row fits int8, else 128),  dw[o] = cw[o] - zw[o]
    S  = X8 @ W8^T + dw[o] * sum_k X8[n, k] + da * (sum_k W8[o, k] + K dw[o])

The GEMM runs on int8 with int32 accumulation; the row term (sum_k W8 + K dw) is precomputed at
export, the per-sample sum only computed for layers with some dw != 0. Every |.| is at most 128,
so all partial sums stay below 2^16 K: exact in int32 for K < 32768 (larger layers fall back).
S is therefore exact, and the only difference from fake quantization is float rounding:
the int8 layer rounds a few times after the exact sum, the fake-quant layer rounds inside its
float32 GEMM/conv. Stated layer tolerance (tested):
    |y_int8 - y_exact| <= 2^-21 (sa sw[o] |S| + |b|)    (a few float32 ulps; y_exact in float64)
    |y_int8 - y_fake|  <= 2^-21 (sa sw[o] |S| + |b|) + (K + 2) 2^-24 sa sw[o] sum_k |Xq - za||Wq - zw|
(the second term bounds fake quantization's own float32 accumulation error).

On CUDA, convolutions with one weight group run as one fused Triton kernel (`triton_int8`: implicit
GEMM, activation quantization in the prologue, this arithmetic in the epilogue, bitwise equal to the
torch path). Elsewhere, convolutions run as im2col + the same GEMM: the input's codes, centred and cast to int8,
go channels-last into a buffer whose border holds the code of a zero input (the padding of the dequantized input,
as in the fake-quant conv), and the patches are gathered from it with k in (r, s, c) order
(`base.channels_last_padded`, `base.im2col_rows`). Grouped convolutions fall back.

`torch._int_mm` on CUDA needs M > 16 rows and K, N multiples of 8: weights are stored padded to
multiples of 8 at export and the rows of small batches are padded at call time (`int_mm`). The
weight is stored transposed, (K, N) row-major, because cuBLAS's int8 path has given silently wrong
results for a non-contiguous second operand (torchao's `safe_int_mm` makes it contiguous for that reason).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..quant.modules import QuantLayer
from .base import ExportedLayer, WeightPart, _Part, channels_last_padded, conv_windows, im2col_rows, round_up, \
    weight_parts

MAX_K = 2**15 - 1  # int32-exact accumulation bound (see the module docstring)
CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: self.size(0) > 16


def int_mm(a: torch.Tensor, b: torch.Tensor, cuda_layout: bool | None = None) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact. b is passed row-major (made contiguous) or, when it
    is the transposed view of a row-major (N, K) tensor, as that view (`Int8Part.int_mm_layout` "nt").

    With `cuda_layout` (default: a is on CUDA) M is padded with zero rows to at least 17, as
    cuBLAS int8 GEMM requires, and to a multiple of 8. With both operands row-major (cuBLAS's "NN"
    int8 case) CUDA 13's cuBLAS refused small shapes on the H200 even so (M = 546 and 552 with K = N = 72,
    CUBLAS_STATUS_NOT_SUPPORTED; results/gpu_tests and results/int_mm_probe, sessions 10-11; pytorch/pytorch#169961
    calls the NN case "not yet supported ... liable to change"): the layers use the transposed ("nt") layout.
    K and N must already be multiples of 8 there (export pads the weight).
    """
    m = a.shape[0]
    if cuda_layout is None:
        cuda_layout = a.is_cuda
    rows = round_up(max(m, CUDA_MIN_ROWS), 8) if cuda_layout else m
    if rows != m:
        a = F.pad(a, (0, 0, 0, rows - m))
    transposed = not b.is_contiguous() and b.t().is_contiguous()
    return torch._int_mm(a.contiguous(), b if transposed else b.contiguous())[:m]


def act_center(qmin: int, qmax: int) -> int:
    """Integer shift that maps an activation grid [qmin, qmax] into int8."""
    return 0 if qmin >= -128 and qmax <= 127 else 128


class Int8Part(_Part):
    """One channel group: the int8 weight, transposed to (K8, O8) and padded to multiples of 8, its grid
    and the correction terms."""

    exact_buffers = ("w_scale",)
    kernel_zero = None  # the fused kernel reads `qweight` as int8 (K8, O8) (W4A8Part: packed codes + zero points)

    def __init__(self, p: WeightPart):
        super().__init__()
        codes, zw = p.codes, p.zero_point.round().to(torch.int64)
        o, k = codes.shape
        fits = ((codes.amax(1) - zw) <= 127) & ((codes.amin(1) - zw) >= -128)
        cw = torch.where(fits, zw, torch.full_like(zw, 128))
        w8 = codes - cw[:, None]
        dw = cw - zw
        self.k, self.out_channels = k, o
        self.has_offset = bool((dw != 0).any())
        padded = torch.zeros(round_up(k, 8), round_up(o, 8), dtype=torch.int8, device=codes.device)
        padded[:k, :o] = w8.t().to(torch.int8)
        self.register_buffer("qweight", padded)  # (K8, O8) row-major: torch._int_mm's second operand
        self.register_buffer("w_scale", p.scale.float().clone())
        self.register_buffer("w_offset", dw.to(torch.int32))
        self.register_buffer("row_term", (w8.sum(1) + k * dw).to(torch.int32))

    # "nt" (default): torch._int_mm's second operand is the transposed view of a row-major (O8, K8) copy of the
    # weight (made once per device, not saved), the layout cuBLAS documents its int8 tensor-core kernels for; "nn":
    # torch._int_mm(a, qweight), both operands row-major. The same exact integers either way. On the H200
    # (benchmarks/probe_int_mm.py, results/int_mm_probe, session 11) "nt" ran 935 TOPS at 8192^3 against "nn"'s 126,
    # 561 against 118 at a 3x3 conv's im2col shape (65536 x 2304 x 256), and took every small shape that "nn"
    # refused (CUBLAS_STATUS_NOT_SUPPORTED for M = 17 ... 1000 with K, N <= 256).
    int_mm_layout = "nt"

    def _weight_nt(self) -> torch.Tensor:
        cached = getattr(self, "_qweight_nt", None)
        if cached is None or cached.device != self.qweight.device:
            cached = self.qweight.t().contiguous()
            self._qweight_nt = cached
        return cached.t()

    def kernel_weight(self, kernel_size: tuple[int, int]) -> torch.Tensor:
        """The Triton conv's weight (`triton_int8.int8_conv2d(w_kmajor=True)`): W8 as (O8, K8) int8 row-major, k in
        (r, s, c) order, channels fastest (the order of the kernel's K loop), where `qweight` is (K8, O8) in
        (c, r, s) order; so each K block's weight tile is contiguous along k, as int8 wgmma wants it in shared memory
        (`triton_int8`'s docstring). Made from `qweight` once per device and cached, not saved: the checkpoint, the
        state dict and the torch path keep `qweight`. GPU memory: a second copy of the int8 weight (O8 x K8 bytes,
        as much again as `qweight`, which stays); a 1x1 kernel's is `_weight_nt`'s copy, the one the torch path's
        "nt" GEMM uses ((c, r, s) is (r, s, c) there). Under torch.compile a first call that makes the copy makes it
        inside the traced graph (no graph break) and the next call compiles once more, the cached attribute being
        guarded on (2 graphs for 3 calls, aot_eager, torch 2.13 CPU)."""
        from .base import rsc_order

        if kernel_size[0] * kernel_size[1] == 1:
            return self._weight_nt().t()
        cached = getattr(self, "_qweight_kmajor", None)
        if cached is None or cached.device != self.qweight.device:
            o, k = self.out_channels, self.k
            cached = torch.zeros(self.qweight.shape[::-1], dtype=torch.int8, device=self.qweight.device)
            cached[:o, :k] = rsc_order(self.qweight[:k, :o].t(), kernel_size)
            self._qweight_kmajor = cached
        return cached

    def gemm_weight(self, kernel_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The torch path's second operand, (K8, O8) int8: `qweight` (k in (c, r, s) order), or, for a conv
        kernel larger than 1x1 whose patches come channels-last (`Int8Layer._code_columns`), k in (r, s, c) order
        (the transposed view of `kernel_weight`'s cached copy). "nt" or "nn" as `int_mm_layout` says."""
        if kernel_size is None or kernel_size[0] * kernel_size[1] == 1:
            return self._weight_nt() if self.int_mm_layout == "nt" else self.qweight
        w = self.kernel_weight(kernel_size).t()
        return w if self.int_mm_layout == "nt" else w.contiguous()

    def accumulate(self, x8: torch.Tensor, da: torch.Tensor, kernel_size: tuple[int, int] | None = None,
                   row_sums: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """S (M, O) int32 for centred inputs x8 (M, K) int8 and da = ca - za (int32 scalar tensor); x8's k in
        `gemm_weight(kernel_size)`'s order. `row_sums()`: x8's sums over k (M,) int32, where the caller has a
        cheaper way to them than summing x8 (`Int8Layer._code_columns`)."""
        kp = self.qweight.shape[0]
        a = x8 if kp == self.k else F.pad(x8, (0, kp - self.k))
        acc = int_mm(a, self.gemm_weight(kernel_size))[:, :self.out_channels]
        if self.has_offset:
            sums = row_sums() if row_sums is not None else x8.sum(1, dtype=torch.int32)
            acc = acc + sums[:, None] * self.w_offset
        return acc + da * self.row_term


class Int8Layer(ExportedLayer):
    """int8 x int8 -> int32 conv/linear; inputs quantized with the act quantizer's current grid."""

    def __init__(self, layer: QuantLayer):
        super().__init__(layer)
        self.parts = torch.nn.ModuleList(Int8Part(p) for p in weight_parts(layer))

    def _code_columns(self, codes: torch.Tensor, c: int, zp: torch.Tensor
                      ) -> tuple[torch.Tensor, tuple[int, int] | None, Callable[[], torch.Tensor] | None]:
        """The GEMM's int8 input rows (M, K), the input's codes (the fake quantizer's integers, as floats) minus the
        centre c: a linear's input rows, or a conv's im2col patches, whose padded positions hold zp - c (the code of
        a zero input); a conv's kernel size, whose (r, s, c) weight order the patches need (`Int8Part.gemm_weight`;
        None for a linear); and, for a conv, a function giving each row's sum over k (the offset term of
        `Int8Part.accumulate`) from the per-pixel channel sums, a pass over the input instead of its kh * kw times
        larger patches. A conv's codes become int8 on the input itself, then go channels-last into a padded buffer,
        and its patches are gathered with k in (r, s, c) order in one int8 copy. Until session 36 they were float
        im2col columns (F.unfold, transpose, add, cast, over K x the input), which took most of a CPU call (int8
        W8A8 on `small`: 1.6 s at batch 16, its int8 GEMMs 0.08 s of it). The same integers, so the same outputs."""
        if not self.is_conv:
            return (codes.reshape(-1, codes.shape[-1]) - c).to(torch.int8), None, None
        geom = self.kernel_size, self.stride, self.dilation
        x8 = channels_last_padded((codes - c).to(torch.int8), tuple(self.padding), fill=(zp - c).reshape(()))

        def row_sums() -> torch.Tensor:
            return conv_windows(x8.sum(-1, dtype=torch.int32), *geom).sum((-2, -1), dtype=torch.int32).reshape(-1)

        return im2col_rows(x8, *geom), self.kernel_size, row_sums

    use_kernel = True  # the Triton kernel where it applies; False: always the torch path (benchmarks)
    # W4A8 only: unpack the int4 codes to int8 once per call and run the int8 kernel on them, instead of unpacking
    # nibbles inside the K loop (the same integers; in session 10 the int8 kernel took 25-50% less time per conv
    # than the W4A8 one); `gacq bench` mode "w4a8 W4A8 unpacked"
    unpack_for_kernel = False
    kernel_linears = False  # int8 linears keep cuBLAS's torch._int_mm; W4A8Layer has no torch int4 GEMM
    # linears with dynamic per-token inputs: one Triton kernel computes each row's grid and codes, the conv kernel
    # takes per-row scales in its epilogue (`triton_int8.int8_linear_dynamic`), instead of the torch path's row
    # min/max, grid, codes and dequantization passes. Bitwise equal to the torch path in Triton's interpreter
    # (tests/triton_w4_checks.py int8_token); compiled on the H200 within 2 float32 ulps of it and 2.5-7.8x faster on
    # the DiT's Linear shapes (session 18, results/bench_token_kernel), so on by default; False: the torch path
    kernel_dynamic = True
    # True: the conv kernel (`int8_conv2d`, convs and static linears) reads the K-major (r, s, c) copy of the weight
    # (`Int8Part.kernel_weight`: as much GPU memory again as the weight, not counted in `weight_bytes`) instead of
    # `qweight`; the same integers. False: `qweight` as stored (the per-token linears always read it:
    # `int8_linear_dynamic`). None (the default): True under the tile rule "small-m-kmajor" only
    # (`triton_w4.kmajor`), so that `gacq bench --tile-rules` times it before it costs anyone the memory
    kernel_kmajor: bool | None = None

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """The fused Triton kernel (`triton_int8`) runs this call: one weight group, a conv with groups
        1 (or a linear, where `kernel_linears`), on CUDA (or in Triton's interpreter)."""
        from .triton_int8 import available

        quantizers = list(self.act_quantizers())
        if any(q.dynamic for q in quantizers):  # per-token grids: linears over the last axis only
            kind_ok = not self.is_conv and self.kernel_dynamic and all(q.dynamic_axis in (-1, x.dim() - 1)
                                                                       for q in quantizers)
        else:
            kind_ok = self.groups == 1 if self.is_conv else self.kernel_linears
        return self.use_kernel and kind_ok and len(self.parts) == 1 and available(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as one `int8_conv2d` call (a linear as a 1x1 conv over 1x1 images). Nothing is computed
        here: the kernels read the quantizer's scale and zero point and the layer's buffers directly. Under
        torch.compile through the same functions' custom ops (`triton_int8.int8_conv2d_op`), opaque to Dynamo."""
        from . import triton_int8, triton_w4

        compiling = torch.compiler.is_compiling()
        int8_conv2d = triton_int8.int8_conv2d_op if compiling else triton_int8.int8_conv2d

        (part,), (q,) = self.parts, list(self.act_quantizers())
        qweight, w_zero, kmajor = part.qweight, part.kernel_zero, False
        if w_zero is not None and self.unpack_for_kernel:  # W4A8: the int8 kernel on this call's unpacked codes
            qweight, w_zero = part.int8_weight(), None
        elif not q.dynamic and (triton_w4.kmajor() if self.kernel_kmajor is None else self.kernel_kmajor):
            qweight, kmajor = part.kernel_weight(self.kernel_size if self.is_conv else (1, 1)), True
        if q.dynamic:
            from ..quant.primitives import MIN_SCALE

            int8_linear_dynamic = triton_int8.int8_linear_dynamic_op if compiling else triton_int8.int8_linear_dynamic
            return int8_linear_dynamic(x, qweight, part.k, part.out_channels, part.w_scale,
                                       part.w_offset if part.has_offset else None, part.row_term, self.bias,
                                       q.qmin, q.qmax, act_center(q.qmin, q.qmax), q.symmetric, MIN_SCALE,
                                       w_zero=w_zero)
        args = (qweight, part.k, part.out_channels, part.w_scale, part.w_offset if part.has_offset else None,
                part.row_term, self.bias, q.scale.detach(), q.zero_point.detach(), q.qmin, q.qmax,
                act_center(q.qmin, q.qmax))
        if self.is_conv:
            return int8_conv2d(x, *args, self.kernel_size, self.stride, tuple(self.padding), self.dilation,
                               w_zero=w_zero, w_kmajor=kmajor)
        y = int8_conv2d(x.reshape(-1, x.shape[-1], 1, 1), *args, (1, 1), (1, 1), (0, 0), (1, 1),
                        w_zero=w_zero, w_kmajor=kmajor)
        return y.reshape(*x.shape[:-1], self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_applies(x):
            return self._fused(x)
        y = None
        for part, q, xs in zip(self.parts, self.act_quantizers(), self.split_input(x)):
            scale, zp = q.qparams(xs)  # the stored grid, or (dynamic, linears only) one grid per row of xs
            if q.dynamic:  # the fake quantizer's float32 arithmetic; per-row grids as (M, 1) columns
                xs = xs.float()
            codes = torch.clamp(torch.round(xs / scale) + zp, q.qmin, q.qmax)  # the fake quantizer's integers
            c = act_center(q.qmin, q.qmax)
            if q.dynamic:
                scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
            x8, order, row_sums = self._code_columns(codes, c, zp)  # Xq - ca; padded positions hold za - ca
            da = (c - zp).round().to(torch.int32)
            s = part.accumulate(x8, da, order, row_sums).float() * (scale.float() * part.w_scale)
            y = s if y is None else y + s
        if self.bias is not None:
            y = y + self.bias.float()
        return self._output(y, x).to(x.dtype)


class Int8Conv2d(Int8Layer):
    pass


class Int8Linear(Int8Layer):
    pass


def int8_unsupported(layer: QuantLayer) -> str | None:
    """Why the int8 backend cannot run this layer, or None."""
    if not layer.w_quant:
        return "weight quantization is switched off"
    if layer.weight_quantizer.bits > 8:
        return f"{layer.weight_quantizer.bits}-bit weights"
    if layer.act_quantizer is None or not layer.a_quant:
        return "input kept in float (no activation quantizer)"
    for q in layer.act_quantizers():
        if q is None or not q.enabled or not q.is_initialized:
            return "activation quantizer missing, disabled or uninitialised"
        if q.bits > 8:
            return f"{q.bits}-bit activations"
        if q.dynamic:  # integer zero points on the grid by construction (qparams_from_range)
            continue
        zp = q.zero_point.detach()
        if not torch.equal(zp, zp.round()) or zp.item() < q.qmin or zp.item() > q.qmax:
            return "activation zero point is not an integer on the grid"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    if isinstance(getattr(layer, "padding", (0, 0)), str):
        return f"padding={layer.padding!r}"
    for p in weight_parts(layer):
        if p.codes.shape[1] > MAX_K:
            return f"reduction length {p.codes.shape[1]} > {MAX_K} could overflow int32"
        if not torch.equal(p.zero_point, p.zero_point.round()):
            return "weight zero point is not an integer"
    return None


def to_int8(layer: QuantLayer) -> Int8Layer:
    from ..quant.modules import QuantConv2d

    return (Int8Conv2d if isinstance(layer, QuantConv2d) else Int8Linear)(layer)


# ------------------------------------------------------------------ W4A8 ---
class W4A8Part(_Part):
    """One channel group stored as packed int4 codes (two per byte, `pack_int4`), 0.25x of fp16.

    W8 = Wq - zw always fits int8 ([-15, 15]), so the int8 backend's offset term is 0 and
    S = X8 @ W8^T + da * row[o] with row[o] = sum_k W8[o, k]."""

    exact_buffers = ("w_scale",)

    def __init__(self, p: WeightPart):
        from .base import pack_int4

        super().__init__()
        codes, zw = p.codes, p.zero_point.round().to(torch.int64)
        o, k = codes.shape
        self.k, self.out_channels, self.has_offset = k, o, False
        self.register_buffer("qweight", pack_int4(codes))  # (O, ceil(K/2)) uint8
        self.register_buffer("w_zero", zw.to(torch.uint8))  # 0..15 (w4a8_unsupported checks)
        self.register_buffer("w_scale", p.scale.float().clone())
        self.register_buffer("row_term", (codes - zw[:, None]).sum(1).to(torch.int32))

    @property
    def kernel_zero(self) -> torch.Tensor:
        return self.w_zero

    def kernel_weight(self, kernel_size: tuple[int, int]) -> torch.Tensor:
        """`Int8Part.kernel_weight` for packed codes: `qweight`'s codes with k in (r, s, c) order, packed by
        `pack_int4` as (O, ceil(K/2)) uint8, made once per device and cached, not saved. GPU memory: a second packed
        copy (K/2 bytes per output channel, as much again as `qweight`, which stays: the stored weight of a W4A8 conv
        on the Triton path is then 0.5x of fp16, not 0.25x); a 1x1 kernel's is `qweight` itself (no copy)."""
        from .base import pack_int4, rsc_order, unpack_int4

        if kernel_size[0] * kernel_size[1] == 1:
            return self.qweight
        cached = getattr(self, "_qweight_kmajor", None)
        if cached is None or cached.device != self.qweight.device:
            # no range check (torch.compile(fullgraph=True) refuses its branch): the codes come from `qweight`
            cached = pack_int4(rsc_order(unpack_int4(self.qweight, self.k), kernel_size), check=False)
            self._qweight_kmajor = cached
        return cached

    def int8_weight(self, kernel_size: tuple[int, int] | None = None) -> torch.Tensor:
        """W8 = Wq - zw as (K8, O8) int8, padded as `Int8Part` stores it (the torch path's operand); k in (r, s, c)
        order for a `kernel_size` larger than 1x1 (`Int8Part.gemm_weight`)."""
        from .base import rsc_order, unpack_int4

        codes = unpack_int4(self.qweight, self.k)
        if kernel_size is not None and kernel_size[0] * kernel_size[1] > 1:
            codes = rsc_order(codes, kernel_size)
        w8 = codes.to(torch.int32) - self.w_zero.to(torch.int32)[:, None]
        padded = torch.zeros(round_up(self.k, 8), round_up(self.out_channels, 8), dtype=torch.int8,
                             device=w8.device)
        padded[:self.k, :self.out_channels] = w8.t().to(torch.int8)
        return padded

    def accumulate(self, x8: torch.Tensor, da: torch.Tensor, kernel_size: tuple[int, int] | None = None,
                   row_sums: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """S (M, O) int32, as `Int8Part.accumulate` (the weight unpacked for this call; no offset term, so
        `row_sums` goes unused)."""
        w = self.int8_weight(kernel_size)
        a = x8 if w.shape[0] == self.k else F.pad(x8, (0, w.shape[0] - self.k))
        return int_mm(a, w)[:, :self.out_channels] + da * self.row_term


class W4A8Layer(Int8Layer):
    """int4 weights (stored packed) x int8 activations -> int32. On CUDA both convs and linears run
    the fused Triton kernel, which unpacks the codes inside its K loop (a linear is a 1x1 conv
    over a 1x1 image); elsewhere the codes are unpacked per call and the int8 torch path runs."""

    kernel_linears = True

    def __init__(self, layer: QuantLayer):
        ExportedLayer.__init__(self, layer)
        self.parts = torch.nn.ModuleList(W4A8Part(p) for p in weight_parts(layer))


class W4A8Conv2d(W4A8Layer):
    pass


class W4A8Linear(W4A8Layer):
    pass


def w4a8_unsupported(layer: QuantLayer) -> str | None:
    """Why the w4a8 backend cannot run this layer, or None."""
    from .w4a16 import w4a16_unsupported

    return w4a16_unsupported(layer) or int8_unsupported(layer)


def to_w4a8(layer: QuantLayer) -> W4A8Layer:
    from ..quant.modules import QuantConv2d

    return (W4A8Conv2d if isinstance(layer, QuantConv2d) else W4A8Linear)(layer)
