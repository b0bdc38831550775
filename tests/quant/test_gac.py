"""GAC (method.md): meta-gradient against finite differences in float64, the surrogate's group
gradients against an explicit per-sample formula, the validation split, down-weighting of
inconsistent samples, and gac with zero meta-iterations == tfmq."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file

from gacq.errors import GacqError
from gacq.quant.gac import GACBlock, GACConfig, validation_split
from gacq.quant.recon import UnitData, lp_loss_per_sample
from gacq.quant.wrap import quant_layers, wrap_layers


class Holder(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.b = block


def _block(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    fp = ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=8, groups=2).to(dtype).eval()
    q = Holder(copy.deepcopy(fp))
    wrap_layers(q, 3, None)
    for _, m in quant_layers(q):
        m.init_weight("mse")
    return fp, q.b


def _data(fp, unit, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x, te = torch.randn(n, 4, 6, 6, generator=g, dtype=dtype), torch.randn(n, 8, generator=g, dtype=dtype)
    with torch.no_grad():
        y = fp(x, te)
    return x, te, y


def test_validation_split_is_balanced_and_grouped():
    step = torch.arange(200) % 20
    train, groups = validation_split(step, 0.05, 5, seed=3)
    val = torch.cat(groups)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 200
    assert torch.bincount(step[val], minlength=20).tolist() == [1] * 20  # 5% of 10 per step, at least 1
    for k, gidx in enumerate(groups):  # contiguous ranges of 4 steps each
        assert set(step[gidx].tolist()) == set(range(4 * k, 4 * k + 4))
    with pytest.raises(GacqError, match="at least K=5"):
        validation_split(torch.arange(10) % 3, 0.05, 5)
    with pytest.raises(GacqError, match="too few"):
        validation_split(torch.arange(5), 0.05, 5)
    with pytest.raises(GacqError, match="inner step"):
        GACConfig(inner_lr=0)


def meta_grad_case():
    """A float64 block, non-uniform scores, a minibatch of 8 and K=5 validation groups."""
    fp, unit = _block()
    x, te, y = _data(fp, unit, 40)
    train, groups = validation_split(torch.arange(40) % 10, 0.2, 5)
    blk = GACBlock(unit, UnitData(unit, [x, te], {}, y, 2.0), train, groups, GACConfig(inner_lr=1.0))
    with torch.no_grad():
        blk.scores.copy_(torch.randn(len(train), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3)
    return blk, torch.arange(8), groups


def test_meta_gradient_matches_central_finite_differences():
    blk, batch, groups = meta_grad_case()
    loss, _ = blk.meta_loss(batch, groups)
    (grad,) = torch.autograd.grad(loss, blk.scores)
    eps = 1e-6
    for j in (0, 3, 7, 20):  # inside and outside the minibatch (outside: only through the softmax)
        with torch.no_grad():
            blk.scores[j] += eps
        lp = blk.meta_loss(batch, groups)[0].item()
        with torch.no_grad():
            blk.scores[j] -= 2 * eps
        lm = blk.meta_loss(batch, groups)[0].item()
        with torch.no_grad():
            blk.scores[j] += eps
        fd = (lp - lm) / (2 * eps)
        # float64 central differences of a loss ~1e-3: absolute error ~1e-12
        assert grad[j].item() == pytest.approx(fd, rel=1e-3, abs=1e-11)
    blk.close()


@pytest.mark.parametrize("nproc", [2, 6])
def test_meta_gradient_split_over_ranks_equals_one_process(tmp_path, nproc):
    """Under torchrun (gloo) the K=5 validation groups are split over the ranks (6 ranks: one has
    none) and the shares' gradients all-reduced: the same dL/ds as one process, float64."""
    blk, batch, groups = meta_grad_case()
    loss, info = blk.meta_loss(batch, groups)
    (want,) = torch.autograd.grad(loss, blk.scores)
    single, single_loss, _ = blk.meta_grad(batch, groups)  # one process: the plain path
    assert torch.equal(single, want)
    out = tmp_path / "grad.safetensors"
    worker = Path(__file__).with_name("gac_dp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(nproc), str(worker), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out))
    torch.testing.assert_close(got["grad"], want, rtol=1e-10, atol=1e-16)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    assert got["gm"].item() == pytest.approx(info["gm"], rel=1e-10, abs=1e-18)
    assert got["grad"].abs().max() > 0
    blk.close()


def test_group_gradients_match_explicit_formula():
    """G_{w,k,i} = -eta * (n/|B|) * grad_theta' l_k(theta') . grad_theta l_i(theta), from per-sample gradients."""
    fp, unit = _block()
    x, te, y = _data(fp, unit, 40)
    train, groups = validation_split(torch.arange(40) % 10, 0.2, 5)
    cfg = GACConfig(inner_lr=0.5)
    blk = GACBlock(unit, UnitData(unit, [x, te], {}, y, 2.0), train, groups, cfg)
    batch = torch.arange(6)
    names = list(blk.theta)
    theta = [blk.theta[k] for k in names]
    w = blk.weights()
    w_b = w[batch]
    n, nb = len(train), len(batch)
    per = blk._loss(blk.theta, train[batch])
    inner = (n * w_b * per).mean()
    grads = torch.autograd.grad(inner, theta, create_graph=True)
    theta2 = {k: blk.theta[k] - cfg.inner_lr * g for k, g in zip(names, grads)}
    ell = blk._loss(theta2, groups[1]).mean()
    (g_auto,) = torch.autograd.grad(ell, w_b, retain_graph=True)
    g_val = torch.autograd.grad(ell, [theta2[k] for k in names], retain_graph=True)
    for pos, i in enumerate(train[batch].tolist()):
        li = lp_loss_per_sample(unit(x[i:i + 1], te[i:i + 1]), y[i:i + 1], 2.0).sum()
        gi = torch.autograd.grad(li, theta)
        explicit = -cfg.inner_lr * (n / nb) * sum((a * b).sum() for a, b in zip(g_val, gi))
        assert g_auto[pos].item() == pytest.approx(explicit.item(), rel=1e-8, abs=1e-15)
    blk.close()


def test_inconsistent_samples_are_down_weighted():
    """A fifth of the training samples get targets from another block; their learned weights fall
    well below uniform (the validation split keeps clean targets)."""
    fp, unit = _block(torch.float32)
    torch.manual_seed(5)
    other = ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=8, groups=2).eval()
    n = 200
    x, te, y = _data(fp, unit, n, torch.float32)
    with torch.no_grad():
        y_bad = other(x, te)
    step = torch.arange(n) % 10
    train, groups = validation_split(step, 0.1, 5)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:40]]] = True
    target = torch.where(bad[:, None, None, None], y_bad, y)
    blk = GACBlock(unit, UnitData(unit, [x, te], {}, target, 2.0), train, groups,
                   GACConfig(inner_lr=1.0, meta_lr=0.2, meta_iters=60, batch_size=32))
    w, log = blk.run()
    blk.close()
    rel = w * len(train)  # 1 = uniform
    b = bad[train]
    assert rel[b].mean() < 0.6 and rel[~b].mean() > 1.0  # measured 0.41 and 1.17
    assert abs(float(w.sum()) - 1) < 1e-9 and len(log) == 60


