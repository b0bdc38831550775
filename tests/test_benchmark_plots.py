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


def test_bench_plot_from_an_earlier_run(tmp_path):
    """`gacq bench --plot-from JSON` draws bench_lowbit.png next to a bench result without running anything: one
    panel per batch size, as wide as the widest bar needs; a file that is not a bench result is refused by name
    and nothing is written."""
    import json
    import subprocess

    rows = [{"mode": "bf16 compiled", "batch": 1, "ms_median": 2.0, "speedup_vs_best_float": 1.0},
            {"mode": "fp8 FP8 compiled + CUDA graph", "batch": 1, "ms_median": 1.0, "speedup_vs_best_float": 2.0},
            {"mode": "int8 W8A8", "batch": 256, "ms_median": 4.0, "speedup_vs_best_float": 0.25},
            {"mode": "w4a8 W4A8", "batch": 256, "error": "boom"}]
    res = {"results": rows, "machine": {"gpu": "a GPU"}, "args": {"config": "tiny"}, "commit": "abcdef0123"}
    path = tmp_path / "run" / "bench_lowbit.json"
    path.parent.mkdir()
    path.write_text(json.dumps(res))
    r = subprocess.run([sys.executable, "-m", "gacq", "bench", "--plot-from", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = path.with_suffix(".png")
    w, h = Image.open(png).size
    assert w > 2 * h  # two panels side by side
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    r = subprocess.run([sys.executable, "-m", "gacq", "bench", "--plot-from", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "is not a `gacq bench` result" in r.stderr and "Traceback" not in r.stderr
    assert not bad.with_suffix(".png").exists()
