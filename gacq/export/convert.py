"""`convert(model, backend)`: swap a fake-quant model's QuantConv2d / QuantLinear for real low-bit layers.

Backends are a name -> `Backend` table (`BACKENDS`). Each says which layers it can run
(`unsupported(layer)` gives the reason it cannot) and which models it refuses outright (weights or
activations wider than it stores). Layers a backend cannot run get the dense fallback
(`DenseConv2d` / `DenseLinear`, outputs equal to fake quantization) and are counted in the report
and in one logged warning; `strict=True` turns any fallback into an error. Attention matmul
quantizers are processors, not layers, and stay as they are.

TFMQ-DM's per-step activation sets (`model.gacq_fsc`) keep working: exported layers share the act
quantizer modules, and `apply_step(model, k)` / `step_hook(model)` write step k's set into them
(FSCParams.apply only finds fake-quant layers).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import GacqError
from ..quant.modules import QuantLayer
from ..quant.wrap import quant_layers
from .base import ExportedLayer, dense_fallback
from .fp8 import fp8_unsupported, to_fp8, to_w4fp8
from .int8 import int8_unsupported, to_int8, to_w4a8, w4a8_unsupported
from .w4a16 import to_w4a16, w4a16_unsupported, weight_bits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """A real low-bit backend.

    Attributes:
        name, description: for users and error messages.
        unsupported: why a layer cannot run on it (None: it can).
        make: the exported layer for a supported QuantLayer.
        refuse: why a model whose usual layer is W`wbits`A`abits` (abits None: float inputs) is refused.
        sample_rtol, min_agree, max_rtol: `export`'s whole-model check on random inputs. A sample *agrees* when
            max |y - y_fake| <= sample_rtol * max |y_fake| over its elements; at least a `min_agree`
            fraction of the samples must agree (or, where rounding-boundary flips make most samples differ, the
            exported model must be as faithful to a float64 run of fake quant as float32 fake quant is: see
            `folder.check_failures`), and none may differ by more than max_rtol.
        layer_rtol: `export`'s layer check: every exported layer, called on the input its fake-quant layer gets in
            the fake-quant model's forward, must give that layer's output within layer_rtol * max |y_fake| of the
            call. The same input gives the same activation codes, so only float rounding remains (no rounding
            flips cascading through later layers, which is what makes whole-model samples disagree).
        tolerance_note: where the tolerances come from (written into export.json).
    """

    name: str
    description: str
    unsupported: Callable[[QuantLayer], str | None]
    make: Callable[[QuantLayer], ExportedLayer]
    refuse: Callable[[int, int | None], str | None]
    sample_rtol: float
    min_agree: float
    max_rtol: float
    tolerance_note: str
    layer_rtol: float = 1e-4


def _refuse_int_acts(backend: str, max_wbits: int, wbits: int, abits: int | None) -> str | None:
    """The int8 and w4a8 backends: weights of at most `max_wbits`, activations quantized to <= 8 bits."""
    if wbits > max_wbits:
        return (f"the {backend} backend stores weights of at most {max_wbits} bits; this model's are {wbits}-bit"
                + (": use --backend int8" if max_wbits < 8 else ""))
    if abits is None:
        return (f"the {backend} backend needs quantized activations; this model keeps them in float "
                "(a weight-only checkpoint): use --backend w4a16")
    if abits > 8:
        return f"the {backend} backend needs activations of at most 8 bits; this model's are {abits}-bit"
    return None


def _refuse_int8(wbits: int, abits: int | None) -> str | None:
    return _refuse_int_acts("int8", 8, wbits, abits)


def _refuse_w4a8(wbits: int, abits: int | None) -> str | None:
    return _refuse_int_acts("w4a8", 4, wbits, abits)


def _refuse_w4a16(wbits: int, abits: int | None) -> str | None:
    if wbits > 4:
        return f"the w4a16 backend stores weights of at most 4 bits; this model's are {wbits}-bit: use --backend int8"
    return None


def _wide(layer: QuantLayer) -> bool:
    """Weights wider than 4 bits (a W8 layer of a mixed-precision W4 checkpoint: QuantConfig.w8_layers, a recipe's
    W8A8 first and last layers)."""
    return weight_bits(layer) > 4


def _w4a8_unsupported(layer: QuantLayer) -> str | None:
    """The w4a8 backend runs a layer with wider weights (5-8 bits) on the int8 kernel, the rest packed int4."""
    return int8_unsupported(layer) if _wide(layer) else w4a8_unsupported(layer)


def _to_w4a8(layer: QuantLayer) -> ExportedLayer:
    return to_int8(layer) if _wide(layer) else to_w4a8(layer)


BACKENDS: dict[str, Backend] = {
    "int8": Backend(
        "int8", "int8 weights (W<=8) x int8 activations (A<=8), int32 GEMM via torch._int_mm; convs as one fused "
        "Triton kernel on CUDA, im2col elsewhere",
        int8_unsupported, to_int8, _refuse_int8,
        sample_rtol=1e-5, min_agree=0.5, max_rtol=0.1,
        tolerance_note=(
            "Per layer the int32 sum is exact, so the only difference from fake quantization is float32 rounding: "
            "|y - y_exact| <= 2^-21 (sa sw |S| + |b|), while fake quant's own float32 GEMM adds up to "
            "(K + 2) 2^-24 sa sw sum|x||w| (measured: <= 1e-6 of max |y| per layer). Whole model: such ulp-level "
            "differences, amplified by normalisation, can move an input sitting at a rounding boundary of a later "
            "activation quantizer by one step, which changes that sample's output by up to a few percent; the "
            "float32 fake-quant model shows the same flips against a float64 run of itself (the 'float64' entry). "
            "So a sample agrees at 1e-5 of max |y|, at least half must agree, and max_rtol 0.1 only guards against "
            "gross errors. Where such flips reach most samples (the bundled CIFAR-10 UNet: every sample, about 1% "
            "of max |y|, for float32 fake quant against its own float64 run too), the int8 model passes instead if "
            "it is as faithful to the float64 fake-quant run as float32 fake quant (folder.check_failures). Each "
            "layer, on the fake-quant model's own inputs (the same codes, no flips): within layer_rtol 1e-4 of max "
            "|y| (measured on the bundled model: <= 2e-6)."),
    ),
    "w4a8": Backend(
        "w4a8", "int4 weights packed two per byte (W<=4) x int8 activations (A<=8), int32 accumulation: on CUDA one "
        "fused Triton kernel per conv or linear unpacks the codes in its K loop; elsewhere the int8 torch path. "
        "Layers with 5-8-bit weights in a W4 model (mixed precision) run as the int8 backend's layers",
        _w4a8_unsupported, _to_w4a8, _refuse_w4a8,
        sample_rtol=1e-5, min_agree=0.5, max_rtol=0.1,
        tolerance_note="as int8: the same exact integer sum and float32 epilogue, so the same per-layer bounds.",
    ),
    "w4a16": Backend(
        "w4a16", "int4 weights packed two per byte, dequantized at call time; inputs as in the fake-quant model",
        w4a16_unsupported, to_w4a16, _refuse_w4a16,
        sample_rtol=1e-6, min_agree=1.0, max_rtol=1e-6, layer_rtol=1e-6,
        tolerance_note=(
            "the dequantized weight equals the fake-quant weight exactly and the float op is the same, so float32 "
            "outputs are identical (tested bitwise on the CPU); 1e-6 of max |y| per sample leaves room for GPU "
            "kernel selection."),
    ),
}


def _refuse_fp8(wbits: int, abits: int | None) -> str | None:
    if 4 < wbits < 8 or abits not in (8, None):
        return (f"the fp8 backend runs FP8 E4M3 inputs against FP8 weights or integer weights of at most 4 bits; this "
                f"model is W{wbits}A{abits or 32}")
    return None


BACKENDS["fp8"] = Backend(
    "fp8", "FP8 E4M3 activations x FP8 E4M3 weights (`gacq quantize --format fp8`) or x integer weights of at most 4 "
    "bits (`--act-format fp8`), one byte per weight; linears through torch._scaled_mm, convs through a Triton FP8 "
    "implicit GEMM on CUDA and im2col + torch._scaled_mm elsewhere, float32 accumulation; float-input layers "
    "dequantize their weights",
    fp8_unsupported, to_fp8, _refuse_fp8,
    sample_rtol=1e-5, min_agree=0.5, max_rtol=0.1,
    tolerance_note=(
        "The codes are the fake quantizer's bit for bit; only float rounding differs (fake quant rounds each "
        "dequantized value to float32 before its GEMM, the fp8 layer rounds the sum and then the scales), so per layer "
        "a few float32 ulps of sa sw sum|x||w|. Whole model: as int8, such differences can move an input at a rounding "
        "boundary of a later quantizer by one FP8 step (2^-3 of its value at most). Same acceptance as int8."),
)


def _refuse_w4fp8(wbits: int, abits: int | None) -> str | None:
    if wbits > 4:
        return (f"the w4fp8 backend packs integer weights of at most 4 bits; this model's are {wbits}-bit: use "
                "--backend fp8")
    return _refuse_fp8(wbits, abits)


def _w4fp8_unsupported(layer: QuantLayer) -> str | None:
    """The fp8 backend's conditions, and for packed integer weights w4a16's (codes and zero points in 0..15)."""
    return fp8_unsupported(layer) or (w4a16_unsupported(layer) if layer.fmt != "fp8" else None)


BACKENDS["w4fp8"] = Backend(
    "w4fp8", "integer weights of at most 4 bits packed two per byte and unpacked to FP8 E4M3 codes at each call "
    "(`--act-format fp8` checkpoints) x FP8 E4M3 activations: the fp8 backend's GEMMs at a quarter of bf16's weight "
    "bytes",
    _w4fp8_unsupported, to_w4fp8, _refuse_w4fp8,
    sample_rtol=1e-5, min_agree=0.5, max_rtol=0.1,
    tolerance_note="as fp8: the unpacked codes are the fp8 backend's, so the same GEMMs and the same bounds.",
)

FP8_BACKENDS = ("fp8", "w4fp8")


def _check_formats(layers: list[tuple[str, QuantLayer]], backend: str) -> None:
    """The fp8 backends take checkpoints with FP8 grids only, the integer backends integer ones."""
    fmts = {f for _, m in layers for f in (m.fmt, m.afmt)}
    if backend in FP8_BACKENDS and "fp8" not in fmts:
        raise GacqError(f"the {backend} backend runs checkpoints quantized with `gacq quantize --format fp8` or "
                        "`--act-format fp8`; this one has integer grids: use --backend int8, w4a8 or w4a16")
    if backend not in FP8_BACKENDS and "fp8" in fmts:
        raise GacqError(f"this checkpoint has FP8 E4M3 grids (`--format fp8` / `--act-format fp8`); the {backend} "
                        "backend runs integer grids: use --backend fp8 (or w4fp8 for W4 weights)")


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise GacqError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)} (or auto)")
    return BACKENDS[name]


def _quantized_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """`quant_layers(model)`, refusing a model that has none."""
    layers = quant_layers(model)
    if not layers:
        raise GacqError("the model has no quantized layers (QuantConv2d / QuantLinear); export a checkpoint "
                        "written by `gacq quantize`")
    return layers


def auto_backend(model: nn.Module) -> str:
    """The backend that runs the checkpoint's quantized layers as they were calibrated (its weight and input grids)
    with the fewest weight bytes: fp8 for FP8 weights, w4fp8 for W4 weights with FP8 inputs, w4a8 / int8 for integer
    inputs (W<=4 / W<=8), w4a16 for W<=4 weights with float inputs. Not the fastest: on the GPUs measured so far
    (results/bench_lowbit) w4a16, which runs W4 weights with float inputs, is faster than every backend with
    quantized inputs, and it does not reproduce a W4A8 checkpoint's outputs."""
    layers = _quantized_layers(model)
    wbits, abits = model_bits(layers)
    if any(m.fmt == "fp8" for _, m in layers):
        return "fp8"
    if any(m.afmt == "fp8" for _, m in layers):
        return "w4fp8" if wbits <= 4 else "fp8"
    if abits is None:
        if wbits > 4:
            raise GacqError(f"no backend runs W{wbits} weights with float inputs (the int8 backend needs quantized "
                            "inputs, w4a16 at most 4-bit weights); quantize with --abits 8 or --wbits 4")
        return "w4a16"
    return "w4a8" if wbits <= 4 else "int8"


