import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch

from gacq.errors import GacqError
from gacq.models import DDPM_SCHEDULE, load_model
from gacq.sampling import SampleConfig, generate, sample, sample_generators


@pytest.fixture
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpm", 0.0)])
def test_batch_size_does_not_change_images(tiny, scheduler, eta):
    cfg = SampleConfig(scheduler=scheduler, eta=eta, steps=6, seed=3)
    whole = generate(tiny, cfg, range(5))
    pieces = np.concatenate([generate(tiny, cfg, range(0, 2)), generate(tiny, cfg, range(2, 3)),
                             generate(tiny, cfg, range(3, 5))])
    # each image's noise is its own (seed, index), so the batch split changes only the order in which CPU kernels sum:
    # bit-equal on the first machines; on an AMD EPYC (session 45) 2 of 3,840 values one level apart
    diff = np.abs(whole.astype(np.int16) - pieces)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (diff.max(), (diff > 0).mean())
    assert not np.array_equal(whole, generate(tiny, SampleConfig(scheduler=scheduler, eta=eta, steps=6, seed=4),
                                              range(5)))


def test_ddim_matches_float64_reference(tiny):
    """Our DDIM path (diffusers scheduler + our noise and scaling) against a naive float64 loop."""
    steps, n = 10, 4
    model = tiny.model.double()
    cfg = SampleConfig(steps=steps, seed=7)
    got = generate(tiny, cfg, range(n), model_fn=lambda x, t, cond: model(x.double(), t).sample.float())
    T = DDPM_SCHEDULE["num_train_timesteps"]
    betas = np.linspace(DDPM_SCHEDULE["beta_start"], DDPM_SCHEDULE["beta_end"], T, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    x = torch.stack([torch.randn(3, 16, 16, generator=g) for g in sample_generators(7, range(n))]).double()
    stride = T // steps
    with torch.no_grad():
        for t in range(T - stride, -1, -stride):  # DDIM "leading" spacing: 900, 800, ..., 0
            eps = model(x, torch.full((n,), t)).sample
            a, a_prev = ab[t], (ab[t - stride] if t - stride >= 0 else 1.0)
            x0 = ((x - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # float32 vs float64 arithmetic can move a value across a .5 rounding edge: at most 1 level,
    # on a small share of pixels.
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_quad_ddim_matches_original_generalized_steps(tiny, eta):
    """'quad' spacing against a float64 transcription of the DDIM repo's generalized_steps
    (seq = int(linspace(0, sqrt(0.8 T), S)^2), seq_next = [-1] + seq[:-1]), same noise."""
    steps, n = 12, 3
    model = tiny.model.double()
    cfg = SampleConfig(steps=steps, seed=5, eta=eta, timestep_spacing="quad")
    got = generate(tiny, cfg, range(n), model_fn=lambda x, t, cond: model(x.double(), t).sample.float())
    T = DDPM_SCHEDULE["num_train_timesteps"]
    ab = np.cumprod(1 - np.linspace(DDPM_SCHEDULE["beta_start"], DDPM_SCHEDULE["beta_end"], T, dtype=np.float64))
    seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(int).tolist()
    gens = sample_generators(5, range(n))
    x = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens]).double()
    with torch.no_grad():
        for t, t_next in zip(reversed(seq), reversed([-1] + seq[:-1])):
            a, a_next = ab[t], (ab[t_next] if t_next >= 0 else 1.0)
            eps = model(x, torch.full((n,), t)).sample
            x0 = ((x - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)
            c1 = eta * np.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
            c2 = np.sqrt(max(1 - a_next - c1 ** 2, 0.0))
            noise = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens]).double()
            x = np.sqrt(a_next) * x0 + c2 * eps + (c1 * noise if eta > 0 else 0)
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_quad_schedule_is_q_diffusions():
    from gacq.sampling import make_scheduler

    sched = make_scheduler(SampleConfig(steps=100, timestep_spacing="quad"), dict(DDPM_SCHEDULE))
    # baselines.md section 4: the 20 calibration steps 0, 5, ..., 95 of Q-Diffusion's CIFAR-10 set
    assert sched.timesteps.tolist()[::5] == [800, 721, 646, 575, 509, 446, 388, 334, 284, 238, 195, 158, 124,
                                             94, 68, 47, 29, 15, 6, 1]
    assert sched.timesteps.tolist()[-4:] == [0, 0, 0, 0]
    with pytest.raises(GacqError, match="only for the ddim"):
        make_scheduler(SampleConfig(scheduler="ddpm", timestep_spacing="quad"), dict(DDPM_SCHEDULE))


def test_sample_writes_and_resumes(tiny, tmp_path):
    cfg = SampleConfig(steps=4, num=7, batch_size=3, shard_size=3, seed=1)
    out = tmp_path / "s"
    meta = sample(tiny, cfg, out, progress=False)
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
    assert (out / "grid.png").exists() and meta["shape"] == [7, 16, 16, 3]
    assert json.loads((out / "meta.json").read_text())["steps"] == 4
    # a run killed after the first shard: the rerun makes only the missing shards
    (out / "shards" / "shard_00001.npz").unlink()
    (out / "shards" / "shard_00002.npz").unlink()
    (out / "samples.npz").unlink()
    meta2 = sample(tiny, SampleConfig(steps=4, num=7, batch_size=5, shard_size=3, seed=1), out, progress=False)
    assert meta2["shards_resumed"] == 1 and meta2["images_made_this_run"] == 4
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], images)


