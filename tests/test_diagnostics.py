"""Diagnostics (the GAC paper's Figures 1a and 2) on a tiny real UNet2DModel: the cosine matrix's
properties and one entry against a direct autograd computation, models left unchanged, the
soft rounding used for measuring reproduces hard rounding, alignment numbers against numpy and a
direct computation, and `gacq diagnose` end to end as a subprocess (files, JSON, clear errors)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gacq import diagnostics as D
from gacq.errors import GacqError
from gacq.models import LoadedModel, build_model, load_model, save_model
from gacq.quant.api import QuantConfig, quantize
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.checkpoint import save_quantized
from gacq.quant.gac import GACConfig
from gacq.quant.modules import QuantLayer
from gacq.quant.recon import ReconConfig, capture_unit_io, lp_loss_per_sample, trainable_layers
from gacq.sampling import SampleConfig

from .conftest import gacq_here

STEPS = 6
RESNET, ATTN = "down_blocks.1.resnets.0", "mid_block.attentions.0"
GAC_CFG = QuantConfig(method="gac", gac=GACConfig(meta_iters=2, batch_size=8, val_fraction=0.1, groups=3),
                      recon=ReconConfig(iters=2, batch_size=8), calib=CalibDataConfig(n_trajectories=8, n_steps=STEPS))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fp():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def calib(fp):
    return collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(selection="all", n_trajectories=8),
                   progress=False)


@pytest.fixture(scope="module")
def rtn(fp):
    return quantize(LoadedModel(fp), QuantConfig(method="rtn", abits=None), None, progress=False)


@pytest.fixture(scope="module")
def gac_q(fp, calib):
    return quantize(LoadedModel(fp), GAC_CFG, calib, progress=False)


@pytest.fixture(scope="module")
def files(fp, calib, rtn, gac_q, tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    save_model(fp, root / "model")
    calib.save(root / "calib")
    save_quantized(gac_q, root / "gac", {"config": GAC_CFG.to_json()}, dict(fp.config), {})
    save_quantized(rtn, root / "rtn", {"method": "rtn"}, dict(fp.config), {})
    small = collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(selection="all", n_trajectories=4),
                    progress=False)
    small.save(root / "calib_small")
    return root


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, \
        [(m.adaround, m.w_quant, m.a_quant) for m in model.modules() if isinstance(m, QuantLayer)]


def _assert_same(model, before):
    sd, flags = before
    now, now_flags = _state(model)
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert len(now_flags) == len(flags) and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(now_flags, flags))
    assert all("adaround" not in m._modules for m in model.modules() if isinstance(m, QuantLayer)
               and m.adaround is None)


def test_cosine_matrix_properties_one_entry_by_autograd_and_state_unchanged(fp, calib, rtn):
    before = _state(rtn)
    res = D.timestep_gradient_cosine(rtn, fp, calib, [ATTN, RESNET], max_per_step=4)
    _assert_same(rtn, before)
    assert list(res["blocks"]) == [RESNET, ATTN]  # execution order
    assert res["steps"] == list(range(STEPS)) and res["n_per_step"] == [4] * STEPS
    assert res["timesteps"] == [int(calib.t[calib.step == s][0]) for s in range(STEPS)]
    for b in list(res["blocks"].values()) + [res["mean"]]:
        d = b["distance"]
        assert d.shape == (STEPS, STEPS) and torch.isfinite(d).all()
        assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
        assert float(d.min()) >= 0 and float(d.max()) <= 2 and float(d.max()) > 0
    torch.testing.assert_close(res["mean"]["distance"], (res["blocks"][RESNET]["distance"]
                                                         + res["blocks"][ATTN]["distance"]) / 2)

    # entry (1, 4) of the resnet block, directly: plain AdaRound on the block, plain autograd
    unit, fp_unit = rtn.get_submodule(RESNET), fp.get_submodule(RESNET)
    grads = []
    for s in (1, 4):
        idx = torch.nonzero(calib.step == s).flatten()[:4]
        run = lambda m, lo, hi, idx=idx: m(calib.x[idx][lo:hi], calib.t[idx][lo:hi])  # noqa: E731
        args, kwargs, _ = capture_unit_io(rtn, unit, run, 4, 4, want_output=False)
        _, _, target = capture_unit_io(fp, fp_unit, run, 4, 4, want_output=True)
        adas = [m.enable_adaround() for m in trainable_layers(unit)]
        loss = lp_loss_per_sample(unit(*args, **kwargs), target, 2.0).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [a.alpha for a in adas])]).double())
        for m in trainable_layers(unit):
            m.adaround = None
    cos = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    assert float(res["blocks"][RESNET]["distance"][1, 4]) == pytest.approx(1 - cos, abs=1e-5)


def test_measuring_reproduces_the_current_rounding_and_leaves_models_alone(fp, calib, rtn, gac_q, files):
    loaded = load_model(files / "gac").model
    for model in (gac_q, loaded):  # hard AdaRound in memory (+ frozen TIB layers); a checkpoint's grid weights
        unit = model.get_submodule(RESNET)
        x, t = calib.x[:3], calib.t[:3]
        before = _state(model)
        with torch.no_grad():
            out = model(x, t).sample
            current = {id(m): m.quantized_weight().clone() for m in trainable_layers(unit)}
        with D.measure_state(model), D.soft_rounding(unit) as theta:
            assert len(theta) == len(trainable_layers(unit)) and all(v.requires_grad for v in theta.values())
            with torch.no_grad():  # the measured point is the model's current rounding
                for m in trainable_layers(unit):
                    torch.testing.assert_close(m.quantized_weight(), current[id(m)], rtol=0, atol=1e-6)
        _assert_same(model, before)
        res = D.timestep_gradient_cosine(model, fp, calib, [RESNET], max_per_step=2)
        assert torch.isfinite(res["blocks"][RESNET]["distance"]).all()
        _assert_same(model, before)
        with torch.no_grad():
            assert torch.equal(model(x, t).sample, out)
    # the grid-init model built from a checkpoint is the rtn model (common presets share layers and grids)
    init = D.fp_init_model(loaded, fp)
    rtn_layers = dict((n, m) for n, m in rtn.named_modules() if isinstance(m, QuantLayer))
    for n, m in init.named_modules():
        if isinstance(m, QuantLayer):
            torch.testing.assert_close(m.quantized_weight(), rtn_layers[n].quantized_weight())


def test_alignment_numbers(fp, calib, rtn, gac_q):
    names = [RESNET, ATTN]
    weights = {n: gac_q.gacq_gac_weights[n]["weights"] for n in names}
    g = GAC_CFG.gac
    res = D.weight_alignment(rtn, fp, calib, weights, g.val_fraction, g.groups, g.seed, n_groups=10,
                             per_sample="loop")
    assert res["split_check"] == "agrees" and res["n_val"] == STEPS and res["n_train"] == len(calib) - STEPS
    for n in names:
        b = res["blocks"][n]
        gw, ga = b["group_weight"].numpy(), b["group_alignment"].numpy()
        assert b["correlation"] == pytest.approx(float(np.corrcoef(gw, ga)[0, 1]), abs=1e-10)
        assert sorted(b["group_size"]) in ([4] * 8 + [5] * 2, [4] * 8 + [5, 5]) and sum(b["group_size"]) == 42
        assert np.all(np.diff(gw) >= 0)  # groups sorted by weight
        assert torch.all(b["alignment"].abs() <= 1 + 1e-9)
        train = torch.nonzero(weights[n] > 0).flatten()
        want = [float(weights[n][train][calib.step[train] == s].double().mean()) for s in range(STEPS)]
        np.testing.assert_allclose(b["weight_per_step"].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(res["mean"]["group_weight"].numpy(),
                               (res["blocks"][RESNET]["group_weight"] + res["blocks"][ATTN]["group_weight"]).numpy() / 2)
    # torch.func per-sample gradients give the loop's alignments
    res_v = D.weight_alignment(rtn, fp, calib, weights, n_groups=10, per_sample="vmap", block_names=[RESNET])
    torch.testing.assert_close(res_v["blocks"][RESNET]["alignment"], res["blocks"][RESNET]["alignment"],
                               rtol=1e-4, atol=1e-6)
    # one alignment directly: cos(grad l_i, grad of the mean validation loss)
    unit, fp_unit = rtn.get_submodule(RESNET), fp.get_submodule(RESNET)
    val = torch.nonzero(weights[RESNET] == 0).flatten()
    i = int(torch.nonzero(weights[RESNET] > 0).flatten()[3])
    adas = [m.enable_adaround() for m in trainable_layers(unit)]

    def grad_of(idx):
        run = lambda m, lo, hi: m(calib.x[idx][lo:hi], calib.t[idx][lo:hi])  # noqa: E731
        args, kwargs, _ = capture_unit_io(rtn, unit, run, len(idx), 64, want_output=False)
        _, _, target = capture_unit_io(fp, fp_unit, run, len(idx), 64, want_output=True)
        loss = lp_loss_per_sample(unit(*args, **kwargs), target, 2.0).mean()
        return torch.cat([x.flatten() for x in torch.autograd.grad(loss, [a.alpha for a in adas])]).double()

    gi, gv = grad_of(torch.tensor([i])), grad_of(val)
    for m in trainable_layers(unit):
        m.adaround = None
    assert float(res["blocks"][RESNET]["alignment"][3]) == pytest.approx(float(gi @ gv / (gi.norm() * gv.norm())),
                                                                         abs=1e-5)


def test_pearson_and_api_errors(fp, calib, rtn, gac_q):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b = b + 0.5 * a
    assert D.pearson(a, b) == pytest.approx(float(np.corrcoef(a, b)[0, 1]), abs=1e-12)
    assert math.isnan(D.pearson([1, 1, 1], [1, 2, 3]))
    weights = {RESNET: gac_q.gacq_gac_weights[RESNET]["weights"]}
    with pytest.raises(GacqError, match="cover 47 samples but the calibration set has 48"):
        D.weight_alignment(rtn, fp, calib, {RESNET: weights[RESNET][:-1]})
    with pytest.raises(GacqError, match="not the timestep-balanced split"):
        D.weight_alignment(rtn, fp, calib, weights, 0.1, 3, seed=5)
    with pytest.raises(GacqError, match="no block named 'up_blocks.9'"):
        D.timestep_gradient_cosine(rtn, fp, calib, ["up_blocks.9"])
    with pytest.raises(GacqError, match="no block of"):
        D.weight_alignment(rtn, fp, calib, {"nope": weights[RESNET]})


def test_diagnose_without_checkpoint_and_on_a_weight_subset(fp, calib, files, tmp_path):
    s = D.diagnose(None, str(files / "model"), files / "calib", tmp_path / "a", blocks=[ATTN], max_per_step=2,
                   progress=False)
    assert s["alignment"] is None and "rtn" in s["init_model"] and not (tmp_path / "a" / "cosine_calibrated").exists()
    assert sorted(s["files"]) == sorted(["diagnose.json"] + [f"cosine_init/cosine_{b}.{e}" for b in (ATTN, "mean")
                                                              for e in ("png", "csv")])
    # gac reconstructs on every 2nd step here (TFMQ-DM's weight subset): its weights cover 24 of the 48 samples
    cfg = QuantConfig(method="gac", gac=GAC_CFG.gac, recon=GAC_CFG.recon, calib=CalibDataConfig(n_trajectories=8, n_steps=3))
    q = quantize(LoadedModel(fp), cfg, calib, progress=False)
    save_quantized(q, tmp_path / "q3", {"config": cfg.to_json()}, dict(fp.config), {})
    s = D.diagnose(tmp_path / "q3", str(files / "model"), files / "calib", tmp_path / "b", blocks=[RESNET],
                   max_per_step=2, n_groups=5, progress=False)
    al = s["alignment"]
    assert "subset (24 of 48" in al["samples"] and al["split_check"] == "agrees" and al["n_train"] == 21
    assert al["weight_per_timestep"]["steps"] == [0, 2, 4] and (tmp_path / "b" / "alignment.png").is_file()


def gacq(*args):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_diagnose_writes_figures_csv_json(files, tmp_path):
    out = tmp_path / "out"
    proc = gacq("diagnose", "--calib", files / "calib", "--out", out, "--model", files / "model",
                "--qdir", files / "gac", "--max-per-step", 4, "--groups", 10)
    assert proc.returncode == 0, proc.stderr
    assert "Pearson r" in proc.stdout and str(out) in proc.stdout
    expect = ["diagnose.json", "alignment.png", "alignment.csv", "weight_per_timestep.png", "weight_per_timestep.csv"]
    expect += [f"{d}/cosine_{b}.{ext}" for d in ("cosine_init", "cosine_calibrated") for b in ("mean", RESNET, ATTN)
               for ext in ("png", "csv")]
    for f in expect:
        assert (out / f).is_file(), f
    for f in out.rglob("*.png"):
        with Image.open(f) as im:
            im.verify()
    with Image.open(out / "alignment.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200
    rows = list(csv.reader((out / "cosine_calibrated" / "cosine_mean.csv").open()))
    assert len(rows) == STEPS + 1 and all(len(r) == STEPS + 1 for r in rows) and rows[1][1] == "0"
    summary = json.loads((out / "diagnose.json").read_text())
    assert summary["command"].startswith("gacq diagnose") and summary["commit"]
    md = summary["cosine"]["mean_distance"]
    assert set(md[RESNET]) == {"init", "calibrated"} and md["mean"]["init"] > 0
    al = summary["alignment"]
    assert al["split_check"] == "agrees" and al["n_groups"] == 10
    assert set(al["correlation"]) >= {RESNET, ATTN, "mean"}
    assert len(al["weight_per_timestep"]["relative_weight_mean"]) == STEPS
    assert set(summary["files"]) == set(expect) | {str(p.relative_to(out)) for p in out.rglob("*.*")}
    acsv = list(csv.DictReader((out / "alignment.csv").open()))
    assert {r["block"] for r in acsv} >= {RESNET, "mean"} and len([r for r in acsv if r["block"] == "mean"]) == 10


@pytest.mark.parametrize("case,msg", [
    ("not_calib", "is not a calibration set"),
    ("no_weights", "need a GAC checkpoint"),
    ("bad_block", "no block named 'mid_block.nothing'"),
    ("length", "cover 48 calibration samples but the calibration set has 24"),
])
def test_cli_diagnose_errors(files, tmp_path, case, msg):
    args = {"calib": files / "calib", "qdir": files / "gac", "extra": []}
    if case == "not_calib":
        args["calib"] = files / "model"
    elif case == "no_weights":
        args["qdir"], args["extra"] = files / "rtn", ["--alignment"]
    elif case == "bad_block":
        args["extra"] = ["--blocks", f"{RESNET},mid_block.nothing"]
    else:
        args["calib"] = files / "calib_small"
    # refusals through the CLI's entry point in this process (the full run above is a real subprocess)
    proc = gacq_here("diagnose", "--calib", args["calib"], "--out", tmp_path / "o", "--model", files / "model",
                     "--qdir", args["qdir"], "--max-per-step", 2, *args["extra"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert msg in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "diagnose.json").exists()
