"""Image datasets from folders, zips, idx files and npz arrays, as uint8 arrays in memory.

Supported inputs (the format is told from the path):
- a folder of images; images in sub-folders get the sub-folder name as class;
- a zip of images, read without extracting (class = the folder inside the zip);
- a "mosaic" zip (`layout.json` + `labels.npy` + `mosaic_NNN.jpg` tiles, the
  compact CIFAR-10 layout in shared/data/cifar10-mosaic);
- idx files (MNIST / Fashion-MNIST layout, optionally gzipped): give the images
  file; labels are read from the matching `labels-idx1` file when present;
- an `.npz` with an `images` (or `samples`) uint8 array (N, H, W, C), as `gacq sample` writes.

Everything is decoded into memory: the datasets this project trains on
(CIFAR-10, Fashion-MNIST) are a few hundred MB at most.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import GacqError
from .utils import npz_problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass
class ImageDataset:
    """Decoded images (uint8, N x H x W x C), integer labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _fit(img: Image.Image, name: str, size: int | None, channels: int | None, resize: bool) -> np.ndarray:
    """Convert one PIL image to the wanted channels and size (resize + centre crop if allowed)."""
    if channels is not None:
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise GacqError(f"only 1 (grayscale) or 3 (RGB) channels are supported, not {channels}")
        img = img.convert(mode)
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        if not resize:
            raise GacqError(
                f"{name} is {img.size[0]}x{img.size[1]} but {size}x{size} is needed; pass --resize "
                "to resize and centre-crop"
            )
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GacqError(f"cannot read image {name}: {e}. Remove or replace the file.") from e
    return img


def _stack(items: Iterable[tuple[str, str, bytes]], source: str, size, channels, resize) -> ImageDataset:
    """items: (display name, class name, encoded bytes) -> ImageDataset."""
    arrays, class_names = [], []
    first_shape, first_name = None, None
    for name, cls, data in items:
        arr = _fit(_decode(data, name), name, size, channels, resize)
        if first_shape is None:
            first_shape, first_name = arr.shape, name
        elif arr.shape != first_shape:
            raise GacqError(
                f"{name} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]} but {first_name} is "
                f"{first_shape[1]}x{first_shape[0]}x{first_shape[2]}; mixed sizes need --resize "
                "(and a target size)"
            )
        arrays.append(arr)
        class_names.append(cls)
    if not arrays:
        raise GacqError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    classes = sorted(set(class_names))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in class_names], dtype=np.int64)
    return ImageDataset(np.stack(arrays), labels, classes, source)