def test_unvisited_samples_keep_their_score_except_under_dense_adam():
    """M x B < N: lazy Adam and SGD leave the never-visited samples' scores at the initial value;
    dense Adam moves them all by the same amount (the softmax normaliser's tiny gradient, scaled
    up to a full step by Adam), the bias seen on the H100 run (GACConfig.meta_optimizer)."""
    fp, unit = _block(torch.float32)
    n = 200
    x, te, y = _data(fp, unit, n, torch.float32)
    train, groups = validation_split(torch.arange(n) % 10, 0.1, 5)
    moved = {}
    for opt in ("adam", "sgd", "dense-adam"):
        fp, unit = _block(torch.float32)
        blk = GACBlock(unit, UnitData(unit, [x, te], {}, y, 2.0), train, groups,
                       GACConfig(meta_iters=2, batch_size=32, meta_optimizer=opt, meta_lr=0.2))
        gen = torch.Generator().manual_seed(0)
        batches = blk._batches(gen)
        visited = torch.cat([next(batches) for _ in range(2)])
        assert len(set(visited.tolist())) == 64  # one epoch's permutation: no repeats
        blk.run()
        s = blk.scores.detach()
        blk.close()
        unvisited = torch.ones(len(train), dtype=torch.bool)
        unvisited[visited] = False
        moved[opt] = (s[unvisited] - 1 / 32).abs().max().item()
        assert torch.allclose(s[unvisited], s[unvisited][0].expand(int(unvisited.sum())))
    assert moved["adam"] == 0 and moved["sgd"] < 1e-6 and moved["dense-adam"] > 0.05


