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
                a_symmetric: bool = False, dynamic: bool = False, fmt: str = "int",
                afmt: str | None = None) -> list[str]:
    """Replace every Conv2d/Linear (except skipped ones) in place; returns the wrapped names in order.
    `dynamic`: the wrapped Linear layers quantize their inputs per token, dynamically (convolutions per tensor).
    `fmt`: the number format of their weight and input grids ("int", or "fp8": FP8 E4M3, 8 bits only); `afmt`: the
    inputs' format where it differs (e.g. int4 weights with FP8 inputs)."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in QUANT_CLASSES and not (skip is not None and skip(name, m))]
    if not targets:
        raise GacqError("the model has no Conv2d or Linear layers to quantize (or the skip list excludes all)")
    for name, layer in targets:
        dyn = dynamic and isinstance(layer, nn.Linear)
        model.set_submodule(name, QUANT_CLASSES[type(layer)](layer, wbits, abits, a_symmetric, a_dynamic=dyn, fmt=fmt,
                                                             afmt=afmt))
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

    For a split layer, `name` holds the range of input channels [:k] and `split_range_key(name)`
    that of channels [k:]. Runs with whatever quantization state the model is in; hooks are removed afterwards.
    """
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, m in quant_layers(model):
        def hook(mod, args, name=name):
            # a split layer's two channel groups are observed separately: [:k] under `name`,
            # [k:] under split_range_key(name)
            for key, x in zip((name, split_range_key(name)), mod.split_input(mod.smoothed_input(args[0].detach()))):
                lo, hi = x.amin(), x.amax()
                if key in ranges:
                    lo, hi = torch.minimum(lo, ranges[key][0]), torch.maximum(hi, ranges[key][1])
                ranges[key] = (lo, hi)
        handles.append(m.register_forward_pre_hook(hook))
    run_with_hooks(model, handles, batches, forward)
    return ranges


def run_with_hooks(model: nn.Module, handles: list, batches: Iterable[tuple], forward: Callable[..., object]) -> None:
    """`forward(model, *batch)` for each batch, then remove the hook `handles` (also when a forward fails)."""
    try:
        for batch in batches:
            forward(model, *batch)
    finally:
        for h in handles:
            h.remove()


def init_act_quantizers_minmax(model: nn.Module, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set every input quantizer's step size from observed (min, max) (both of a split layer's)."""
    for name, m in quant_layers(model):
        if m.act_quantizer is None or m.a_dynamic:  # dynamic: a grid per token, computed per call
            continue
        if name not in ranges:
            raise GacqError(f"no calibration input reached layer {name}; the calibration set does not cover it")
        lo, hi = ranges[name]
        m.act_quantizer.init_minmax(torch.stack([lo, hi]))
        if m.split:
            key = split_range_key(name)
            if key not in ranges:
                raise GacqError(f"no range for the second channel group of split layer {name} ({key!r}); "
                                "observe the ranges after apply_shortcut_splits")
            m.act_quantizer_0.init_minmax(torch.stack(list(ranges[key])))


def split_range_key(name: str) -> str:
    """Key of a split layer's second input channel group in `observe_input_ranges`' result."""
    return f"{name}.act_quantizer_0"


# ------------------------------------------------------- shortcut splitting ---
# diffusers up blocks whose forward does, for each resnet i,
#     hidden_states = torch.cat([hidden_states, res_hidden_states_tuple.pop()], dim=1); resnet_i(hidden_states)
# (diffusers 0.42 unet_2d_blocks.py). KUpBlock2D / KCrossAttnUpBlock2D concatenate once before all
# resnets and the *UpDecoderBlock2D (VAE) do not concatenate, so they are not listed.
SKIP_CONCAT_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D",
                         "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")


def find_shortcut_splits(model: nn.Module) -> dict[str, int]:
    """{qualified name of an up-path resnet's conv_shortcut: channels of hidden_states in its input}.

    Found by module type (the classes in SKIP_CONCAT_UP_BLOCKS, with ResnetBlock2D resnets), not by
    attribute paths. The split is derived from the block's construction (diffusers' __init__):
        res_skip_channels_i  = in_channels if i == n - 1 else out_channels
        resnet_in_channels_i = prev_output_channel if i == 0 else out_channels
    and resnet_i.in_channels = resnet_in_channels_i + res_skip_channels_i, so
        i > 0:          split = out_channels = resnets[i - 1].out_channels
        i = 0, n > 1:   split = resnets[0].in_channels - resnets[0].out_channels
    (i = 0 with a single resnet needs the block's constructor arguments: refused). Only resnets with a
    conv_shortcut (in_channels != out_channels) are listed; conv1 is never split. Works on float and
    on wrapped models.
    """
    from diffusers.models.resnet import ResnetBlock2D

    splits: dict[str, int] = {}
    for name, block in model.named_modules():
        if (type(block).__name__ not in SKIP_CONCAT_UP_BLOCKS
                or not isinstance(getattr(block, "resnets", None), nn.ModuleList)):
            continue
        resnets = list(block.resnets)
        for i, r in enumerate(resnets):
            if not isinstance(r, ResnetBlock2D):
                raise GacqError(f"{name}.resnets.{i} is a {type(r).__name__}, not a ResnetBlock2D")
            if getattr(r, "conv_shortcut", None) is None:
                continue
            if i > 0:
                k = resnets[i - 1].out_channels
            elif len(resnets) > 1:
                k = r.in_channels - r.out_channels
            else:
                raise GacqError(f"{name} has a single resnet: its hidden/skip channel split cannot be derived")
            if not 0 < k < r.in_channels:
                raise GacqError(f"{name}.resnets.{i}: derived split {k} is outside 1..{r.in_channels - 1}")
            splits[f"{name}.resnets.{i}.conv_shortcut" if name else f"resnets.{i}.conv_shortcut"] = int(k)
    return splits


def apply_shortcut_splits(model: nn.Module, splits: dict[str, int]) -> None:
    """Call `set_split(k)` on each named quantized layer (after `wrap_layers`, before `init_weight`)."""
    for name, k in splits.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            m = None
        if not isinstance(m, QuantLayer):
            raise GacqError(f"cannot split {name}: it is not a quantized (wrapped) layer of the model")
        m.set_split(k)