@dataclass
class ExportReport:
    """What `convert` did.

    Attributes:
        converted: exported layer class name -> count (fallbacks included as Dense*).
        fallbacks: one {"layer", "type", "reason"} per layer left on the dense path.
        weight_bytes_before: the fake-quant layers' float weights as stored (float32 in a loaded checkpoint).
        weight_bytes_after: every byte the exported layers keep for their weights (codes, scales, offsets,
            dense fallback weights); biases excluded on both sides.
        weight_bytes_fp16: the same weights as a dense fp16 model would store them.
    """

    backend: str
    converted: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    weight_bytes_fp16: int = 0

    @property
    def n_fallbacks(self) -> int:
        return len(self.fallbacks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.converted.items()))
        return (f"{sum(self.converted.values())} layers ({kinds}), {self.n_fallbacks} on the dense fallback; "
                f"weight bytes {self.weight_bytes_before / 1e6:.3f} MB -> {self.weight_bytes_after / 1e6:.3f} MB "
                f"(fp16: {self.weight_bytes_fp16 / 1e6:.3f} MB)")


def model_bits(layers: list[tuple[str, QuantLayer]]) -> tuple[int, int | None]:
    """The most common (weight bits, input bits) of the quantized layers; input bits None = float inputs."""
    def bits(m: QuantLayer) -> tuple[int, int | None]:
        abits = m.act_quantizer.bits if (m.act_quantizer is not None and m.a_quant) else None
        return m.weight_quantizer.bits, abits

    return Counter(bits(m) for _, m in layers).most_common(1)[0][0]


