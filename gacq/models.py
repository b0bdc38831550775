"""Diffusers models in and out: named configs, safetensors-only loading, the bundled model.

A *model folder* is what `ModelMixin.save_pretrained` writes (config.json +
safetensors). A *pipeline folder* is what `DiffusionPipeline.save_pretrained`
writes (model_index.json, unet/ or transformer/, scheduler/). Both load with
`load_model`, as does a hub id (downloaded with huggingface_hub, safetensors
and JSON only). Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GacqError
from .model_paths import BUNDLED_MODEL_NAME, PICKLE_SUFFIXES, bundled_model_path, resolve_model_folder  # noqa: F401
from .utils import atomic_dir

log = logging.getLogger(__name__)


# The DDPM CIFAR-10 noise schedule (Ho et al. 2020): T=1000, linear betas 1e-4..0.02.
DDPM_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

_DDPM_CIFAR10_UNET: dict[str, Any] = {
    # The exact UNet2DModel config of google/ddpm-cifar10-32 (the pesser/Ho et al. DDPM
    # CIFAR-10 model used by Q-Diffusion, TFMQ-DM and the GAC paper): 35.7M parameters.
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "dropout": 0.1,
    "act_fn": "silu",
    "time_embedding_type": "positional",
}

_TINY: dict[str, Any] = {
    **_DDPM_CIFAR10_UNET,
    "sample_size": 16,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "dropout": 0.0,
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # Tests: 16x16, two levels, one attention level; about 30k parameters.
    "tiny": dict(_TINY),
    # Tests of the class-conditional paths: `tiny` with 2 classes + the null label, and a tiny DiT.
    "tiny-cond": {**_TINY, "num_class_embeds": 3},
    "tiny-dit": {"_class_name": "DiTTransformer2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 6,
                 "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
                 "num_embeds_ada_norm": 2, "norm_type": "ada_norm_zero", "dropout": 0.0},
    # The project's CIFAR-10 model: the DDPM layout at base 64 channels, 9.0M parameters.
    "small": {**_DDPM_CIFAR10_UNET, "block_out_channels": (64, 128, 128, 128)},
    "ddpm-cifar10": dict(_DDPM_CIFAR10_UNET),
    # Class-conditional CIFAR-10 UNet: `small` with a label embedding of 10 classes + the null label
    # (classifier-free guidance; see gacq.conditioning).
    "small-cond": {**_DDPM_CIFAR10_UNET, "block_out_channels": (64, 128, 128, 128), "num_class_embeds": 11},
    # A DiT-S/2-like class-conditional transformer on 32x32 pixels (256 tokens of 2x2 patches):
    # hidden 384 = 6 heads x 64, 12 blocks with adaLN-Zero, 10 classes (+ the null label).
    "dit-s": {"_class_name": "DiTTransformer2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
              "patch_size": 2, "num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12,
              "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero", "dropout": 0.0},
    # `dit-s` at half the depth (6 blocks, 17.8M parameters, 34 MiB in float16): small enough that a device call
    # carries it in beside the checkout and one 10-minute call quantizes and samples its cells
    # (experiments/dit-s6-cifar10.toml, scripts/gpu-dit-call.sh).
    "dit-s6": {"_class_name": "DiTTransformer2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
               "patch_size": 2, "num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 6,
               "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero", "dropout": 0.0},
    # The same design small enough to train on a CPU in half an hour (64 tokens of 4x4 patches, hidden 128 =
    # 4 heads x 32, 6 blocks, 2.1M parameters): the DiT whose activation ranges a CPU-only machine can measure.
    "dit-xs": {"_class_name": "DiTTransformer2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
               "patch_size": 4, "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 6,
               "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero", "dropout": 0.0},
    # A latent denoiser for `gacq train --vae` (the autoencoder sets its sample size and channels: 8x8x4 for `ae-f4`
    # on 32x32 images): two levels, attention at 4x4.
    "ldm-s": {**_DDPM_CIFAR10_UNET, "sample_size": 8, "in_channels": 4, "out_channels": 4,
              "block_out_channels": (64, 128), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
              "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
}

# Autoencoders (diffusers' AutoencoderKL) that `gacq train-autoencoder` trains for latent diffusion.
AE_CONFIGS: dict[str, dict[str, Any]] = {
    # Tests: 16x16 images -> 8x8x4 latents.
    "ae-tiny": {"sample_size": 16, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                "block_out_channels": (8, 16), "norm_num_groups": 4,
                "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2},
    # CIFAR-10: 32x32 images -> 8x8x4 latents (a factor of 4 per side, 12x fewer numbers).
    "ae-f4": {"sample_size": 32, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
              "block_out_channels": (64, 128, 128), "norm_num_groups": 32,
              "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3},
}


def build_autoencoder(config: str) -> torch.nn.Module:
    """A freshly initialised AutoencoderKL from a named config (AE_CONFIGS)."""
    from diffusers import AutoencoderKL

    if config not in AE_CONFIGS:
        raise GacqError(f"unknown autoencoder config {config!r}; choose one of {', '.join(AE_CONFIGS)}")
    return AutoencoderKL(**AE_CONFIGS[config])

# Model classes gacq knows how to load from a config's `_class_name`.
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
# Sub-folders of a pipeline folder that hold the denoiser, in order of preference.
DENOISER_SUBFOLDERS = ("unet", "transformer")
# ... and the autoencoder of a latent pipeline (LDMPipeline: vqvae; DiT / Stable Diffusion: vae).
AUTOENCODER_SUBFOLDERS = ("vae", "vqvae")
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")


@dataclass
class LoadedModel:
    """A denoiser together with the noise schedule it was trained with."""

    model: torch.nn.Module
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(DDPM_SCHEDULE))
    source: str = ""
    # step_hook(step_index, sample_config) runs before every model call of `gacq.generate`
    # (per-step activation parameters of TFMQ-DM's finite set calibration use it).
    step_hook: Any = None
    # latent diffusion: the autoencoder whose decoder turns sampled latents into images (never
    # quantized); None for pixel-space models.
    vae: Any = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (identity for pixel models). AutoencoderKL latents are
        divided by its `scaling_factor` first (DiTPipeline, Stable Diffusion); VQModel latents are
        decoded as they are (diffusers' LDMPipeline)."""
        if self.vae is None:
            return latents
        if type(self.vae).__name__ == "AutoencoderKL":
            latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).sample

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        cfg = self.model.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)


