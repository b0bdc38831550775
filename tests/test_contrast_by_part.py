"""benchmarks/contrast_by_part.py on a real W4A8 checkpoint of a tiny UNet, written to disk by `gacq quantize`:
putting every part back to float must give the float model's very images, and each part's run must differ."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import gacq_here

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "contrast_by_part.py"


def test_contrast_by_part_restores_float_parts(tiny_model_dir, tmp_path):
    q = tmp_path / "q"
    gacq_here("quantize", "--model", tiny_model_dir, "--method", "rtn", "--wbits", 4, "--abits", 8,
              "--calib-trajectories", 4, "--record-steps", 5, "--steps", 5, "--out", q, "--device", "cpu")
    out = tmp_path / "cbp"
    r = subprocess.run([sys.executable, str(SCRIPT), str(q), "--float", str(tiny_model_dir), "--num", "3", "--steps",
                        "5", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "contrast_by_part.json").read_text())
    runs = {x["variant"]: x for x in res["runs"]}
    assert runs["fp"]["rms_to_fp"] == 0 and runs["fp"]["float_layers"] == 0
    assert runs["quantized"]["rms_to_fp"] > 0 and runs["quantized"]["float_layers"] == 0
    # every layer back to float: exactly the float model's images (weights copied, both quantizers off)
    assert runs["all float"]["rms_to_fp"] == 0 and runs["all float"]["contrast"] == runs["fp"]["contrast"]
    assert runs["all float"]["recovered"] == 1.0 and runs["quantized"]["recovered"] == 0.0
    parts = [v[len("float "):] for v in runs if v.startswith("float ")]
    assert "down_blocks.0" in parts and "up_blocks.0" in parts and "mid_block" in parts, parts
    n_layers = runs["all float"]["float_layers"]
    assert sum(runs[f"float {p}"]["float_layers"] for p in parts) == n_layers  # the parts cover every layer once
    assert runs["acts float"]["float_layers"] == runs["weights float"]["float_layers"] == n_layers
    rows = [x for x in (out / "README.md").read_text().splitlines() if x.startswith("| float ")]
    assert len(rows) == len(parts)
    assert (out / "contrast_by_part.png").stat().st_size > 0

    # --within: that part's layers one at a time (weights and input, then weights alone), covering the part once
    r = subprocess.run([sys.executable, str(SCRIPT), str(q), "--float", str(tiny_model_dir), "--num", "2", "--steps",
                        "5", "--within", "up_blocks.0", "--out", str(tmp_path / "w")], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    w = {x["variant"]: x for x in json.loads((tmp_path / "w" / "contrast_by_part.json").read_text())["runs"]}
    layers = [v[len("float "):-len(" weights")] for v in w if v.endswith(" weights")]
    assert layers and all(x.startswith("up_blocks.0.") for x in layers), layers
    assert all(w[f"float {x}"]["float_layers"] == w[f"float {x} weights"]["float_layers"] == 1 for x in layers)
    assert w["float up_blocks.0"]["float_layers"] == len(layers) == runs["float up_blocks.0"]["float_layers"]
    assert w["all float"]["rms_to_fp"] == 0
    bad = subprocess.run([sys.executable, str(SCRIPT), str(q), "--float", str(tiny_model_dir), "--within", "nope",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode != 0 and "--within nope: no quantized layer inside it; parts: time_embedding" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_contrast_by_part_refuses_a_folder_that_is_not_a_checkpoint(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "is not a quantized checkpoint folder" in r.stderr
    assert not (tmp_path / "o").exists()
