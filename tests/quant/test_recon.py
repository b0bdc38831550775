import pytest
import torch

from gacq.models import build_model
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.recon import (ActReconConfig, ReconConfig, capture_unit_io, find_units, lp_loss_per_sample,
                              reconstruct_unit)
from gacq.quant.wrap import quant_layers, set_quant_state, wrap_layers
from gacq.models import LoadedModel
from gacq.sampling import SampleConfig


def test_units_by_type():
    model = build_model("ddpm-cifar10")
    wrap_layers(model, 4, 8)
    units = find_units(model)
    kinds = [type(m).__name__ for _, m in units]
    # 22 ResnetBlocks and 6 attention blocks, as in the DDPM CIFAR-10 UNet (baselines.md §3.1);
    # the rest are layer units: time embedding (2), conv_in, 3 down convs, 3 up convs, conv_out
    assert kinds.count("ResnetBlock2D") == 22 and kinds.count("Attention") == 6
    assert kinds.count("QuantConv2d") + kinds.count("QuantLinear") == 10
    covered = {n for n, _ in quant_layers(model) if any(n == u or n.startswith(u + ".") for u, _ in units)}
    assert covered == {n for n, _ in quant_layers(model)}


def test_lp_loss_reduction_matches_naive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 2, 5, generator=g), torch.randn(3, 4, 2, 5, generator=g)
    got = lp_loss_per_sample(a, b, 2.4)
    for i in range(3):
        naive = sum(sum(abs(a[i, c, y, x] - b[i, c, y, x]) ** 2.4 for c in range(4)) for y in range(2) for x in range(5)) / 10
        assert got[i].item() == pytest.approx(float(naive), rel=1e-5)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fp = build_model("tiny").eval()
    cs = collect(LoadedModel(fp), SampleConfig(steps=10), CalibDataConfig(n_trajectories=16, n_steps=5), progress=False)
    return fp, cs


def _prepare(fp, bits=3):
    import copy

    q = copy.deepcopy(fp)
    wrap_layers(q, bits, None)
    for _, m in quant_layers(q):
        m.init_weight("mse")
    set_quant_state(q, weights=True, acts=False)
    return q


def test_adaround_beats_rtn_on_a_block(setup):
    fp, cs = setup
    q = _prepare(fp)
    name, unit = next((n, m) for n, m in find_units(q) if type(m).__name__ == "ResnetBlock2D")
    fp_unit = fp.get_submodule(name)
    run = lambda model, lo, hi: model(cs.x[lo:hi], cs.t[lo:hi])  # noqa: E731
    q_args, _, _ = capture_unit_io(q, unit, run, len(cs), 32, want_output=False)
    args, kwargs, target = capture_unit_io(fp, fp_unit, run, len(cs), 32, want_output=True)
    assert len(target) == len(cs) == 80
    assert not torch.equal(q_args[0], args[0])  # the quantized prefix changes the block's input
    # FP inputs isolate the rounding error of this block (the prefix's error is not this block's to fix).
    # 300 iterations at lr 1e-2 instead of 20k at 1e-3 keep the test short.
    stats = reconstruct_unit(unit, args, kwargs, target, ReconConfig(iters=300, batch_size=16, lr=1e-2))
    assert stats["loss_after"] < 0.7 * stats["loss_before"], stats
    for m in unit.modules():
        if hasattr(m, "adaround") and m.adaround is not None:
            assert not m.adaround.soft