def build_model(config: str | dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised denoiser from a named config or a config dict (`_class_name` picks the
    diffusers class among MODEL_CLASSES; default UNet2DModel)."""
    import diffusers

    if isinstance(config, str):
        if config not in NAMED_CONFIGS:
            raise GacqError(f"unknown model config {config!r}; choose one of {', '.join(NAMED_CONFIGS)}")
        config = NAMED_CONFIGS[config]
    config = dict(config)
    cls = config.pop("_class_name", "UNet2DModel")
    if cls not in MODEL_CLASSES:
        raise GacqError(f"unsupported model class {cls!r}; choose one of {', '.join(MODEL_CLASSES)}")
    return getattr(diffusers, cls)(**config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _refuse_pickles(folder: Path) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise GacqError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); gacq never unpickles "
            "files, which can run arbitrary code. Convert them once, in an environment you trust, with "
            "`Model.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`."
        )
    raise GacqError(f"{folder} has a config but no .safetensors weights")


def _model_class(folder: Path):
    import diffusers

    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GacqError(f"{cfg_path} is not valid JSON: {e}") from e
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if name is None:
        raise GacqError(f"{cfg_path} has no _class_name: not a diffusers model config (gacq loads denoisers of "
                        f"type {', '.join(MODEL_CLASSES)}, saved with save_pretrained)")
    if name not in MODEL_CLASSES:
        raise GacqError(
            f"{cfg_path} describes a {name!r}; gacq loads denoisers of type {', '.join(MODEL_CLASSES)}"
        )
    return getattr(diffusers, name)


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    act_quant: bool = True,
) -> LoadedModel:
    """Load a denoiser and its noise schedule.

    Args:
        spec: a model folder, a pipeline folder, a quantized folder (from `gacq quantize`), a hub id,
            or None for the bundled model.
        device: where to put the model.
        dtype: the model's parameter dtype (weights stored in fp16 are upcast to fp32 by default).
        act_quant: for a quantized folder, False keeps its activations in float (weight-only
            inference of a W/A checkpoint); the source then says so.
    """
    folder, source = resolve_model_folder(spec)
    from .quant.checkpoint import is_quantized_folder, load_quantized

    if is_quantized_folder(folder):
        qmodel, _, sched_cfg = load_quantized(folder)
        vae = _load_autoencoder(folder / "vae", device) if (folder / "vae" / "config.json").exists() else None
        sched = {**DDPM_SCHEDULE, **{k: v for k, v in sched_cfg.items() if not k.startswith("_")}}
        qmodel = qmodel.to(device).eval()
        from .export.folder import EXPORT_FILE

        if (folder / EXPORT_FILE).exists():  # `gacq export`: run it on its backend, not as fake quant
            return _load_exported(folder, qmodel, sched, source, vae, act_quant)
        if not act_quant:
            from .quant.attention import set_attention_quant
            from .quant.wrap import set_quant_state

            set_quant_state(qmodel, weights=True, acts=False)
            set_attention_quant(qmodel, False)
            return LoadedModel(model=qmodel, scheduler_config=sched, source=f"{source} (activations float)", vae=vae)
        fsc = getattr(qmodel, "gacq_fsc", None)  # TFMQ-DM per-step activation sets
        return LoadedModel(model=qmodel, scheduler_config=sched, source=source,
                           step_hook=fsc.step_hook(qmodel) if fsc is not None else None, vae=vae)
    sched_file: Path | None = None
    vae = None
    if (folder / "model_index.json").exists():
        sub = next((folder / s for s in DENOISER_SUBFOLDERS if (folder / s / "config.json").exists()), None)
        if sub is None:
            raise GacqError(f"pipeline folder {folder} has no {' or '.join(DENOISER_SUBFOLDERS)}/config.json")
        ae = next((folder / s for s in AUTOENCODER_SUBFOLDERS if (folder / s / "config.json").exists()), None)
        if ae is not None:
            vae = _load_autoencoder(ae, device)
        sched_file = folder / "scheduler" / "scheduler_config.json"
        folder = sub
    elif not (folder / "config.json").exists():
        raise GacqError(f"{folder} is not a diffusers folder: no config.json or model_index.json in it")
    else:
        sched_file = folder / "scheduler_config.json"
    cls = _model_class(folder)
    _refuse_pickles(folder)
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise GacqError(f"could not load the model in {folder}: {e}") from e
    model.to(device).eval()
    sched = dict(DDPM_SCHEDULE)
    if sched_file is not None and sched_file.exists():
        sched.update({k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")})
    return LoadedModel(model=model, scheduler_config=sched, source=source, vae=vae)


def _load_exported(folder: Path, qmodel: torch.nn.Module, sched: dict, source: str, vae,
                   act_quant: bool) -> LoadedModel:
    """The quantized model of an exported folder, converted to the backend its export.json names, with the step
    hook that reaches exported layers (`gacq.export.load_exported` returns its model)."""
    from .export import convert_loaded, read_export_info
    from .export.folder import check_converted

    info = read_export_info(folder)
    if not act_quant:
        raise GacqError(f"{folder} is exported for the {info['backend']} backend, whose layers quantize their inputs; "
                        "for float activations sample the quantized checkpoint it was exported from with --float-acts")
    loaded, report = convert_loaded(LoadedModel(model=qmodel, scheduler_config=sched, source=source, vae=vae),
                                    info["backend"])
    check_converted(folder, info, report)
    return loaded


def _load_autoencoder(folder: Path, device) -> torch.nn.Module:
    """The autoencoder of a latent pipeline (AutoencoderKL or VQModel), safetensors only."""
    import diffusers

    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise GacqError(f"{folder / 'config.json'} is not valid JSON: {e}") from e
    if name not in AUTOENCODER_CLASSES:
        raise GacqError(f"{folder} holds a {name!r}; gacq decodes latents with {' or '.join(AUTOENCODER_CLASSES)}")
    _refuse_pickles(folder)
    try:
        vae = getattr(diffusers, name).from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise GacqError(f"could not load the autoencoder in {folder}: {e}") from e
    return vae.to(device).eval()


def save_model(
    model: torch.nn.Module,
    out: str | os.PathLike,
    scheduler_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "10GB",
    vae: torch.nn.Module | None = None,
) -> Path:
    """Save as a diffusers DDPM pipeline folder (model_index.json, unet/, scheduler/), atomically.

    The folder loads back with `load_model` and with `diffusers.DDPMPipeline.from_pretrained`. With `vae` (a
    latent denoiser's AutoencoderKL or VQModel) the autoencoder is saved as vae/ and listed in model_index.json.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(**{**DDPM_SCHEDULE, **(scheduler_config or {})})
    out = Path(out)
    if dtype is not None:
        import copy

        model = copy.deepcopy(model).to(dtype)
    with atomic_dir(out) as tmp:
        pipe = DDPMPipeline(unet=model, scheduler=sched)
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if vae is not None:  # a latent model: the decoder beside the denoiser (load_model finds vae/)
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
            index = json.loads((tmp / "model_index.json").read_text())
            index["vae"] = ["diffusers", type(vae).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
