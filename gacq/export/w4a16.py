"""The `w4a16` backend: weight-only, int4 codes packed two per byte, dequantized at call time (on CUDA
optionally inside a Triton GEMM: `W4A16Layer.use_kernel`).

Each layer keeps its weight as unsigned 4-bit codes, two per byte, row by row (`pack_int4`), with
the per-output-channel scale (float32) and zero point (uint8) of each channel group. A call
unpacks them and dequantizes, w = (code - zero_point) * scale, in float32 (the same float op as
fake quantization, so the values are identical), casts to the input dtype, and runs the float
conv/linear. Input quantizers are left as in the fake-quant model (a W4A8 checkpoint keeps its
fake-quantized 8-bit inputs; a W4A32 one its float inputs).

Stated tolerance: none in float32, the output equals the fake-quant layer's (tested bitwise on the
CPU); with fp16/bf16 inputs the weight is rounded once to that dtype, as a bf16 model rounds it.
Weight bytes: K/2 per output channel plus 5 bytes per channel and group (scale + zero point),
about 0.25x of the fp16 weight.
"""

from __future__ import annotations

import torch

from ..quant.modules import QuantConv2d, QuantLayer
from .base import ExportedLayer, pack_int4, unpack_int4, weight_parts


class W4A16Layer(ExportedLayer):
    """Packed int4 weight, dequantized to the input dtype at every call, then the float conv/linear (cuDNN /
    cuBLAS) runs. With `use_kernel` set, on CUDA a Triton GEMM (`triton_w4`) instead dequantizes it tile by tile
    inside its K loop (one weight group, groups 1)."""

    exact_buffers = ("w_scale",)

    def __init__(self, layer: QuantLayer):
        super().__init__(layer)
        parts = weight_parts(layer)
        codes = torch.cat([p.codes for p in parts], dim=1)  # (O, K): the groups' columns side by side
        self.k = codes.shape[1]
        self.part_columns = tuple(p.codes.shape[1] for p in parts)
        self.register_buffer("qweight", pack_int4(codes))
        self.register_buffer("w_scale", torch.stack([p.scale for p in parts], dim=1).float())  # (O, P)
        self.register_buffer("w_zero", torch.stack([p.zero_point for p in parts], dim=1).round().to(torch.uint8))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_int4(self.qweight, self.k).float()
        if len(self.part_columns) == 1:
            w = (codes - self.w_zero.float()) * self.w_scale
        else:
            chunks = codes.split(self.part_columns, dim=1)
            w = torch.cat([(c - self.w_zero[:, j:j + 1].float()) * self.w_scale[:, j:j + 1]
                           for j, c in enumerate(chunks)], dim=1)
        return w.reshape(self.weight_shape).to(dtype)

    # The Triton kernel only where asked for. Measured on the H200 (session 10, ddpm-cifar10, CUDA graphs, ms per
    # step at batch 1 / 64 / 256): dequantize per call + cuDNN 4.3 / 8.6 / 23.9, the kernel 9.8 / 28.1 / 91.1
    # (results/bench_lowbit); `gacq bench` times both ("w4a16 W4A16" and "w4a16 W4A16 triton").
    use_kernel = False

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """The Triton kernel runs this call: one weight group, groups 1, on CUDA (or Triton's interpreter)."""
        from .triton_w4 import available

        return (self.use_kernel and len(self.part_columns) == 1 and (not self.is_conv or self.groups == 1)
                and available(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.kernel_applies(x):
            from .triton_w4 import w4a16_conv2d, w4a16_matmul

            scale, zero = self.w_scale[:, 0], self.w_zero[:, 0]
            if self.is_conv:
                return w4a16_conv2d(x, self.qweight, scale, zero, self.weight_shape, self.bias, self.stride,
                                    self.padding, self.dilation)
            return w4a16_matmul(x, self.qweight, scale, zero, self.k, self.bias)
        return self.dense(x, self.dequantized_weight(x.dtype))


class W4A16Conv2d(W4A16Layer):
    pass


class W4A16Linear(W4A16Layer):
    pass


def weight_bits(layer: QuantLayer) -> int:
    """A layer's weight bits (the wider half's, for a split layer)."""
    return max(layer.weight_quantizer.bits, layer.weight_quantizer_0.bits if layer.split else 0)


def w4a16_unsupported(layer: QuantLayer) -> str | None:
    """Why the w4a16 backend cannot run this layer, or None."""
    if not layer.w_quant:
        return "weight quantization is switched off"
    bits = weight_bits(layer)
    if bits > 4:
        return f"{bits}-bit weights (w4a16 stores at most 4 bits)"
    for p in weight_parts(layer):
        z = p.zero_point
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 15:
            return "weight zero point is not an integer in 0..15"
    return None


def to_w4a16(layer: QuantLayer) -> W4A16Layer:
    return (W4A16Conv2d if isinstance(layer, QuantConv2d) else W4A16Linear)(layer)