def test_sample_weights_change_what_is_fitted(setup):
    """All weight on one timestep: that timestep's error falls more than under uniform weights."""
    fp, cs = setup
    res = {}
    for mode in ("uniform", "focused"):
        q = _prepare(fp)
        name, unit = next((n, m) for n, m in find_units(q) if type(m).__name__ == "ResnetBlock2D")
        run = lambda model, lo, hi: model(cs.x[lo:hi], cs.t[lo:hi])  # noqa: E731
        args, kwargs, target = capture_unit_io(fp, fp.get_submodule(name), run, len(cs), 32, want_output=True)
        focus = cs.step == cs.step.max()
        w = focus.float() / focus.sum() if mode == "focused" else None
        reconstruct_unit(unit, args, kwargs, target, ReconConfig(iters=300, batch_size=16, lr=1e-2), sample_weights=w)
        with torch.no_grad():
            out = unit(*[a[focus] if torch.is_tensor(a) else a for a in args])
        res[mode] = lp_loss_per_sample(out, target[focus]).mean().item()
    assert res["focused"] < res["uniform"], res


def test_killed_run_resumes_bit_identical(setup, tmp_path):
    from gacq.quant.recon import reconstruct_model

    fp, cs = setup
    cfg = ReconConfig(iters=15, batch_size=8, lr=1e-2)
    full = _prepare(fp)
    reconstruct_model(full, fp, cs.x, cs.t, cfg, ckpt_dir=tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_after_third(i, name, s):
        if i == 2:
            raise Killed

    part = _prepare(fp)
    with pytest.raises(Killed):
        reconstruct_model(part, fp, cs.x, cs.t, cfg, ckpt_dir=tmp_path / "b", on_unit_done=kill_after_third,
                          progress=False)
    resumed = _prepare(fp)
    stats = reconstruct_model(resumed, fp, cs.x, cs.t, cfg, ckpt_dir=tmp_path / "b", progress=False)
    assert [s.get("resumed", False) for s in stats[:4]] == [True, True, True, False]
    names = [s["unit"] for s in stats]
    # execution order: a block's resnet runs before its attention (unlike definition order)
    assert names.index("down_blocks.1.resnets.0") < names.index("down_blocks.1.attentions.0")
    assert names.index("up_blocks.0.resnets.0") < names.index("up_blocks.0.attentions.0")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("adaround.alpha"):  # resume points keep the signs only, all a hardened rounding reads
            assert torch.equal(a[k] >= 0, b[k] >= 0), k
        else:
            assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(full(cs.x[:8], cs.t[:8]).sample, resumed(cs.x[:8], cs.t[:8]).sample)
    # every unit ended with hard rounding, and the whole W3 model moved closer to FP than RTN
    rtn = _prepare(fp)
    with torch.no_grad():
        ref = fp(cs.x[:16], cs.t[:16]).sample
        err_rtn = (rtn(cs.x[:16], cs.t[:16]).sample - ref).pow(2).mean()
        err_rec = (resumed(cs.x[:16], cs.t[:16]).sample - ref).pow(2).mean()
    assert err_rec < err_rtn


def _killed_after(fp, cs, cfg, ckpt, n):
    """Reconstruct a fresh copy of fp with resume points in ckpt, killed after unit n."""
    from gacq.quant.recon import reconstruct_model

    class Killed(Exception):
        pass

    def kill(i, name, s):
        if i == n:
            raise Killed

    with pytest.raises(Killed):
        reconstruct_model(_prepare(fp), fp, cs.x, cs.t, cfg, ckpt_dir=ckpt, on_unit_done=kill, progress=False)


def test_resume_points_are_compact_and_checked(setup, tmp_path):
    """A resume point drops the tensors the resumed run rebuilds (weight, bias, w_floor) and packs the rounding signs
    eight to a byte; resuming onto other weights is refused by name, and full-state files (before session 28) load."""
    from safetensors.torch import load_file, save_file

    from gacq.errors import GacqError
    from gacq.quant.recon import reconstruct_model

    fp, cs = setup
    cfg = ReconConfig(iters=6, batch_size=8, lr=1e-2)
    ckpt = tmp_path / "r"
    _killed_after(fp, cs, cfg, ckpt, 4)
    files = sorted(ckpt.glob("unit_*.safetensors"))
    assert len(files) == 5
    full = _prepare(fp)
    ref = reconstruct_model(full, fp, cs.x, cs.t, cfg, progress=False)
    compact_bytes = full_bytes = 0
    for i, f in enumerate(files):
        keys = load_file(str(f)).keys()
        assert not any(k.endswith(("weight", "adaround.w_floor", "adaround.alpha")) and "norm" not in k for k in keys)
        assert any(k.endswith("adaround.alpha.alpha_signs") for k in keys), f
        unit = full.get_submodule(ref[i]["unit"])
        full_bytes += sum(v.numel() * v.element_size() for v in unit.state_dict().values())
        compact_bytes += f.stat().st_size
    assert compact_bytes < full_bytes / 4, (compact_bytes, full_bytes)

    other = _prepare(fp)  # another model: one weight of the first unit changed
    with torch.no_grad():
        next(m for _, m in quant_layers(other)).weight.add_(0.01)
    with pytest.raises(GacqError, match="made from other weights"):
        reconstruct_model(other, fp, cs.x, cs.t, cfg, ckpt_dir=ckpt, progress=False)

    # the full-state format: a resumed run reads it as before (the units' finished state as the old code saved it)
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text((ckpt / "run.json").read_text())
    for i, f in enumerate(files):
        unit = full.get_submodule(ref[i]["unit"])
        save_file({k: v.contiguous() for k, v in unit.state_dict().items()}, str(old / f.name))
    resumed = _prepare(fp)
    stats = reconstruct_model(resumed, fp, cs.x, cs.t, cfg, ckpt_dir=old, progress=False)
    assert [s.get("resumed", False) for s in stats] == [True] * 5 + [False] * (len(stats) - 5)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_refuses_other_settings(setup, tmp_path):
    from gacq.errors import GacqError
    from gacq.quant.recon import reconstruct_model

    fp, cs = setup
    reconstruct_model(_prepare(fp), fp, cs.x, cs.t, ReconConfig(iters=2, batch_size=8), ckpt_dir=tmp_path / "r",
                      progress=False)
    with pytest.raises(GacqError, match="another run"):
        reconstruct_model(_prepare(fp), fp, cs.x, cs.t, ReconConfig(iters=3, batch_size=8), ckpt_dir=tmp_path / "r",
                          progress=False)


def test_batch_plan_is_the_seeded_permutation_sequence():
    from gacq.quant.recon import batch_plan

    plan = batch_plan(20, 7, 6, seed=3)
    g = torch.Generator().manual_seed(3)
    naive = [torch.randperm(20, generator=g)[:6] for _ in range(7)]
    assert plan.shape == (7, 6)
    for row, ref in zip(plan, naive):
        assert torch.equal(row, ref)
    assert batch_plan(5, 2, 32, seed=0).shape == (2, 5)  # batch larger than the set: all samples


def test_cosine_lr_matches_torch_scheduler():
    from gacq.quant.recon import cosine_lr

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=4e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.0)
    for it in range(50):
        assert cosine_lr(it, 50, 4e-4) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_optimise_names_the_first_non_finite_iteration():
    from gacq.errors import GacqError
    from gacq.quant.recon import batch_plan, make_adam, optimise

    data = torch.randn(40)
    data[17] = float("nan")
    plan = batch_plan(40, 600, 4, seed=1)
    first = int(torch.nonzero((plan == 17).any(1)).flatten()[0])  # first minibatch holding the bad sample
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(GacqError, match=f"diverged .* at iteration {first}$"):
        optimise([p], make_adam([p], 1e-3, graph=False), lambda idx: (p * data[idx]).pow(2).mean(), plan,
                 "toy", check_every=64)


