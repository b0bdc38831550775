"""Shared parts of the exported layers: the weight's integer grid, the input quantizers, the dense path.

An exported layer replaces a fake-quant `QuantConv2d` / `QuantLinear` for inference. It keeps
the fake-quant layer's input quantizers as the *same modules* (`act_quantizer`, and
`act_quantizer_0` on a shortcut-split layer), so per-step activation sets that TFMQ-DM's finite
set calibration writes into them are read at forward time, never copied at export.

Weights are stored per *part*: an unsplit layer has one, a split layer two (input channels
[:k] and [k:], each with its own per-output-channel grid). `weight_parts` reads them off a
QuantLayer exactly as its fake quantization sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GacqError
from ..quant.modules import QuantConv2d, QuantLayer, SplitInputs
from ..quant.quantizer import UniformQuantizer


@dataclass
class WeightPart:
    """One channel group of a layer's weight on its integer grid.

    codes: (O, K) integers in [qmin, qmax] (K = in-channels of the part x kernel elements);
    scale, zero_point: (O,) float32, the per-output-channel grid; channels: the part's input
    channel range [lo, hi).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    channels: tuple[int, int]
    bits: int


def weight_parts(m: QuantLayer) -> list[WeightPart]:
    """The integer weight of a QuantLayer, split into its channel groups (one unless split).

    Uses `QuantLayer.integer_weight` (hard AdaRound where enabled, else round-to-nearest), so
    (codes - zero_point) * scale is exactly the fake-quant weight of each part.
    """
    ints = m.integer_weight().detach()
    o, i = ints.shape[:2]
    q = m.weight_quantizer
    if not m.split:
        groups = [(q, 0, i)]
    else:
        groups = [(q, 0, m.split), (m.weight_quantizer_0, m.split, i)]
    parts = []
    for wq, lo, hi in groups:
        parts.append(WeightPart(codes=ints[:, lo:hi].reshape(o, -1).to(torch.int64),
                                scale=wq.scale.detach().reshape(o).float(),
                                zero_point=wq.zero_point.detach().reshape(o).float(),
                                channels=(lo, hi), bits=wq.bits))
    return parts


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m (the padded sizes of the GEMM backends' stored weights)."""
    return (n + m - 1) // m * m


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class ExportedLayer(SplitInputs, nn.Module):
    """Base of the layers that replace a QuantLayer: geometry, bias, input quantizers.

    Float buffers listed in `exact_buffers` (weight scales) stay float32 when the model is cast
    to another dtype (`model.to(torch.bfloat16)`): they only move device, so the integer path
    keeps the checkpoint's exact grid whatever the activation dtype.
    """

    exact_buffers: tuple[str, ...] = ()

    def __init__(self, layer: QuantLayer):
        super().__init__()
        if getattr(layer, "smooth", None) is not None:
            raise GacqError("this checkpoint was quantized with activation smoothing (--smooth), which the export "
                            "backends do not run yet; sample it as fake quant, or quantize without --smooth to export")
        w = layer.weight
        self.is_conv = isinstance(layer, QuantConv2d)
        self.weight_shape = tuple(w.shape)
        self.out_channels, self.in_channels = int(w.shape[0]), int(w.shape[1])
        if self.is_conv:
            self.kernel_size = tuple(int(k) for k in w.shape[2:])
            self.stride, self.padding = tuple(layer.stride), layer.padding
            self.dilation, self.groups = tuple(layer.dilation), int(layer.groups)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.split = int(layer.split)
        self.act_quantizer: UniformQuantizer | None = layer.act_quantizer
        self.act_quantizer_0: UniformQuantizer | None = layer.act_quantizer_0
        self.a_quant = bool(layer.a_quant and layer.act_quantizer is not None)

    # ----------------------------------------------------------------- inputs ---
    @property
    def in_axis(self) -> int:
        return 1 if self.is_conv else -1

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the fake-quant layer sees it (QuantLayer.quantized_input)."""
        if not self.a_quant:
            return x
        if self.split:
            a, b = self.split_input(x)
            return torch.cat([self.act_quantizer(a), self.act_quantizer_0(b)], self.in_axis)
        return self.act_quantizer(x)

    def dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float conv/linear with this layer's geometry."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, bias)

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A GEMM's (M, O) output rows in the layer's output shape: (..., O) for a linear, (N, O, HO, WO) for a conv
        whose rows are its output positions (n, ho, wo) (im2col's order)."""
        if not self.is_conv:
            return y.reshape(*x.shape[:-1], self.out_channels)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = self.padding
        ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
        return y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2).contiguous()

    # ---------------------------------------------------------------- storage ---
    def weight_bytes(self) -> int:
        """Bytes of everything stored for the weight (codes, scales, offsets); the bias excluded."""
        return _stored_bytes(self) + sum(c.weight_bytes() for c in self.modules() if isinstance(c, _Part))

    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in self.exact_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        _restore_exact(self, keep)
        return self

    def extra_repr(self) -> str:
        kind = f"{self.in_channels}, {self.out_channels}"
        if self.is_conv:
            kind += f", kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return kind + (f", split={self.split}" if self.split else "")


