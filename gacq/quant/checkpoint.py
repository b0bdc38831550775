"""Quantized checkpoint folders: packed integer weights, scales, zero points and JSON.

Layout of QDIR:
    quant_config.json     method, bits, options, versions, and one entry per quantized layer
    model_config.json     the base model's diffusers config and its noise schedule
    quantized.safetensors per layer: qweight (uint8; two 4-bit values per byte when bits <= 4; an fp8 layer's
                          FP8 E4M3 values of W / scale, float8_e4m3fn, in the weight's shape),
                          scale, zero_point, and the input quantizer's act_scale / act_zero_point
    float.safetensors     everything kept in floating point (norms, biases, unquantized layers)

Loading rebuilds the architecture from model_config.json, wraps the same layers, and sets each
quantized layer to its stored integer grid, so the loaded model's outputs equal the saved model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import GacqError
from ..utils import atomic_dir
from .primitives import FP8_DTYPE
from .wrap import quant_layers, wrap_layers

FORMAT_VERSION = 2
# 2 added shortcut splits (per layer "split" and the second half's scale_0 / zero_point_0 /
# act_scale_0 / act_zero_point_0); format-1 folders have no split layers and read unchanged.
# 3 = 2 plus smoothed layers (per layer "smooth": true and its input divisor `<layer>.smooth`); written only when a
# layer is smoothed, so that a gacq that cannot divide the inputs refuses the folder instead of misreading it.
SMOOTH_FORMAT_VERSION = 3
# 4 = 3 plus dynamic per-token input quantization (per layer "a_dynamic": true, no act_scale / act_zero_point);
# written only when a layer has it.
DYNAMIC_FORMAT_VERSION = 4
# 5 = 4 plus FP8 E4M3 layers (per layer "fmt": "fp8", qweight float8_e4m3fn) and FP8 inputs of integer-weight layers
# ("afmt": "fp8"); written only when a layer has either.
FP8_FORMAT_VERSION = 5
READABLE_FORMATS = (1, 2, 3, 4, 5)


def pack_int(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers (0..2^bits-1) -> uint8 bytes; two values per byte when bits <= 4."""
    v = values.flatten().to(torch.uint8)
    if bits > 4:
        return v
    if len(v) % 2:
        v = torch.cat([v, v.new_zeros(1)])
    return v[0::2] | (v[1::2] << 4)


