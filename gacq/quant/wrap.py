"""Swap a model's conv/linear layers for quantized ones, by module type, and calibrate input ranges.

Layers are found by type (`nn.Conv2d`, `nn.Linear`), never by attribute paths, so the same code
serves UNet2DModel, UNet2DConditionModel and DiT transformers. A `skip(name, module)` predicate
keeps chosen layers in full precision (the baselines' layer choices are such predicates).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import GacqError
from .modules import QUANT_CLASSES, QuantLayer

SkipFn = Callable[[str, nn.Module], bool]


def wrap_layers(model: nn.Module, wbits: int, abits: int | None, skip: SkipFn | None = None,
                a_symmetric: bool = False) -> list[str]:
    """Replace every Conv2d/Linear (except skipped ones) in place; returns the wrapped names in order."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in QUANT_CLASSES and not (skip is not None and skip(name, m))]
    if not targets:
        raise GacqError("the model has no Conv2d or Linear layers to quantize (or the skip list excludes all)")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QUANT_CLASSES[type(layer)](layer, wbits, abits, a_symmetric))
    return [name for name, _ in targets]


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def set_quant_state(model: nn.Module, weights: bool, acts: bool) -> None:
    """Switch weight and activation fake quantization of every quantized layer."""
    for _, m in quant_layers(model):
        m.w_quant, m.a_quant = weights, acts


@torch.no_grad()
def observe_input_ranges(model: nn.Module, batches: Iterable[tuple], forward: Callable[..., object]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min and max of every quantized layer's input over `forward(model, *batch)` for each batch.

    Runs with whatever quantization state the model is in; hooks are removed afterwards.
    """
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, m in quant_layers(model):
        def hook(mod, args, name=name):
            x = args[0].detach()
            lo, hi = x.amin(), x.amax()
            if name in ranges:
                lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
            ranges[name] = (lo, hi)
        handles.append(m.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            forward(model, *batch)
    finally:
        for h in handles:
            h.remove()
    return ranges


def init_act_quantizers_minmax(model: nn.Module, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set every input quantizer's step size from observed (min, max)."""
    for name, m in quant_layers(model):
        if m.act_quantizer is None:
            continue
        if name not in ranges:
            raise GacqError(f"no calibration input reached layer {name}; the calibration set does not cover it")
        lo, hi = ranges[name]
        m.act_quantizer.init_minmax(torch.stack([lo, hi]))