def test_sample_in_parts_gives_the_whole_runs_images(tiny, tmp_path):
    """`first`: images 3..6 of seed 1's run are the same images whether sampled as part of one run of 7 or as a run of
    their own starting at 3; the folder of a part records `first`, one without it does not (older folders resume)."""
    whole = sample(tiny, SampleConfig(steps=3, num=7, batch_size=4, seed=1), tmp_path / "w", progress=False)
    assert "first" not in json.loads((tmp_path / "w" / "run.json").read_text())
    head = sample(tiny, SampleConfig(steps=3, num=3, batch_size=2, seed=1), tmp_path / "a", progress=False)
    tail = sample(tiny, SampleConfig(steps=3, num=4, batch_size=3, seed=1, first=3), tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["first"] == 3
    assert head["shape"][0] == 3 and tail["shape"][0] == 4 and whole["shape"][0] == 7
    parts = np.concatenate([np.load(tmp_path / d / "samples.npz")["images"] for d in ("a", "b")])
    np.testing.assert_array_equal(parts, np.load(tmp_path / "w" / "samples.npz")["images"])
    with pytest.raises(GacqError, match="--first"):
        SampleConfig(first=-1)


def test_sample_refuses_other_settings_in_same_folder(tiny, tmp_path):
    sample(tiny, SampleConfig(steps=2, num=2), tmp_path / "s", progress=False)
    with pytest.raises(GacqError, match="seed"):
        sample(tiny, SampleConfig(steps=2, num=2, seed=5), tmp_path / "s", progress=False)


@pytest.mark.parametrize("kw,msg", [({"scheduler": "euler"}, "unknown scheduler"), ({"steps": 0}, "--steps"),
                                    ({"eta": 2.0}, "--eta"), ({"timestep_spacing": "cubic"}, "spacing")])
def test_config_errors(kw, msg):
    with pytest.raises(GacqError, match=msg):
        SampleConfig(**kw)


def test_too_many_steps(tiny):
    with pytest.raises(GacqError, match="exceeds"):
        generate(tiny, SampleConfig(steps=1001), range(1))


def test_sample_seeds_are_distinct():
    from gacq.sampling import _mix32, sample_seed

    seeds = {sample_seed(0, i) for i in range(50_000)}
    assert len(seeds) == 50_000
    assert sample_seed(0, 5) != sample_seed(1, 5)
    # _mix32 is a bijection: check it on a slice of the 32-bit range against a brute-force set.
    xs = range(0, 2**32, 2**32 // 100_003)
    assert len({_mix32(x) for x in xs}) == len(xs)


def test_progress_bar_stays_within_its_total(tiny, tmp_path):
    """The bar advances by a fraction of the batch per step; 100 steps of 1/100 of 64 images once summed past 64 by a
    rounding error, and tqdm warned ("clamping frac to range [0, 1]") at the end of every batch."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(tiny, SampleConfig(num=64, batch_size=64, steps=100), tmp_path / "s", progress=True)



@contextlib.contextmanager
def _shifting_bias(loaded):
    """`loaded` with a step hook that writes conv_out's bias in place, shifted by 0.3 at odd steps (the way per-step
    activation sets are loaded); the bias is restored afterwards."""
    bias = loaded.model.conv_out.bias
    saved = bias.detach().clone()

    def hook(i, cfg):
        with torch.no_grad():
            bias.copy_(saved + 0.3 * (i % 2))

    try:
        yield dataclasses.replace(loaded, step_hook=hook)
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_compiled_sampling_reads_what_a_step_hook_writes_in_place(tiny, tmp_path):
    """`SampleConfig(compile=True)`: the model call runs under torch.compile (one graph for every step: no recompiles)
    and reads, at each step, what the step hook wrote in place. The images equal the eager run's to one level (float
    model; compiled kernels may round differently), and differ plainly from a run without the hook, so the writes are
    not ignored. The folder records compile, and a folder sampled eagerly refuses to be resumed compiled."""
    from torch._dynamo.utils import counters

    cfg = SampleConfig(steps=4, num=3, batch_size=3, seed=2)
    with _shifting_bias(tiny) as hooked:
        eager = sample(hooked, cfg, tmp_path / "eager", progress=False)
        graphs = counters["stats"]["unique_graphs"]
        compiled = sample(hooked, dataclasses.replace(cfg, compile=True), tmp_path / "compiled", progress=False)
        assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled once, for all four steps
        with pytest.raises(GacqError, match="compile differ"):
            sample(hooked, dataclasses.replace(cfg, compile=True), tmp_path / "eager", progress=False)
    sample(tiny, cfg, tmp_path / "plain", progress=False)
    images = {k: np.load(tmp_path / k / "samples.npz")["images"].astype(int) for k in ("eager", "compiled", "plain")}
    assert np.abs(images["compiled"] - images["eager"]).max() <= 1
    assert np.abs(images["plain"] - images["eager"]).mean() > 10
    assert compiled["compile"] is True and "compile" not in eager
    with pytest.raises(GacqError, match="custom model_fn"):
        generate(tiny, dataclasses.replace(cfg, compile=True), range(1), model_fn=lambda x, t, c: x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_compiled_sampling_on_cuda_replays_a_graph_per_step(tiny):
    """On CUDA `compile` also captures each batch's model call as one CUDA graph and replays it per step: the images
    equal eager CUDA sampling's to one level, with a step hook writing in place (read at replay time)."""
    tiny.model.cuda()
    cfg = SampleConfig(steps=4, num=6, batch_size=3, seed=2)
    with _shifting_bias(tiny) as hooked:
        eager = generate(hooked, cfg, range(6), device="cuda")
        compiled = generate(hooked, dataclasses.replace(cfg, compile=True), range(6), device="cuda")
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1
