"""scripts/model_parts.py: a trained model travels between GPU sessions in float16 parts (run as the scripts run it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gacq.models import load_model, save_model
from tests.conftest import perturbed_tiny_dit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "model_parts.py"


def parts_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """The script as the GPU scripts run it: a process of its own."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


_spec = importlib.util.spec_from_file_location("model_parts", SCRIPT)
model_parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_parts)


def parts_main(*args: str | Path, capsys) -> subprocess.CompletedProcess:
    """The same entry point in this process (no torch import per call), with the same returncode/stdout/stderr."""
    capsys.readouterr()
    rc = model_parts.main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def weights(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_pack_join_round_trip(tmp_path: Path, capsys):
    model = save_model(perturbed_tiny_dit(), tmp_path / "model")
    before = {k: v.clone() for k, v in load_model(model).model.state_dict().items()}
    # parts of 20 kB: the tiny DiT's float16 tar is cut into several
    r = parts_cli("pack", model, tmp_path / "parts", "--part-mib", 20_000 / 2**20)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert manifest["parts"] >= 3 and manifest["dtype"] == "float16"
    assert len(list((tmp_path / "parts").glob("model.tar.part*"))) == manifest["parts"]
    # in place: every weight is now its float16 rounding, kept in float32
    after = load_model(model).model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == torch.float32
        torch.testing.assert_close(after[k], v.to(torch.float16).to(torch.float32), rtol=0, atol=0)
    # the parts travel (together they are about half the float32 weights) ...
    f32 = sum(len(b) for b in weights(model).values())
    sent = sum(p.stat().st_size for p in (tmp_path / "parts").glob("model.tar.part*"))
    assert sent < 0.6 * f32 + 20_000
    # ... and join into the same bytes: the experiment runner's weights digest matches on both sides
    r = parts_cli("join", tmp_path / "parts", tmp_path / "there" / "model")
    assert r.returncode == 0, r.stderr
    assert weights(tmp_path / "there" / "model") == weights(model)
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == \
        sorted(p.relative_to(tmp_path / "there" / "model") for p in (tmp_path / "there" / "model").rglob("*"))
    # packing the rounded model again changes nothing (idempotent), and joining onto the same model is a no-op
    w = weights(model)
    assert parts_main("pack", model, tmp_path / "parts2", capsys=capsys).returncode == 0
    assert weights(model) == w
    assert parts_main("join", tmp_path / "parts2", tmp_path / "there" / "model", capsys=capsys).returncode == 0


def test_status_and_errors(tmp_path: Path, capsys):
    model = save_model(perturbed_tiny_dit(), tmp_path / "model")
    assert parts_main("pack", model, tmp_path / "parts", "--part-mib", 20_000 / 2**20, capsys=capsys).returncode == 0
    n = json.loads((tmp_path / "parts" / "manifest.json").read_text())["parts"]
    # a missing part: status says so (exit 3), join refuses and writes nothing
    last = tmp_path / "parts" / f"model.tar.part{n - 1:02d}"
    data = last.read_bytes()
    last.unlink()
    r = parts_main("status", tmp_path / "parts", capsys=capsys)
    assert r.returncode == 3 and f"{n - 1} of {n}" in r.stdout
    r = parts_main("join", tmp_path / "parts", tmp_path / "out", capsys=capsys)
    assert r.returncode == 2 and "carry the rest" in r.stderr and not (tmp_path / "out").exists()
    # a damaged part: the sha256 check refuses it, and no half-written folder is left
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert parts_main("status", tmp_path / "parts", capsys=capsys).returncode == 0
    r = parts_main("join", tmp_path / "parts", tmp_path / "out", capsys=capsys)
    assert r.returncode == 2 and "sha256" in r.stderr and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    last.write_bytes(data)
    # joining onto a folder with other weights is refused
    other = save_model(perturbed_tiny_dit(seed=1), tmp_path / "other")
    r = parts_main("join", tmp_path / "parts", other, capsys=capsys)
    assert r.returncode == 2 and "other weights" in r.stderr
    # a weight beyond float16's range cannot travel: an error naming the tensor, not a silent inf
    f = next(model.rglob("*.safetensors"))
    t = load_file(str(f))
    name = sorted(t)[0]
    t[name] = t[name].clone()
    t[name].view(-1)[0] = 1e6
    save_file(t, str(f), metadata={"format": "pt"})
    r = parts_main("pack", model, tmp_path / "parts3", capsys=capsys)
    assert r.returncode == 2 and name in r.stderr and "float16" in r.stderr
    r = parts_main("pack", tmp_path / "parts", tmp_path / "parts4", capsys=capsys)
    assert r.returncode == 2 and "not a diffusers model folder" in r.stderr


def test_carry_size_fits_beside_the_checkout(tmp_path: Path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "big.bin").write_bytes(b"\0" * (60 * 2**20))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "big.bin"], cwd=repo, check=True)
    model = save_model(perturbed_tiny_dit(), tmp_path / "model")
    monkeypatch.chdir(repo)
    r = parts_main("pack", model, tmp_path / "parts", "--carry", capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert f"at most {3 * 2**20} bytes" in r.stdout  # 64 MiB - 60 MiB tracked - 1 MiB spare
    (repo / "big2.bin").write_bytes(b"\0" * (3 * 2**20 + 512 * 1024))
    subprocess.run(["git", "add", "big2.bin"], cwd=repo, check=True)
    r = parts_main("pack", model, tmp_path / "parts", "--carry", capsys=capsys)
    assert r.returncode == 2 and "cannot travel" in r.stderr


def test_single_part(tmp_path: Path, capsys):
    model = save_model(perturbed_tiny_dit(), tmp_path / "model")
    assert parts_main("pack", model, tmp_path / "parts", capsys=capsys).returncode == 0
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text())["parts"] == 1
    assert parts_main("join", tmp_path / "parts", tmp_path / "m2", capsys=capsys).returncode == 0
    out = load_model(tmp_path / "m2").model.state_dict()
    ref = load_model(model).model.state_dict()
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_shipped_dit_joins_loads_and_matches_its_digest(tmp_path: Path, capsys):
    """models/dit-s6-cifar10 (the DiT trained on the H200 in session 17, measured in
    results/experiments/dit-s6-cifar10): its parts pass the manifest's sha256, join into the float32 model the cells
    used (the weights digest recorded in every cell JSON), and that model loads and runs a guided step."""
    from gacq.experiment import model_digest

    repo = Path(__file__).resolve().parents[1]
    cells = sorted((repo / "results" / "experiments" / "dit-s6-cifar10" / "cells").glob("*.json"))
    assert cells, "the dit-s6 cells are missing"
    digests = {json.loads(c.read_text())["model_digest"] for c in cells}
    assert len(digests) == 1
    model = tmp_path / "dit-s6"
    r = parts_main("join", repo / "models" / "dit-s6-cifar10", model, capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert model_digest(str(model)) == digests.pop()
    loaded = load_model(str(model), device="cpu")
    net = loaded.model
    assert type(net).__name__ == "DiTTransformer2DModel" and net.config.num_layers == 6
    assert sum(p.numel() for p in net.parameters()) == 17_769_612
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32), timestep=torch.tensor([500, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_shipped_main_model_joins_loads_and_matches_its_digest(tmp_path: Path, capsys):
    """models/ddpm-cifar10-main (issue 4's main FP model, trained on an H100 in session 49; its FID in
    results/fp_fid.json): the parts pass the manifest's sha256 and join into the model that was measured (the weights
    digest recorded with its FID row), a `ddpm-cifar10` UNet that runs a step."""
    from gacq.experiment import model_digest

    repo = Path(__file__).resolve().parents[1]
    rows = [r for r in json.loads((repo / "results" / "fp_fid.json").read_text())["rows"] if "model_digest" in r]
    # its 10k and 50k rows (sessions 49 and 50), both of these weights
    assert [(r["model"], r["samples"]) for r in rows] == [("main ddpm-cifar10 (FP, float16 weights)", n)
                                                          for n in (10000, 50000)]
    model = tmp_path / "main"
    r = parts_main("join", repo / "models" / "ddpm-cifar10-main", model, capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert {r["model_digest"] for r in rows} == {model_digest(str(model))}
    net = load_model(str(model), device="cpu").model
    assert type(net).__name__ == "UNet2DModel" and sum(p.numel() for p in net.parameters()) == 35_746_307
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32), torch.tensor([500])).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
