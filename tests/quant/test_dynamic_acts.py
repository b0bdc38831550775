"""Dynamic per-token input quantization (`UniformQuantizer(dynamic_axis=...)`, `QuantConfig.act_granularity`,
`gacq quantize --act-granularity token`): the quantizer against a float64 loop, its refusals, a tiny DiT quantized
(rtn and tfmq), saved, loaded and sampled, the int8 backend against the fake-quant layer, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from gacq.conditioning import model_forward, slice_cond
from gacq.errors import GacqError
from gacq.models import load_model, save_model
from gacq.quant.api import QuantConfig, config_from_json, quantize, quantize_to_dir
from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect
from gacq.quant.modules import QuantConv2d, QuantLinear
from gacq.quant.quantizer import UniformQuantizer
from gacq.quant.recon import ReconConfig
from gacq.quant.wrap import quant_layers
from gacq.sampling import SampleConfig

from ..conftest import gacq_here, perturbed_tiny_dit


def gacq(*args):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True)


def naive_per_token(x: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Per-token fake quantization, one token (last-axis row) at a time, in float64."""
    out = np.empty_like(x, dtype=np.float64)
    rows, ref = x.reshape(-1, x.shape[-1]).astype(np.float64), out.reshape(-1, x.shape[-1])
    for i, v in enumerate(rows):
        if symmetric:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            s, z = max(np.abs(v).max() / qmax, 1e-8), 0.0
        else:
            qmin, qmax = 0, 2**bits - 1
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            s = max((hi - lo) / (qmax - qmin), 1e-8)
            z = np.round(-lo / s)
        ref[i] = (np.clip(np.round(v / s) + z, qmin, qmax) - z) * s
    return out


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (6, True)])
def test_per_token_grid_matches_a_float64_loop(bits, symmetric):
    g = torch.Generator().manual_seed(bits + symmetric)
    x = torch.randn(3, 7, 24, generator=g)
    x[0, 2] *= 80.0  # an outlier token: its own grid, the others unaffected
    x[1, 4] = 0.0  # a constant token: the floored step size, no division by zero
    q = UniformQuantizer(bits, symmetric=symmetric, dynamic_axis=-1)
    got = q(x).double().numpy()
    ref = naive_per_token(x.numpy(), bits, symmetric)
    # float32 against float64 arithmetic: a few ulps of each token's range
    tol = 1e-5 * np.abs(x.numpy()).max(axis=-1, keepdims=True)
    assert (np.abs(got - ref) <= tol).all()
    assert (got[1, 4] == 0).all()
    # per token, not per tensor: the outlier leaves the other tokens' error at their own step size
    step = (x.amax(-1) - x.amin(-1)).clamp_min(1e-8) / (2**bits - 1)
    err = (q(x) - x).abs().amax(-1)
    assert (err[0, :2] <= step[0, :2] * (1.01 if not symmetric else 2.02)).all()
    # bf16 inputs: the grid in float32, the output back in bf16
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_gradient_passes_straight_through():
    q = UniformQuantizer(4, dynamic_axis=-1)
    x = torch.randn(5, 9, requires_grad=True)
    q(x).sum().backward()
    # the grid covers every token's min and max: nothing is clamped, so the STE gradient is 1 everywhere
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=0)


def test_refusals():
    q = UniformQuantizer(8, dynamic_axis=-1)
    assert q.is_initialized and q.dynamic
    with pytest.raises(GacqError, match="nothing|no step size"):
        q.init_minmax(torch.randn(4))
    with pytest.raises(GacqError, match="no step size"):
        q._set(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(GacqError, match="no learned scale"):
        UniformQuantizer(8, learn_scale=True, dynamic_axis=-1)
    with pytest.raises(GacqError, match="for Linear layers"):
        QuantConv2d(nn.Conv2d(3, 4, 3), 8, 8, a_dynamic=True)
    with pytest.raises(GacqError, match="act-granularity must be"):
        QuantConfig(method="rtn", wbits=8, abits=8, act_granularity="channel")
    with pytest.raises(GacqError, match="float activations"):
        QuantConfig(method="rtn", wbits=8, abits=None, act_granularity="token")
    # a split linear keeps dynamic quantizers on both channel groups
    lin = QuantLinear(nn.Linear(6, 3), 8, 8, a_dynamic=True)
    lin.set_split(2)
    assert lin.act_quantizer.dynamic and lin.act_quantizer_0.dynamic and lin.act_quantizer.is_initialized


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    path = save_model(perturbed_tiny_dit(), root / "dit")
    calib = collect(load_model(path), SampleConfig(steps=10, guidance_scale=1.5),
                    CalibDataConfig(selection="all", n_trajectories=2), device="cpu", progress=False)
    calib.save(root / "calib")
    return path, root / "calib", root


def _eps(model, cs, idx):
    with torch.no_grad():
        y = model_forward(model, cs.x[idx], cs.t[idx], slice_cond(cs.cond, idx, "cpu"))
    return getattr(y, "sample", y)


@pytest.mark.parametrize("method", ["rtn", "tfmq"])
def test_quantize_save_load_sample(dit, method):
    path, calib, root = dit
    loaded = load_model(path)
    cs = CalibrationSet.load(calib)
    kw = {"recon": ReconConfig(iters=2)} if method == "tfmq" else {}
    cfg = QuantConfig(method=method, wbits=8, abits=8, act_granularity="token",
                      calib=CalibDataConfig(n_trajectories=2, n_steps=10), **kw)
    out = root / f"q_{method}"
    quantize_to_dir(loaded, cfg, out, calib=calib, progress=False)
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["format_version"] == 4 and config_from_json(qc["config"]).act_granularity == "token"
    dyn = {n for n, e in qc["layers"].items() if e.get("a_dynamic")}
    linears = {n for n, e in qc["layers"].items() if e["type"] == "QuantLinear" and e["abits"] is not None}
    assert dyn and dyn == linears  # every quantized-input Linear, no conv
    from safetensors.torch import load_file

    stored = load_file(str(out / "quantized.safetensors"))
    assert not any(f"{n}.act_scale" in stored for n in dyn)
    q_disk = load_model(out).model
    assert {n for n, m in quant_layers(q_disk) if m.a_dynamic} == dyn
    idx = torch.arange(6)
    q_mem = quantize(loaded, cfg, cs, progress=False)
    # tfmq: the per-step sets cover only the static inputs; both models apply step 0's
    for m in (q_mem, q_disk):
        fsc = getattr(m, "gacq_fsc", None)
        if fsc is not None:
            assert not set(fsc.scale) & dyn
            fsc.apply(m, 0)
    a, b = _eps(q_mem, cs, idx), _eps(q_disk, cs, idx)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    f = _eps(loaded.model, cs, idx)
    # quantized per token at 8 bits: close to the float model, not equal to it
    rel = ((a - f).norm() / f.norm()).item()
    assert 0 < rel < 0.1, rel
    # `gacq sample` through its entry point in this process (the checkpoint is loaded in a new interpreter by
    # test_cli_quantize_export_and_refusal's export run)
    r = gacq_here("sample", "--model", out, "--num", 2, "--steps", 10, "--guidance-scale", 1.5, "--out",
                  root / f"s_{method}", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert np.isfinite(np.load(root / f"s_{method}" / "samples.npz")["images"].astype(float)).all()


def test_int8_backend_matches_the_fake_quant_layer():
    """The int8 torch path quantizes each row with its own grid and corrects each row's zero point:
    the same numbers as the fake-quant layer up to float32 rounding (int8 module docstring)."""
    from gacq.export.int8 import Int8Linear, int8_unsupported

    torch.manual_seed(0)
    lin = nn.Linear(40, 12)
    q = QuantLinear(lin, 8, 8, a_dynamic=True)
    q.init_weight("minmax")
    q.a_quant = True
    x = torch.randn(2, 9, 40)
    x[1, 3] *= 60.0
    assert int8_unsupported(q) is None
    e = Int8Linear(q)
    with torch.no_grad():
        want, got = q(x), e(x)
    scale = want.abs().amax()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale.item())


def test_cli_quantize_export_and_refusal(dit, tmp_path):
    path, calib, root = dit
    out = tmp_path / "q"
    # quantized through the CLI's entry point in this process; the checkpoint is exported by a new interpreter
    r = gacq_here("quantize", "--model", path, "--method", "rtn", "--wbits", 8, "--abits", 8, "--act-granularity",
                  "token", "--calib", calib, "--record-steps", 10, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "quant_config.json").read_text())["config"]["act_granularity"] == "token"
    r = gacq("export", out, "--backend", "int8", "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr + r.stdout
    r = gacq_here("quantize", "--model", path, "--method", "rtn", "--wbits", 8, "--abits", 32, "--act-granularity",
                  "token", "--calib", calib, "--record-steps", 10, "--out", tmp_path / "bad", "--device", "cpu")
    assert r.returncode != 0 and "act-granularity" in (r.stderr + r.stdout) and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
    # the default leaves the config (and the resume fingerprints of earlier runs) as they were
    assert "act_granularity" not in QuantConfig(method="rtn", wbits=8, abits=8).to_json()


def test_float_input_linear_is_not_dynamic_and_reloads(tiny_model_dir, tmp_path):
    """TFMQ-DM's faithful preset keeps the time embedding's second Linear's input float: with per-token inputs
    elsewhere, that layer is neither dynamic nor calibrated, and the checkpoint loads back to the same outputs."""
    loaded = load_model(tiny_model_dir)
    calib = collect(loaded, SampleConfig(steps=4), CalibDataConfig(selection="all", n_trajectories=2),
                    device="cpu", progress=False)
    cfg = QuantConfig(method="tfmq", preset="faithful", wbits=8, abits=8, act_granularity="token",
                      recon=ReconConfig(iters=2), calib=CalibDataConfig(n_trajectories=2, n_steps=4))
    calib.save(tmp_path / "calib")
    quantize_to_dir(loaded, cfg, tmp_path / "q", calib=tmp_path / "calib", progress=False)
    qc = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    floats = [n for n, e in qc["layers"].items() if e["type"] == "QuantLinear" and e["abits"] is None]
    assert floats and not any(qc["layers"][n].get("a_dynamic") for n in floats)
    assert any(e.get("a_dynamic") for e in qc["layers"].values())
    q_disk = load_model(tmp_path / "q").model
    q_mem = quantize(loaded, cfg, CalibrationSet.load(tmp_path / "calib"), progress=False)
    for m in (q_mem, q_disk):
        m.gacq_fsc.apply(m, 0)
    cs = CalibrationSet.load(tmp_path / "calib")
    idx = torch.arange(4)
    torch.testing.assert_close(_eps(q_disk, cs, idx), _eps(q_mem, cs, idx), rtol=0, atol=1e-5)
