"""`export(QDIR, backend, OUT)` and `load_exported(OUT)`: exported folders on disk.

An exported folder is a copy of the quantized checkpoint (its packed integer weights are already
the low-bit storage) plus `export.json`: the backend, the conversion report, and the measured
agreement with the fake-quant model on random inputs next to the backend's tolerance (whole-model outputs,
and each exported layer on its fake-quant layer's inputs: `compare_outputs`, `check_failures`). Loading
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
from ..quant.wrap import quant_layers
from ..utils import atomic_dir, git_commit
from .base import ExportedLayer
from .convert import Backend, apply_step, auto_backend, convert, get_backend

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


class _LayerCheck:
    """Forward hooks on the fake-quant model's quantized layers that call the exported model's layer of the same name
    on the same input and keep the largest max |y - y_fake| / max |y_fake| of a call, per layer.

    Each exported layer sees exactly its fake-quant layer's input, so both compute the same activation codes and
    differ only by float rounding inside the layer: unlike the whole-model outputs, no rounding-boundary flip of an
    earlier layer's output reaches it. An exported layer that computes something else (a wrong grid, a dropped or
    stale activation quantizer, a per-step set not applied) shows here however deep the model is.
    """

    def __init__(self, ref: nn.Module, exported: nn.Module):
        self.worst: dict[str, float] = {}
        self.calls = 0
        self._handles = []
        for name, m in quant_layers(ref):
            try:
                ex = exported.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(ex, ExportedLayer):
                self._handles.append(m.register_forward_hook(self._hook(name, ex)))

    def _hook(self, name: str, ex: nn.Module):
        def hook(_m: nn.Module, inputs: tuple, y_ref: torch.Tensor) -> None:
            y = ex(*inputs)
            diff = float((y.double() - y_ref.double()).abs().max()) if y.numel() else 0.0
            scale = float(y_ref.double().abs().max()) if y_ref.numel() else 0.0
            rel = diff / scale if scale > 0 else (float("inf") if diff > 0 else 0.0)
            self.worst[name] = max(self.worst.get(name, 0.0), rel)
            self.calls += 1
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict[str, Any] | None:
        if not self.worst:
            return None
        name = max(self.worst, key=lambda n: self.worst[n])
        return {"layers": len(self.worst), "calls": self.calls, "max_rel_error": self.worst[name],
                "worst_layer": name}


@torch.no_grad()
def compare_outputs(ref: nn.Module, exported: nn.Module, device: torch.device | str = "cpu", batches: int = 2,
                    batch_size: int = 4, seed: int = 0, num_train_timesteps: int = 1000, sample_rtol: float = 1e-5,
                    float64: bool = True, layers: bool = True) -> dict[str, Any]:
    """How closely `exported` follows the fake-quant model `ref` on random inputs (float32, TF32 off).

    Per sample, rel = max |y - y_ref| / max |y_ref|. Returns the max and median rel, the largest
    absolute difference, and the fraction of samples with rel <= sample_rtol. With `float64`, a
    float64 copy of `ref` (the fake-quant computation without float32 rounding) is run too, and the
    same fraction is given for the exported model and for the float32 fake-quant model against it:
    where activation-quantizer rounding-boundary flips make samples differ, this shows which side
    is nearer to the exact computation. With TFMQ-DM per-step sets, every batch runs at the first,
    middle and last step's set, written into all models (the exported layers read the current grid).

    With `layers`, every exported layer is also checked on its own (`_LayerCheck`): called on the input its
    fake-quant layer gets in `ref`'s forward, its output's largest difference from that layer's, relative to the
    call's max |y|, is the entry "layers" ({"layers", "calls", "max_rel_error", "worst_layer"}; None where no layer
    of `exported` is an exported layer of the same name).
    """
    device = torch.device(device)
    fsc = getattr(ref, "gacq_fsc", None)
    steps = sorted({0, fsc.n_steps // 2, fsc.n_steps - 1}) if fsc is not None else [None]
    ref64 = copy.deepcopy(ref).double() if float64 else None  # before the hooks: a deep copy would copy them
    g = torch.Generator().manual_seed(seed)
    rel, rel64, fake64, max_abs = [], [], [], 0.0
    layer_check = _LayerCheck(ref, exported) if layers else None
    with _no_tf32(), contextlib.ExitStack() as stack:
        if layer_check is not None:
            stack.callback(layer_check.remove)
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
    if layer_check is not None:
        out["layers"] = layer_check.result()
    if ref64 is not None:
        e, f = torch.cat(rel64), torch.cat(fake64)
        out["float64"] = {"exported_agree_fraction": float((e <= sample_rtol).double().mean()),
                          "fake_quant_agree_fraction": float((f <= sample_rtol).double().mean()),
                          "exported_max_rel_error": float(e.max()), "fake_quant_max_rel_error": float(f.max())}
    return out


# check_failures: where the exported model does not agree with float32 fake quant sample by sample, it must be as
# faithful to the float64 fake-quant computation as float32 fake quant is: agreeing with it on no fewer samples, less
# AGREE_SLACK of them (at least one: one of the 8 samples of the default check), and no farther from it than
# FLIP_SLACK times
AGREE_SLACK = 0.125
FLIP_SLACK = 2.0


def check_failures(check: dict[str, Any], b: Backend) -> list[str]:
    """Why `compare_outputs`'s result `check` fails backend `b`'s acceptance (empty: it passes).

    - Layer check: every exported layer within `b.layer_rtol` of its fake-quant layer on the same inputs.
    - Whole model: no sample beyond `b.max_rtol`, and at least `b.min_agree` of the samples within `b.sample_rtol` of
      the float32 fake-quant output. That demand assumes float32 rounding rarely reaches an activation quantizer's
      rounding boundary, which holds in tiny models only: an ulp-level difference moves one input code by a step,
      and that step, carried through the next layers, moves many more. In the bundled CIFAR-10 UNet (W8A8) every
      sample gets such flips, so 0 of 8 samples agree, about 1% of max |y| apart, for the int8 model against fake
      quant and for float32 fake quant against its own float64 run alike (the tiny test models: about half). So
      where the samples do not agree, the exported model passes if it is as faithful to the float64 fake-quant run
      (the exact quantized computation) as the float32 fake-quant model: within `b.sample_rtol` of it on at least
      as many samples as the fake-quant model less `AGREE_SLACK` of them (at least one sample), and at most
      `FLIP_SLACK` times the fake-quant model's largest distance from it. Without a float64 entry the agreement
      itself is required.
    """
    fails = []
    lay = check.get("layers")
    if lay is not None and not lay["max_rel_error"] <= b.layer_rtol:
        fails.append(f"layer {lay['worst_layer']} differs from its fake-quant layer on the same inputs by "
                     f"{lay['max_rel_error']:.3g} of max |y| (allowed: {b.layer_rtol:g})")
    if not check["max_rel_error"] <= b.max_rtol:
        fails.append(f"largest difference {check['max_rel_error']:.3g} of max |y| (allowed: {b.max_rtol:g})")
    if check["agree_fraction"] < b.min_agree:
        agree = (f"{check['agree_fraction']:.0%} of samples agree to {b.sample_rtol:g} of max |y| "
                 f"(needed: {b.min_agree:.0%})")
        f64 = check.get("float64")
        if f64 is None:
            fails.append(agree)
        elif (f64["fake_quant_agree_fraction"] - f64["exported_agree_fraction"]) * check["samples"] \
                > max(AGREE_SLACK * check["samples"], 1) + 1e-9:
            fails.append(f"{agree}, and against the float64 fake-quant run {f64['exported_agree_fraction']:.0%} "
                         f"do, where {f64['fake_quant_agree_fraction']:.0%} of the float32 fake-quant model's do")
        elif not f64["exported_max_rel_error"] <= FLIP_SLACK * f64["fake_quant_max_rel_error"]:
            fails.append(f"{agree}, and the exported model is {f64['exported_max_rel_error']:.3g} of max |y| from "
                         f"the float64 fake-quant run, more than {FLIP_SLACK:g}x the float32 fake-quant model's "
                         f"{f64['fake_quant_max_rel_error']:.3g}")
    return fails


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
        fails the backend's check against the fake-quant model (`check_failures`: a layer beyond `layer_rtol`
        on the fake-quant model's own inputs, any sample beyond `max_rtol`, or fewer than `min_agree` of the
        samples within `sample_rtol` of max |y| where the exported model is also less faithful to the float64
        fake-quant run than float32 fake quant is; see `Backend`).
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
    check.update(min_agree=b.min_agree, max_rtol=b.max_rtol, layer_rtol=b.layer_rtol, agree_slack=AGREE_SLACK,
                 flip_slack=FLIP_SLACK, tolerance_note=b.tolerance_note)
    fails = check_failures(check, b)
    if fails:
        raise GacqError(f"the {backend} model does not match the fake-quant model on random inputs: "
                        f"{'; '.join(fails)}; nothing was written")
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