def _check_step_sets(model: nn.Module) -> None:
    fsc = getattr(model, "gacq_fsc", None)
    if fsc is None:
        return
    for name, z in fsc.zero_point.items():
        if not torch.equal(z, z.round()):
            raise GacqError(f"per-step activation zero points of {name} are not integers; the checkpoint is corrupt")


def convert(model: nn.Module, backend: str, strict: bool = False) -> tuple[nn.Module, ExportReport]:
    """Replace every QuantConv2d / QuantLinear of `model` by `backend`'s layer, in place.

    Args:
        model: a fake-quant model (from `load_quantized` or `gacq.quant.quantize`); deep-copy it first
            to keep the fake-quant one.
        backend: a name in `BACKENDS` ('int8', 'w4a8', 'w4a16', 'fp8').
        strict: refuse (GacqError) instead of falling back to the dense path for some layers.

    Returns:
        (model, report). Exported layers are inference-only (no autograd through integer weights).

    Example:
        >>> model, _, _ = load_quantized("runs/q_w8a8")
        >>> model, report = convert(model, "int8")
        >>> report.summary()
    """
    if backend == "auto":
        backend = auto_backend(model)
    b = get_backend(backend)
    layers = _quantized_layers(model)
    _check_formats(layers, backend)
    why = b.refuse(*model_bits(layers))
    if why:
        raise GacqError(why)
    if backend in ("int8", "w4a8"):
        _check_step_sets(model)
    plan = [(name, m, b.unsupported(m)) for name, m in layers]
    fallbacks = [{"layer": n, "type": type(m).__name__, "reason": r} for n, m, r in plan if r is not None]
    if strict and fallbacks:
        listed = "; ".join(f"{f['layer']}: {f['reason']}" for f in fallbacks[:5])
        raise GacqError(f"the {backend} backend cannot run {len(fallbacks)} of {len(layers)} quantized layers "
                        f"({listed}{'; ...' if len(fallbacks) > 5 else ''}); drop --strict to run them densely")
    report = ExportReport(backend)
    counts: Counter[str] = Counter()
    for name, m, reason in plan:
        report.weight_bytes_before += m.weight.numel() * m.weight.element_size()
        report.weight_bytes_fp16 += m.weight.numel() * 2
        with torch.no_grad():
            new = dense_fallback(m) if reason is not None else b.make(m)
        new.to(m.weight.device)
        model.set_submodule(name, new)
        counts[type(new).__name__] += 1
        report.weight_bytes_after += new.weight_bytes()
    report.converted = dict(sorted(counts.items()))
    report.fallbacks = fallbacks
    if fallbacks:
        reasons = Counter(f["reason"] for f in fallbacks)
        log.warning("%s backend: %d of %d quantized layers run on the dense fallback path (%s)", backend,
                    len(fallbacks), len(layers), "; ".join(f"{n}x {r}" for r, n in reasons.most_common()))
    return model, report


