"""gacq models in diffusers pipelines and other sampling loops.

A quantized model with per-step activation sets (TFMQ-DM's finite set calibration: methods `tfmq` and `gac`) must
have set k loaded before its k-th call. gacq's own sampler does that by step index (`LoadedModel.step_hook`). A
diffusers pipeline, or any loop of one's own, calls the model with a timestep only, and would otherwise run every step
on whichever set was loaded last. `follow_timesteps` installs a forward pre-hook that finds the call's timestep in the
schedule the sets were calibrated for and loads that step's set; a timestep outside that schedule is refused with an
error that names the schedule. `diffusers_pipeline` builds diffusers' own `DDIMPipeline` (or `DDPMPipeline`) around
a loaded model, with the scheduler it was calibrated for and the hook in place:

    >>> import gacq, torch
    >>> loaded = gacq.load_model("runs/gac-w4a8")                 # a `gacq quantize` folder
    >>> pipe = gacq.diffusers_pipeline(loaded)                    # DDIM, 100 steps, as calibrated
    >>> images = pipe(batch_size=8, num_inference_steps=100, generator=torch.Generator().manual_seed(0),
    ...               output_type="np").images

Models without per-step sets (rtn, ptq4dm, qdiffusion; float models) need no hook and sample with any schedule.
Only unconditional pixel-space UNets have such a diffusers pipeline; class- or text-conditioned and latent models
sample through `gacq.sample` / `gacq sample` (or a loop of one's own with `follow_timesteps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import GacqError
from .models import LoadedModel
from .sampling import SampleConfig, make_scheduler


def calibrated_sampler(model: nn.Module) -> SampleConfig | None:
    """The sampler (scheduler, steps, timestep spacing) a model's per-step activation sets belong to; None for a model
    without per-step sets."""
    fsc = getattr(model, "gacq_fsc", None)
    if fsc is None:
        return None
    keys = ("scheduler", "steps", "timestep_spacing")
    if not all(fsc.sampler.get(k) is not None for k in keys):
        raise GacqError("this model's per-step activation sets do not record the sampler they were calibrated for; "
                        "requantize it with this version of gacq")
    return SampleConfig(**{k: fsc.sampler[k] for k in keys})


class StepFollower:
    """Maps the timesteps of successive model calls to sampling-step indices of one schedule.

    A timestep that occurs once in the schedule is its step. One that occurs several times (the 'quad' spacing repeats
    t = 0) is the first of its steps after the previous call's step, or its first step when none is left (a new
    sampling run; a new run starts at the schedule's first timestep, which occurs once)."""

    def __init__(self, timesteps: list[int], description: str):
        self.positions: dict[int, list[int]] = {}
        for i, t in enumerate(timesteps):
            self.positions.setdefault(int(t), []).append(i)
        self.description = description
        self.last = -1

    def __call__(self, t: int) -> int:
        steps = self.positions.get(int(t))
        if steps is None:
            raise GacqError(
                f"the model was called at timestep {int(t)}, which is not a step of the schedule its per-step "
                f"activation sets were calibrated for ({self.description}); sample with that schedule (a diffusers "
                f"pipeline: num_inference_steps={len(self)}), or choose a step's set yourself with "
                "gacq.export.apply_step(model, step) after removing this hook (the handle follow_timesteps returned)")
        step = next((i for i in steps if i > self.last), steps[0])
        self.last = step
        return step

    def __len__(self) -> int:
        return sum(len(v) for v in self.positions.values())


def _call_timestep(args: tuple, kwargs: dict[str, Any]) -> int:
    """The one timestep of a denoiser call (UNet2DModel / UNet2DConditionModel: (sample, timestep, ...); DiT:
    timestep=...)."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
    if t is None:
        raise GacqError("the model was called without a timestep; per-step activation sets need one")
    if isinstance(t, torch.Tensor):
        values = torch.unique(t.detach().flatten().cpu())
        if values.numel() != 1:
            raise GacqError(f"one model call mixes {values.numel()} timesteps; a model with per-step activation "
                            "sets runs one sampling step per call (the same timestep for the whole batch)")
        t = values.item()
    if float(t) != int(t):
        raise GacqError(f"timestep {t} is not an integer; per-step activation sets belong to integer timesteps")
    return int(t)


def follow_timesteps(model: nn.Module, scheduler_config: dict[str, Any]):
    """Install a forward pre-hook on `model` that loads, before every call, the per-step activation set of the call's
    timestep (`StepFollower`), for use in loops other than gacq's own sampler (which sets steps by index and needs
    no hook). `scheduler_config`: the model's noise schedule (`LoadedModel.scheduler_config`), from which the
    calibrated sampler's timesteps are rebuilt. Returns the hook's handle (`handle.remove()` uninstalls it), or
    None when the model has no per-step sets. Installing again replaces the previous hook. Works on fake-quant and
    exported (`gacq export`) models alike."""
    from .export.convert import apply_step

    cfg = calibrated_sampler(model)
    old = getattr(model, "_gacq_step_follower", None)
    if old is not None:
        old.remove()
        model._gacq_step_follower = None
    if cfg is None:
        return None
    timesteps = [int(t) for t in make_scheduler(cfg, scheduler_config).timesteps]
    follower = StepFollower(timesteps, f"{cfg.scheduler}, {cfg.steps} steps, '{cfg.timestep_spacing}' spacing")

    def hook(module, args, kwargs):
        apply_step(module, follower(_call_timestep(args, kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    handle.follower = follower
    model._gacq_step_follower = handle
    return handle


def diffusers_pipeline(loaded: LoadedModel, cfg: SampleConfig | None = None):
    """diffusers' `DDIMPipeline` (DDIM with diffusers' spacings) or `DDPMPipeline` (the other schedulers, and DDIM
    with the 'quad' spacing, a gacq scheduler class) around `loaded.model`, with the scheduler of `cfg` on the model's
    noise schedule. `cfg` defaults to the sampler the model's per-step activation sets were calibrated for (and must
    match it: a different one is refused), else DDIM with 100 steps; only its scheduler, steps and timestep spacing
    are used. Call the pipeline with `num_inference_steps=cfg.steps` (and `eta=cfg.eta` for DDIM): the pipelines'
    defaults are 50 and 1,000 steps. A model with per-step sets gets `follow_timesteps`' hook.

    Only unconditional pixel-space `UNet2DModel`s have such a diffusers pipeline; other models raise GacqError.
    """
    from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel

    model = loaded.model
    if not isinstance(model, UNet2DModel) or loaded.vae is not None:
        kind = "a latent model" if loaded.vae is not None else f"a {type(model).__name__}"
        raise GacqError(f"gacq.diffusers_pipeline builds diffusers' DDIM / DDPM pipelines, which sample unconditional "
                        f"pixel-space UNet2DModels; this is {kind}. Sample it with gacq.sample (`gacq sample`), or in "
                        "a loop of your own with gacq.follow_timesteps(model, loaded.scheduler_config)")
    if model.config.num_class_embeds is not None or model.config.class_embed_type is not None:
        raise GacqError("gacq.diffusers_pipeline: this UNet2DModel is class-conditional, and diffusers' DDIM / DDPM "
                        "pipelines pass no class labels; sample it with gacq.sample (`gacq sample --class-label`)")
    calibrated = calibrated_sampler(model)
    cfg = cfg or calibrated or SampleConfig()
    if calibrated is not None:
        model.gacq_fsc.check_sampler(cfg)
    scheduler = make_scheduler(cfg, loaded.scheduler_config)
    if cfg.scheduler == "ddim" and cfg.timestep_spacing != "quad":
        pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=model, scheduler=scheduler)
    follow_timesteps(model, loaded.scheduler_config)
    return pipe


__all__ = ["StepFollower", "calibrated_sampler", "diffusers_pipeline", "follow_timesteps"]
