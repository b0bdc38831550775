"""Quantized Conv2d and Linear: a per-output-channel weight quantizer and a per-tensor input quantizer.

The wrapper keeps the float layer's weight and bias (frozen) and computes the same operation
with fake-quantized weight and input. Weight and activation quantization switch independently
(`w_quant`, `a_quant`), as block reconstruction needs (weights first, activations later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import AdaRoundQuantizer, UniformQuantizer


class QuantLayer(nn.Module):
    """Base of the quantized conv/linear wrappers."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, wbits: int, abits: int | None,
                 a_symmetric: bool = False):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.wbits, self.abits = wbits, abits
        self.weight_quantizer = UniformQuantizer(wbits, symmetric=False, channel_axis=0, shape=tuple(self.weight.shape))
        self.act_quantizer = (UniformQuantizer(abits, symmetric=a_symmetric, learn_scale=True)
                              if abits is not None else None)
        self.adaround: AdaRoundQuantizer | None = None
        self.w_quant = True
        self.a_quant = False

    def init_weight(self, method: str = "mse") -> None:
        """Initialise the weight grid: 'minmax' or 'mse' (80-candidate Lp 2.4 search)."""
        if method == "minmax":
            self.weight_quantizer.init_minmax(self.weight)
        else:
            self.weight_quantizer.init_mse(self.weight)

    def enable_adaround(self) -> AdaRoundQuantizer:
        """Switch the weight to learned rounding on the initialised grid."""
        self.adaround = AdaRoundQuantizer(self.weight_quantizer, self.weight)
        return self.adaround

    def quantized_weight(self) -> torch.Tensor:
        if not self.w_quant:
            return self.weight
        if self.adaround is not None:
            return self.adaround()
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant and self.act_quantizer is not None:
            return self.act_quantizer(x)
        return x


class QuantConv2d(QuantLayer):
    def __init__(self, layer: nn.Conv2d, wbits: int, abits: int | None, a_symmetric: bool = False):
        super().__init__(layer, wbits, abits, a_symmetric)
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding mode {layer.padding_mode!r} is not supported")
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantized_input(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QuantLinear(QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


QUANT_CLASSES: dict[type, type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
