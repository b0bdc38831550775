"""Output bias correction (gacq.quant.bias_correction) on tiny real diffusers models: the measured
bias against a naive per-sample loop, the fold against a direct output shift (UNet, and DiT's
patchified learned-variance output), the corrected model's remaining bias, the checkpoint and
the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gacq.conditioning import predict_eps
from gacq.errors import GacqError
from gacq.models import LoadedModel, build_model, load_model
from gacq.quant.api import QuantConfig, quantize
from gacq.quant.bias_correction import fold_output_bias, measure_output_bias, output_layer
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.checkpoint import save_quantized
from gacq.quant.recon import ReconConfig
from gacq.sampling import SampleConfig

STEPS = 5


@pytest.fixture(scope="module")
def fp():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def calib_all(fp):
    return collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(selection="all", n_trajectories=6),
                   progress=False)


def _tfmq(fp, calib, **kw):
    """W3A8 tfmq (per-step activation sets): large enough errors for a clear output bias."""
    cfg = QuantConfig(method="tfmq", wbits=3, abits=8, recon=ReconConfig(iters=3, batch_size=8),
                      calib=CalibDataConfig(n_trajectories=6, n_steps=3), **kw)
    return quantize(LoadedModel(fp), cfg, calib, progress=False)


@pytest.fixture(scope="module")
def q_tfmq(fp, calib_all):
    return _tfmq(fp, calib_all)


def test_measured_bias_matches_a_naive_per_sample_loop(fp, q_tfmq, calib_all):
    """Step-grouped, batched measurement (float64 accumulation) against one sample at a time with
    that sample's per-step activation set loaded. Tolerance 1e-4 against a bias of 5e-3 or more: the
    models run in float32, batching changes their last bits, and an activation on a rounding boundary
    then lands one quantization level over (measured: differences up to 1.4e-5)."""
    m = measure_output_bias(q_tfmq, fp, calib_all, batch_size=4)
    errs, cross, norm = [], {}, {}
    with torch.no_grad():
        for i in range(len(calib_all)):
            q_tfmq.gacq_fsc.apply(q_tfmq, int(calib_all.step[i]))
            x, t = calib_all.x[i:i + 1], calib_all.t[i:i + 1]
            e_fp = fp(x, t).sample.double()
            d = q_tfmq(x, t).sample.double() - e_fp
            errs.append(d[0].mean(dim=(1, 2)))
            k = int(calib_all.step[i])  # the gain: a plain dot-product ratio per step
            cross[k] = cross.get(k, 0.0) + float((d * e_fp).sum())
            norm[k] = norm.get(k, 0.0) + float((e_fp * e_fp).sum())
    q_tfmq.gacq_fsc.apply(q_tfmq, 0)
    ref = torch.stack(errs).mean(0)
    assert m["bias"].shape == (3,)
    assert (m["bias"] - ref).abs().max() < 1e-4, (m["bias"] - ref)
    assert sum(m["count"].values()) == len(calib_all) and sorted(m["by_step"]) == list(range(STEPS))
    assert m["bias"].abs().max() > 1e-3  # a real bias to correct, far above the tolerance
    # the gains (0.016-0.042) are ratios of sums over few samples, where one level flip moves them more: measured
    # differences up to 6.9e-5 with two torch threads and 4.1e-4 with one (session 47, step 0), hence 1e-3
    for k in range(STEPS):
        assert abs(m["gain_by_step"][k] - cross[k] / norm[k]) < 1e-3, (k, m["gain_by_step"][k], cross[k] / norm[k])
    assert max(abs(g) for g in m["gain_by_step"].values()) > 1e-2  # measured -0.016 to -0.042: far above the tolerance


def test_fold_shifts_unet_predictions_by_minus_bias(fp):
    q = build_model("tiny").eval()
    q.load_state_dict(fp.state_dict())
    b = torch.tensor([0.3, -0.2, 0.05], dtype=torch.float64)
    fold_output_bias(q, b)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        d = (q(x, t).sample - fp(x, t).sample).double()
    assert torch.allclose(d, -b.view(1, 3, 1, 1).expand_as(d), atol=1e-6)


def test_fold_on_dit_shifts_only_the_noise_half_of_each_patch():
    """DiT's proj_out_2 feature f is channel f % out_channels after the unpatchify; with learned
    variance (out 6 = 2 x in 3) only channels 0..2 move."""
    torch.manual_seed(1)
    fp = build_model("tiny-dit").eval()
    q = build_model("tiny-dit").eval()
    q.load_state_dict(fp.state_dict())
    name, _, channel = output_layer(q)
    assert name == "proj_out_2" and (channel >= 0).sum() == len(channel) // 2
    b = torch.tensor([0.1, -0.4, 0.25], dtype=torch.float64)
    fold_output_bias(q, b)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 1])
    with torch.no_grad():
        d = (q(x, t, class_labels=y).sample - fp(x, t, class_labels=y).sample).double()
    assert torch.allclose(d[:, :3], -b.view(1, 3, 1, 1).expand_as(d[:, :3]), atol=1e-6)
    assert d[:, 3:].abs().max() < 1e-6


def test_quantize_with_bias_correction_leaves_no_output_bias(fp, q_tfmq, calib_all, tmp_path):
    before = measure_output_bias(q_tfmq, fp, calib_all)["bias"]
    qc = _tfmq(fp, calib_all, bias_correction=True)
    after = measure_output_bias(qc, fp, calib_all)["bias"]
    assert before.abs().max() > 1e-3 and after.abs().max() < 1e-5
    assert qc.gacq_output_bias["samples"] == len(calib_all) and qc.gacq_output_bias["layer"] == "conv_out"
    assert torch.allclose(torch.tensor(qc.gacq_output_bias["bias"], dtype=torch.float64), before, atol=1e-6)
    # everything but the last layer's bias is the uncorrected model's
    sa, sb = q_tfmq.state_dict(), qc.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == ["conv_out.bias"]
    # the checkpoint keeps the correction (a float parameter) and records it
    save_quantized(qc, tmp_path / "q", {"method": "tfmq"}, dict(fp.config), {})
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["output_bias"]["bias"] == qc.gacq_output_bias["bias"]
    back = load_model(tmp_path / "q")
    x, t = calib_all.x[:3], calib_all.t[:3]
    with torch.no_grad():
        for k in (0, STEPS - 1):
            qc.gacq_fsc.apply(qc, k)
            back.step_hook(k, SampleConfig(steps=STEPS))
            assert torch.equal(predict_eps(qc, x, t), predict_eps(back.model, x, t))


def test_bias_correction_errors(fp, q_tfmq):
    other = collect(LoadedModel(fp), SampleConfig(steps=STEPS - 1), CalibDataConfig(selection="all", n_trajectories=1),
                    progress=False)
    with pytest.raises(GacqError, match="same sampler"):
        measure_output_bias(q_tfmq, fp, other)
    with pytest.raises(GacqError, match="bias correction needs calibration"):
        quantize(LoadedModel(fp), QuantConfig(method="rtn", wbits=4, abits=None, bias_correction=True), None)
    with pytest.raises(GacqError, match="does not know the last layer"):
        output_layer(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(GacqError, match="does not fit"):
        fold_output_bias(build_model("tiny"), torch.zeros(4))


def test_cli_quantize_with_bias_correction(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "gacq", "quantize", "--model", str(tiny_model_dir), "--method", "rtn",
                        "--wbits", "3", "--abits", "8", "--steps", "5", "--record-steps", "3",
                        "--calib-trajectories", "4", "--bias-correction", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["config"]["bias_correction"] is True and len(meta["output_bias"]["bias"]) == 3
    assert meta["output_bias"]["samples"] > 0
