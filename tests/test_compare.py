import numpy as np

from gacq.compare import contrast, psnr, side_by_side


def test_psnr_matches_naive_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] ^= 8
    b[2] = 255 - b[2]
    got = psnr(a, b)
    for i in range(3):
        mse = sum((float(a[i].flat[j]) - float(b[i].flat[j])) ** 2 for j in range(a[i].size)) / a[i].size
        want = np.inf if mse == 0 else 10 * np.log10(255 ** 2 / mse)
        assert got[i] == want or abs(got[i] - want) < 1e-9


def test_side_by_side_pairs_rows():
    fp = np.zeros((3, 2, 2, 3), np.uint8)
    q = np.full((3, 2, 2, 3), 200, np.uint8)
    img = np.asarray(side_by_side(fp, q, per_row=2))
    # 2 pairs of rows (the second pair padded white), 2 columns, pad 2: height 4*(2+2)+2, width 2*(2+2)+2
    assert img.shape == (18, 10, 3)
    assert (img[2:4, 2:4] == 0).all() and (img[6:8, 2:4] == 200).all()  # FP row above its quantized row


def test_contrast_matches_a_naive_loop():
    """Each image's population standard deviation over all its pixels and channels, averaged over the images."""
    import statistics

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    ref = sum(statistics.pstdev(int(v) for v in img.ravel()) for img in images) / len(images)
    assert abs(contrast(images) - ref) < 1e-9
    assert contrast(np.full((2, 4, 4, 3), 7, np.uint8)) == 0.0


def test_compare_samples_in_batches_with_the_same_images(tiny_model_dir, tmp_path):
    """`compare` samples in batches of cfg.batch_size (per-image noise): the images do not depend on the batch size
    beyond float rounding in batched kernels (seen here: one 8-bit level in one of 5,376 values), and the JSON report
    is written."""
    import json

    import torch

    from gacq.compare import compare
    from gacq.models import load_model
    from gacq.sampling import SampleConfig

    fp = load_model(tiny_model_dir)
    other = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.01)
    reports = {}
    for bs in (3, 64):
        reports[bs] = compare(fp, other, SampleConfig(num=7, steps=4, batch_size=bs), tmp_path / str(bs),
                              metrics=False, progress=bs == 3)
    for name in ("fp.npz", "quantized.npz"):
        a, b = (np.load(tmp_path / str(bs) / name)["images"] for bs in (3, 64))
        assert a.shape == (7, 16, 16, 3)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert abs(reports[3]["psnr_db_mean"] - reports[64]["psnr_db_mean"]) < 0.05
    assert reports[3]["psnr_db_mean"] < float("inf")
    assert json.loads((tmp_path / "3" / "report.json").read_text())["num"] == 7