def test_non_finite_unit_is_named_and_earlier_units_kept(setup, tmp_path):
    import copy

    from gacq.errors import GacqError
    from gacq.quant.recon import reconstruct_model

    fp, cs = setup
    bad_fp = copy.deepcopy(fp)
    units = [n for n, _ in find_units(_prepare(fp))]
    q = _prepare(fp)
    from gacq.quant.recon import order_by_execution

    order = [n for n, _ in order_by_execution(q, find_units(q), lambda m: m(cs.x[:1], cs.t[:1]))]
    target_unit = order[2]
    assert target_unit in units
    with torch.no_grad():  # the FP target of the third unit becomes inf
        next(p for p in bad_fp.get_submodule(target_unit).parameters() if p.ndim > 1).fill_(float("inf"))
    with pytest.raises(GacqError, match=rf"unit 2 \({target_unit}, weights stage\).*diverged"):
        reconstruct_model(q, bad_fp, cs.x, cs.t, ReconConfig(iters=5, batch_size=8), ckpt_dir=tmp_path / "c",
                          progress=False)
    assert sorted(p.name for p in (tmp_path / "c").glob("unit_*.safetensors")) == ["unit_000.safetensors",
                                                                                  "unit_001.safetensors"]


def test_a_resumed_quantization_records_the_killed_runs_time(setup, tmp_path, monkeypatch):
    """A run killed after its last resume point (here: while writing the checkpoint) and resumed: the checkpoint's
    wall_seconds adds the killed run's time up to its last resume point to the resumed run's own."""
    import json
    import time

    import gacq.quant.checkpoint as ckpt_mod
    from gacq.quant.api import QuantConfig, quantize_to_dir

    fp, cs = setup
    cs.save(tmp_path / "calib")
    cfg = QuantConfig(method="brecq", wbits=4, abits=8, recon=ReconConfig(iters=3, batch_size=8),
                      recon_checkpoints=str(tmp_path / "q.recon-ckpt"))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_quantized", killed)  # quantize_to_dir imports it from there when it runs
    t = time.time()
    with pytest.raises(KeyboardInterrupt):
        quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "q", calib=tmp_path / "calib", progress=False)
    first = time.time() - t
    monkeypatch.undo()
    ckpt = tmp_path / "q.recon-ckpt"
    units = sorted(ckpt.glob("*unit_*.safetensors"))
    assert units
    start = json.loads((ckpt / "wall_runs.json").read_text())[0]["start"]
    last_point = max(f.stat().st_mtime for f in ckpt.rglob("*") if f.name != "wall_runs.json")
    time.sleep(0.2)
    meta = quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "q", calib=tmp_path / "calib", progress=False)
    runs = meta["wall_seconds_runs"]
    assert len(runs) == 2 and runs[0] == pytest.approx(last_point - start, abs=0.01)
    assert 0 < runs[0] <= first + 0.01
    assert meta["wall_seconds"] == pytest.approx(sum(runs), abs=0.02)
    assert json.loads((tmp_path / "q" / "quant_config.json").read_text())["wall_seconds"] == meta["wall_seconds"]
    assert not ckpt.exists()  # finished: the resume points and their run times are gone


def test_resume_point_log_lines_carry_the_gpu_peak_for_the_resumed_runs_total(tmp_path, monkeypatch):
    """On CUDA each resume point's log line holds the peak GPU memory so far, and a resumed quantization reports the
    highest of them and its own; lines without one (an older gacq, the CPU) leave it knowing only the last run's."""
    import json

    from gacq.quant.recon import logged_peak
    from gacq.quant.recon import append_recon_log

    assert logged_peak(tmp_path) == (0, False)  # no log at all
    append_recon_log(tmp_path, {"index": 0, "loss_after": 1.0}, "cpu")
    assert json.loads((tmp_path / "recon_log.jsonl").read_text()) == {"index": 0, "loss_after": 1.0}
    assert logged_peak(tmp_path) == (0, False)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * 2**30)
    for i in (1, 2):
        append_recon_log(tmp_path, {"index": i}, torch.device("cuda"))
    lines = [json.loads(x) for x in (tmp_path / "recon_log.jsonl").read_text().splitlines()]
    assert lines[1:] == [{"index": i, "peak_gpu_memory_bytes": 7 * 2**30} for i in (1, 2)]
    assert logged_peak(tmp_path) == (7 * 2**30, False)  # the CPU line has none
    (tmp_path / "recon_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    assert logged_peak(tmp_path) == (7 * 2**30, True)


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_a_quantization_resumed_from_every_resume_point_writes_the_same_checkpoint(setup, tmp_path, monkeypatch,
                                                                                    method):
    """tfmq (temporal-block resume point, weight units) and qdiffusion (weight and activation units): a run killed
    while writing its checkpoint leaves every resume point; the run that resumes from them, learning nothing again,
    writes the checkpoint the killed run was writing, tensor for tensor."""
    from safetensors.torch import load_file

    import gacq.quant.checkpoint as ckpt_mod
    import gacq.quant.recon as recon_mod
    import gacq.quant.tfmq as tfmq_mod
    from gacq.quant.api import QuantConfig, quantize_to_dir

    fp, _ = setup
    collect(LoadedModel(fp), SampleConfig(steps=20), CalibDataConfig(selection="all", n_trajectories=2),
            progress=False).save(tmp_path / "calib")
    cfg = QuantConfig(method=method, wbits=4, abits=8, recon=ReconConfig(iters=4, batch_size=8),
                      act_recon=ActReconConfig(iters=4, batch_size=8), recon_checkpoints=str(tmp_path / "q.recon-ckpt"))
    save = ckpt_mod.save_quantized

    def killed(model, out, *a, **k):  # the uninterrupted run's checkpoint goes to "a"; then the run dies
        save(model, tmp_path / "a", *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_quantized", killed)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "b", calib=tmp_path / "calib", progress=False)
    monkeypatch.undo()
    points = {f.name for f in (tmp_path / "q.recon-ckpt").glob("*.safetensors")}
    assert ("tib.safetensors" in points) == (method == "tfmq")
    assert any(p.startswith("act_unit_") for p in points) == (method == "qdiffusion")

    def learned(*a, **k):
        raise AssertionError("learned again instead of resumed")

    for mod, fn in ((recon_mod, "reconstruct_unit"), (recon_mod, "reconstruct_acts_unit"),
                    (tfmq_mod, "reconstruct_tib")):
        monkeypatch.setattr(mod, fn, learned)
    quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "b", calib=tmp_path / "calib", progress=False)
    a, b = (load_file(str(tmp_path / d / "quantized.safetensors")) for d in "ab")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_resume_onto_another_calibration_set_is_refused(setup, tmp_path, monkeypatch):
    """Resume points record the calibration samples' digest: a later run (another device call collects the set
    again) goes on from them only on the very same samples, and says so by name otherwise."""
    import gacq.quant.checkpoint as ckpt_mod
    from gacq.errors import GacqError
    from gacq.quant.api import QuantConfig, quantize_to_dir
    from gacq.quant.calib_data import CalibrationSet

    fp, cs = setup
    cs.save(tmp_path / "calib")
    other = CalibrationSet(cs.x.clone(), cs.t, cs.step, cs.meta, cs.cond)
    other.x[0, 0, 0, 0] += 1e-3  # one value of one sample
    other.save(tmp_path / "other")
    assert other.digest() != cs.digest()
    cfg = QuantConfig(method="brecq", wbits=4, abits=8, recon=ReconConfig(iters=2, batch_size=8),
                      recon_checkpoints=str(tmp_path / "q.recon-ckpt"))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_quantized", killed)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "q", calib=tmp_path / "calib", progress=False)
    monkeypatch.undo()
    with pytest.raises(GacqError, match=r"another run \(it differs in: calibration_sha256\)"):
        quantize_to_dir(LoadedModel(fp), cfg, tmp_path / "q", calib=tmp_path / "other", progress=False)
