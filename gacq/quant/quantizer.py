"""Quantizer modules: a uniform affine quantizer and AdaRound on top of it.

State is explicit: a quantizer's scale and zero point are buffers (or, for learned activation
step sizes, a Parameter) created with their final shape, set by an explicit `init_*` call, and
saved in the state dict. Nothing is initialised lazily from whatever batch arrives first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import GacqError
from .primitives import (FP8_MAX, MIN_SCALE, check_format, choose_qparams_minmax, choose_qparams_mse, fake_quantize,
                         fp8_fake_quantize, fp8_round, fused_rows_apply, qparams_from_range, qrange)


class UniformQuantizer(nn.Module):
    """Fake quantizer: per-tensor (`channel_axis=None`) or per-channel, symmetric or asymmetric.

    Args:
        bits: 2..8.
        symmetric: zero point 0 and a signed grid.
        channel_axis: axis with one (scale, zero point) per index, or None for per-tensor.
        shape: the shape of the tensors it will quantize (needed for per-channel parameters).
        learn_scale: make the step size a Parameter (LSQ-style activation calibration).
        dynamic_axis: dynamic per-token quantization: the grid is not stored but computed on every call, one
            (scale, zero point) per token from the min and max over this axis (the features'), as
            `qparams_from_range` maps them (asymmetric grids include 0). Nothing to calibrate: the quantizer is
            initialised from the start, and `init_*` / `_set` refuse. The `scale` and `zero_point` buffers stay
            (unused, shape ()) so that code reading a quantizer's state finds the same attributes.
        fmt: the grid's number format (`primitives.FORMATS`): "int" (uniform integers) or "fp8" (FP8 E4M3, 8 bits,
            symmetric, zero point 0: x_hat = fp8(clamp(x / scale, -448, 448)) * scale). An fp8 quantizer's qmin and
            qmax are -448 and 448, the ends of its grid in units of the scale; it is never dynamic.
    """

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = None,
                 shape: tuple[int, ...] | None = None, learn_scale: bool = False, dynamic_axis: int | None = None,
                 fmt: str = "int"):
        super().__init__()
        if dynamic_axis is not None and (learn_scale or channel_axis is not None):
            raise GacqError("a dynamic per-token quantizer has no stored grid: no learned scale, no channel axis")
        check_format(fmt, bits)
        if fmt == "fp8" and dynamic_axis is not None:
            raise GacqError("dynamic per-token inputs (--act-granularity token) are not available with the fp8 format; "
                            "use per-tensor inputs (the default)")
        self.fmt = fmt
        self.bits, self.symmetric, self.channel_axis = bits, symmetric or fmt == "fp8", channel_axis
        self.dynamic_axis = dynamic_axis
        self.qmin, self.qmax = (-FP8_MAX, FP8_MAX) if fmt == "fp8" else qrange(bits, self.symmetric)
        if channel_axis is None:
            pshape: tuple[int, ...] = ()
        else:
            if shape is None:
                raise GacqError("a per-channel quantizer needs the tensor shape")
            axis = channel_axis % len(shape)
            pshape = tuple(s if d == axis else 1 for d, s in enumerate(shape))
        scale = torch.ones(pshape)
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(pshape))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the `initialized` buffer: forward must not read a CUDA tensor on the
        # host (a device sync per layer call, and it breaks CUDA-graph capture). Kept in step by
        # `mark_initialized` and by loading a state dict.
        self.is_initialized = False
        self.enabled = True
        if dynamic_axis is not None:
            self.mark_initialized(True)

    @property
    def dynamic(self) -> bool:
        return self.dynamic_axis is not None

    def _refuse_if_dynamic(self) -> None:
        if self.dynamic:
            raise GacqError("a dynamic per-token quantizer computes its grid from every input; it has no step size "
                            "to initialise or set")

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) for quantizing `x`: the stored grid, or (dynamic) one grid per token of `x`, in
        float32, with `x`'s rank and size 1 on `dynamic_axis`."""
        if not self.dynamic:
            return self.scale, self.zero_point
        v = x.detach()
        lo = v.amin(dim=self.dynamic_axis, keepdim=True).float()
        hi = v.amax(dim=self.dynamic_axis, keepdim=True).float()
        return qparams_from_range(lo, hi, self.bits, self.symmetric)

    def mark_initialized(self, value: bool = True) -> None:
        with torch.no_grad():
            self.initialized.fill_(bool(value))
        self.is_initialized = bool(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "initialized"
        if key in state_dict:
            self.is_initialized = bool(state_dict[key])

    def _set(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self._refuse_if_dynamic()
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.mark_initialized(True)

    def init_minmax(self, x: torch.Tensor) -> None:
        """Step size from the min and max of `x` (per channel if per-channel)."""
        self._set(*choose_qparams_minmax(x, self.bits, self.symmetric, self.channel_axis, self.fmt))

    def init_mse(self, x: torch.Tensor, p: float = 2.4, n_candidates: int = 80) -> None:
        """Step size by the clipping-range search for least Lp error."""
        self._set(*choose_qparams_mse(x, self.bits, self.symmetric, self.channel_axis, p, n_candidates, self.fmt))

    def codes(self, x: torch.Tensor, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None
              ) -> torch.Tensor:
        """x on this grid, in grid units: the integers qmin..qmax (fmt "int", round-to-nearest), or the FP8 E4M3
        values of x / scale (fmt "fp8", as floats), so that (codes - zero point) * scale is the fake-quantized x.
        `scale` and `zero_point` default to the stored grid (a split layer passes its combined one)."""
        scale = self.scale if scale is None else scale
        if self.fmt == "fp8":
            return fp8_round(x / scale)
        zp = self.zero_point if zero_point is None else zero_point
        return torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_initialized:
            raise GacqError("quantizer used before initialisation: call init_minmax or init_mse first")
        if self.dynamic:  # float32 grid and arithmetic (a bf16 step size of a near-constant token underflows)
            xf = x.float()
            if fused_rows_apply(xf, self.dynamic_axis):  # sampling: grid and fake quantization in one kernel
                from .triton_fq import fake_quantize_rows_fused

                return fake_quantize_rows_fused(xf, self.symmetric, self.qmin, self.qmax, MIN_SCALE).to(x.dtype)
            scale, zp = self.qparams(x)
            return fake_quantize(xf, scale, zp, self.qmin, self.qmax).to(x.dtype)
        if self.fmt == "fp8":
            return fp8_fake_quantize(x, self.scale)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        if self.dynamic:
            gran = f"dynamic per-token(over axis {self.dynamic_axis})"
        if self.fmt == "fp8":
            return f"fp8 e4m3, {gran}"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {gran}"


# AdaRound (Nagel et al. 2020) rectified sigmoid stretch parameters, as in both baselines.
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def beta_schedule(it: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """AdaRound's annealed beta, as the released code does it (linear, not cosine).

    beta = start while it < warmup * iters, then linear from start to end at it = iters.
    The regulariser is switched off during the warm-up (see `AdaRoundQuantizer.regularizer`).
    """
    t0 = warmup * iters
    if it < t0:
        return start
    frac = (it - t0) / max(iters - t0, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - frac)


class AdaRoundQuantizer(nn.Module):
    """Learned rounding of a weight on the (frozen) grid of an initialised per-channel quantizer.

    Soft:  W_hat = scale * (clamp(floor(W/scale) + h(V) + z, qmin, qmax) - z)
    Hard:  h(V) replaced by 1[V >= 0].
    V starts so that h(V) = W/scale - floor(W/scale): the soft weight equals W inside the range.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor):
        super().__init__()
        if not base.is_initialized:
            raise GacqError("AdaRound needs an initialised weight quantizer")
        if base.fmt != "int":
            raise GacqError("AdaRound learns roundings on a uniform integer grid; fp8 weights are rounded to nearest "
                            "(use a method without weight reconstruction, e.g. --method rtn)")
        self.bits, self.qmin, self.qmax = base.bits, base.qmin, base.qmax
        self.register_buffer("scale", base.scale.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        w = weight.detach()
        self.register_buffer("w_floor", torch.floor(w / self.scale))
        rest = (w / self.scale - self.w_floor).clamp(0, 1)
        # V = -log((zeta - gamma) / (rest - gamma) - 1) inverts h on (0, 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.alpha)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The rounded weight (the FP weight is baked into `w_floor`; the argument is ignored)."""
        up = self.h() if self.soft else (self.alpha >= 0).to(self.alpha.dtype)
        w_int = torch.clamp(self.w_floor + up + self.zero_point, self.qmin, self.qmax)
        return (w_int - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum over all elements of 1 - |2 h(V) - 1|^beta (a sum, not a mean, as in the baselines)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.soft = False

    def integer_weight(self) -> torch.Tensor:
        """The hard-rounded integers (qmin..qmax), for packing into checkpoints."""
        up = (self.alpha >= 0).to(self.w_floor.dtype)
        return torch.clamp(self.w_floor + up + self.zero_point, self.qmin, self.qmax)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's `compute_error`)."""
    noise = (ref - approx).float().pow(2).sum()
    return float(10 * torch.log10(ref.float().pow(2).sum() / noise)) if noise > 0 else math.inf
