"""Uniform affine quantization as pure functions (no module state).

Conventions, as in the released Q-Diffusion / TFMQ-DM code (shared/docs/baselines.md §1):
    x_int = clamp(round(x / scale) + zero_point, qmin, qmax)
    x_hat = (x_int - zero_point) * scale
asymmetric: [qmin, qmax] = [0, 2^b - 1]; symmetric: [-2^(b-1), 2^(b-1) - 1], zero_point = 0.
Per-channel parameters have the tensor's rank with size 1 on every axis but the channel axis,
so they broadcast (e.g. (O, 1, 1, 1) for a conv weight).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import GacqError
from .config import FORMATS

MIN_SCALE = 1e-8  # floor for the step size of constant channels (max == min)

# Number formats of a quantizer's grid. "int": the uniform integer grid above. "fp8": FP8 E4M3 (torch.float8_e4m3fn,
# the format of Hopper's and Ada's FP8 tensor cores): x_hat = fp8(clamp(x / scale, -448, 448)) * scale, with fp8()
# torch's round-to-nearest-even cast; symmetric, zero point 0, scale = max|x| / 448 (per tensor or per channel). Its
# grid is not uniform (3 mantissa bits: steps of 2^(e-3) in [2^e, 2^(e+1))), so learned rounding (AdaRound) does not
# apply; only 8-bit weights and activations use it.
FP8_MAX = 448.0  # the largest finite E4M3FN value
FP8_DTYPE = torch.float8_e4m3fn


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit quantizer."""
    if not 2 <= bits <= 8:
        raise GacqError(f"bit width {bits} is not supported; use 2 to 8 bits")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


# the fused sampling kernel (`gacq.quant.triton_fq`), off unless switched on: `use_fused_fake_quant`, or
# GACQ_FUSED_FAKE_QUANT=1; its module (and triton) is imported only when it is on
_FUSED = os.environ.get("GACQ_FUSED_FAKE_QUANT") == "1"


@contextlib.contextmanager
def use_fused_fake_quant(on: bool = True):
    """Inside the block, no-grad fake quantization of per-tensor grids runs `gacq.quant.triton_fq`'s one-kernel
    version where it applies (CUDA; bitwise equal to the torch ops in Triton's interpreter and on an H200)."""
    global _FUSED
    before, _FUSED = _FUSED, on
    try:
        yield
    finally:
        _FUSED = before


def fused_rows_apply(x: torch.Tensor, axis: int) -> bool:
    """Whether a dynamic per-token quantizer's call on x (float32) runs `triton_fq.fake_quantize_rows_fused`: the
    fused path is on (`use_fused_fake_quant`), nothing needs a gradient, and the kernel applies (CUDA, last axis)."""
    if not _FUSED or (torch.is_grad_enabled() and x.requires_grad):
        return False
    from .triton_fq import rows_apply

    return rows_apply(x, axis)


def _fake_quantize_nograd(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                          qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize `x`.

    Gradients: w.r.t. x, 1 inside the clamp range and 0 outside (STE through round, exact through
    clamp); w.r.t. scale, the plain STE gradient (Q-Diffusion's LSQ-style learning, no LSQ gradient
    scale); zero_point is not learned (its gradient is cut). Without autograd (sampling) the same
    values come from plain rounding, without the straight-through bookkeeping.
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        if _FUSED:
            from .triton_fq import applies, fake_quantize_fused

            if applies(x, scale, zero_point):
                return fake_quantize_fused(x, scale, zero_point, qmin, qmax)
        return _fake_quantize_nograd(x, scale, zero_point.detach(), qmin, qmax)
    zp = zero_point.detach()
    v = round_ste(x / scale) + zp
    # the clamp's gradient made explicit, 1 on the closed range [qmin, qmax]: v sits exactly on a bound for every
    # value that rounds to the grid's first or last code, and torch 2.14 changed clamp's backward to 0 there
    # (2.13 and earlier: 1), which silently cut the STE gradient of a grid's edge values
    inside = ((v >= qmin) & (v <= qmax)).to(v.dtype)
    x_int = torch.clamp(v, qmin, qmax).detach() + (v - v.detach()) * inside
    return (x_int - zp) * scale


def fp8_cast(v: torch.Tensor) -> torch.Tensor:
    """v clamped to [-448, 448] and rounded to the nearest FP8 E4M3 value (ties to even), as float8_e4m3fn."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """`fp8_cast(v)` in v's dtype (exact: every E4M3 value is a float16, bfloat16 and float32 value)."""
    return fp8_cast(v).to(v.dtype)


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(x / scale, -448, 448)) * scale: FP8 E4M3 quantize and dequantize.

    Gradients as `fake_quantize`'s: w.r.t. x, 1 inside the clamp range and 0 outside (STE through the rounding); w.r.t.
    scale, the plain STE gradient (learned step sizes work on this grid too).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        return fp8_round(x / scale) * scale
    v = x / scale
    inside = (v.abs() <= FP8_MAX).to(v.dtype)
    q = fp8_round(v.detach()) + (v - v.detach()) * inside
    return q * scale


