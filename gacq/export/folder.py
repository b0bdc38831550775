"""`export(QDIR, backend, OUT)` and `load_exported(OUT)`: exported folders on disk.

An exported folder is a copy of the quantized checkpoint (its packed integer weights are already
the low-bit storage) plus `export.json`: the backend, the conversion report, and the measured
agreement with the fake-quant model on random inputs next to the backend's tolerance. Loading
rebuilds the fake-quant model from the copy and converts it again (deterministic, a fraction of a
second), checking that the same layers convert as at export. `load_model(OUT)` (so `gacq sample --model OUT`)
loads it so, on its backend; for fake quant, load the checkpoint it was exported from (until session 38 the
folder loaded as that checkpoint, fake quant, which only this docstring said).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import GacqError
from ..quant.checkpoint import is_quantized_folder, load_quantized
from ..utils import atomic_dir, git_commit
from .convert import apply_step, auto_backend, convert, get_backend

EXPORT_FILE = "export.json"
EXPORT_VERSION = 1


def example_inputs(model: nn.Module, n: int, generator: torch.Generator, num_train_timesteps: int = 1000
                   ) -> tuple[tuple, dict]:
    """Random (x_t, t) and whatever conditioning the model class needs, as (args, kwargs) on the CPU."""
    cfg = model.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn((n, cfg.in_channels, h, w), generator=generator)
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    name = type(model).__name__
    kwargs: dict[str, Any] = {}
    if name == "UNet2DConditionModel":
        dim = cfg.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        kwargs["encoder_hidden_states"] = torch.randn((n, 4, dim), generator=generator)
    elif name in ("DiTTransformer2DModel", "Transformer2DModel") and getattr(cfg, "num_embeds_ada_norm", None):
        kwargs["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (n,), generator=generator)
    elif name == "UNet2DModel" and getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (n,), generator=generator)
    if name in ("DiTTransformer2DModel", "Transformer2DModel"):
        kwargs["timestep"] = t
        return (x,), kwargs
    return (x, t), kwargs


@contextlib.contextmanager
def _no_tf32():
    """Full float32 convs/matmuls on CUDA while checking (TF32 would dwarf the rounding being measured)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _sample_rel(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per sample: max |y - ref| / max |ref| (0 where both are 0)."""
    diff = (y.double() - ref.double()).flatten(1).abs().amax(1)
    scale = ref.double().flatten(1).abs().amax(1)
    return torch.where(scale > 0, diff / scale.clamp_min(1e-300), (diff > 0).double() * float("inf"))


@torch.no_grad()
def compare_outputs(ref: nn.Module, exported: nn.Module, device: torch.device | str = "cpu", batches: int = 2,
                    batch_size: int = 4, seed: int = 0, num_train_timesteps: int = 1000, sample_rtol: float = 1e-5,
                    float64: bool = True) -> dict[str, Any]:
    """How closely `exported` follows the fake-quant model `ref` on random inputs (float32, TF32 off).

    Per sample, rel = max |y - y_ref| / max |y_ref|. Returns the max and median rel, the largest
    absolute difference, and the fraction of samples with rel <= sample_rtol. With `float64`, a
    float64 copy of `ref` (the fake-quant computation without float32 rounding) is run too, and the
    same fraction is given for the exported model and for the float32 fake-quant model against it:
    where activation-quantizer rounding-boundary flips make samples differ, this shows which side
    is nearer to the exact computation. With TFMQ-DM per-step sets, every batch runs at the first,
    middle and last step's set, written into all models (the exported layers read the current grid).
    """
    device = torch.device(device)
    fsc = getattr(ref, "gacq_fsc", None)
    steps = sorted({0, fsc.n_steps // 2, fsc.n_steps - 1}) if fsc is not None else [None]
    ref64 = copy.deepcopy(ref).double() if float64 else None
    g = torch.Generator().manual_seed(seed)
    rel, rel64, fake64, max_abs = [], [], [], 0.0
    with _no_tf32():
        for _ in range(batches):
            args, kwargs = example_inputs(ref, batch_size, g, num_train_timesteps)
            args = tuple(a.to(device) for a in args)
            kwargs = {k: v.to(device) for k, v in kwargs.items()}
            for step in steps:
                for m in (ref, exported, ref64):
                    if step is not None and m is not None:
                        apply_step(m, step)
                y_ref = ref(*args, **kwargs).sample.float()
                y = exported(*args, **kwargs).sample.float()
                max_abs = max(max_abs, float((y - y_ref).abs().max()))
                rel.append(_sample_rel(y, y_ref))
                if ref64 is not None:
                    a64 = tuple(a.double() if a.is_floating_point() else a for a in args)
                    k64 = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
                    y64 = ref64(*a64, **k64).sample
                    rel64.append(_sample_rel(y, y64))
                    fake64.append(_sample_rel(y_ref, y64))
    if fsc is not None:
        apply_step(ref, 0)
        apply_step(exported, 0)
    r = torch.cat(rel)
    out: dict[str, Any] = {
        "samples": len(r), "max_rel_error": float(r.max()), "median_rel_error": float(r.median()),
        "max_abs_error": max_abs, "sample_rtol": sample_rtol,
        "agree_fraction": float((r <= sample_rtol).double().mean()),
        "batches": batches, "batch_size": batch_size, "seed": seed,
        "steps_checked": [s for s in steps if s is not None]}
    if ref64 is not None:
        e, f = torch.cat(rel64), torch.cat(fake64)
        out["float64"] = {"exported_agree_fraction": float((e <= sample_rtol).double().mean()),
                          "fake_quant_agree_fraction": float((f <= sample_rtol).double().mean()),
                          "exported_max_rel_error": float(e.max()), "fake_quant_max_rel_error": float(f.max())}
    return out


def export(qdir: str | Path, backend: str, out: str | Path, device: torch.device | str = "cpu", strict: bool = False,
           check_batches: int = 2, check_batch_size: int = 4, seed: int = 0) -> dict[str, Any]:
    """Convert the quantized checkpoint QDIR for `backend`, check it, and write the folder `out` atomically.

    Args:
        qdir: a folder written by `gacq quantize`.
        backend: 'int8', 'w4a8', 'w4a16', 'fp8', 'w4fp8' (see `BACKENDS`) or 'auto' (`auto_backend`: the one that
            runs the checkpoint as calibrated with the fewest weight bytes; export.json records which).
        out: the exported folder (QDIR's files + export.json); must not be QDIR or inside it.
        device: where the check runs.
        strict: refuse layers the backend cannot run instead of leaving them on the dense path.
        check_batches, check_batch_size, seed: the random inputs of the agreement check.

    Returns:
        The contents of export.json. Raises GacqError, and writes nothing, when the exported model
        fails the backend's check against the fake-quant model (fewer than `min_agree` of the samples
        within `sample_rtol` of max |y|, or any beyond `max_rtol`; see `Backend`).
    """
    if backend != "auto":
        get_backend(backend)  # an unknown name fails before anything is loaded
    qdir, out = Path(qdir), Path(out)
    if not qdir.is_dir() or not is_quantized_folder(qdir):
        raise GacqError(f"{qdir} is not a quantized checkpoint (no quant_config.json); write one with `gacq quantize`")
    if out.resolve() == qdir.resolve() or qdir.resolve() in out.resolve().parents:
        raise GacqError(f"--out {out} is the checkpoint folder or inside it; export to a new folder")
    device = torch.device(device)
    ref, meta, sched = load_quantized(qdir)
    ref = ref.to(device).eval()
    if backend == "auto":
        backend = auto_backend(ref)
    b = get_backend(backend)
    t0 = time.time()
    model, report = convert(copy.deepcopy(ref), backend, strict)
    convert_s = time.time() - t0
    check = compare_outputs(ref, model, device, check_batches, check_batch_size, seed,
                            int(sched.get("num_train_timesteps", 1000)), b.sample_rtol)
    check.update(min_agree=b.min_agree, max_rtol=b.max_rtol, tolerance_note=b.tolerance_note)
    if check["agree_fraction"] < b.min_agree or not check["max_rel_error"] <= b.max_rtol:
        raise GacqError(
            f"the {backend} model does not match the fake-quant model on random inputs: "
            f"{check['agree_fraction']:.0%} of samples agree to {b.sample_rtol:g} of max |y| "
            f"(needed: {b.min_agree:.0%}), largest difference {check['max_rel_error']:.3g} of max |y| "
            f"(allowed: {b.max_rtol:g}); nothing was written")
    info = {"format_version": EXPORT_VERSION, "backend": backend, "description": b.description,
            "source": str(qdir), "quant": {k: meta.get(k) for k in ("config", "base_model") if k in meta},
            "report": report.to_dict(), "check": check, "convert_seconds": round(convert_s, 3),
            "device": str(device), "torch": torch.__version__, "commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_dir(out) as tmp:
        for entry in sorted(qdir.iterdir()):
            if entry.name == EXPORT_FILE:
                continue  # QDIR may itself be an exported folder
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_export_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / EXPORT_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise GacqError(f"{folder} is not an exported folder (no {EXPORT_FILE}); make one with `gacq export`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GacqError(f"{path} cannot be read: {e}") from e
    if info.get("format_version") != EXPORT_VERSION:
        raise GacqError(f"{path} has export format {info.get('format_version')}; this gacq reads {EXPORT_VERSION}")
    return info


def load_exported(folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The converted model of an exported folder, on `device`, in eval mode: `load_model(folder).model`, which
    converts an exported folder to its backend.

    TFMQ-DM per-step activation sets stay on `model.gacq_fsc`; `gacq.export.step_hook(model)` is the
    sampler's step hook for them (`load_model(folder).step_hook` is that hook).
    """
    from ..models import load_model

    read_export_info(folder)  # a folder that is no export is refused as such, not as some other model folder
    return load_model(folder, torch.device(device)).model


def check_converted(folder: str | Path, info: dict, report) -> None:
    """Refuse a conversion of an exported folder that converted other layers than its export did (another gacq
    version's rules): its outputs would not be the ones export checked against fake quant."""
    if report.converted != info["report"]["converted"]:
        raise GacqError(f"{folder} was exported with layers {info['report']['converted']}, this gacq converts "
                        f"{report.converted}; export it again")
