"""Activation smoothing (SmoothQuant, Xiao et al., ICML 2023) for the linear layers of a quantized model.

A per-tensor 8-bit input grid is as coarse as the input's widest channel allows. Smoothing divides each input
channel j by

    s_j = max|X_j|^alpha / max|W_{:, j}|^(1 - alpha)

and multiplies the weight's column j by s_j: the layer computes the same function in float, and the quantized
input's channels are closer in range (alpha = 1 moves all of the range into the weight, 0 none of it). PTQ4DiT's
channel balancing (Wu et al., NeurIPS 2024) applies the same idea to diffusion transformers. gacq keeps the
division as an explicit per-channel multiply before the input quantizer (`QuantLayer.smooth`), not folded into
the previous layer, so it applies after any operation (GELU, adaLN modulation) and at every layer it selects.

Not part of the GAC paper or its baselines: an option of gacq's (`QuantConfig.smooth`, `gacq quantize --smooth`).
The export backends refuse smoothed layers for now.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import GacqError
from .modules import QuantLayer, QuantLinear
from .wrap import quant_layers, run_with_hooks, set_quant_state

EPS = 1e-5  # floor of the channel maxima, so a dead channel neither divides by zero nor blows up s


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) for a weight (O, I, ...) and its inputs' per-channel
    absolute maxima (I,); both maxima floored at EPS."""
    if not 0.0 <= alpha <= 1.0:
        raise GacqError(f"smoothing strength alpha must be in [0, 1], got {alpha}")
    w = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)
    a = act_absmax.detach().to(w.dtype)
    if a.shape != w.shape:
        raise GacqError(f"{a.numel()} activation channel maxima for a weight with {w.numel()} input channels")
    return a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1.0 - alpha)


def smoothable(name: str, m: nn.Module, patterns: tuple[str, ...] | None) -> bool:
    """Linear layers with a quantized input, unsplit (and matching `patterns` when given)."""
    if not isinstance(m, QuantLinear) or m.act_quantizer is None or m.split or m.smooth is not None:
        return False
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def observe_channel_absmax(model: nn.Module, names: set[str], batches: Iterable[tuple],
                           forward: Callable[..., object]) -> dict[str, torch.Tensor]:
    """Per input channel max |x| of the named quantized layers over `forward(model, *batch)` for each batch
    (the model's quantization state as it is; call with quantization off for the float model's inputs)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in quant_layers(model):
        if name not in names:
            continue

        def hook(mod: QuantLayer, args, name=name):
            x = args[0].detach()
            a = x.abs().movedim(mod.in_axis % x.ndim, -1).reshape(-1, x.shape[mod.in_axis]).amax(0).float()
            out[name] = a if name not in out else torch.maximum(out[name], a)
        handles.append(m.register_forward_pre_hook(hook))
    run_with_hooks(model, handles, batches, forward)
    return out


def smooth_model(model: nn.Module, batches: Iterable[tuple], forward: Callable[..., object], alpha: float,
                 patterns: tuple[str, ...] | None = None) -> dict[str, float]:
    """Smooth every selected layer (`smoothable`) of a wrapped model from its float inputs on `batches`.

    Run before the weight grids are initialised (their inits are marked void). Every layer's quantization is
    switched off while observing and left off; the caller sets the state it needs next. Returns {layer: max s / min s}.
    """
    if not 0.0 <= alpha <= 1.0:
        raise GacqError(f"smoothing strength alpha must be in [0, 1], got {alpha}")
    layers = {n: m for n, m in quant_layers(model) if smoothable(n, m, patterns)}
    if not layers:
        raise GacqError("--smooth found no layer to smooth (it applies to Linear layers with quantized inputs)")
    set_quant_state(model, weights=False, acts=False)  # the float model's inputs (weight grids are not set yet)
    absmax = observe_channel_absmax(model, set(layers), batches, forward)
    spread = {}
    for name, m in layers.items():
        if name not in absmax:  # not reached by the model's forward (unused layer): leave it as it is
            continue
        s = smoothing_scales(absmax[name], m.weight, alpha)
        m.set_smoothing(s)
        spread[name] = float(s.max() / s.min())
    return spread
