"""Quantized Conv2d and Linear: a per-output-channel weight quantizer and a per-tensor input quantizer.

The wrapper keeps the float layer's weight and bias (frozen) and computes the same operation
with fake-quantized weight and input. Weight and activation quantization switch independently
(`w_quant`, `a_quant`), as block reconstruction needs (weights first, activations later).

Shortcut splitting (Q-Diffusion, baselines.md §2.4): a layer whose input is a channel
concatenation cat([h, skip], dim=1) can be split at k = channels of h (`set_split(k)`). Then
input channels [:k] use `act_quantizer` and [k:] `act_quantizer_0`; weight columns W[:, :k] use
`weight_quantizer` and W[:, k:] `weight_quantizer_0`, each per output channel with its own init.
`wrap.find_shortcut_splits` / `wrap.apply_shortcut_splits` find and set the splits of diffusers' up blocks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GacqError
from .quantizer import AdaRoundQuantizer, UniformQuantizer


class SplitInputs:
    """Channel groups of a layer's input and their quantizers (attributes `split`, `in_axis`,
    `act_quantizer`, `act_quantizer_0`); shared by QuantLayer and the exported integer layers."""

    def split_input(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The input's channel groups: (x,) unsplit, (x[:, :k], x[:, k:]) split (Linear: last axis)."""
        if not self.split:
            return (x,)
        k, n = self.split, x.shape[self.in_axis]
        return x.narrow(self.in_axis, 0, k), x.narrow(self.in_axis, k, n - k)

    def act_quantizers(self) -> list[UniformQuantizer]:
        """The input quantizers, one per channel group of `split_input` (empty without act quant)."""
        if self.act_quantizer is None:
            return []
        return [self.act_quantizer] if not self.split else [self.act_quantizer, self.act_quantizer_0]


class QuantLayer(SplitInputs, nn.Module):
    """Base of the quantized conv/linear wrappers."""

    in_axis = 1  # channel axis of the layer's input (Linear: -1)

    def __init__(self, layer: nn.Conv2d | nn.Linear, wbits: int, abits: int | None,
                 a_symmetric: bool = False, a_dynamic: bool = False, fmt: str = "int", afmt: str | None = None):
        super().__init__()
        if a_dynamic and self.in_axis != -1:
            raise GacqError(f"dynamic per-token input quantization is for Linear layers, not {type(layer).__name__} "
                            "(a token is a row of a Linear's input)")
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.wbits, self.abits = wbits, abits
        # the number formats (`primitives.FORMATS`, "int" or "fp8") of the weight and of the inputs (afmt None: fmt's)
        self.fmt, self.afmt = fmt, afmt or fmt
        self.weight_quantizer = UniformQuantizer(wbits, symmetric=False, channel_axis=0, shape=tuple(self.weight.shape),
                                                 fmt=fmt)
        self.act_quantizer = self._new_act_quantizer(abits, a_symmetric, a_dynamic) if abits is not None else None
        self.adaround: AdaRoundQuantizer | None = None
        self.w_quant = True
        self.a_quant = False
        # Shortcut split: 0 = unsplit. The second-half quantizers exist only on split layers
        # (so an unsplit layer's state dict is unchanged).
        self.split = 0
        self.weight_quantizer_0: UniformQuantizer | None = None
        self.act_quantizer_0: UniformQuantizer | None = None
        self.frozen_weight: torch.Tensor | None = None  # set by `frozen_weights` for inference
        # Activation smoothing (SmoothQuant): per input channel s; the layer holds W * s and divides its input by s
        # before quantizing it. None: no smoothing (and no state-dict entry).
        self.register_buffer("smooth", None)

    def _new_act_quantizer(self, abits: int, symmetric: bool, dynamic: bool) -> UniformQuantizer:
        """Static per-tensor with a learnable step size, or (dynamic) one grid per token, computed per call."""
        if dynamic:
            return UniformQuantizer(abits, symmetric=symmetric, dynamic_axis=-1, fmt=self.afmt)
        return UniformQuantizer(abits, symmetric=symmetric, learn_scale=True, fmt=self.afmt)

    @property
    def a_dynamic(self) -> bool:
        """The input is quantized per token, dynamically (False when the input quantizer was removed: float input)."""
        return self.act_quantizer is not None and self.act_quantizer.dynamic

    # ------------------------------------------------------------------ split ---
    def set_split(self, k: int) -> None:
        """Split the input channels at k: [:k] and [k:] get their own weight and input quantizers.

        Creates `weight_quantizer_0` (per output channel over W[:, k:]) and `act_quantizer_0`, and
        marks every quantizer of the layer uninitialised (except a dynamic input quantizer): call `init_weight` (and
        calibrate the activation quantizers) after splitting. Calling it again with the same k does nothing.
        """
        k = int(k)
        c_in = self.weight.shape[1]
        if k == self.split and k != 0:
            return
        if self.adaround is not None:
            raise GacqError("cannot split a layer after AdaRound was enabled on it")
        if getattr(self, "groups", 1) != 1:
            raise GacqError(f"cannot split a grouped convolution (groups={self.groups}) along its input channels")
        if self.split != 0:
            raise GacqError(f"layer is already split at {self.split}; cannot split again at {k}")
        if not 0 < k < c_in:
            raise GacqError(f"split {k} is outside 1..{c_in - 1} for a layer with {c_in} input channels")
        self.split = k
        # weight_quantizer keeps its (O, 1, ...) shape, now over W[:, :k]; any earlier init covered
        # the whole weight (or the whole input), so it is void.
        self.weight_quantizer.mark_initialized(False)
        self.weight_quantizer_0 = UniformQuantizer(self.wbits, symmetric=False, channel_axis=0,
                                                   shape=tuple(self.weight[:, k:].shape), fmt=self.fmt)
        if self.act_quantizer is not None:
            if not self.a_dynamic:  # a dynamic grid has nothing to calibrate: it stays initialised
                self.act_quantizer.mark_initialized(False)
            self.act_quantizer_0 = self._new_act_quantizer(self.abits, self.act_quantizer.symmetric, self.a_dynamic)
        self.weight_quantizer_0.to(self.weight.device)
        if self.act_quantizer_0 is not None:
            self.act_quantizer_0.to(self.weight.device)

    def set_smoothing(self, s: torch.Tensor) -> None:
        """Move input-range imbalance into the weight (SmoothQuant, Xiao et al. 2023): the layer computes
        (x / s) W'^T with W' = W * s per input channel, the same function in float, and quantizes x / s and W'.

        Call before the weight grid is initialised (its init is marked void). Not for split layers (their two
        channel groups have their own quantizers already) nor grouped convolutions; only once.
        """
        c_in = self.weight.shape[1]
        s = torch.as_tensor(s, dtype=self.weight.dtype, device=self.weight.device).flatten()
        if self.smooth is not None:
            raise GacqError("layer is already smoothed; smoothing twice would compound the scales")
        if self.split or self.adaround is not None or getattr(self, "groups", 1) != 1:
            raise GacqError("smoothing needs an unsplit, ungrouped layer without AdaRound")
        if s.numel() != c_in or not torch.isfinite(s).all() or (s <= 0).any():
            raise GacqError(f"smoothing scales must be {c_in} finite positive values, got {s.numel()}")
        with torch.no_grad():
            self.weight.mul_(self._per_in_channel(s, self.weight.ndim, 1))
        self.smooth = s.clone()
        self.weight_quantizer.mark_initialized(False)

    @staticmethod
    def _per_in_channel(s: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return s.view(shape)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight grid's (scale, zero_point), broadcastable to the weight.

        Unsplit: per output channel, (O, 1, ...). Split: (O, I, 1, ...), holding weight_quantizer's
        values on columns [:k] and weight_quantizer_0's on [k:].
        """
        q = self.weight_quantizer
        if not self.split:
            return q.scale, q.zero_point
        q0 = self.weight_quantizer_0
        o, i = self.weight.shape[:2]
        k = self.split

        def full(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            rest = (1,) * (self.weight.ndim - 2)
            return torch.cat([a.expand(o, k, *rest), b.expand(o, i - k, *rest)], dim=1).contiguous()

        return full(q.scale, q0.scale), full(q.zero_point, q0.zero_point)

    # ---------------------------------------------------------------- weights ---
    def init_weight(self, method: str = "mse") -> None:
        """Initialise the weight grid: 'minmax' or 'mse' (80-candidate Lp 2.4 search); per half when split."""
        pairs = [(self.weight_quantizer, self.weight)]
        if self.split:
            k = self.split
            pairs = [(self.weight_quantizer, self.weight[:, :k]), (self.weight_quantizer_0, self.weight[:, k:])]
        for q, w in pairs:
            if method == "minmax":
                q.init_minmax(w)
            else:
                q.init_mse(w)

    def enable_adaround(self) -> AdaRoundQuantizer:
        """Switch the weight to learned rounding on the initialised grid.

        A split layer gets ONE AdaRoundQuantizer over the whole weight, on the combined grid of
        `weight_qparams` (scale/zero point of shape (O, I, 1, ...)): each half is rounded on its own
        per-output-channel grid with its own V, as in Q-Diffusion, and recon.py's loop, the
        regulariser, hardening and integer export need no special case. The regulariser therefore
        sums 1 - |2h(V) - 1|^beta over both halves' elements, the same as for an unsplit layer.
        This deliberately differs from [QD], whose block regulariser omits the `_0` half
        (block_recon.py L221-224), and from [TF], which weights the two halves' sums by their
        channel fractions, (k * sum_0 + (I - k) * sum_1) / I (reconstruction_util.py L76-83).
        """
        if self.fmt != "int":
            raise GacqError(f"AdaRound learns roundings on a uniform integer grid; this layer's weights are "
                            f"{self.fmt} and are rounded to nearest (use a method without weight reconstruction, e.g. "
                            "--method rtn)")
        if not self.split:
            base = self.weight_quantizer
        else:
            if not (self.weight_quantizer.is_initialized and self.weight_quantizer_0.is_initialized):
                raise GacqError("AdaRound needs an initialised weight quantizer (both halves of a split layer)")
            scale, zp = self.weight_qparams()
            base = UniformQuantizer(self.wbits, symmetric=False)
            base.scale, base.zero_point = scale.detach().clone(), zp.detach().clone()  # buffers: full-shape grid
            base.mark_initialized(True)
        self.adaround = AdaRoundQuantizer(base, self.weight)
        return self.adaround

    def integer_weight(self) -> torch.Tensor:
        """The weight's integers on its grid (hard AdaRound when enabled, else round-to-nearest); for fp8 weights
        their FP8 E4M3 values in units of the scale (`UniformQuantizer.codes`), as floats."""
        if self.adaround is not None:
            return self.adaround.integer_weight()
        scale, zp = self.weight_qparams()
        return self.weight_quantizer.codes(self.weight, scale, zp)

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen_weight is not None:
            return self.frozen_weight
        if not self.w_quant:
            return self.weight
        if self.adaround is not None:
            return self.adaround()
        if self.split:
            k = self.split
            w = self.weight
            return torch.cat([self.weight_quantizer(w[:, :k]), self.weight_quantizer_0(w[:, k:])], 1)
        return self.weight_quantizer(self.weight)

    def smoothed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the activation quantizer sees: x / s on a smoothed layer (whose weight holds W * s), else x.
        Everything that measures a layer's input range from a forward pre-hook must measure this."""
        if self.smooth is None:
            return x
        return x / self._per_in_channel(self.smooth.to(x.dtype), x.ndim, self.in_axis % x.ndim)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed_input(x)  # always: the weight holds W * s
        if self.a_quant and self.act_quantizer is not None:
            if self.split:
                a, b = self.split_input(x)
                return torch.cat([self.act_quantizer(a), self.act_quantizer_0(b)], self.in_axis)
            return self.act_quantizer(x)
        return x

    def extra_repr(self) -> str:
        fmt = ["fp8"] if self.fmt == "fp8" else ["fp8 inputs"] if self.afmt == "fp8" else []
        parts = fmt + ([f"split={self.split}"] if self.split else []) \
            + (["smoothed"] if self.smooth is not None else []) \
            + (["dynamic per-token inputs"] if self.a_dynamic else [])
        return ", ".join(parts)


class QuantConv2d(QuantLayer):
    def __init__(self, layer: nn.Conv2d, wbits: int, abits: int | None, a_symmetric: bool = False,
                 a_dynamic: bool = False, fmt: str = "int", afmt: str | None = None):
        super().__init__(layer, wbits, abits, a_symmetric, a_dynamic, fmt, afmt)
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding mode {layer.padding_mode!r} is not supported")
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantized_input(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QuantLinear(QuantLayer):
    in_axis = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


@contextmanager
def frozen_weights(model: nn.Module):
    """Inside the block, every quantized layer reuses its (fake-)quantized weight computed once on
    entry instead of re-quantizing it on every call: for sampling, where weights do not change.
    Gradients do not flow into the frozen weights; do not use it while training."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    with torch.no_grad():
        for m in layers:
            m.frozen_weight = None
            m.frozen_weight = m.quantized_weight().detach()
    try:
        yield model
    finally:
        for m in layers:
            m.frozen_weight = None


QUANT_CLASSES: dict[type, type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
