"""`gacq.utils.save_figure` and the plots of benchmarks/output_bias.py and benchmarks/contrast_trajectory.py, drawn
from made-up rows into real PNG files (the scripts' measurements themselves need quantized checkpoints)."""

import importlib.util
import sys
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from gacq.utils import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # output_bias.py imports a sibling script
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_save_figure_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert out == tmp_path / "sub" / "f.png"
    assert Image.open(out).format == "PNG" and Image.open(out).size == (150, 100)
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.png"]  # no temporary file left


@pytest.mark.parametrize("name", ["output_bias", "contrast_trajectory"])
def test_benchmark_plots_draw(tmp_path, name):
    mod = _script(name)
    path = tmp_path / f"{name}.png"
    if name == "output_bias":
        steps = [0, 5, 10]
        rows = [{"checkpoint": f"q{i}", "bias": [[0.01 * i] * 3] * 3, "gain": [0.001 * i] * 3} for i in range(2)]
        mod.plot(rows, steps, path)
    else:
        runs = [{"model": m, "contrast": [1.0, 0.5, 0.4], "dist": [0.0 if m == "fp" else 0.3] * 3} for m in ("fp", "q")]
        mod.plot(runs, path)
    assert Image.open(path).format == "PNG"
