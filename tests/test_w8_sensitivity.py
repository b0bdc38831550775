"""benchmarks/w8_sensitivity.py on a tiny real checkpoint, through a subprocess: each row equals the same
measurement made on the checkpoint that w8_checkpoint writes to disk with that layer alone at 8 bits (an independent
path: folder written, loaded again), the base row the checkpoint's own, and undoing a layer restores the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gacq.models import load_model, build_model, save_model
from gacq.quant.api import QuantConfig, quantize_to_dir, w8_checkpoint
from gacq.quant.bias_correction import measure_output_bias
from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect
from gacq.sampling import SampleConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from w8_sensitivity import summarise  # noqa: E402


def test_rows_equal_the_measurement_on_the_written_w8_checkpoint(tmp_path):
    torch.manual_seed(0)
    model_dir = save_model(build_model("tiny").eval(), tmp_path / "tiny")
    fp = load_model(str(model_dir))
    collect(fp, SampleConfig(steps=5), CalibDataConfig(selection="all", n_trajectories=3), progress=False) \
        .save(tmp_path / "calib")
    qdir = tmp_path / "q"
    quantize_to_dir(fp, QuantConfig(method="rtn", wbits=3, abits=8, calib=CalibDataConfig(n_trajectories=3,
                                                                                          n_steps=3)),
                    qdir, tmp_path / "calib", progress=False)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/w8_sensitivity.py"), str(qdir), "--float",
                        str(model_dir), "--calib", str(tmp_path / "calib"), "--layers", "up_blocks.*.conv_shortcut",
                        "--together", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "w8_sensitivity.json").read_text())
    assert [row["layer"] for row in res["rows"]] == [f"up_blocks.{i}.resnets.{j}.conv_shortcut"
                                                    for i in (0, 1) for j in (0, 1)]
    assert (out / "README.md").exists() and (out / "w8_sensitivity.png").stat().st_size > 0
    calib = CalibrationSet.load(tmp_path / "calib")
    base = summarise(measure_output_bias(load_model(str(qdir)).model, fp.model, calib))
    assert base["mse"] == pytest.approx(res["base"]["mse"], rel=1e-9)
    for row in res["rows"][:2]:
        w8_checkpoint(qdir, tmp_path / row["layer"], fp, (row["layer"],))
        got = summarise(measure_output_bias(load_model(str(tmp_path / row["layer"])).model, fp.model, calib))
        assert got["mse"] == pytest.approx(row["mse"], rel=1e-6)
        assert got["gain"] == pytest.approx(row["gain"], rel=1e-6, abs=1e-9)
        assert got["bias"] == pytest.approx(row["bias"], rel=1e-6, abs=1e-9)
        assert row["mse_ratio"] == pytest.approx(row["mse"] / res["base"]["mse"])
    assert len({row["mse"] for row in res["rows"]}) == 4  # each layer measured, not one state four times
    w8_checkpoint(qdir, tmp_path / "all4", fp, ("up_blocks.*.conv_shortcut",))
    got = summarise(measure_output_bias(load_model(str(tmp_path / "all4")).model, fp.model, calib))
    assert got["mse"] == pytest.approx(res["together"]["mse"], rel=1e-6) and len(res["together"]["layers"]) == 4
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/w8_sensitivity.py"), str(qdir), "--float",
                          str(model_dir), "--calib", str(tmp_path / "calib"), "--layers", "nothing*",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "no low-bit layer" in bad.stderr
