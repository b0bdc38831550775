"""The `fp8` backend: FP8 E4M3 activations x FP8 E4M3 weights (`--format fp8`) or x integer weights of at most 4 bits
(`--act-format fp8`, e.g. W4 weights of any method: their codes minus the zero point are integers of at most 15 in
magnitude, exact in E4M3, so they go into the same FP8 GEMM, one byte each, and the product of the two codes is exact).

The fake-quant layer (`UniformQuantizer(fmt="fp8")`) computes, per output channel o (weight scale sw[o]; input
scale sa, read from the act quantizer at call time; fp8() the round-to-nearest-even cast to float8_e4m3fn):

    y[n, o] = sum_k (fp8(x[n, k] / sa) * sa) (Wq[o, k] * sw[o]) + b[o],    Wq = fp8(W / sw), stored

Here the codes themselves go into one scaled GEMM, `torch._scaled_mm` (FP8 tensor cores on Hopper and Ada; a float32
reference on the CPU), and the scales come after it:

    y[n, o] = sa * sw[o] * S[n, o] + b[o],    S = fp8(x / sa) @ Wq^T    (float32 accumulation)

The codes are the fake quantizer's, bit for bit (the same x / sa in x's dtype, the same cast), so the only difference
from fake quantization is float rounding: fake quant rounds each dequantized value (code * scale) to float32 before
its GEMM, this layer rounds S and then the two products. On CUDA (and in Triton's interpreter) convolutions run
as two Triton kernels (`triton_fp8`: the input's codes into a padded channels-last buffer, then an implicit GEMM with
the scales and bias in its epilogue); elsewhere, and for split convs (grouped ones are refused), as im2col (the
input's codes as bytes, gathered channels-last: `base.im2col_rows`) + `torch._scaled_mm` (session 28's measurement
of im2col + cuBLAS FP8 on 3x3 convs: 5-11x slower than cuDNN bf16, results/conv_paths). A conv's codes are stored
with k in (r, s, c) order, channels fastest: the kernel's K loop order, each K block's weight tile contiguous
(K-major, as wgmma reads it); the im2col path gathers its columns in that order. A split (shortcut) layer runs one
GEMM per channel group, each with its own scales.

Layers whose inputs stay float (a weight-only W8A32 fp8 checkpoint, or the first and last layers of some recipes)
keep their weights as FP8 codes, one byte each, and dequantize them at call time for the float conv / linear, whose
output then equals fake quantization's exactly (as the w4a16 backend does for int4).

`torch._scaled_mm` on CUDA needs the reduction length and the output channels in multiples of 16: the stored weight
is padded with zero codes at export and the input's K with zero columns at call time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.modules import QuantConv2d, QuantLayer
from ..quant.primitives import FP8_DTYPE, fp8_cast
from .base import ExportedLayer, _Part, channels_last_padded, im2col_rows, pack_int4, round_up, rsc_order, \
    unpack_int4
from .w4a16 import weight_bits

ALIGN = 16  # torch._scaled_mm on CUDA: K and N multiples of 16


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(x / scale, -448, 448)) as float8_e4m3fn: the fake quantizer's codes (`primitives.fp8_round`)."""
    return fp8_cast(x / scale)


