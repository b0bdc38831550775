import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from gacq.data import load_images
from gacq.errors import GacqError

from .conftest import write_idx, write_images


def test_folder_classes_and_pixels(image_folder):
    ds = load_images(image_folder)
    assert ds.images.shape == (12, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.classes == ["cat", "dog"]
    assert list(ds.labels) == [0] * 6 + [1] * 6
    ref = np.asarray(Image.open(image_folder / "dog" / "002.png"))
    np.testing.assert_array_equal(ds.images[8], ref)


def test_zip_matches_folder(image_folder, tmp_path):
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(image_folder.rglob("*.png")):
            zf.write(p, "./" + str(p.relative_to(image_folder)))
    a, b = load_images(image_folder), load_images(zpath)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.classes == b.classes


def test_mosaic_zip(tmp_path):
    rng = np.random.default_rng(1)
    imgs = (rng.random((5, 4, 4, 3)) * 255).astype(np.uint8)
    tile = np.zeros((2 * 4, 3 * 4, 3), np.uint8)  # 3 columns, 2 rows
    for i, a in enumerate(imgs):
        r, c = divmod(i, 3)
        tile[r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = a
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG")  # lossless stand-in for the JPEG mosaics
    labels = io.BytesIO()
    np.save(labels, np.array([0, 1, 2, 1, 0], np.uint8))
    layout = {"images": 5, "image_size": [4, 4, 3], "per_mosaic": 6, "grid": {"cols": 3, "rows": 2},
              "classes": ["a", "b", "c"]}
    z = tmp_path / "mosaic.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("mosaic_000.jpg", buf.getvalue())
        zf.writestr("labels.npy", labels.getvalue())
        zf.writestr("layout.json", json.dumps(layout))
    ds = load_images(z)
    np.testing.assert_array_equal(ds.images, imgs)
    assert list(ds.labels) == [0, 1, 2, 1, 0] and ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize("gz", [False, True])
def test_idx_with_labels(tmp_path, gz):
    rng = np.random.default_rng(2)
    arr = (rng.random((7, 8, 8)) * 255).astype(np.uint8)
    suffix = ".gz" if gz else ""
    img = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", arr, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(7) % 3, gz)
    ds = load_images(img)
    assert ds.images.shape == (7, 8, 8, 1)
    np.testing.assert_array_equal(ds.images[..., 0], arr)
    assert list(ds.labels) == [0, 1, 2, 0, 1, 2, 0]
    rgb = load_images(img, channels=3)
    assert rgb.images.shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(rgb.images[..., 1], arr)


def test_npz_roundtrip(tmp_path):
    imgs = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images=imgs)
    np.testing.assert_array_equal(load_images(tmp_path / "s.npz").images, imgs)


def test_grayscale_and_resize(image_folder):
    ds = load_images(image_folder, size=8, channels=1, resize=True)
    assert ds.images.shape == (12, 8, 8, 1)


def test_size_mismatch_needs_resize(image_folder):
    with pytest.raises(GacqError, match="--resize"):
        load_images(image_folder, size=8)


def test_mixed_sizes_named(tmp_path):
    root = write_images(tmp_path / "m", classes=("a",), per_class=2)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "a" / "odd.png")
    with pytest.raises(GacqError, match=r"odd\.png.*--resize"):
        load_images(root)


def test_corrupt_image_named(image_folder):
    (image_folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(GacqError, match=r"broken\.png"):
        load_images(image_folder)


def test_corrupt_image_in_zip_named(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("c/ok.jpg", b"garbage")
    with pytest.raises(GacqError, match=r"bad\.zip:c/ok\.jpg"):
        load_images(z)


@pytest.mark.parametrize("case", ["missing", "empty", "unsupported", "badzip", "badidx"])
def test_bad_inputs(tmp_path, case):
    if case == "missing":
        path, msg = tmp_path / "nope", "does not exist"
    elif case == "empty":
        path, msg = tmp_path / "empty", "no images found"
        path.mkdir()
    elif case == "unsupported":
        path, msg = tmp_path / "data.csv", "unsupported data format"
        path.write_text("a,b\n")
    elif case == "badzip":
        path, msg = tmp_path / "x.zip", "not a valid zip"
        path.write_bytes(b"PK not a zip")
    else:
        path, msg = tmp_path / "t-images-idx3-ubyte", "cannot read idx"
        path.write_bytes(b"\x01\x02")
    with pytest.raises(GacqError, match=msg):
        load_images(path)
