"""gacq: post-training quantization of diffusion models.

The public API (the CLI calls exactly these):

    from gacq import load_model, save_model, build_model, load_images
    from gacq import TrainConfig, train, SampleConfig, sample, generate
    from gacq import QuantConfig, ReconConfig, ActReconConfig, GACConfig, CalibDataConfig
    from gacq import quantize, quantize_to_dir, collect_calibration
    from gacq import evaluate, load_exported
    from gacq.export import export                             # `gacq export`; gacq.export is its package
    from gacq.compare import compare                           # `gacq compare`
    from gacq import diffusers_pipeline, follow_timesteps      # quantized models in diffusers pipelines

Every name is imported on first use, so `import gacq` does not import torch (nor do `gacq --help` and `gacq experiment
list`; the commands that load models or checkpoints still do).
"""

from importlib import import_module

from .errors import GacqError

__version__ = "0.1.0"

# name -> (module, attribute), imported by __getattr__ on first use: `import gacq`, `gacq --help` and `gacq experiment
# list` (recipe overrides included: the configs live in the torch-free `gacq.quant.config`) and `gacq report` do not
# import torch (0.8 s against 4 s on a 2-core CPU)
_LAZY = {
    "ImageDataset": (".data", "ImageDataset"),
    "load_images": (".data", "load_images"),
    "NAMED_CONFIGS": (".models", "NAMED_CONFIGS"),
    "LoadedModel": (".models", "LoadedModel"),
    "build_model": (".models", "build_model"),
    "bundled_model_path": (".models", "bundled_model_path"),
    "load_model": (".models", "load_model"),
    "save_model": (".models", "save_model"),
    "diffusers_pipeline": (".pipeline", "diffusers_pipeline"),
    "follow_timesteps": (".pipeline", "follow_timesteps"),
    "SampleConfig": (".sampling", "SampleConfig"),
    "generate": (".sampling", "generate"),
    "sample": (".sampling", "sample"),
    "TrainConfig": (".train", "TrainConfig"),
    "train": (".train", "train"),
    "QuantConfig": (".quant.config", "QuantConfig"),
    "quantize": (".quant.api", "quantize"),
    "quantize_to_dir": (".quant.api", "quantize_to_dir"),
    "ReconConfig": (".quant.config", "ReconConfig"),
    "ActReconConfig": (".quant.config", "ActReconConfig"),
    "GACConfig": (".quant.config", "GACConfig"),
    "CalibDataConfig": (".quant.config", "CalibDataConfig"),
    "CalibrationSet": (".quant.calib_data", "CalibrationSet"),
    "collect_calibration": (".quant.calib_data", "collect"),
    "evaluate": (".metrics", "evaluate"),
    "load_exported": (".export", "load_exported"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module, __name__), attr)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule not imported yet (`gacq.models` after a bare `import gacq`)
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'gacq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GacqError", "ImageDataset", "LoadedModel", "NAMED_CONFIGS", "SampleConfig", "TrainConfig",
    "build_model", "bundled_model_path", "diffusers_pipeline", "follow_timesteps", "generate", "load_images",
    "load_model", "sample", "save_model", "train", "__version__", *_LAZY,
]
