"""Activation smoothing (SmoothQuant, `gacq.quant.smooth`, `gacq quantize --smooth`): the scales against a numpy
reference, the smoothed layer's float equivalence, its effect on an outlier channel, the calibration of its
quantizer on x / s, and a tiny DiT quantized, saved, loaded and refused by export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from gacq.errors import GacqError
from gacq.models import load_model, save_model
from gacq.quant.api import QuantConfig, config_from_json, quantize, quantize_to_dir
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.modules import QuantLinear
from gacq.quant.smooth import smoothing_scales
from gacq.quant.wrap import init_act_quantizers_minmax, observe_input_ranges, quant_layers
from gacq.sampling import SampleConfig

from ..conftest import gacq_here, perturbed_tiny_dit


def gacq(*args):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_scales_match_numpy(alpha):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.01, 30, 7)
    a[2] = 0.0  # a dead channel: floored, not a division by zero
    w = rng.normal(size=(5, 7))
    ref = np.maximum(a, 1e-5) ** alpha / np.maximum(np.abs(w).max(0), 1e-5) ** (1 - alpha)
    got = smoothing_scales(torch.tensor(a), torch.tensor(w), alpha).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    # a conv weight (O, I, kh, kw): the max over everything but the input channel
    wc = rng.normal(size=(4, 3, 3, 3))
    refc = np.maximum(a[:3], 1e-5) ** alpha / np.abs(wc).max(axis=(0, 2, 3)) ** (1 - alpha)
    np.testing.assert_allclose(smoothing_scales(torch.tensor(a[:3]), torch.tensor(wc), alpha).numpy(), refc, rtol=1e-12)


def test_bad_alpha_and_shapes_refused():
    with pytest.raises(GacqError, match=r"\[0, 1\]"):
        smoothing_scales(torch.ones(3), torch.ones(2, 3), 1.5)
    with pytest.raises(GacqError, match="input channels"):
        smoothing_scales(torch.ones(4), torch.ones(2, 3), 0.5)
    with pytest.raises(GacqError, match="outside"):
        QuantConfig(method="rtn", wbits=8, abits=8, smooth=-0.1)
    with pytest.raises(GacqError, match="float activations"):
        QuantConfig(method="rtn", wbits=8, abits=None, smooth=0.5)
    q = QuantLinear(nn.Linear(3, 2), 8, 8)
    with pytest.raises(GacqError, match="finite positive"):
        q.set_smoothing(torch.tensor([1.0, 0.0, 2.0]))
    q.set_smoothing(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(GacqError, match="already smoothed"):
        q.set_smoothing(torch.tensor([1.0, 2.0, 3.0]))


def _outlier_inputs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64)
    x[:, 3] *= 60.0  # one channel 60x wider than the rest, as in a transformer's activations
    return x


def test_smoothed_layer_is_the_same_function_in_float():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).double()
    x = _outlier_inputs()
    q = QuantLinear(lin, 8, 8).double()
    q.set_smoothing(smoothing_scales(x.abs().amax(0), lin.weight, 0.5))
    q.w_quant, q.a_quant = False, False
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=1e-12)
    # what the quantizer sees is x / s: the outlier channel's range is cut down
    xs = q.smoothed_input(x)
    ratio = lambda v: (v.abs().amax(0).max() / v.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(xs) < ratio(x) / 4


def _w8a8(lin, x, s):
    q = QuantLinear(lin, 8, 8).double()
    if s is not None:
        q.set_smoothing(s)
    q.init_weight("minmax")
    q.a_quant = False
    # the range observation as quantize() does it (a forward pre-hook on the wrapped layer)
    model = nn.Sequential(q)
    ranges = observe_input_ranges(model, [(x,)], lambda m, v: m(v))
    init_act_quantizers_minmax(model, {"0": ranges["0"]})
    q.w_quant, q.a_quant = True, True
    return (q(x) - lin(x)).pow(2).mean().item()


def test_smoothing_cuts_the_error_of_an_outlier_channel():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).double()
    x = _outlier_inputs()
    plain = _w8a8(lin, x, None)
    smoothed = _w8a8(lin, x, smoothing_scales(x.abs().amax(0), lin.weight, 0.5))
    assert smoothed < plain / 3, (plain, smoothed)


def test_ranges_are_observed_on_the_smoothed_input():
    lin = nn.Linear(4, 2).double()
    q = QuantLinear(lin, 8, 8).double()
    q.set_smoothing(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64))
    q.w_quant = False
    x = torch.tensor([[1.0, 8.0, 16.0, 32.0], [-1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    r = observe_input_ranges(nn.Sequential(q), [(x,)], lambda m, v: m(v))["0"]
    assert r[0].item() == -1.0 and r[1].item() == 4.0  # x / s = [[1, 4, 4, 4], [-1, 0, 0, 0]]; raw x reaches 32


def test_finite_set_calibration_measures_the_smoothed_input():
    """TFMQ-DM's per-step ranges on a smoothed layer are those of x / s (what its quantizer sees), per step."""
    from gacq.quant.fsc import finite_set_calibration
    from gacq.quant.primitives import qparams_from_range

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = QuantLinear(nn.Linear(4, 2), 8, 8)

        def forward(self, x, t):
            return self.lin(x)

    net = Net()
    s = torch.tensor([1.0, 2.0, 4.0, 8.0])
    net.lin.set_smoothing(s)
    net.lin.init_weight("minmax")
    x = torch.tensor([[1.0, 8.0, 16.0, 32.0], [-1.0, 0.0, 0.0, 0.0],  # step 0: x / s in [-1, 4]
                      [2.0, -8.0, 0.0, 8.0], [0.5, 0.0, 4.0, 0.0]])   # step 1: x / s in [-4, 2]
    step = torch.tensor([0, 0, 1, 1])
    p = finite_set_calibration(net, x, torch.zeros(4, dtype=torch.long), step, {"steps": 2}, batch_size=2,
                               progress=False)
    for k, (lo, hi) in enumerate([(-1.0, 4.0), (-4.0, 2.0)]):
        want_s, want_z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), 8, False)
        assert p.scale["lin"][k].item() == pytest.approx(want_s.item(), rel=1e-6)
        assert p.zero_point["lin"][k].item() == want_z.item()
    # the raw input's range (up to 32 at step 0) would give an 8x wider step
    assert p.scale["lin"][0].item() < (33.0 / 255) / 4


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    path = save_model(perturbed_tiny_dit(), root / "dit")
    loaded = load_model(path)
    calib = collect(loaded, SampleConfig(steps=20, guidance_scale=1.5), CalibDataConfig(selection="all", n_trajectories=2),
                    device="cpu")
    calib.save(root / "calib")
    return path, root / "calib", root


def test_quantize_save_load_with_smoothing(dit):
    path, calib, root = dit
    loaded = load_model(path)
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, smooth=0.5)
    out = root / "q"
    meta = quantize_to_dir(loaded, cfg, out, calib=calib, progress=False)
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["format_version"] == 3 and meta["smoothing"]["alpha"] == 0.5
    smoothed = [n for n, e in qc["layers"].items() if e.get("smooth")]
    assert smoothed and len(smoothed) == meta["smoothing"]["layers"]
    assert all(qc["layers"][n]["type"] == "QuantLinear" for n in smoothed)
    assert config_from_json(qc["config"]).smooth == 0.5
    # the loaded checkpoint computes what the in-memory quantized model computes
    from gacq.quant.calib_data import CalibrationSet

    cs = CalibrationSet.load(calib)
    q_mem = quantize(loaded, cfg, cs, progress=False)
    q_disk = load_model(out).model
    assert all(m.smooth is not None for n, m in quant_layers(q_disk) if n in smoothed)
    from gacq.conditioning import model_forward, slice_cond

    idx = torch.arange(6)
    with torch.no_grad():
        a = model_forward(q_mem, cs.x[idx], cs.t[idx], slice_cond(cs.cond, idx, "cpu"))
        b = model_forward(q_disk, cs.x[idx], cs.t[idx], slice_cond(cs.cond, idx, "cpu"))
    a, b = (getattr(v, "sample", v) for v in (a, b))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # with every quantizer off, the smoothed model is the float model
    from gacq.quant.wrap import set_quant_state

    set_quant_state(q_mem, weights=False, acts=False)
    with torch.no_grad():
        f = model_forward(loaded.model, cs.x[idx], cs.t[idx], slice_cond(cs.cond, idx, "cpu"))
        s = model_forward(q_mem, cs.x[idx], cs.t[idx], slice_cond(cs.cond, idx, "cpu"))
    torch.testing.assert_close(getattr(s, "sample", s), getattr(f, "sample", f), rtol=1e-4, atol=1e-5)


def test_cli_smooth_and_export_refusal(dit):
    path, calib, root = dit
    out = root / "q_cli"
    # quantized through the CLI's entry point in this process; the smoothed checkpoint is sampled by a new interpreter
    r = gacq_here("quantize", "--model", path, "--method", "rtn", "--wbits", 8, "--abits", 8, "--smooth", 0.5,
                  "--calib", calib, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "quant_config.json").read_text())["config"]["smooth"] == 0.5
    r = gacq("sample", "--model", out, "--num", 2, "--steps", 2, "--out", root / "s.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    # the refusals through the CLI's entry point in this process
    r = gacq_here("export", out, "--backend", "int8", "--out", root / "exp")
    assert r.returncode != 0 and "smoothing" in (r.stderr + r.stdout) and "Traceback" not in r.stderr
    assert not (root / "exp").exists()
    r = gacq_here("quantize", "--model", path, "--method", "rtn", "--wbits", 8, "--abits", 8, "--smooth", 1.5,
                  "--calib", calib, "--out", root / "bad")
    assert r.returncode != 0 and "--smooth" in (r.stderr + r.stdout) and not (root / "bad").exists()


def test_corrupt_smoothed_checkpoint_refused(dit, tmp_path):
    path, calib, root = dit
    out = tmp_path / "q"
    quantize_to_dir(load_model(path), QuantConfig(method="rtn", wbits=8, abits=8, smooth=0.5), out, calib=calib,
                    progress=False)
    from safetensors.torch import load_file, save_file

    t = load_file(str(out / "quantized.safetensors"))
    name = next(k for k in t if k.endswith(".smooth"))
    del t[name]
    save_file(t, str(out / "quantized.safetensors"))
    with pytest.raises(GacqError, match="divisor is missing"):
        load_model(out)