def check_format(fmt: str, bits: int) -> None:
    if fmt not in FORMATS:
        raise GacqError(f"unknown number format {fmt!r}; choose {' or '.join(FORMATS)}")
    if fmt == "fp8" and bits != 8:
        raise GacqError(f"the fp8 format has 8 bits, not {bits}: use 8-bit weights and activations with it")


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(x.ndim))
    axis = channel_axis % x.ndim
    return tuple(d for d in range(x.ndim) if d != axis)


def _amin_amax(x: torch.Tensor, channel_axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    dims = _reduce_dims(x, channel_axis)
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       fmt: str = "int") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] onto the integer grid (fmt "fp8": onto FP8 E4M3's [-448, 448],
    scale = max(|lo|, |hi|) / 448, zero point 0, whatever `symmetric` says).

    Asymmetric: the range is widened to include 0 (so 0 is exactly representable, as padding and
    ReLU/SiLU outputs need), scale = (hi - lo) / (2^b - 1), zero_point = round(-lo / scale).
    Symmetric: scale = max(|lo|, |hi|) / (2^(b-1) - 1), zero_point = 0.
    """
    if fmt == "fp8":
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (absmax / lo.new_tensor(FP8_MAX)).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    qmin, qmax = qrange(bits, symmetric)
    # divisors as tensors on lo's device, not Python numbers: CUDA torch computes `t / number` as t * (1 / number),
    # which can be 1 ulp off the IEEE quotient that the CPU (and the int8 backend's Triton kernels) compute, and a
    # scale 1 ulp off moves some codes by one step (session 17's H200 run of benchmarks/int8_token_layer.py)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (absmax / lo.new_tensor(float(qmax))).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / lo.new_tensor(float(qmax - qmin))).clamp_min(MIN_SCALE)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def choose_qparams_minmax(x: torch.Tensor, bits: int, symmetric: bool = False,
                          channel_axis: int | None = None, fmt: str = "int") -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max step size and zero point ([QD]'s 'max' init), per tensor or per channel."""
    lo, hi = _amin_amax(x.detach(), channel_axis)
    return qparams_from_range(lo, hi, bits, symmetric, fmt)


def choose_qparams_mse(x: torch.Tensor, bits: int, symmetric: bool = False, channel_axis: int | None = None,
                       p: float = 2.4, n_candidates: int = 80, fmt: str = "int") -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping-range search for the least Lp reconstruction error (Q-Diffusion/TFMQ-DM 'mse' init).

    For i = 0..n_candidates-1 the range [lo, hi] = (1 - 0.01 i) [min, max] is tried
    (symmetric, and fmt "fp8": the range is symmetrised first) and the candidate with the least
    mean |x - Q(x)|^p (per channel when `channel_axis` is set) is kept.
    """
    x = x.detach()
    dims = _reduce_dims(x, channel_axis)
    fp8 = fmt == "fp8"
    qmin, qmax = (0, 0) if fp8 else qrange(bits, symmetric)
    lo0, hi0 = _amin_amax(x, channel_axis)
    if symmetric or fp8:
        hi0 = torch.maximum(lo0.abs(), hi0.abs())
        lo0 = -hi0
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zp = qparams_from_range(lo0, hi0, bits, symmetric, fmt)
    for i in range(n_candidates):
        shrink = 1.0 - 0.01 * i
        scale, zp = qparams_from_range(lo0 * shrink, hi0 * shrink, bits, symmetric, fmt)
        xq = fp8_fake_quantize(x, scale) if fp8 else fake_quantize(x, scale, zp, qmin, qmax)
        err = (x - xq).abs().pow(p).mean(dim=dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp
