"""`quantize`: one entry point from a float model, a QuantConfig and calibration data to a quantized model.

The pipeline (each step only where the method's recipe asks for it, see `methods.py`):
wrap layers -> split shortcuts -> attention quantizers -> weight grid init -> temporal block
reconstruction (TFMQ-DM) -> block reconstruction of the weights -> activations (min-max ranges,
learned step sizes, or per-step sets).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import GacqError
from ..models import LoadedModel
from ..utils import atomic_path
from .calib_data import CalibrationSet
from .config import ActReconConfig, CalibDataConfig, GACConfig, QuantConfig, ReconConfig
from .gac import make_gac_weight_fn
from .methods import MethodSpec, float_input_layers, float_layers
from .recon import append_recon_log, load_resume_point, logged_peak, reconstruct_model, save_resume_point
from .modules import QUANT_CLASSES
from .wrap import init_act_quantizers_minmax, observe_input_ranges, quant_layers, set_quant_state, wrap_layers


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _weight_subset(calib: CalibrationSet, spec: MethodSpec, n_steps: int) -> CalibrationSet:
    """TFMQ-DM reconstructs weights on every `steps // n_steps`-th step of its all-steps set:
    the uniform selection of the same trajectories."""
    if spec.calib_selection != "all":
        return calib
    from .calib_data import select_from_all

    sel = calib.meta.get("selection", {})
    cfg = CalibDataConfig(selection="uniform", n_trajectories=int(sel.get("n_trajectories", 1)),
                          n_steps=n_steps, seed=sel.get("seed", 0))
    return select_from_all(calib, cfg)


def _fit_selection(calib: CalibrationSet, config: "QuantConfig", num_train_timesteps: int) -> CalibrationSet:
    """An all-steps set is cut into the recipe's selection (the same trajectories); another
    selection than the recipe's is refused."""
    spec = config.spec()
    got = calib.meta.get("selection", {}).get("selection")
    if got == "all" and spec.calib_selection != "all":
        from .calib_data import select_from_all

        sel = calib.meta["selection"]
        cfg = config.calib_config()
        cfg = CalibDataConfig(**{**asdict(cfg), "n_trajectories": int(sel["n_trajectories"]), "seed": sel.get("seed", 0)})
        return select_from_all(calib, cfg, num_train_timesteps)
    if got is not None and got != spec.calib_selection:
        raise GacqError(f"method {spec.name} ({spec.preset}) calibrates on '{spec.calib_selection}' timesteps, "
                        f"but the calibration set was collected with '{got}'; collect one with "
                        f"`gacq calib --selection {spec.calib_selection}` (or all) or omit --calib")
    return calib


def quantize(loaded: LoadedModel, config: QuantConfig, calib: CalibrationSet | None = None,
             device: torch.device | str = "cpu", progress: bool = True) -> torch.nn.Module:
    """Return a quantized copy of `loaded.model` (the float model is left as it was).

    Needs `calib` (model inputs x_t, timesteps t, sampling-step indices) for any reconstruction
    and for activation quantization; weight-only round-to-nearest does not.
    """
    spec = config.spec()
    device = torch.device(device)
    abits = config.abits
    needs_calib = config.needs_calibration()
    if needs_calib and (calib is None or len(calib) == 0):
        raise GacqError(f"{spec.name}{' with bias correction' if config.bias_correction else ''} needs calibration "
                        "data (run `gacq calib`, or pass --abits 32 for rtn without --bias-correction)")
    if calib is not None:
        calib = _fit_selection(calib, config, int(loaded.scheduler_config.get("num_train_timesteps", 1000)))
    model = copy.deepcopy(loaded.model).to(device).eval()

    # 1. which layers, at which bits
    skip_names = float_layers(model, spec.skip_fn)
    eight = set(spec.eight_bit)
    skip = lambda n, m: _match(n, spec.skip) or n in skip_names or _match(n, eight)  # noqa: E731
    dynamic = config.act_granularity == "token"  # Linear inputs per token
    w8 = _w8_names([n for n, m in model.named_modules() if type(m) in QUANT_CLASSES and not skip(n, m)],
                   config.w8_layers)
    wrap_layers(model, config.wbits, abits, skip=lambda n, m: skip(n, m) or n in w8, a_symmetric=spec.a_symmetric,
                dynamic=dynamic, fmt=config.fmt, afmt=config.act_fmt)
    if w8:
        wrap_layers(model, 8, abits, skip=lambda n, m: n not in w8, a_symmetric=spec.a_symmetric, dynamic=dynamic,
                    afmt=config.act_fmt)
    if eight:
        wrap_layers(model, 8, 8 if abits is not None else None, skip=lambda n, m: not _match(n, eight),
                    a_symmetric=spec.a_symmetric, dynamic=dynamic, fmt=config.fmt, afmt=config.act_fmt)
    float_inputs = float_input_layers(model, spec.act_skip_fn)
    for name, m in quant_layers(model):
        if name in float_inputs:
            m.act_quantizer = None
    if spec.split_shortcuts:
        from .wrap import apply_shortcut_splits, find_shortcut_splits

        splits = {n: k for n, k in find_shortcut_splits(model).items() if n in dict(quant_layers(model))}
        apply_shortcut_splits(model, splits)
    if spec.attn_quant and abits is not None:
        from .attention import install_attention_quantizers

        install_attention_quantizers(model, abits, softmax_bits=spec.softmax_bits, symmetric=spec.a_symmetric,
                                     softmax_mode="symmetric" if spec.a_symmetric else "zero")
    model.to(device)  # the quantizers created above start on the CPU
    if config.smooth is not None:
        _smooth(model, calib, config, device)
    for _, m in quant_layers(model):
        m.init_weight(spec.weight_init)
    set_quant_state(model, weights=True, acts=False)

    fp = loaded.model
    if needs_calib and next(fp.parameters()).device != device:
        fp = copy.deepcopy(fp).to(device)  # leave the caller's model where it is
    fp = fp.eval()
    ckpt = Path(config.recon_checkpoints) if config.recon_checkpoints else None
    # what resume points must find again: the settings (not where the points live: a later device call may find them
    # under another path), the model and the calibration samples (another device call collects the set again from
    # the same seed); hashed only where there are resume points
    fingerprint = {"quant": {k: v for k, v in config.to_json().items()
                             if k not in ("recon", "act_recon", "recon_checkpoints")},
                   "model": loaded.source,
                   "calibration_sha256": calib.digest() if calib is not None and ckpt is not None else None}
    wcal = _weight_subset(calib, spec, config.calib.n_steps) if calib is not None else None

    # 2. TFMQ-DM temporal information block
    if spec.tib:
        _run_tib(model, fp, wcal, config, ckpt, device, progress)
    # 3. weights (GAC: with learned per-sample loss weights)
    weight_fn = _gac_weight_fn(model, wcal, config, ckpt, device) if spec.gac else None
    if spec.weight_recon:
        reconstruct_model(model, fp, wcal.x, wcal.t, config.recon, ckpt_dir=ckpt, device=device,
                          fingerprint=fingerprint, progress=progress, weight_fn=weight_fn, cond=wcal.cond)
    # 4. activations
    if abits is not None:
        _calibrate_acts(model, fp, calib, wcal, spec, config, ckpt, fingerprint, device, progress)
    # 5. output bias correction (on the whole calibration set, per-step activation sets applied)
    if config.bias_correction:
        from .bias_correction import correct_output_bias

        correct_output_bias(model, fp, calib, config.calib_batch_size, device, progress)
    # how many calibration samples the recipe used (its selection cut out of `calib`), for the checkpoint's record
    model.gacq_calibration_samples = None if calib is None else len(calib)
    return model


def _w8_names(cand: list[str], patterns) -> set[str]:
    """The layers among `cand` (those the recipe quantizes to low bits) that `patterns` (QuantConfig.w8_layers) raise
    to 8-bit weights; every pattern must match one."""
    names = set()
    for p in patterns or ():
        hit = {n for n in cand if _match(n, (p,))}
        if not hit:
            raise GacqError(f"--w8-layer {p!r} matches none of the {len(cand)} layers this recipe quantizes to "
                            f"low bits; their names look like {', '.join(cand[:3])}")
        names |= hit
    return names


def _calib_batches(src: CalibrationSet, idx: torch.Tensor, bs: int, device) -> list[tuple]:
    """The (x, t, cond) batches of `bs` samples of `src` at `idx`, on `device`, for `model_forward`."""
    from ..conditioning import slice_cond

    return [(src.x[idx[i:i + bs]].to(device), src.t[idx[i:i + bs]].to(device),
             slice_cond(src.cond, idx[i:i + bs], device)) for i in range(0, len(idx), bs)]


def _smooth(model, calib: CalibrationSet, config: "QuantConfig", device) -> None:
    """SmoothQuant's per-channel migration on up to `config.smooth_samples` calibration samples (seeded)."""
    from ..conditioning import model_forward
    from .smooth import smooth_model

    n = min(len(calib), config.smooth_samples)
    idx = torch.randperm(len(calib), generator=torch.Generator().manual_seed(config.recon.seed))[:n]
    batches = _calib_batches(calib, idx, config.calib_batch_size, device)
    spread = smooth_model(model, batches, model_forward, config.smooth, config.smooth_layers)
    model.gacq_smoothed = {"alpha": config.smooth, "samples": n, "layers": len(spread),
                           "max_scale_spread": round(max(spread.values()), 3) if spread else None}


def _gac_weight_fn(model, wcal, config, ckpt, device):
    """GAC's weight_fn; the learned weights of every block go to `model.gacq_gac_weights` (saved
    with the checkpoint) and, with resume points, to ckpt/gac/<block>.safetensors."""
    store: dict = {}
    model.gacq_gac_weights = store
    model.gacq_gac_samples = {"sampling_step": wcal.step, "timestep": wcal.t}  # saved beside the weights
    if ckpt is not None and (ckpt / "gac").is_dir():
        for f in sorted((ckpt / "gac").glob("*.safetensors")):
            store[f.stem] = {"weights": load_file(str(f))["weights"]}
    fn = make_gac_weight_fn(wcal.step, config.gac, device, store, cuda_graph=config.recon.cuda_graph)
    if fn is None:
        return None

    def weight_fn(name, unit, args, kwargs, target):
        from .. import distributed as gdist

        w = fn(name, unit, args, kwargs, target)  # every data-parallel rank learns the same weights
        if ckpt is not None and gdist.rank() == 0:
            (ckpt / "gac").mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt / "gac" / f"{name}.safetensors") as tmp:
                save_file({"weights": w.contiguous()}, str(tmp))
        return w

    return weight_fn


def _run_tib(model, fp, wcal, config, ckpt, device, progress) -> None:
    from .tfmq import TIB, freeze_tib, reconstruct_tib

    path = ckpt / "tib.safetensors" if ckpt is not None else None
    names = {id(m): n for n, m in model.named_modules()}
    if path is not None and path.exists():
        layers = TIB(model).layers()
        for m in layers:
            m.enable_adaround().harden()
        load_resume_point(path, [(names[id(m)] + ".", m) for m in layers], device)
        freeze_tib(model)
        return
    from .. import distributed as gdist

    stats = reconstruct_tib(model, fp, wcal.t, config.recon, device=device, progress=progress,
                            labels=wcal.cond.get("class_labels"))
    gdist.barrier("temporal-block reconstruction")
    if path is not None and gdist.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_resume_point(path, [(names[id(m)] + ".", m) for m in TIB(model).layers()])
        append_recon_log(path.parent, {"index": -1, "stage": "tib", **stats}, device)


def _calibrate_acts(model, fp, calib, wcal, spec, config, ckpt, fingerprint, device, progress) -> None:
    bs = config.calib_batch_size
    if spec.act_mode == "fsc":
        from .fsc import static_act_layers, finite_set_calibration

        if not static_act_layers(model):  # every quantized input is dynamic per token: no stored grid to calibrate
            set_quant_state(model, weights=True, acts=True)
            return
        sampler = calib.meta.get("sampler", {})
        params = finite_set_calibration(model, calib.x, calib.t, calib.step, sampler, config.fsc_momentum,
                                        config.fsc_batch_size, config.recon.seed, device, progress, cond=calib.cond)
        params.apply(model, 0)
        model.gacq_fsc = params
        set_quant_state(model, weights=True, acts=True)
        return
    src = wcal if spec.act_mode == "lsq" else calib
    idx = torch.arange(len(src))
    if spec.act_init_samples is not None and spec.act_init_samples < len(src):
        g = torch.Generator().manual_seed(config.recon.seed)
        idx = torch.randperm(len(src), generator=g)[: spec.act_init_samples]
    from ..conditioning import model_forward

    batches = _calib_batches(src, idx, bs, device)
    forward = model_forward  # forward(model, x, t, cond) over the (x, t, cond) batches
    ranges = observe_input_ranges(model, batches, forward)
    init_act_quantizers_minmax(model, ranges)
    if spec.attn_quant:
        from .attention import init_attention_quantizers

        init_attention_quantizers(model, batches, forward)
    if spec.act_mode == "lsq":
        reconstruct_model(model, fp, wcal.x, wcal.t, config.act_recon, ckpt_dir=ckpt, device=device,
                          fingerprint=fingerprint, progress=progress, stage="acts", cond=wcal.cond)
    set_quant_state(model, weights=True, acts=True)
    if spec.attn_quant:
        from .attention import set_attention_quant

        set_attention_quant(model, True)


def _earlier_runs_seconds(ckpt: Path, t0: float) -> list[float]:
    """Wall seconds of the earlier, killed runs that left resume points in `ckpt` (each counted from its start to
    the last file it wrote there: work after its last resume point was lost and is done again, and counted, by a
    later run), and this run's start noted for the next one. `ckpt/wall_runs.json` holds the runs' starts."""
    import os

    from ..utils import write_json

    path = ckpt / "wall_runs.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    starts = [r["start"] for r in runs] + [t0]
    mtimes = [f.stat().st_mtime for f in ckpt.rglob("*") if f.is_file() and f != path] if ckpt.is_dir() else []
    for i, r in enumerate(runs):
        if "seconds" not in r:  # the last file it wrote, before the next run began
            mine = [m for m in mtimes if starts[i] <= m < starts[i + 1]]
            r["seconds"] = round(max(mine) - r["start"], 2) if mine else 0.0
    os.makedirs(ckpt, exist_ok=True)
    write_json(path, runs + [{"start": t0}])
    return [r["seconds"] for r in runs]