class _Part(nn.Module):
    """A container of one channel group's weight buffers (see ExportedLayer.exact_buffers)."""

    exact_buffers: tuple[str, ...] = ()

    def weight_bytes(self) -> int:
        return _stored_bytes(self)

    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in self.exact_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        _restore_exact(self, keep)
        return self


def _stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's own persistent buffers (non-persistent ones, such as constants kept on the device for a
    kernel call, are not stored)."""
    return sum(b.numel() * b.element_size() for n, b in module._buffers.items()
               if b is not None and n not in module._non_persistent_buffers_set)


def _restore_exact(module: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """After `_apply`: a buffer whose dtype changed gets its old values back, on the new device."""
    for n, old in keep.items():
        new = module._buffers[n]
        if new.dtype != old.dtype:
            module._buffers[n] = old.to(new.device)


class DenseLayer(ExportedLayer):
    """The dense fallback: the fake-quant layer's (dequantized) weight in float, its input quantizers.

    Its output equals the fake-quant layer's exactly (same weight values, same float op); it is
    what a backend leaves for layers it cannot run.
    """

    def __init__(self, layer: QuantLayer):
        super().__init__(layer)
        with torch.no_grad():
            self.register_buffer("weight", layer.quantized_weight().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.quantized_input(x), self.weight.to(x.dtype))


class DenseConv2d(DenseLayer):
    pass


class DenseLinear(DenseLayer):
    pass


def dense_fallback(layer: QuantLayer) -> DenseLayer:
    return (DenseConv2d if isinstance(layer, QuantConv2d) else DenseLinear)(layer)


# ---------------------------------------------------------------- int4 packing ---
def pack_int4(codes: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Unsigned 4-bit codes (0..15) along the last axis -> uint8, two per byte (low nibble first).

    An odd last axis is padded with one zero code, so (..., K) packs to (..., ceil(K / 2)); each
    row packs on its own (rows of a weight stay addressable). The nibble order is that of the
    checkpoint's `pack_int`. `check=False` skips the range check, for codes known to be in range
    (it is a data-dependent branch, which torch.compile(fullgraph=True) refuses).
    """
    if check and codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("pack_int4 takes codes in 0..15")
    v = codes.to(torch.uint8)
    if v.shape[-1] % 2:
        v = F.pad(v, (0, 1))
    return v[..., 0::2] | (v[..., 1::2] << 4)


def conv_windows(t: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> torch.Tensor:
    """A conv's input windows as a view: t (N, Hp, Wp, ...) channels-last and already padded -> (N, HO, WO, kh, kw,
    ...), element [n, i, j, r, s] = t[n, i * sh + r * dh, j * sw + s * dw]."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    n, hp, wp = t.shape[:3]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    sn, sr, sc = t.stride()[:3]
    return t.as_strided((n, ho, wo, kh, kw, *t.shape[3:]), (sn, sh * sr, sw * sc, dh * sr, dw * sc, *t.stride()[3:]))


def channels_last_padded(x: torch.Tensor, padding: tuple[int, int], fill: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, C, H, W) -> (N, H + 2 ph, W + 2 pw, C), contiguous, the border zeros or `fill` (a 0-dim tensor: no host
    sync on CUDA): a conv's input as its integer/byte GEMM paths gather it (`im2col_rows`)."""
    ph, pw = padding
    if (ph, pw) == (0, 0):
        return x.permute(0, 2, 3, 1).contiguous()
    n, c, h, w = x.shape
    out = x.new_empty((n, h + 2 * ph, w + 2 * pw, c))
    out.fill_(0 if fill is None else fill)
    out[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    return out


def im2col_rows(t: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                dilation: tuple[int, int]) -> torch.Tensor:
    """A conv's im2col rows (N HO WO, kh kw C), k in (r, s, c) order (`rsc_order`'s), from its padded channels-last
    input t (`channels_last_padded`), in one copy of t's dtype (a view for a 1x1 stride-1 kernel)."""
    if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1):
        return t.reshape(-1, t.shape[-1])
    cols = conv_windows(t, kernel_size, stride, dilation)
    return cols.reshape(-1, cols.shape[3:].numel())


def rsc_order(w: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """A conv weight flattened as `weight.reshape(O, -1)`, (O, K) with k in (c, r, s) order, reordered to k in
    (r, s, c) order, channels fastest (the int8 conv kernel's K loop order)."""
    (kh, kw), (o, k) = kernel_size, w.shape
    return w.reshape(o, k // (kh * kw), kh, kw).permute(0, 2, 3, 1).reshape(o, k)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (..., ceil(k / 2)) -> uint8 codes (..., k)."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return out[..., :k]
