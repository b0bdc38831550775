"""gacq: post-training quantization of diffusion models.

The public API (the CLI calls exactly these):

    from gacq import load_model, save_model, build_model, load_images
    from gacq import TrainConfig, train, SampleConfig, sample, generate
"""

from .data import ImageDataset, load_images
from .errors import GacqError
from .models import NAMED_CONFIGS, LoadedModel, build_model, bundled_model_path, load_model, save_model
from .sampling import SampleConfig, generate, sample
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "GacqError", "ImageDataset", "LoadedModel", "NAMED_CONFIGS", "SampleConfig", "TrainConfig",
    "build_model", "bundled_model_path", "generate", "load_images", "load_model", "sample", "save_model",
    "train", "__version__",
]
