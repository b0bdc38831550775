"""`gacq train-classifier` end to end on a tiny labelled folder, and its network as `--features` of `gacq stats` /
`gacq eval` (figures under its own hash, never mixed with the bundled network's statistics)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gacq.data import load_images
from gacq.errors import GacqError
from gacq.metrics import evaluate, get_feature_extractor
from gacq.metrics.cifar10_net import load_cifar10_net
from gacq.metrics.evaluate import bundled_stats_path
from gacq.metrics.train_classifier import classifier_accuracy
from gacq.utils import file_sha256
from ..conftest import gacq_here, write_images

SMALL = ["--widths", "8,16,16,32", "--batch-size", "16", "--cutout", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two classes told apart by the top half's grey level (40 or 200), 24 training and 8 test images each, and a
    network trained on them for 6 epochs (18 steps) by the real command in a new interpreter."""
    root = tmp_path_factory.mktemp("classifier")
    train = write_images(root / "train", per_class=24, size=32, seed=0)
    test = write_images(root / "test", per_class=8, size=32, seed=1)
    out = root / "net"
    r = subprocess.run([sys.executable, "-m", "gacq", "train-classifier", "--data", str(train), "--test", str(test),
                        "--out", str(out), "--epochs", "6", *SMALL], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return train, test, out, r.stdout


def test_train_classifier_writes_a_network_that_classifies(trained):
    _, test, out, stdout = trained
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "log.jsonl", "model.safetensors", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    printed = json.loads(stdout[stdout.index("{"):])  # the command prints the summary (without the machine)
    assert printed["test_acc"] == summary["test_acc"] and "machine" not in printed and "machine" in summary
    assert summary["train_images"] == 48 and summary["test_images"] == 16 and summary["steps"] == 6 * 3
    assert summary["classes"] == ["cat", "dog"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 7))
    assert [r["epoch"] for r in log if "test_acc" in r] == [5, 6]  # every 5 epochs and at the end
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # warm-up, then linear down to 0 at the last step
    assert log[-1]["loss"] < log[0]["loss"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["widths"] == [8, 16, 16, 32] and cfg["train_config"]["epochs"] == 6
    # the saved (fp16) network, reloaded, classifies the held-out images as the run reported
    net = load_cifar10_net(out)
    ds = load_images(test, size=32, channels=3)
    acc = classifier_accuracy(net, ds.images, ds.labels.astype(np.int64), torch.device("cpu"))
    assert acc == summary["test_acc"] == 1.0
    assert sum(p.numel() for p in net.parameters()) == summary["parameters"]


def test_trained_network_as_features_of_stats_and_eval(trained, tmp_path):
    train, test, out, _ = trained
    own_hash = file_sha256(out / "model.safetensors")[:16]
    ext = get_feature_extractor(str(out), "cpu")
    assert ext.name == "cifar10" and ext.hash == own_hash != get_feature_extractor("cifar10", "cpu").hash
    r = gacq_here("stats", "--data", train, "--features", out, "--out", tmp_path / "ref.npz", "--device", "cpu",
                  "--pr-max", "48")
    assert r.returncode == 0, r.stderr
    assert own_hash in r.stdout
    r = gacq_here("eval", "--samples", train, "--ref", tmp_path / "ref.npz", "--features", out, "--device", "cpu",
                  "--pr-max", "48", "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["feature_network"]["hash"] == own_hash and m["samples"]["n"] == m["reference"]["n"] == 48
    assert abs(m["fid"]) < 1e-3 and m["precision"] == m["recall"] == 1.0  # the same images on both sides
    # the shipped statistics belong to the bundled network: refused, by default and when named
    r = gacq_here("eval", "--samples", test, "--features", out, "--device", "cpu")
    assert r.returncode == 2 and "--ref is needed" in r.stderr and f"--features {out}" in r.stderr
    with pytest.raises(GacqError, match="recompute"):
        evaluate(test, bundled_stats_path("train"), features=str(out), device="cpu", progress=False)
    # a folder holding the bundled weights themselves is the bundled network: the shipped statistics serve it
    copy = tmp_path / "bundled-copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bundled_stats_path("train").parent / name, copy / name)
    res = evaluate(test, features=str(copy), device="cpu", progress=False)
    assert res["feature_network"]["hash"] == get_feature_extractor("cifar10", "cpu").hash
    assert res["reference"]["n"] == 50000
    r = gacq_here("eval", "--samples", test, "--features", tmp_path / "no-such-net", "--device", "cpu")
    assert r.returncode == 2 and "not a CIFAR-10 feature network folder" in r.stderr
    r = gacq_here("eval", "--samples", test, "--features", "vgg", "--device", "cpu")
    assert r.returncode == 2 and "unknown feature network 'vgg'" in r.stderr and "train-classifier" in r.stderr


def test_train_classifier_refusals(trained, tmp_path):
    train, _, out, _ = trained
    r = gacq_here("train-classifier", "--data", train, "--out", out, "--epochs", "1", *SMALL)
    assert r.returncode == 2 and "not empty" in r.stderr
    np.savez(tmp_path / "samples.npz", images=np.zeros((20, 32, 32, 3), np.uint8))
    r = gacq_here("train-classifier", "--data", tmp_path / "samples.npz", "--out", tmp_path / "a", "--epochs", "1",
                  *SMALL)
    assert r.returncode == 2 and "no class labels" in r.stderr
    r = gacq_here("train-classifier", "--data", train, "--out", tmp_path / "b", "--epochs", "1", *SMALL[:2],
                  "--batch-size", "64", "--device", "cpu")
    assert r.returncode == 2 and "fewer than one batch of 64" in r.stderr
    other = write_images(tmp_path / "other", classes=("cat", "cow"), per_class=2, size=32)
    r = gacq_here("train-classifier", "--data", train, "--test", other, "--out", tmp_path / "c", "--epochs", "1",
                  *SMALL)
    assert r.returncode == 2 and "class names differ" in r.stderr
    r = gacq_here("train-classifier", "--data", train, "--out", tmp_path / "d", "--epochs", "2", "--lr", "1e9", *SMALL)
    assert r.returncode == 2 and "training diverged at epoch" in r.stderr and "(loss nan); lower --lr" in r.stderr
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing half-written
