"""Small helpers shared across gacq: atomic writes, run metadata, image grids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_perms(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask modes."""
    mask = _umask()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)
    if is_dir:
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:  # safetensors writes its files 0600
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    A crash or an exception leaves no half-written `path` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_perms(tmp_path, is_dir=False)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it to `path` as PNG (atomically, see `atomic_path`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _default_perms(tmp, is_dir=True)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def npz_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be an .npz archive (numpy's savez format, a zip), or None if it starts like one.

    np.load reads any other file as a pickle and then tells the user to load it with allow_pickle;
    gacq never unpickles, so the caller says what the file is not instead."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return None
    return "not an .npz archive (numpy's savez format); gacq reads arrays only from .npz files, never from pickles"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The commit of the gacq checkout, with '+dirty' if it has changes, or 'unknown'."""
    if os.environ.get("GACQ_COMMIT"):  # set by device calls, whose copy of the tree has no .git
        return os.environ["GACQ_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=10
        )
        sha = res.stdout.strip()
        if res.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """What ran this: host, CPU count, torch version and GPU name if any."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2):
    """Tile uint8 images (N, H, W, C) into one PIL image."""
    from PIL import Image

    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid wants uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    if c == 1:
        return Image.fromarray(canvas[..., 0], mode="L")
    return Image.fromarray(canvas, mode="RGB")


def save_image(img, path: str | os.PathLike) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def resolve_device(device: str | None) -> "torch.device":  # noqa: F821
    """'auto' or None -> cuda if available else cpu; otherwise torch.device(device)."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        from .errors import GacqError

        raise GacqError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import GacqError

        raise GacqError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev
