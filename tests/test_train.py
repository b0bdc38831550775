import json

import pytest
import torch
from safetensors.torch import load_file

from gacq.errors import GacqError
from gacq.models import load_model
from gacq.train import TrainConfig, train

BASE = dict(config="tiny", batch_size=8, lr=2e-3, warmup_steps=5, log_every=1, grid_num=0)


def test_loss_falls_and_outputs(image_folder, tmp_path):
    cfg = TrainConfig(data=str(image_folder), max_steps=40, ckpt_every=20, **{**BASE, "grid_num": 4, "grid_steps": 3})
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["step"] == 40 and summary["images_seen"] == 320
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "run" / "grids" / "step_0000020.png").exists()
    assert (tmp_path / "run" / "grids" / "step_0000040.png").exists()
    assert load_model(tmp_path / "run" / "model").sample_shape == (3, 16, 16)


def test_resume_is_bit_identical(image_folder, tmp_path):
    kw = dict(data=str(image_folder), ckpt_every=100, **BASE)
    train(TrainConfig(max_steps=16, **kw), tmp_path / "full", progress=False)
    train(TrainConfig(max_steps=7, **kw), tmp_path / "split", progress=False)
    s = train(TrainConfig(max_steps=16, **kw), tmp_path / "split", resume=True, progress=False)
    assert s["steps_this_call"] == 9
    for name in ("model", "ema", "optim"):
        a = load_file(tmp_path / "full" / "ckpt" / f"{name}.safetensors")
        b = load_file(tmp_path / "split" / "ckpt" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_time_budget_stops_with_checkpoint(image_folder, tmp_path):
    cfg = TrainConfig(data=str(image_folder), time_budget_min=0.04, ckpt_every=10**6, **BASE)
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["stopped_by"] == "time_budget" and s["step"] > 0
    state = json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())
    assert state["step"] == s["step"]


def test_run_folder_guards(image_folder, tmp_path):
    kw = dict(data=str(image_folder), max_steps=2, **BASE)
    with pytest.raises(GacqError, match="no checkpoint"):
        train(TrainConfig(**kw), tmp_path / "run", resume=True, progress=False)
    train(TrainConfig(**kw), tmp_path / "run", progress=False)
    with pytest.raises(GacqError, match="--resume"):
        train(TrainConfig(**kw), tmp_path / "run", progress=False)
    with pytest.raises(GacqError, match="different lr"):
        train(TrainConfig(**{**kw, "lr": 1e-4}), tmp_path / "run", resume=True, progress=False)


def test_config_validation(image_folder):
    with pytest.raises(GacqError, match="--max-steps or --time-budget"):
        TrainConfig(data=str(image_folder), config="tiny")
    with pytest.raises(GacqError, match="unknown --config"):
        TrainConfig(data=str(image_folder), config="giant", max_steps=1)


def test_init_from(image_folder, tmp_path, tiny_model_dir):
    cfg = TrainConfig(data=str(image_folder), max_steps=1, init_from=str(tiny_model_dir), **{**BASE, "lr": 1e-12})
    train(cfg, tmp_path / "run", progress=False)
    src = load_model(tiny_model_dir).model.state_dict()
    got = load_file(tmp_path / "run" / "ckpt" / "model.safetensors")
    # lr 1e-12 (during warm-up, 2e-13): one AdamW step moves weights by at most ~1e-12.
    for k, v in src.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-9)


def test_commit_is_read_once_at_the_start(image_folder, tmp_path, monkeypatch):
    """The summary and the checkpoint name the code the call started with, even if the checkout changes while it
    trains (session 12's summary named a commit made during its training)."""
    import itertools
    import sys

    tr = sys.modules[TrainConfig.__module__]  # the module (gacq.train the attribute may be a function)

    calls = itertools.count()
    monkeypatch.setattr(tr, "git_commit", lambda: "start" if next(calls) == 0 else "changed-later")
    s = train(TrainConfig(data=str(image_folder), max_steps=3, ckpt_every=2, **BASE), tmp_path / "run", progress=False)
    assert s["commit"] == "start"
    assert json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())["commit"] == "start"