def unpack_int(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits > 4:
        return packed[:numel].to(torch.int64)
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    return out[:numel].to(torch.int64)


def save_quantized(model: torch.nn.Module, out: str | Path, config: dict[str, Any], model_config: dict[str, Any],
                   scheduler_config: dict[str, Any], vae: torch.nn.Module | None = None) -> Path:
    """Write a quantized model (wrapped with gacq.quant) into QDIR, atomically; a latent model's
    autoencoder (`vae`, float) goes along in QDIR/vae/ so that the checkpoint samples images."""
    import diffusers

    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quant_names = []
    for name, m in quant_layers(model):
        q = m.weight_quantizer
        ints = m.integer_weight().detach().cpu()  # a split layer: on both halves' combined grid
        if q.fmt == "fp8":  # FP8 values in units of the scale, stored as themselves (1 byte each)
            tensors[f"{name}.qweight"] = ints.float().to(FP8_DTYPE).contiguous()
        else:
            tensors[f"{name}.qweight"] = pack_int(ints, q.bits)
        tensors[f"{name}.scale"] = q.scale.detach().cpu().float()
        tensors[f"{name}.zero_point"] = q.zero_point.detach().cpu().float()
        entry = {"type": type(m).__name__, "wbits": q.bits, "shape": list(m.weight.shape),
                 "abits": m.abits if m.act_quantizer is not None else None,
                 "a_symmetric": bool(m.act_quantizer.symmetric) if m.act_quantizer is not None else None}
        if q.fmt != "int":
            entry["fmt"] = q.fmt
        if m.afmt != m.fmt:  # inputs in another format than the weight (int4 weights, FP8 inputs)
            entry["afmt"] = m.afmt
        if m.a_dynamic:
            entry["a_dynamic"] = True  # the grid is computed per token at run time: nothing stored
        elif m.act_quantizer is not None:
            if not m.act_quantizer.is_initialized:
                raise GacqError(f"layer {name} has an uncalibrated activation quantizer; calibrate before saving")
            tensors[f"{name}.act_scale"] = m.act_quantizer.scale.detach().cpu().float().reshape(1)
            tensors[f"{name}.act_zero_point"] = m.act_quantizer.zero_point.detach().cpu().float().reshape(1)
        if m.split:
            entry["split"] = m.split
            tensors[f"{name}.scale_0"] = m.weight_quantizer_0.scale.detach().cpu().float()
            tensors[f"{name}.zero_point_0"] = m.weight_quantizer_0.zero_point.detach().cpu().float()
            if m.act_quantizer is not None and m.act_quantizer_0 is not None and not m.a_dynamic:
                if not m.act_quantizer_0.is_initialized:
                    raise GacqError(f"layer {name} has an uncalibrated activation quantizer; calibrate before saving")
                tensors[f"{name}.act_scale_0"] = m.act_quantizer_0.scale.detach().cpu().float().reshape(1)
                tensors[f"{name}.act_zero_point_0"] = m.act_quantizer_0.zero_point.detach().cpu().float().reshape(1)
        if m.smooth is not None:
            entry["smooth"] = True
            tensors[f"{name}.smooth"] = m.smooth.detach().cpu().float().contiguous()
        layers[name] = entry
        quant_names.append(name)
    floats = {}
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if any(owner == n or owner.startswith(n + ".") for n in quant_names) and not k.endswith(".bias"):
            continue
        floats[k] = v.detach().cpu().contiguous()
    smoothed = any(e.get("smooth") for e in layers.values())
    dynamic = any(e.get("a_dynamic") for e in layers.values())
    fp8 = any("fp8" in (e.get("fmt"), e.get("afmt")) for e in layers.values())
    version = FP8_FORMAT_VERSION if fp8 else DYNAMIC_FORMAT_VERSION if dynamic else \
        SMOOTH_FORMAT_VERSION if smoothed else FORMAT_VERSION
    meta = {"format_version": version,
            "diffusers": diffusers.__version__, "torch": torch.__version__, **config, "layers": layers}
    from .attention import attention_quantizers

    procs = attention_quantizers(model)
    if procs:  # their step sizes are in float.safetensors (state-dict keys under `<attn>.processor.`)
        p0 = procs[0][1]
        meta["attention"] = {"modules": [n for n, _ in procs], "abits": p0.q.bits, "softmax_bits": p0.softmax.bits,
                             "symmetric": bool(p0.q.symmetric), "softmax_mode": p0.softmax.mode, "quant": bool(p0.quant)}
    fsc = getattr(model, "gacq_fsc", None)
    if fsc is not None:
        meta["fsc"] = {"sampler": fsc.sampler, "steps": fsc.n_steps}
    if getattr(model, "gacq_output_bias", None):  # already folded into the last layer's bias (float.safetensors)
        meta["output_bias"] = model.gacq_output_bias
    gac = getattr(model, "gacq_gac_weights", None) or {}
    if gac:
        meta["gac_weights"] = {"blocks": sorted(gac), "file": "gac_weights.safetensors"}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "quantized.safetensors"))
        save_file(floats, str(tmp / "float.safetensors"))
        if fsc is not None:
            save_file({k: v.cpu().float() for k, v in fsc.state_dict().items()}, str(tmp / "fsc.safetensors"))
        if gac:  # GAC's learned per-sample weights of every block (over the calibration samples)
            gt = {n: d["weights"].float().contiguous() for n, d in gac.items()}
            for key, v in (getattr(model, "gacq_gac_samples", None) or {}).items():  # each sample's step / timestep
                gt[f"{GAC_RESERVED}{key}"] = v.detach().cpu().to(torch.int64).contiguous()
            save_file(gt, str(tmp / "gac_weights.safetensors"))
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "quant_config.json").write_text(json.dumps(meta, indent=2))
        base = {"_class_name": type(model).__name__,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in model_config.items() if not k.startswith("_")}}
        (tmp / "model_config.json").write_text(json.dumps({"model": base, "scheduler": scheduler_config}, indent=2))
    return out


GAC_RESERVED = "__"  # gac_weights.safetensors keys that are not blocks: __sampling_step, __timestep (per sample)


def load_gac_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's gac_weights.safetensors -> ({block: weight of every weighted sample}, {'sampling_step' and
    'timestep' of each sample, where the checkpoint recorded them (gacq after 2026-12-02)})."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    weights = {k: v for k, v in raw.items() if not k.startswith(GAC_RESERVED)}
    samples = {k[len(GAC_RESERVED):]: v for k, v in raw.items() if k.startswith(GAC_RESERVED)}
    return weights, samples


def is_quantized_folder(path: Path) -> bool:
    return (path / "quant_config.json").exists()