# ------------------------------------------------------- per-step act sets ---
def apply_step(model: nn.Module, step: int) -> None:
    """Write sampling step `step`'s activation set (TFMQ-DM FSC) into the act quantizers, if the model has sets.

    Works on fake-quant and exported layers alike (both hold `act_quantizer`).
    """
    fsc = getattr(model, "gacq_fsc", None)
    if fsc is None:
        return
    if not 0 <= step < fsc.n_steps:
        raise GacqError(f"sampling step {step} has no calibrated activation set (there are {fsc.n_steps})")
    for name, s in fsc.scale.items():
        try:
            q = model.get_submodule(name).act_quantizer
        except AttributeError:
            q = None
        if q is None:
            raise GacqError(f"per-step activation parameters name layer {name}, which has no activation quantizer")
        q._set(s[step], fsc.zero_point[name][step])


def step_hook(model: nn.Module) -> Callable[[int, Any], None] | None:
    """The `LoadedModel.step_hook` of an exported model: None without per-step sets."""
    fsc = getattr(model, "gacq_fsc", None)
    if fsc is None:
        return None

    def hook(step: int, cfg) -> None:
        if step == 0:
            fsc.check_sampler(cfg)
        apply_step(model, step)

    return hook


def convert_loaded(loaded, backend: str, strict: bool = False):
    """Convert a `LoadedModel` of a quantized checkpoint in place; returns (loaded, report).

    Its step hook is replaced by one that also reaches exported layers (`load_model` of an exported folder, so
    `gacq sample --model EXPORTED`, uses it).
    """
    _, report = convert(loaded.model, backend, strict)
    loaded.step_hook = step_hook(loaded.model)
    loaded.source = f"{loaded.source} ({backend})"
    return loaded, report