def quantize_to_dir(loaded: LoadedModel, config: QuantConfig, out: str | Path, calib: str | Path | None = None,
                    sample_cfg=None, save_calib: str | Path | None = None, device: torch.device | str = "cpu",
                    extra_meta: dict | None = None, progress: bool = True) -> dict:
    """Quantize `loaded` and write the checkpoint folder `out` (what `gacq quantize` does).

    `calib`: a calibration folder from `gacq calib`; without one, the recipe's set is collected
    along `sample_cfg` trajectories (and kept in `save_calib` when given). A killed run resumes
    from `config.recon_checkpoints`; when the checkpoint is written, the per-unit losses
    (`recon_log.jsonl`) are kept in `out` and the resume folder is removed. Returns the metadata
    stored in the checkpoint (config, commit, wall seconds, peak GPU memory on CUDA).

    Under a torch.distributed group (torchrun / `gacq quantize --gpus N`) every rank runs the same
    pipeline; reconstruction steps split each minibatch over the ranks and sum their gradients
    (`gacq.quant.recon.optimise`), and rank 0 alone writes files.
    """
    import shutil
    import time

    from .. import distributed as gdist
    from ..sampling import SampleConfig
    from ..utils import git_commit
    from .calib_data import collect
    from .checkpoint import save_quantized

    t0 = time.time()
    device = torch.device(device)
    progress = progress and gdist.rank() == 0  # one set of progress bars in data-parallel runs
    earlier = _earlier_runs_seconds(Path(config.recon_checkpoints), t0) \
        if config.recon_checkpoints and gdist.rank() == 0 else []
    cs = None
    if config.needs_calibration():
        if calib is not None:
            cs = CalibrationSet.load(calib)
        else:
            cs = collect(loaded, sample_cfg or SampleConfig(), config.calib_config(), device=device)
            if save_calib is not None and gdist.rank() == 0:
                cs.save(save_calib)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    qmodel = quantize(loaded, config, cs, device=device, progress=progress)
    this_run = round(time.time() - t0, 2)
    meta = {"config": config.to_json(), "base_model": loaded.source, "commit": git_commit(),
            **(extra_meta or {}),
            "calibration": str(calib) if calib is not None else "collected",
            "calibration_meta": cs.meta if cs is not None else None,
            "calibration_samples": getattr(qmodel, "gacq_calibration_samples", None),
            **({"smoothing": qmodel.gacq_smoothed} if getattr(qmodel, "gacq_smoothed", None) else {}),
            "wall_seconds": round(this_run + sum(earlier), 2)}
    if earlier:  # resumed: the total above counts the killed runs up to their last resume points
        meta["wall_seconds_runs"] = [*earlier, this_run]
    if device.type == "cuda":
        meta["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        if earlier:  # the earlier runs' peaks, as far as their resume points logged them
            logged, complete = logged_peak(Path(config.recon_checkpoints))
            meta["peak_gpu_memory_bytes"] = max(meta["peak_gpu_memory_bytes"], logged)
            meta["peak_gpu_memory_of"] = "all runs" if complete else "last run"
    out = Path(out)
    meta["world_size"] = gdist.world_size()
    gdist.barrier("quantization")
    if gdist.rank() == 0:
        save_quantized(qmodel, out, meta, dict(loaded.model.config), loaded.scheduler_config, vae=loaded.vae)
        if config.recon_checkpoints and Path(config.recon_checkpoints).exists():
            log = Path(config.recon_checkpoints) / "recon_log.jsonl"
            if log.exists():  # per-unit losses before/after (and loss curves) stay with the checkpoint
                shutil.copyfile(log, out / "recon_log.jsonl")
            shutil.rmtree(config.recon_checkpoints)  # finished: per-unit resume points are no longer needed
    gdist.barrier("writing the checkpoint")
    return meta


def config_from_json(c: dict) -> QuantConfig:
    """The QuantConfig a checkpoint's quant_config.json records (`QuantConfig.to_json`); fields a
    checkpoint of an older gacq lacks take today's defaults."""
    try:
        return QuantConfig(
            method=c["method"], preset=c["preset"], wbits=c["wbits"], abits=c["abits"],
            weight_init=c.get("weight_init"), a_symmetric=c.get("a_symmetric"),
            act_mode=c.get("act_mode"), split_shortcuts=c.get("split_shortcuts"),
            skip=None if c.get("skip") is None else tuple(c["skip"]),
            calib=CalibDataConfig(**c["calib"]), calib_batch_size=c.get("calib_batch_size", 64),
            recon=ReconConfig(**c["recon"]), act_recon=ActReconConfig(**c["act_recon"]),
            fsc_momentum=c.get("fsc_momentum", 0.95), fsc_batch_size=c.get("fsc_batch_size", 16),
            gac=GACConfig(**c.get("gac", {})), recon_checkpoints=c.get("recon_checkpoints"),
            bias_correction=c.get("bias_correction", False), smooth=c.get("smooth"),
            smooth_layers=None if c.get("smooth_layers") is None else tuple(c["smooth_layers"]),
            smooth_samples=c.get("smooth_samples", 256), act_granularity=c.get("act_granularity", "tensor"),
            w8_layers=None if c.get("w8_layers") is None else tuple(c["w8_layers"]), fmt=c.get("fmt", "int"),
            act_fmt=c.get("act_fmt"))
    except (KeyError, TypeError) as e:
        raise GacqError(f"a quantization config this gacq cannot read ({type(e).__name__}: {e}); the checkpoint "
                        "comes from another gacq version: quantize again") from e


def bias_correct_checkpoint(qdir: str | Path, out: str | Path, fp: LoadedModel, calib: str | Path,
                            device: torch.device | str = "cpu", extra_meta: dict | None = None,
                            progress: bool = True) -> dict:
    """Write `out`: the quantized checkpoint `qdir` with output bias correction added
    (`gacq.quant.bias_correction`), measured on the calibration folder `calib` exactly as
    `quantize(..., bias_correction=True)` would have (same selection of the set), without
    quantizing again. Returns the new checkpoint's metadata; `quantize_seconds_of_base` keeps the
    base checkpoint's cost, `wall_seconds` is the correction's."""
    import dataclasses
    import time

    from ..models import load_model
    from .bias_correction import correct_output_bias

    t0 = time.time()
    qdir, out, device = Path(qdir), Path(out), torch.device(device)
    base_meta = json.loads((qdir / "quant_config.json").read_text())
    c = dict(base_meta["config"])
    if c.get("bias_correction"):
        raise GacqError(f"{qdir} is already bias-corrected")
    config = dataclasses.replace(config_from_json(c), bias_correction=True)
    q = load_model(qdir, device=device)
    cs = _fit_selection(CalibrationSet.load(calib), config, int(q.scheduler_config.get("num_train_timesteps", 1000)))
    fp_model = fp.model if next(fp.model.parameters()).device == device else copy.deepcopy(fp.model).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    correct_output_bias(q.model, fp_model.eval(), cs, config.calib_batch_size, device, progress)
    peak = {"peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated(device))} if device.type == "cuda" else {}
    meta = {"bias_corrected_from": {"checkpoint": qdir.name, "commit": base_meta.get("commit"),
                                    "calibration": str(calib)},
            **(extra_meta or {}), "wall_seconds": round(time.time() - t0, 2), **peak}
    return _save_derived(q, qdir, out, base_meta, config, meta)


def _save_derived(q: LoadedModel, qdir: Path, out: Path, base_meta: dict, config: QuantConfig, meta: dict) -> dict:
    """Write `out`, a checkpoint derived from `qdir` (whose metadata is `base_meta`) without quantizing again: the
    changed model `q.model` under `config`, `meta` added to what the base recorded of its making; the base's GAC
    weights and reconstruction log go along unchanged. Returns the new checkpoint's metadata."""
    import shutil

    from ..utils import git_commit
    from .checkpoint import save_quantized

    gac_file = qdir / "gac_weights.safetensors"
    if gac_file.exists():  # carried over unchanged
        from .checkpoint import load_gac_weights

        gw, samples = load_gac_weights(gac_file)
        q.model.gacq_gac_weights = {n: {"weights": w} for n, w in gw.items()}
        q.model.gacq_gac_samples = samples
    keep = {k: v for k, v in base_meta.items()
            if k not in ("format_version", "diffusers", "torch", "layers", "attention", "fsc", "gac_weights",
                         "output_bias", "config", "wall_seconds", "peak_gpu_memory_bytes", "commit")}
    meta = {**keep, "config": config.to_json(), "commit": git_commit(),
            "quantize_seconds_of_base": base_meta.get("wall_seconds"),
            "peak_gpu_memory_bytes_of_base": base_meta.get("peak_gpu_memory_bytes"), **meta}
    mcfg = json.loads((qdir / "model_config.json").read_text())["model"]
    save_quantized(q.model, out, meta, {k: v for k, v in mcfg.items() if k != "_class_name"}, q.scheduler_config,
                   vae=q.vae)
    if (qdir / "recon_log.jsonl").exists():
        shutil.copyfile(qdir / "recon_log.jsonl", out / "recon_log.jsonl")
    return meta


def set_w8_layers(q_model: torch.nn.Module, fp_model: torch.nn.Module, names, weight_init: str = "mse") -> dict:
    """Give the quantized layers `names` of `q_model` 8-bit weights, in place: each takes `fp_model`'s weight of the
    same name, rounded to nearest on an 8-bit per-channel grid searched by `weight_init` ('mse' or 'minmax'), and
    keeps its input quantizer (calibrated grid, per-step sets) and bias. Returns {name: the replaced layer}; setting
    those back undoes it."""
    layers = dict(quant_layers(q_model))
    old = {}
    for name in sorted(names):
        m = layers.get(name)
        if m is None:
            raise GacqError(f"{name} is not a quantized layer of the model")
        if m.split or m.smooth is not None:
            raise GacqError(f"layer {name} is {'split' if m.split else 'smoothed'}; 8-bit weights after the fact "
                            "handle plain layers only: quantize with w8_layers from scratch instead")
        try:
            layer = fp_model.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) not in QUANT_CLASSES or tuple(layer.weight.shape) != tuple(m.weight.shape):
            raise GacqError(f"the float model has no layer {name} of shape {tuple(m.weight.shape)}; pass the model "
                            "the checkpoint was quantized from")
        new = QUANT_CLASSES[type(layer)](layer, 8, m.abits, a_dynamic=m.a_dynamic).to(m.weight.device)
        new.act_quantizer, new.bias = m.act_quantizer, m.bias  # calibrated input grid; a corrected bias stays
        new.init_weight(weight_init)
        new.w_quant, new.a_quant = True, m.a_quant
        q_model.set_submodule(name, new)
        old[name] = m
    return old


def w8_checkpoint(qdir: str | Path, out: str | Path, fp: LoadedModel, patterns, device: torch.device | str = "cpu",
                  extra_meta: dict | None = None) -> dict:
    """Write `out`: the quantized checkpoint `qdir` with the layers that `patterns` match (fnmatch, as
    `QuantConfig.w8_layers`) at 8-bit weights. Each such layer takes the float model's weight, rounded to nearest
    on an 8-bit per-channel grid searched as the recipe's weight init searches; its input grid (and per-step input
    sets) stay. Every other layer stays exactly as in `qdir`.

    Mixed precision after the fact: no calibration data, no reconstruction. Quantizing with `w8_layers` from
    scratch differs in that the 8-bit layers' rounding is learned with the rest of their block (AdaRound), and the
    other layers of that block adapt to them. Returns the new checkpoint's metadata; `w8_from` names the base."""
    import dataclasses
    import time

    from ..models import load_model

    t0 = time.time()
    qdir, out, device = Path(qdir), Path(out), torch.device(device)
    base_meta = json.loads((qdir / "quant_config.json").read_text())
    c = dict(base_meta["config"])
    if c.get("w8_layers"):
        raise GacqError(f"{qdir} already has 8-bit layers ({', '.join(c['w8_layers'])}); derive from its base "
                        "checkpoint instead")
    config = dataclasses.replace(config_from_json(c), w8_layers=tuple(patterns))
    q = load_model(qdir, device=device)
    layers = dict(quant_layers(q.model))
    names = _w8_names([n for n, m in layers.items() if m.wbits < 8], config.w8_layers)
    init = config.spec().weight_init
    set_w8_layers(q.model, fp.model, names, init)
    meta = {"w8_from": {"checkpoint": qdir.name, "commit": base_meta.get("commit"), "layers": sorted(names),
                        "rounding": f"nearest on the {init} grid"},
            **(extra_meta or {}), "wall_seconds": round(time.time() - t0, 2)}
    return _save_derived(q, qdir, out, base_meta, config, meta)
