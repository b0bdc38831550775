"""Feature networks for the sample metrics, behind one interface.

`get_feature_extractor("cifar10" | "inception", ...)` gives a callable that maps a uint8
N x H x W x 3 batch to the taps every metric needs: `pool` (FID, precision/recall),
`spatial` (sFID) and `logits` (Inception Score). Each extractor has a name and a hash of
its weights, written next to every figure it produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import GacqError
from ..utils import file_sha256, resolve_device
from .stats import FeatureStats, StatsAccumulator

FEATURE_NAMES = ("cifar10", "inception")
FEATURE_NOTES = {
    "cifar10": "gacq's own CIFAR-10 ResNet-9 features: comparable only with figures from the same "
               "feature hash, never with published (Inception) FID",
    "inception": "FID Inception-v3 (TF 2015-12-05 graph) with the weights file given",
}


@dataclass
class FeatureExtractor:
    name: str
    hash: str
    net: torch.nn.Module
    device: torch.device
    input_size: int | None  # required image size (None: any size, resized inside)
    float_input: bool  # the net takes float [0, 1] instead of uint8

    @property
    def note(self) -> str:
        return FEATURE_NOTES[self.name]

    def check(self, images: np.ndarray, source: str) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise GacqError(f"{source}: expected uint8 images N x H x W x C, got {images.dtype} {images.shape}")
        if images.shape[3] != 3:
            raise GacqError(f"{source}: the {self.name} feature network needs RGB images, these have "
                            f"{images.shape[3]} channel(s); convert them to RGB first")
        if self.input_size is not None and images.shape[1:3] != (self.input_size, self.input_size):
            raise GacqError(f"{source}: the {self.name} feature network needs {self.input_size}x{self.input_size} "
                            f"images, these are {images.shape[1]}x{images.shape[2]}; resize them or use "
                            "--features inception")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        if self.float_input:
            x = x.float() / 255
        taps = self.net.features(x)
        return {k: v.double().cpu().numpy() for k, v in taps.items()}


def get_feature_extractor(name: str = "cifar10", device: str | torch.device | None = None,
                          inception_weights: str | Path | None = None,
                          cifar10_weights: str | Path | None = None) -> FeatureExtractor:
    """Build a feature extractor.

    Args:
        name: "cifar10" (the project's classifier, bundled), "inception" (needs `inception_weights`), or the
            folder of a classifier from `gacq train-classifier` (the cifar10 architecture with those weights: its
            figures carry that file's hash, so they never mix with the bundled network's).
        device: where to run it (default: CUDA if available).
        inception_weights: FID Inception-v3 weights file (.pth state dict or .safetensors).
        cifar10_weights: a folder from `gacq train-classifier` instead of the bundled network.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if name not in FEATURE_NAMES and cifar10_weights is None and is_network_folder(name):
        name, cifar10_weights = "cifar10", name  # a folder from `gacq train-classifier` given as --features
    if name == "cifar10":
        from .cifar10_net import bundled_features_path, load_cifar10_net

        folder = Path(cifar10_weights) if cifar10_weights else bundled_features_path()
        net = load_cifar10_net(folder, dev)
        return FeatureExtractor("cifar10", cifar10_network_hash(folder), net, dev, 32, True)
    if name == "inception":
        from .inception import load_inception

        net = load_inception(inception_weights, dev)
        return FeatureExtractor("inception", file_sha256(Path(inception_weights))[:16], net, dev, None, False)
    raise GacqError(f"unknown feature network {name!r}; choose one of {', '.join(FEATURE_NAMES)}, or give the folder "
                    "of a network trained with `gacq train-classifier`")


def cifar10_network_hash(folder: str | Path | None = None) -> str:
    """The hash every figure of a cifar10 network carries: the first 16 hex digits of the SHA-256 of its
    `model.safetensors` (`folder`: one from `gacq train-classifier`; default: the bundled network)."""
    from .cifar10_net import bundled_features_path

    return file_sha256(Path(folder or bundled_features_path()) / "model.safetensors")[:16]


def is_network_folder(name) -> bool:
    """Whether `--features NAME` names a folder (a path that exists, or one with a path separator) rather than one
    of FEATURE_NAMES: such a folder must hold a `gacq train-classifier` network (load_cifar10_net says what is
    missing)."""
    text = str(name)
    return Path(text).exists() or "/" in text or "\\" in text


def compute_stats(images: np.ndarray, extractor: FeatureExtractor, batch_size: int = 500, pr_max: int = 10000,
                  is_splits: int = 10, seed: int = 0, source: str = "images", progress: bool = True,
                  meta: dict | None = None) -> FeatureStats | None:
    """Stream `images` (uint8 N x H x W x 3) through the extractor into FeatureStats.

    Memory stays bounded: features are reduced batch by batch into running moments, a
    reservoir of `pr_max` pooled features and the Inception Score sums.
    Under a process group (`gacq.distributed`) every rank calls this with the same images:
    in each round, rank r extracts batch `round * world + r`, and rank 0 reduces the
    gathered batches in order, so the statistics are those of one process. Returns None on
    the other ranks.
    """
    from .. import distributed as gdist

    extractor.check(images, source)
    if len(images) < 2:
        raise GacqError(f"{source}: {len(images)} image(s) are too few for a covariance (need at least 2)")
    rank, world = gdist.rank(), gdist.world_size()
    acc = StatsAccumulator(extractor.name, extractor.hash, pr_max=pr_max, is_splits=is_splits, seed=seed)
    starts = range(0, len(images), batch_size)
    bar = tqdm(total=len(starts), desc=f"features ({extractor.name})", unit="batch",
               disable=not progress or rank != 0)
    for first in range(0, len(starts), world):
        j = first + rank
        taps = extractor(images[starts[j]:starts[j] + batch_size]) if j < len(starts) else None
        gathered = gdist.gather_object(taps, what="gathering features")
        if rank == 0:
            for t in gathered:
                if t is not None:
                    acc.add(t)
        bar.update(min(world, len(starts) - first))
    bar.close()
    if rank != 0:
        return None
    return acc.result({"source": source, "pr_max": pr_max, "is_splits": is_splits, "seed": seed, **(meta or {})})
