"""benchmarks/compiled_sampling.py: eager and compiled sampling of one model side by side, through a real subprocess
on a tiny model (CPU: torch.compile without CUDA graphs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compiled_sampling.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from compiled_sampling import image_difference  # noqa: E402


def test_image_difference_against_a_hand_count():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    assert image_difference(a, b) == {"mean_abs_levels": 0.0, "max_abs_levels": 0, "fraction_differing": 0.0,
                                      "psnr_db": None}
    b[0, 0, 0, 0], b[1, 2, 3, 1] = 255, 3  # two of 96 values: |d| sums to 258, squares to 65034
    d = image_difference(a, b)
    assert d["max_abs_levels"] == 255 and d["fraction_differing"] == round(2 / 96, 6)
    assert d["mean_abs_levels"] == round(258 / 96, 4)
    assert d["psnr_db"] == round(10 * np.log10(255**2 / (65034 / 96)), 2)


def test_eager_and_compiled_rows_of_a_tiny_model(tiny_model_dir, tmp_path):
    # batches of 3, as test_sampling's compiled run: the same graph, which torch's on-disk cache then compiles once
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", str(tiny_model_dir), "--num", "3", "--batch-size",
                        "3", "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "out" / "compiled_sampling.json").read_text())
    eager, compiled = res["rows"]
    assert (eager["mode"], compiled["mode"]) == ("eager", "compiled") and eager["num"] == compiled["num"] == 3
    assert compiled["speedup_vs_eager"] == round(eager["wall_seconds"] / compiled["wall_seconds"], 3)
    # the warm-up holds the compilation: far longer compiled than eager
    assert compiled["warmup_seconds"] > 5 * eager["warmup_seconds"]
    assert compiled["difference_from_eager"]["max_abs_levels"] <= 1  # a float model
    md = (tmp_path / "out" / "compiled_sampling.md").read_text()
    assert "| tiny_model | compiled |" in md.replace(str(tiny_model_dir), "tiny_model") and res["commit"]


def test_a_missing_model_folder_is_refused_before_any_model_runs(tmp_path):
    import pytest
    from compiled_sampling import main

    with pytest.raises(SystemExit) as e:
        main(["--models", f"bundled,{tmp_path / 'nope'}", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