class FP8Part(_Part):
    """One channel group of the weight: FP8 codes (O16, K16) row-major, zero-padded, and the per-channel scales.

    With `zero` (the `w4fp8` backend): `codes` are a 4-bit integer weight's own codes (0..15) and `zero` its integer
    zero points per output channel; they are kept packed two per byte (`pack_int4`, a quarter of bf16's bytes), and
    the FP8 codes of code - zero (in [-15, 15]: exact in E4M3) are unpacked from them at each call (`fp8_weight`)."""

    # they survive `model.to(torch.bfloat16)` as they are: qweight is a floating-point dtype to torch, which would
    # otherwise cast the codes to bf16 (and then torch._scaled_mm refuses them); `one` is torch._scaled_mm's unit
    # scale, which must be float32
    exact_buffers = ("qweight", "w_scale", "one")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, channels: tuple[int, int],
                 zero: torch.Tensor | None = None):
        super().__init__()
        o, k = codes.shape
        self.k, self.out_channels, self.channels = k, o, channels
        self.packed = zero is not None
        if self.packed:
            self.register_buffer("qweight_packed", pack_int4(codes.round().to(torch.int32)))
            self.register_buffer("w_zero", zero.reshape(o).round().to(torch.uint8).clone())
        else:
            padded = torch.zeros(round_up(o, ALIGN), round_up(k, ALIGN), dtype=FP8_DTYPE, device=codes.device)
            padded[:o, :k] = codes.to(FP8_DTYPE)
            self.register_buffer("qweight", padded)
        self.register_buffer("w_scale", scale.float().reshape(o).clone())
        self.register_buffer("one", torch.ones((), device=codes.device), persistent=False)

    def fp8_weight(self) -> torch.Tensor:
        """The FP8 codes (O16, K16), zero-padded, that the GEMMs take: `qweight`, or a packed part's code - zero
        unpacked now (torch ops: under torch.compile one fused kernel per weight)."""
        if not self.packed:
            return self.qweight
        o, k = self.out_channels, self.k
        centred = unpack_int4(self.qweight_packed, k).float() - self.w_zero.float()[:, None]
        return F.pad(centred, (0, round_up(k, ALIGN) - k, 0, round_up(o, ALIGN) - o)).to(FP8_DTYPE)

    def codes(self) -> torch.Tensor:
        """The unpadded codes (O, K) as float32 (exact)."""
        return self.fp8_weight()[:self.out_channels, :self.k].float()

    def gemm(self, a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
        """a (M, K) float8 codes -> (M, O) float32: a_scale * sw[o] * (a @ codes^T)."""
        w = self.fp8_weight()
        kp = w.shape[1]
        if a.shape[1] != kp:  # zero codes add nothing
            a = F.pad(a.view(torch.uint8), (0, kp - a.shape[1])).view(FP8_DTYPE)
        s = torch._scaled_mm(a.contiguous(), w.t(), scale_a=self.one, scale_b=self.one,
                             out_dtype=torch.float32)
        return s[:, :self.out_channels] * (a_scale.float().reshape(()) * self.w_scale)


def fp8_parts(layer: QuantLayer, packed: bool = False) -> list[FP8Part]:
    """The layer's weight codes per channel group (one unless split) as FP8 values, a conv's with k in (r, s, c)
    order: an fp8 weight's FP8 values of W / scale as the fake quantizer rounds them, or an integer weight's codes
    minus their zero point (at most 4 bits: integers of at most 15 in magnitude, exact in E4M3), so that
    codes * scale is the fake-quant weight either way. `packed` (integer weights only): the codes themselves, packed
    two per byte, and the zero points, unpacked to those FP8 values at call time."""
    codes = layer.integer_weight().detach()  # on both halves' grids when split
    if layer.fmt != "fp8" and not packed:
        codes = codes - layer.weight_qparams()[1]  # centred integers
    o, i = codes.shape[:2]
    groups = [(layer.weight_quantizer, 0, layer.split or i)]
    if layer.split:
        groups.append((layer.weight_quantizer_0, layer.split, i))
    parts = []
    for q, lo, hi in groups:
        c = codes[:, lo:hi]
        flat = rsc_order(c.reshape(o, -1), tuple(c.shape[2:])) if c.ndim == 4 else c
        zero = q.zero_point.detach().reshape(o) if packed else None
        parts.append(FP8Part(flat, q.scale.detach().reshape(o), (lo, hi), zero))
    return parts


class FP8Layer(ExportedLayer):
    """FP8 E4M3 conv / linear: `torch._scaled_mm` on the input's and the weight's codes (float inputs: the weight's
    codes dequantized, then the float op)."""

    def __init__(self, layer: QuantLayer, packed: bool = False):
        super().__init__(layer)
        self.parts = torch.nn.ModuleList(fp8_parts(layer, packed))

    def _columns(self, u: torch.Tensor) -> torch.Tensor:
        """The GEMM's input rows (M, K) of the input's codes u (float8): u itself (linear) or its im2col patches
        (conv), k in (r, s, c) order, gathered channels-last in one byte copy (`base.im2col_rows`; zero bytes pad,
        FP8's +0). Until session 36 an `F.unfold` in float (no float8 kernel) took most of a CPU call."""
        if not self.is_conv:
            return u.reshape(-1, u.shape[-1])
        b = channels_last_padded(u.view(torch.uint8), tuple(self.padding))  # bytes: no float8 kernels needed
        return im2col_rows(b, self.kernel_size, self.stride, self.dilation).view(FP8_DTYPE)

    def dequantized_weight(self) -> torch.Tensor:
        """The fake-quant weight (codes * scale per output channel and channel group), in float32, in its own shape."""
        ws = []
        for p in self.parts:
            w = p.codes() * p.w_scale[:, None]
            if self.is_conv:  # (O, r s c) -> (O, c, r, s)
                kh, kw = self.kernel_size
                w = w.reshape(self.out_channels, kh, kw, -1).permute(0, 3, 1, 2)
            ws.append(w)
        w = torch.cat(ws, 1) if len(ws) > 1 else ws[0]
        return w.reshape(self.weight_shape)

    use_kernel = True  # convs: the Triton kernel where it applies; False: always the torch path (benchmarks)
    # 1x1 stride-1 convs on the torch path (channels-last codes through cuBLAS's FP8 GEMM, `torch._scaled_mm`) instead
    # of the Triton conv, which ran them at 0.64x of cuDNN bf16 on the H100 where its 3x3 convs ran 1.15-1.9x
    # (session 34, results/conv_tiles/s34-fp8-gemm); off until a benchmark shows it pays (`gacq bench`'s mode
    # "fp8 FP8 compiled 1x1-cublas")
    cublas_pointwise = False

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """The Triton conv (`triton_fp8`) runs this call: an unsplit conv with groups 1 and quantized inputs, on CUDA
        (or in Triton's interpreter), unless it is a 1x1 stride-1 conv and `cublas_pointwise` is on."""
        from .triton_fp8 import available

        if self.cublas_pointwise and self.is_conv and self.kernel_size == (1, 1) and self.stride == (1, 1) \
                and tuple(self.padding) == (0, 0):
            return False
        return self.use_kernel and self.is_conv and self.groups == 1 and len(self.parts) == 1 and available(x)

    # under torch.compile: True, the input's codes come from torch ops (`triton_fp8.fp8_halo_codes`) that inductor
    # fuses into the kernel producing the input, and only the GEMM is an opaque op; False: the eager path's Triton
    # quantize kernel and the GEMM, both inside one opaque op (benchmarks compare the two)
    compile_fuses_quantize = True
    # under torch.compile with compile_fuses_quantize: the conv's output in channels-last memory (coalesced stores
    # along the output channels; `triton_fp8.fp8_conv2d_codes`); off until a benchmark shows it pays (`gacq bench`'s
    # mode "fp8 FP8 compiled nhwc-out")
    channels_last_out = False
    # the convs' FP8 products promoted into the float32 accumulator after each K block (`triton_fp8.fp8_conv2d_codes`'s
    # precise_acc) instead of Triton's sm_90 default, the MMA's narrower accumulator over the whole K loop; off until a
    # benchmark prices it (`gacq bench`'s mode "fp8 FP8 compiled precise-acc")
    precise_acc = False

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        from .triton_fp8 import fp8_conv2d, fp8_conv2d_codes_op, fp8_conv2d_op, fp8_halo_codes

        p, q = self.parts[0], self.act_quantizer
        scale = q.scale.detach().reshape(1)
        weight = (p.fp8_weight(), p.k, self.out_channels, p.w_scale, self.bias, scale)
        geom = (self.kernel_size, self.stride, tuple(self.padding), self.dilation)
        if not torch.compiler.is_compiling():
            return fp8_conv2d(x, *weight, *geom, precise_acc=self.precise_acc)
        if self.compile_fuses_quantize:
            return fp8_conv2d_codes_op(fp8_halo_codes(x, scale, geom[2]), *weight, *(list(g) for g in geom), x.dtype,
                                       self.channels_last_out, self.precise_acc)
        # one opaque op per layer (as the int8 layers)
        return fp8_conv2d_op(x, *weight, *(list(g) for g in geom), self.precise_acc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.a_quant:
            return self.dense(x, self.dequantized_weight().to(x.dtype))
        if self.kernel_applies(x):
            return self._fused(x)
        y = None
        for part, q, xs in zip(self.parts, self.act_quantizers(), self.split_input(x)):
            s = part.gemm(self._columns(fp8_codes(xs, q.scale)), q.scale)
            y = s if y is None else y + s
        if self.bias is not None:
            y = y + self.bias.float()
        return self._output(y, x).to(x.dtype)


class FP8Conv2d(FP8Layer):
    pass


class FP8Linear(FP8Layer):
    pass


def fp8_unsupported(layer: QuantLayer) -> str | None:
    """Why the fp8 backend cannot run this layer, or None: it runs FP8 inputs (or float ones) against FP8 weights or
    integer weights of at most 4 bits."""
    if not layer.w_quant:
        return "weight quantization is switched off"
    if layer.fmt != "fp8":
        if weight_bits(layer) > 4:
            return f"{weight_bits(layer)}-bit integer weights (FP8 holds integers exactly up to 4 bits)"
        zp = layer.weight_qparams()[1]
        if not torch.equal(zp, zp.round()):
            return "weight zero point is not an integer"
    if layer.act_quantizer is not None and layer.a_quant:
        for q in layer.act_quantizers():
            if q is None or not q.enabled or not q.is_initialized:
                return "activation quantizer missing, disabled or uninitialised"
            if q.fmt != "fp8":
                return "integer inputs (the fp8 backend runs FP8 inputs)"
    if getattr(layer, "groups", 1) != 1:
        return f"grouped convolution (groups={layer.groups})"
    if isinstance(getattr(layer, "padding", (0, 0)), str):
        return f"padding={layer.padding!r}"
    return None


def to_fp8(layer: QuantLayer, packed: bool = False) -> FP8Layer:
    return (FP8Conv2d if isinstance(layer, QuantConv2d) else FP8Linear)(layer, packed)


def to_w4fp8(layer: QuantLayer) -> FP8Layer:
    """The `w4fp8` backend's layer: integer weights of at most 4 bits packed two per byte, unpacked to FP8 codes at
    each call; FP8 weights as the fp8 backend's."""
    return to_fp8(layer, packed=layer.fmt != "fp8")
