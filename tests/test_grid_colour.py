"""benchmarks/grid_colour.py run as a script on grids written to disk: its per-grid colour, contrast and FID
columns against numpy on the tiles the test drew, and its rank correlation against a naive Spearman."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "grid_colour.py"


def run_script(*args) -> subprocess.CompletedProcess:
    """The script in a new interpreter; it needs scipy, which tests/conftest.py hides from subprocesses by default."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "GACQ_TEST_HIDE": ""})


def write_grid(path: Path, tiles: np.ndarray, gap: int = 2) -> None:
    n = 8
    a = np.full((gap + n * (32 + gap),) * 2 + (3,), 255, dtype=np.uint8)
    for k, t in enumerate(tiles):
        i, j = divmod(k, n)
        a[gap + i * (32 + gap):gap + i * (32 + gap) + 32, gap + j * (32 + gap):gap + j * (32 + gap) + 32] = t
    Image.fromarray(a).save(path)  # PNG: lossless, so the script sees exactly these tiles


def naive_spearman(x, y):
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties in the test's values
    rx, ry = rank(np.asarray(x)), rank(np.asarray(y))
    n = len(x)
    return 1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1))


def test_contrast_fid_and_rank_correlation(tmp_path):
    rng = np.random.default_rng(0)
    grids, cells = tmp_path / "grids", tmp_path / "cells"
    grids.mkdir(), cells.mkdir()
    expected, fids = {}, [40.0, 55.0, 47.0, 90.0]
    for g, (spread, fid) in enumerate(zip([60, 20, 45, 5], fids)):
        tiles = np.clip(128 + rng.normal(0, spread, (64, 32, 32, 3)), 0, 255).round().astype(np.uint8)
        name = f"cell{g}"
        write_grid(grids / f"{name}.png", tiles)
        (cells / f"{name}.json").write_text(json.dumps(
            {"metrics": {"fid": fid, "feature_network": {"name": "cifar10", "hash": "abc"}}}))
        t = tiles.astype(np.float64)
        expected[name] = (t.reshape(64, -1).std(axis=1).mean(), t.mean(axis=(1, 2)).mean(0))
    out = tmp_path / "out"
    r = run_script(*sorted(map(str, grids.glob("*.png"))), "--cells", cells, "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "grid_colour.json").read_text())
    assert len(res["rows"]) == 4
    for row in res["rows"]:
        contrast, rgb = expected[Path(row["grid"]).stem]
        assert abs(row["contrast"] - contrast) < 1e-3  # rounded to 3 decimals
        np.testing.assert_allclose(row["mean_rgb"], rgb, atol=0.01)
        assert row["features"] == "cifar10 (hash abc)"
    contrasts = [expected[f"cell{g}"][0] for g in range(4)]
    rho = naive_spearman(fids, contrasts)
    assert abs(res["correlation"]["spearman_fid_contrast"] - rho) < 1e-4
    assert rho == -1.0  # the test's grids: the lower the contrast, the higher the FID
    md = (out / "README.md").read_text()
    assert "cifar10 (hash abc)" in md and "Spearman" in md


def test_missing_cell_result_is_a_clear_error(tmp_path):
    write_grid(tmp_path / "lonely.png", np.zeros((64, 32, 32, 3), np.uint8))
    r = run_script(tmp_path / "lonely.png", "--cells", tmp_path, "--out", tmp_path / "out")
    assert r.returncode != 0
    assert "no cell result" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_grids_that_share_a_file_name_are_named_by_their_folder(tmp_path):
    """`gacq sample` writes every run's grid as grid.png: the table then names each by its folder."""
    rng = np.random.default_rng(1)
    paths = []
    for name in ("fp", "gac_w4a8"):
        (tmp_path / name).mkdir()
        write_grid(tmp_path / name / "grid.png", rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
        paths.append(str(tmp_path / name / "grid.png"))
    r = run_script(*paths, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out/README.md").read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "mean R" not in line
            and "---" not in line]
    assert rows == ["| fp", "| gac_w4a8"], md