def _folder_items(root: Path) -> Iterator[tuple[str, str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        rel = p.relative_to(root)
        cls = rel.parts[0] if len(rel.parts) > 1 else ""
        yield str(p), cls, p.read_bytes()


def _zip_items(zf: zipfile.ZipFile, path: Path) -> Iterator[tuple[str, str, bytes]]:
    names = sorted(
        n for n in zf.namelist() if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_SUFFIXES
        and not Path(n).name.startswith(".") and "__MACOSX" not in n
    )
    for n in names:
        parts = [p for p in Path(n).parts if p not in (".", "")]
        cls = parts[-2] if len(parts) > 1 else ""
        yield f"{path}:{n}", cls, zf.read(n)


def _read_mosaic(zf: zipfile.ZipFile, path: Path, size, channels, resize) -> ImageDataset:
    layout = json.loads(zf.read("layout.json"))
    h, w, c = layout["image_size"]
    cols, per = layout["grid"]["cols"], layout["per_mosaic"]
    total = layout["images"]
    labels = np.load(io.BytesIO(zf.read("labels.npy")), allow_pickle=False).astype(np.int64)
    mosaics = sorted(n for n in zf.namelist() if n.startswith("mosaic_") and n.endswith(".jpg"))
    out = np.empty((total, h, w, c), np.uint8)
    for k, name in enumerate(mosaics):
        tile = np.asarray(_decode(zf.read(name), f"{path}:{name}").convert("RGB"), np.uint8)
        n = min(per, total - k * per)
        for i in range(n):
            r, q = divmod(i, cols)
            out[k * per + i] = tile[r * h : (r + 1) * h, q * w : (q + 1) * w]
    if (size is not None and size != h) or (channels is not None and channels != c):
        fitted = [_fit(Image.fromarray(a), f"{path}[{i}]", size, channels, resize) for i, a in enumerate(out)]
        out = np.stack(fitted)
    return ImageDataset(out, labels[:total], list(layout.get("classes", [])), str(path))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise GacqError(f"cannot read idx file {path}: {e}") from e


def _idx_dataset(path: Path, size, channels, resize) -> ImageDataset:
    images = _read_idx(path)
    if images.ndim != 3:
        raise GacqError(f"{path} holds an array of shape {images.shape}; an idx images file is (N, H, W)")
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    labels = _read_idx(label_path).astype(np.int64) if label_path != path and label_path.exists() else None
    if labels is None:
        labels = np.zeros(len(images), np.int64)
    arr = images[..., None]
    if (size is not None and size != arr.shape[1]) or channels == 3:
        arr = np.stack([_fit(Image.fromarray(a[..., 0]), f"{path}[{i}]", size, channels, resize)
                        for i, a in enumerate(arr)])
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return ImageDataset(arr, labels, [str(i) for i in range(n_classes)], str(path))


def _npz_dataset(path: Path, size, channels, resize) -> ImageDataset:
    try:
        if (problem := npz_problem(path)) is not None:
            raise GacqError(f"cannot read {path}: {problem}")
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("images", "samples", "arr_0") if k in z.files), None)
            if key is None:
                raise GacqError(f"{path} has no 'images' array (it has: {', '.join(z.files)})")
            images = z[key]
            labels = z["labels"].astype(np.int64) if "labels" in z.files else np.zeros(len(images), np.int64)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise GacqError(f"cannot read {path}: {e}") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        hint = " (grayscale images need a channel axis of 1: images[..., None])" if images.ndim == 3 else ""
        raise GacqError(f"{path}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}{hint}")
    if (size is not None and size != images.shape[1]) or (channels is not None and channels != images.shape[3]):
        images = np.stack([_fit(Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a), f"{path}[{i}]",
                                size, channels, resize) for i, a in enumerate(images)])
    return ImageDataset(images, labels, [], str(path))


def load_images(
    path: str | Path, size: int | None = None, channels: int | None = None, resize: bool = False
) -> ImageDataset:
    """Read a dataset into memory.

    Args:
        path: an image folder, a zip (of images or a mosaic zip), an idx images file, or an npz.
        size: wanted square size in pixels; None keeps the files' size (which must then agree).
        channels: 1 (grayscale) or 3 (RGB); None keeps grayscale or RGB as stored.
        resize: allow resizing and centre-cropping images whose size differs from `size`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise GacqError(f"data path {path} does not exist")
    if path.is_dir():
        return _stack(_folder_items(path), str(path), size, channels, resize)
    name = path.name.lower()
    if name.endswith(".zip"):
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise GacqError(f"{path} is not a valid zip file: {e}") from e
        with zf:
            if "layout.json" in zf.namelist() and "labels.npy" in zf.namelist():
                return _read_mosaic(zf, path, size, channels, resize)
            return _stack(_zip_items(zf, path), str(path), size, channels, resize)
    if "idx3" in name or name.endswith((".idx", ".idx.gz")):
        return _idx_dataset(path, size, channels, resize)
    if name.endswith(".npz"):
        return _npz_dataset(path, size, channels, resize)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise GacqError(f"{path} is a single image; give the folder that holds the images")
    raise GacqError(
        f"unsupported data format: {path}. Use an image folder, a .zip, an idx file "
        "(*-images-idx3-ubyte[.gz]) or an .npz with an 'images' array."
    )
