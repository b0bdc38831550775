import pytest
import torch

from gacq.errors import GacqError
from gacq.models import load_model
from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect, select_steps
from gacq.sampling import SampleConfig, make_scheduler, sample_generators


@pytest.fixture
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def _manual_inputs(loaded, scfg, seed, n):
    """The model inputs of a plain DDIM loop, written out by hand."""
    sched = make_scheduler(scfg, loaded.scheduler_config)
    x = torch.stack([torch.randn(3, 16, 16, generator=g) for g in sample_generators(seed, range(n))])
    inputs = []
    with torch.no_grad():
        for t in sched.timesteps:
            inputs.append(x.clone())
            eps = loaded.model(x, torch.full((n,), int(t))).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    return sched.timesteps, inputs


def test_uniform_selection_records_sampler_inputs(tiny):
    scfg = SampleConfig(steps=10)
    cfg = CalibDataConfig(selection="uniform", n_trajectories=5, n_steps=5, seed=2, batch_size=2)
    cs = collect(tiny, scfg, cfg, progress=False)
    assert len(cs) == 25
    assert cs.step.tolist() == [k for k in (0, 2, 4, 6, 8) for _ in range(5)]
    timesteps, inputs = _manual_inputs(tiny, scfg, 2, 5)
    assert cs.t.tolist() == [int(timesteps[k]) for k in cs.step.tolist()]
    for j, k in enumerate(cs.step.tolist()):
        # batches of 2 vs 5: CPU conv kernels sum in a batch-dependent order (~1e-6 per step, growing to ~2e-5 along a
        # trajectory; x is of order 1)
        torch.testing.assert_close(cs.x[j], inputs[k][j % 5], rtol=1e-3, atol=1e-4)


def test_deterministic_and_seeded(tiny):
    scfg = SampleConfig(steps=6)
    a = collect(tiny, scfg, CalibDataConfig(n_trajectories=3, n_steps=3, seed=1), progress=False)
    a2 = collect(tiny, scfg, CalibDataConfig(n_trajectories=3, n_steps=3, seed=1), progress=False)
    b = collect(tiny, scfg, CalibDataConfig(n_trajectories=3, n_steps=3, seed=1, batch_size=1), progress=False)
    c = collect(tiny, scfg, CalibDataConfig(n_trajectories=3, n_steps=3, seed=2), progress=False)
    assert torch.equal(a.x, a2.x) and torch.equal(a.t, a2.t)
    # another batch size: same noise, float-level differences from batched kernels only
    torch.testing.assert_close(a.x, b.x, rtol=1e-3, atol=1e-4)
    assert torch.equal(a.t, b.t)
    assert not torch.equal(a.x, c.x)


def test_gaussian_selection_distribution():
    sched = make_scheduler(SampleConfig(steps=100), {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                                      "beta_start": 1e-4, "beta_end": 0.02})
    cfg = CalibDataConfig(selection="gaussian", n_trajectories=4000, mu=0.4, sigma=0.2, seed=0)
    steps = select_steps(cfg, sched.timesteps, 1000)
    assert all(len(s) == 1 for s in steps)
    ts = torch.tensor([int(sched.timesteps[s[0]]) for s in steps], dtype=torch.float64)
    # 4000 draws: the standard error of the mean is 0.2*1000/sqrt(4000) = 3.2 timesteps
    assert abs(ts.mean().item() - 400) < 15
    assert abs(ts.std().item() - 200) < 15


def test_gaussian_draws_per_trajectory():
    """draws=d: d steps per trajectory, drawn with replacement from the same Gaussian (duplicates kept, so the
    timestep distribution is unchanged); draws=1 is the one-draw selection of earlier versions, bit for bit."""
    sched = make_scheduler(SampleConfig(steps=100), {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                                      "beta_start": 1e-4, "beta_end": 0.02})
    one = select_steps(CalibDataConfig(selection="gaussian", n_trajectories=50, mu=0.4, sigma=0.2, seed=1),
                       sched.timesteps, 1000)
    # an independent transcription of the one-draw rule: t = int(N(mu, sigma) * T), the nearest sampling step
    g = torch.Generator().manual_seed(1)
    t_star = ((torch.randn(50, generator=g, dtype=torch.float64) * 0.2 + 0.4) * 1000).long().clamp(0, 999)
    assert one == [[int((sched.timesteps - int(t)).abs().argmin())] for t in t_star]
    cfg = CalibDataConfig(selection="gaussian", n_trajectories=400, mu=0.4, sigma=0.2, seed=0, draws=20)
    steps = select_steps(cfg, sched.timesteps, 1000)
    assert all(len(s) == 20 and s == sorted(s) for s in steps)
    assert any(len(set(s)) < len(s) for s in steps)  # duplicates are kept
    ts = torch.tensor([int(sched.timesteps[k]) for s in steps for k in s], dtype=torch.float64)
    assert abs(ts.mean().item() - 400) < 15 and abs(ts.std().item() - 200) < 15  # 8000 draws
    with pytest.raises(GacqError, match="at least 1"):
        CalibDataConfig(selection="gaussian", draws=0)


def test_save_load_roundtrip_and_corruption(tiny, tmp_path):
    cs = collect(tiny, SampleConfig(steps=4), CalibDataConfig(n_trajectories=3, n_steps=2), progress=False)
    cs.save(tmp_path / "c", shard_size=4)
    back = CalibrationSet.load(tmp_path / "c")
    assert torch.equal(back.x, cs.x) and torch.equal(back.t, cs.t) and back.meta == cs.meta
    (tmp_path / "c" / "calib_00001.safetensors").unlink()
    with pytest.raises(GacqError, match="incomplete"):
        CalibrationSet.load(tmp_path / "c")
    with pytest.raises(GacqError, match="not a calibration set"):
        CalibrationSet.load(tmp_path)


def test_bad_configs():
    with pytest.raises(GacqError, match="unknown calibration selection"):
        CalibDataConfig(selection="normal")
    with pytest.raises(GacqError, match="cannot record"):
        select_steps(CalibDataConfig(n_steps=20), torch.arange(10), 1000)


@pytest.mark.parametrize("selection,draws", [("uniform", 1), ("gaussian", 1), ("gaussian", 6)])
def test_select_from_all_equals_direct_collection(selection, draws):
    """One all-steps collection reproduces any other selection exactly (same trajectories)."""
    from gacq.models import LoadedModel, build_model
    from gacq.quant.calib_data import CalibDataConfig, collect, select_from_all
    from gacq.sampling import SampleConfig

    torch.manual_seed(0)
    loaded = LoadedModel(build_model("tiny").eval())
    scfg = SampleConfig(steps=8)
    full = collect(loaded, scfg, CalibDataConfig(selection="all", n_trajectories=5, seed=3), progress=False)
    cfg = CalibDataConfig(selection=selection, n_trajectories=5, n_steps=4, seed=3, mu=0.5, sigma=0.3, draws=draws)
    direct = collect(loaded, scfg, cfg, progress=False)
    cut = select_from_all(full, cfg)
    assert len(direct) == 5 * (4 if selection == "uniform" else draws)
    assert torch.equal(cut.t, direct.t) and torch.equal(cut.step, direct.step)
    torch.testing.assert_close(cut.x, direct.x, atol=1e-6, rtol=0)  # batched CPU kernels: ~1e-7 differences
    with pytest.raises(GacqError, match="cannot stand in"):
        select_from_all(full, CalibDataConfig(selection=selection, n_trajectories=9, seed=3))
    with pytest.raises(GacqError, match="only an all-steps"):
        select_from_all(direct, cfg)