def load_quantized(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Rebuild a quantized model from QDIR; returns (model, quant_config, scheduler_config)."""
    import diffusers

    from ..models import MODEL_CLASSES

    folder = Path(folder)
    try:
        meta = json.loads((folder / "quant_config.json").read_text())
        mcfg = json.loads((folder / "model_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GacqError(f"{folder} is not a readable quantized checkpoint: {e}") from e
    if meta.get("format_version") not in READABLE_FORMATS:
        raise GacqError(f"{folder} has checkpoint format {meta.get('format_version')}; this gacq reads "
                        f"{', '.join(map(str, READABLE_FORMATS))}")
    cls_name = mcfg["model"].get("_class_name")
    if cls_name not in MODEL_CLASSES:
        raise GacqError(f"{folder}: unsupported base model class {cls_name!r}")
    try:
        tensors = load_file(str(folder / "quantized.safetensors"))
        floats = load_file(str(folder / "float.safetensors"))
    except Exception as e:  # OSError, or safetensors' own error types for corrupt files
        raise GacqError(f"{folder}: cannot read the weight files ({e}); the checkpoint is corrupt or incomplete") from e
    model = getattr(diffusers, cls_name).from_config(mcfg["model"]).eval()
    layers = meta["layers"]
    groups: dict[tuple, set[str]] = {}
    for n, e in layers.items():  # layers may differ in bits (W8A8 first/last) or keep float inputs
        key = (e["wbits"], e["abits"], bool(e["a_symmetric"]), bool(e.get("a_dynamic")), e.get("fmt", "int"),
               e.get("afmt"))
        groups.setdefault(key, set()).add(n)
    wrapped = []
    try:
        for (wb, ab, sym, dyn, fmt, afmt), names in groups.items():
            wrapped += wrap_layers(model, wb, ab, skip=lambda n, m, names=names: n not in names, a_symmetric=sym,
                                   dynamic=dyn, fmt=fmt, afmt=afmt)
    except GacqError as e:
        raise GacqError(f"{folder}: the quantized layers do not match the model architecture ({e})") from e
    if sorted(wrapped) != sorted(layers):
        raise GacqError(f"{folder}: the quantized layers do not match the model architecture")
    att = meta.get("attention")
    if att:
        from .attention import install_attention_quantizers, set_attention_quant

        install_attention_quantizers(model, att["abits"], att["softmax_bits"], att["symmetric"], att["softmax_mode"])
        set_attention_quant(model, bool(att["quant"]))
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise GacqError(f"{folder}: float weights for unknown parameters: {unexpected[:3]}")
    for name, m in quant_layers(model):
        entry = layers[name]
        if list(m.weight.shape) != entry["shape"] or m.weight_quantizer.bits != entry["wbits"]:
            raise GacqError(f"{folder}: layer {name} has shape/bits {entry['shape']}/{entry['wbits']}, "
                            f"the model has {list(m.weight.shape)}/{m.weight_quantizer.bits}")
        q = m.weight_quantizer
        scale, zp = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
        if q.fmt == "fp8":
            ints = tensors[f"{name}.qweight"]
            if ints.dtype != FP8_DTYPE or list(ints.shape) != entry["shape"] or not torch.isfinite(ints.float()).all():
                raise GacqError(f"{folder}: layer {name} is marked fp8 but its weight is not a finite float8_e4m3fn "
                                f"tensor of shape {entry['shape']}; the checkpoint is corrupt: quantize again")
            ints = ints.float()
        else:
            ints = unpack_int(tensors[f"{name}.qweight"], q.bits, math.prod(entry["shape"])).view(entry["shape"])
            if ints.max() > q.qmax or ints.min() < q.qmin:
                raise GacqError(f"{folder}: layer {name} holds integers outside its {q.bits}-bit range")
        if entry.get("split"):
            m.set_split(entry["split"])
            m.weight_quantizer_0._set(tensors[f"{name}.scale_0"], tensors[f"{name}.zero_point_0"])
        q._set(scale, zp)
        with torch.no_grad():
            full_scale, full_zp = m.weight_qparams()  # scale, zp, or both halves' grid of a split layer
            m.weight.copy_((ints.to(scale.dtype) - full_zp) * full_scale)
        if bool(entry.get("a_dynamic")) != m.a_dynamic:  # a conv marked dynamic: wrap_layers made it static
            raise GacqError(f"{folder}: layer {name} is marked for dynamic per-token inputs, which only Linear "
                            "layers have; the checkpoint is corrupt: quantize again")
        if m.act_quantizer is not None and not m.a_dynamic:
            m.act_quantizer._set(tensors[f"{name}.act_scale"], tensors[f"{name}.act_zero_point"])
            if m.split:
                m.act_quantizer_0._set(tensors[f"{name}.act_scale_0"], tensors[f"{name}.act_zero_point_0"])
        if entry.get("smooth"):  # the stored integers are already on W * s's grid: only the input divisor
            s_in = tensors.get(f"{name}.smooth")
            if (s_in is None or s_in.numel() != entry["shape"][1] or not torch.isfinite(s_in).all()
                    or (s_in <= 0).any()):
                raise GacqError(f"{folder}: layer {name} is marked smoothed but its `{name}.smooth` divisor is missing "
                                "or invalid; the checkpoint is corrupt: quantize again")
            m.smooth = s_in.to(m.weight.device, m.weight.dtype)
        m.w_quant, m.a_quant = True, m.act_quantizer is not None
    if meta.get("fsc"):
        from .fsc import FSCParams

        path = folder / "fsc.safetensors"
        if not path.exists():
            raise GacqError(f"{folder}: quant_config.json lists per-step activation sets but fsc.safetensors is missing")
        fsc = FSCParams.from_state_dict(load_file(str(path)), meta["fsc"]["sampler"])
        if fsc.n_steps != meta["fsc"]["steps"]:
            raise GacqError(f"{folder}: fsc.safetensors holds {fsc.n_steps} step sets, quant_config.json says "
                            f"{meta['fsc']['steps']}")
        fsc.apply(model, 0)
        model.gacq_fsc = fsc
    return model, meta, mcfg["scheduler"]
