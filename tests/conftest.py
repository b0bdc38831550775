"""Shared fixtures: tiny real diffusers models and real data files on disk."""

from __future__ import annotations

import os

# numpy's OpenBLAS spawns one thread per core; next to torch's OpenMP threads (which spin after every op) the two pools
# oversubscribe a small CI machine: on 2 cores one 512x512 eigh (the sFID of every `evaluate`) took 0.1-2.7 s instead
# of 0.04 s. One BLAS thread, set before numpy loads and inherited by every `gacq` subprocess, gives the same figures
# (the same numpy in every process) without the contention; torch's own threads (MKL / OpenMP) are untouched.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gzip  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from gacq.models import build_model, save_model  # noqa: E402


def perturbed_tiny_dit(seed: int = 0) -> torch.nn.Module:
    """The `tiny-dit` config with every parameter nudged: adaLN-Zero starts at zero, and a perturbed model carries
    signal on every path (and its labels matter)."""
    torch.manual_seed(seed)
    model = build_model("tiny-dit").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_images(root: Path, classes=("cat", "dog"), per_class=6, size=16, seed=0, fmt="png") -> Path:
    """A class-per-subfolder image folder with distinguishable classes."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            arr[: size // 2] = (40 + 160 * k) % 256
            Image.fromarray(arr).save(root / c / f"{i:03d}.{fmt}")
    return root


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "imgs")


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    return save_model(model, tmp_path / "tiny_model")
