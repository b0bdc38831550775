"""`gacq ranges`: per-step input ranges of every conv/linear layer, against a naive capture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gacq.act_ranges import activation_ranges, write_ranges
from gacq.errors import GacqError
from gacq.models import LoadedModel, build_model
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.sampling import SampleConfig

from .conftest import gacq_here


@pytest.mark.parametrize("config", ["tiny", "tiny-dit"])
def test_ranges_equal_a_naive_capture(config, tmp_path):
    torch.manual_seed(0)
    model = build_model(config).eval()
    cfg = SampleConfig(steps=4, guidance_scale=1.0)
    calib = collect(LoadedModel(model), cfg, CalibDataConfig(selection="all", n_trajectories=3), progress=False)
    res = activation_ranges(model, calib, max_per_step=2, batch_size=1)  # batches of 1: the merge across batches
    assert res["steps"] == [0, 1, 2, 3] and len(res["timesteps"]) == 4
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert set(res["layers"]) <= set(names) and len(res["layers"]) >= len(names) - 2  # layers the forward skips
    name = next(iter(res["layers"]))
    seen = {}
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0]))
    from gacq.conditioning import model_forward, slice_cond

    for k in range(4):
        seen.clear()
        idx = (calib.step == k).nonzero().flatten()[:2]
        with torch.no_grad():
            model_forward(model, calib.x[idx], calib.t[idx], slice_cond(calib.cond, idx))
        x = torch.cat([v.flatten() for v in seen["x"]])
        got = res["layers"][name]["per_step"][k]
        assert got["min"] == float(x.min()) and got["max"] == float(x.max())
        if x.numel() <= 65536:  # no subsample: the percentile is exact
            assert got["p999_abs"] == pytest.approx(float(torch.quantile(x.abs(), 0.999)), rel=1e-6)
    h.remove()
    lay = res["layers"][name]
    width = lay["max"] - lay["min"]
    assert lay["step_width_over_all"][0] == pytest.approx((lay["per_step"][0]["max"] - lay["per_step"][0]["min"]) / width)
    assert max(lay["step_width_over_all"]) <= 1 + 1e-12
    summary = write_ranges(res, tmp_path / "out", {"command": "test", "max_per_step": 2})
    for f in ("ranges.json", "ranges.csv", "ranges_heatmap.png", "outliers.png", "ranges.md"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert summary["layers"] == len(res["layers"]) and summary["outlier_ratio_max"]["ratio"] >= 1
    rows = (tmp_path / "out" / "ranges.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * len(res["layers"])
    with pytest.raises(GacqError, match="empty"):
        activation_ranges(model, calib.subset(torch.tensor([], dtype=torch.long), calib.meta))


def test_ranges_cli(tiny_model_dir, tmp_path):
    def gacq(*args):
        return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True,
                              check=False)

    # the calibration set through the CLI's entry point in this process, `gacq ranges` in a new interpreter
    r = gacq_here("calib", "--model", tiny_model_dir, "--selection", "all", "--trajectories", 2, "--steps", 3,
                  "--out", tmp_path / "c", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = gacq("ranges", "--model", tiny_model_dir, "--calib", tmp_path / "c", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert "layers x 3 steps" in r.stdout
    got = json.loads((tmp_path / "r" / "ranges.json").read_text())
    assert got["steps"] == 3 and got["command"].startswith("gacq ranges")
    # the refusal through the CLI's entry point in this process
    r = gacq_here("ranges", "--model", tiny_model_dir, "--calib", tmp_path / "nothing", "--out", tmp_path / "r2")
    assert r.returncode == 2 and "error:" in r.stderr and not (tmp_path / "r2").exists()
