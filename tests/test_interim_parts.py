"""benchmarks/interim_parts.py through a subprocess, on part statistics of real images written to disk: the merged
first K parts give the metrics that evaluating those K x part-size images directly gives (an independent path: one
pass of the feature network over the images), and asking for more parts than a cell has is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gacq.metrics.evaluate import evaluate, make_part_stats

ROOT = Path(__file__).resolve().parent.parent
PART, TOTAL = 20, 80  # parts of 20 images (a multiple of the 10 Inception Score splits) of a run of 80


def _cell(folder: Path, images: np.ndarray, parts: int) -> None:
    folder.mkdir(parents=True)
    for k in range(parts):
        make_part_stats(images[k * PART:(k + 1) * PART], folder / f"stats_{k:04d}.npz", k * PART, TOTAL,
                        progress=False)
        (folder / f"meta_{k:04d}.json").write_text(json.dumps({"commit": "abc", "wall_seconds_this_run": 1.0}))


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/interim_parts.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (TOTAL, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    _cell(root / "a", a, 3)
    _cell(root / "b", b, 2)
    return root, a, b


def test_first_parts_equal_a_direct_evaluation_of_their_images(cells, tmp_path):
    root, a, b = cells
    r = _run("--parts", root, "--cells", "a,b", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "out/interim_parts.json").read_text())
    rows = {row["cell"]: row for row in doc["rows"]}
    assert {row["parts"] for row in doc["rows"]} == {2}  # the parts every cell has
    assert rows["a"]["parts_in_folder"] == 3
    for name, images in (("a", a), ("b", b)):
        got = rows[name]["metrics"]
        want = evaluate(images[:2 * PART], progress=False)
        assert got["samples"]["n"] == 2 * PART
        # the parts' covariances are stored in float32 (near-singular at 40 images: rel 1e-4), their P/R features in
        # float16 (a neighbour may change: one sample of 40); the IS sums in float64
        for key in ("fid", "sfid"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (name, key)
        for key in ("is_mean", "is_std"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), (name, key)
        for key in ("precision", "recall"):
            assert got[key] == pytest.approx(want[key], abs=1 / 40 + 1e-9), (name, key)
    assert "| a | 40 |" in (tmp_path / "out/interim_parts.md").read_text()
    assert doc["command"].startswith("python ") and doc["wall_seconds"] >= 0


def test_more_parts_than_a_cell_has_is_refused(cells, tmp_path):
    root, _, _ = cells
    r = _run("--parts", root, "--cells", "a,b", "--k", 3, "--out", tmp_path / "out")
    assert r.returncode != 0
    assert "3 parts wanted" in r.stderr and "'b': 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = _run("--parts", root, "--cells", "a,nope", "--out", tmp_path / "out")
    assert r.returncode != 0 and "no parts folder for ['nope']" in r.stderr