def _run_block(mode, opt="adam", device="cpu", target_nan=False, iters=6):
    fp, unit = _block(torch.float32)
    n = 120
    x, te, y = _data(fp, unit, n, torch.float32)
    if target_nan:
        y = y.clone()
        y[:] = float("nan")
    train, groups = validation_split(torch.arange(n) % 10, 0.1, 5)
    unit = unit.to(device)
    blk = GACBlock(unit, UnitData(unit, [x, te], {}, y, 2.0, device=device), train, groups,
                   GACConfig(meta_iters=iters, batch_size=16, meta_optimizer=opt, val_batch=2),
                   cuda_graph=(mode == "capture"))
    if mode == "static":
        blk.static_mode = "static"  # the capture path's static-buffer bookkeeping, run eagerly
    assert blk.static_mode == (None if mode == "eager" else mode)
    try:
        return blk.run()
    finally:
        blk.close()


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_static_buffer_meta_gradient_equals_the_eager_loop(opt):
    """The path that the CUDA graph replays (indices copied into static buffers, losses kept on
    the device and checked at the end) learns exactly the eager loop's weights and log."""
    w_e, log_e = _run_block("eager", opt)
    w_s, log_s = _run_block("static", opt)
    assert torch.equal(w_e, w_s) and not torch.equal(w_e, torch.full_like(w_e, w_e[0]))
    assert len(log_s) == 6 and [r["loss"] for r in log_s] == pytest.approx([r["loss"] for r in log_e], rel=1e-12)
    assert [r["gm"] for r in log_s] == pytest.approx([r["gm"] for r in log_e], rel=1e-12)


def test_static_buffer_path_names_the_first_nan_iteration():
    for mode in ("eager", "static"):
        with pytest.raises(GacqError, match="meta-objective is nan at meta-iteration 0; lower --gac-inner-lr"):
            _run_block(mode, target_nan=True, iters=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_meta_gradient_on_cuda_equals_eager():
    import warnings

    w_e, log_e = _run_block("eager", device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture (fallback to eager) fails this test
        w_g, log_g = _run_block("capture", device="cuda")
    torch.testing.assert_close(w_g, w_e, rtol=1e-6, atol=1e-9)
    assert [r["loss"] for r in log_g] == pytest.approx([r["loss"] for r in log_e], rel=1e-5)


def test_gac_cost_benchmark_cpu_smoke(tmp_path):
    """benchmarks/gac_cost.py runs end to end on the CPU and writes its JSON and table."""
    import json

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gac_cost.py"), "--device", "cpu",
                        "--trajectories", "2", "--iters", "2", "--meta-iters", "1", "--units", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "gac_cost.json").read_text())
    (row,) = res["units"]
    assert row["meta_eager_ms_per_iter"] > 0 and row["weights_ms_per_iter"] > 0
    assert all(v > 1 for v in row["gac_over_tfmq_per_block"].values())
    assert "| down_blocks.0.resnets.0 (ResnetBlock2D) |" in (out / "README.md").read_text()
