"""Data parallelism over torch.distributed: real torchrun jobs of gloo processes on the CPU.

Every multi-process result is compared with a single-process run of the same command made in
this process. CPU kernels sum in an order that depends on the intra-op thread count, so the
reference and every worker run with one thread (OMP_NUM_THREADS=1); at equal thread counts the
outputs are bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gacq import distributed as gdist
from gacq.errors import GacqError
from gacq.models import build_model, load_model, save_model
from gacq.sampling import SampleConfig, sample

ENV = {"OMP_NUM_THREADS": "1", "GACQ_DIST_TIMEOUT_S": "60"}
SAMPLE = SampleConfig(steps=3, num=9, batch_size=2, shard_size=2, seed=1)  # 5 shards: uneven over 2 and 3 ranks
SAMPLE_ARGS = ["--steps", 3, "--num", 9, "--batch-size", 2, "--shard-size", 2, "--seed", 1, "--device", "cpu"]


def run(args: list, env: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`gacq ARGS`, or under `torchrun --nproc-per-node N` (the `--` keeps torchrun's parser off --num)."""
    pre = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "-m", "--"] if torchrun \
        else ["-m"]
    return subprocess.run([sys.executable, *pre, "gacq", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **ENV, **(env or {})}, check=False)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def one_thread(fn):
    """Call fn() with one intra-op thread, as the workers have."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("tiny").eval(), tmp_path_factory.mktemp("dist") / "tiny_model")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref") / "s"
    one_thread(lambda: sample(load_model(model_dir), SAMPLE, out, progress=False))
    return np.load(out / "samples.npz")["images"]


def assert_no_debris(out: Path) -> None:
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))


# ---- helpers ----------------------------------------------------------------------------------

def test_owned_partitions_round_robin():
    for n in range(12):
        for world in (1, 2, 3, 5):
            parts = [list(gdist.owned(n, r, world)) for r in range(world)]
            assert sorted(i for part in parts for i in part) == list(range(n))  # disjoint and complete
            assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert list(gdist.owned(5, 1, 2)) == [1, 3]
    with pytest.raises(ValueError):
        gdist.owned(4, 2, 2)


def test_single_process_fallbacks(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert (gdist.rank(), gdist.world_size(), gdist.where(), gdist.in_torchrun()) == (0, 1, "", False)
    assert gdist.all_gather_object(3) == [3] and gdist.gather_object(4) == [4] and gdist.broadcast_object(5) == 5
    assert gdist.on_rank0(lambda: 6, "x") == 6
    gdist.barrier()
    assert gdist.init(torch.device("cpu")) == torch.device("cpu") and not gdist.is_initialized()
    assert not gdist.relaunch(1, "cpu", "gacq sample")
    monkeypatch.setenv("GACQ_DIST_TIMEOUT_S", "90")
    assert gdist.timeout().total_seconds() == 90
    monkeypatch.setenv("GACQ_DIST_TIMEOUT_S", "soon")
    with pytest.raises(GacqError, match="GACQ_DIST_TIMEOUT_S"):
        gdist.timeout()
    monkeypatch.setenv("GACQ_TEST_FAIL_RANK", "0")
    with pytest.raises(GacqError, match="rank 0 of 1: test failure .* after shard 3"):
        gdist.fail_for_test(1, "shard 3")


def test_relaunch_refuses_a_mismatched_world(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert not gdist.relaunch(3, "cpu", "gacq sample")  # the relaunched workers see their own --gpus
    with pytest.raises(GacqError, match="--gpus 2 inside a torchrun job of 3"):
        gdist.relaunch(2, "cpu", "gacq sample")


def test_exit_now_flushes_and_keeps_the_exit_code(tmp_path):
    """A worker that formed a group leaves through exit_now (no finalization): buffered output
    and log records still come out, and sys.exit's code (int, None or message) is kept."""
    script = ("import logging, sys\n"
              "from gacq import distributed as gdist\n"
              f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r})\n"
              "sys.stdout.write('partial line, no newline')\n"
              "logging.getLogger('gacq').warning('logged before exit')\n"
              "gdist.exit_now(eval(sys.argv[1]))\n"
              "print('not reached')\n")
    for arg, rc in (("3", 3), ("None", 0), ("'bad input'", 1)):
        proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, timeout=120)
        assert proc.returncode == rc, proc.stderr
        assert proc.stdout == "partial line, no newline"
        assert "logged before exit" in (tmp_path / "log.txt").read_text()
        assert ("bad input" in proc.stderr) == (rc == 1)


def test_main_leaves_through_exit_now_only_after_forming_a_group(monkeypatch):
    from gacq import cli

    calls = []
    monkeypatch.setattr(gdist, "exit_now", calls.append)
    monkeypatch.setattr(cli, "_main", lambda: sys.exit(5))
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == []  # no group formed in this process
    monkeypatch.setattr(gdist, "_formed_group", True)
    with pytest.raises(SystemExit):  # the real exit_now would not return
        cli.main()
    monkeypatch.setattr(cli, "_main", lambda: None)
    cli.main()
    assert calls == [5, 0]


# ---- sampling ---------------------------------------------------------------------------------

# 3 ranks over 5 shards (2/2/1: uneven, the last rank short); two ranks sample and equal the reference in
# test_failed_rank_fails_the_job_then_gpus_flag_resumes
@pytest.mark.parametrize("nproc", [3])
def test_torchrun_sampling_equals_one_process(model_dir, reference, tmp_path, nproc):
    out = tmp_path / "s"
    proc = ok(run(["sample", "--model", model_dir, "--out", out, *SAMPLE_ARGS], torchrun=nproc))
    assert proc.stdout.count("wrote 9 images") == 1  # rank 0 alone reports
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], reference)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == nproc and meta["images_made_this_run"] == 9 and meta["shards_resumed"] == 0


def test_failed_rank_fails_the_job_then_gpus_flag_resumes(model_dir, reference, tmp_path):
    """--gpus 2 (gloo on the CPU): rank 1 fails after its first shard; the job exits non-zero and
    names it, only whole shards remain; the same command then finishes from them."""
    out = tmp_path / "s"
    args = ["sample", "--model", model_dir, "--out", out, *SAMPLE_ARGS, "--gpus", 2]
    bad = run(args, env={"GACQ_TEST_FAIL_RANK": "1", "GACQ_TEST_FAIL_AFTER": "1"})
    assert bad.returncode == 2, bad.stderr
    assert "rank 1 of 2: test failure (GACQ_TEST_FAIL_RANK) after writing 1 shard(s), the last shard_00001.npz" \
        in bad.stderr
    assert "error: the 2-process gacq sample failed" in bad.stderr
    assert not any((out / f).exists() for f in ("samples.npz", "grid.png", "meta.json"))
    assert_no_debris(out)
    shards = sorted((out / "shards").glob("shard_*.npz"))
    assert out / "shards" / "shard_00001.npz" in shards
    kept = 0
    for p in shards:  # whole shards only, each the reference's images
        k = int(p.stem.split("_")[1])
        images = np.load(p)["images"]
        np.testing.assert_array_equal(images, reference[2 * k:2 * k + 2])
        kept += len(images)

    proc = ok(run(args))
    assert "wrote 9 images" in proc.stdout
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], reference)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["shards_resumed"] == len(shards)
    assert meta["images_made_this_run"] == 9 - kept


def test_killed_rank_then_one_process_finishes(model_dir, reference, tmp_path):
    """A rank killed outright (SIGKILL, no clean-up of its own): torchrun ends the job and names
    it; a single-process rerun finishes the same output."""
    out = tmp_path / "s"
    bad = run(["sample", "--model", model_dir, "--out", out, *SAMPLE_ARGS], torchrun=2,
              env={"GACQ_TEST_FAIL_RANK": "1", "GACQ_TEST_FAIL_KILL": "1"})
    assert bad.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in bad.stderr and "SIGKILL" in bad.stderr
    assert not (out / "samples.npz").exists()
    assert_no_debris(out)
    assert (out / "shards" / "shard_00001.npz").exists()
    meta = one_thread(lambda: sample(load_model(model_dir), SAMPLE, out, progress=False))
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], reference)
    assert meta["world_size"] == 1 and meta["shards_resumed"] >= 1


# ---- calibration data and evaluation -----------------------------------------------------------

def test_calib_with_two_procs_equals_one_process(model_dir, tmp_path):
    from gacq.quant.calib_data import CalibDataConfig, CalibrationSet, collect

    out = tmp_path / "c"
    proc = ok(run(["calib", "--model", model_dir, "--trajectories", 5, "--batch-size", 2, "--record-steps", 2,
                   "--steps", 4, "--selection", "gaussian", "--out", out, "--device", "cpu", "--procs", 2]))
    assert proc.stdout.count("wrote 5 calibration samples") == 1
    got = CalibrationSet.load(out)
    ref = one_thread(lambda: collect(load_model(model_dir), SampleConfig(steps=4, seed=0),
                                     CalibDataConfig(selection="gaussian", n_trajectories=5, n_steps=2, batch_size=2),
                                     progress=False))
    for key in ("x", "t", "step"):
        assert torch.equal(getattr(got, key), getattr(ref, key)), key
    assert got.meta == json.loads(json.dumps(ref.meta))


def test_eval_with_two_procs_equals_one_process(tmp_path):
    rng = np.random.default_rng(0)
    samples, ref = (tmp_path / "samples.npz"), (tmp_path / "ref.npz")
    np.savez(samples, images=(rng.random((37, 32, 32, 3)) * 255).astype(np.uint8))  # 5 batches of 8
    np.savez(ref, images=(rng.random((29, 32, 32, 3)) * 255).astype(np.uint8))  # 4 batches
    # pr_max < n: the seeded reservoir is exercised. The reference is the CLI too: in this process
    # numpy's BLAS would run multi-threaded (slow eigh on 2 cores), the workers' does not.
    args = ["eval", "--samples", samples, "--ref", ref, "--batch-size", 8, "--pr-max", 20, "--seed", 3,
            "--device", "cpu"]
    proc = ok(run([*args, "--json", tmp_path / "m2.json", "--gpus", 2]))
    assert proc.stdout.count("feature network: cifar10") == 1  # rank 0 alone reports
    ok(run([*args, "--json", tmp_path / "m1.json"]))
    got, want = (json.loads((tmp_path / f"m{k}.json").read_text()) for k in (2, 1))
    assert got["samples"]["n"] == 37 and got["reference"]["n"] == 29
    # Rank 0 reduces the gathered feature batches in the single-process order (same batches,
    # same reservoir draws), so at equal thread counts every figure is bit-identical.
    assert {k: v for k, v in got.items() if k != "command"} == {k: v for k, v in want.items() if k != "command"}


# 3 ranks: minibatches of 8 split 3/3/2 and GAC's 5 validation groups 2/2/1, uneven both ways (2 ranks would split
# both more evenly through the same code)
QUANT_ARGS = ["quantize", "--method", "gac", "--wbits", 4, "--abits", 8, "--calib-trajectories", 4, "--steps", 10,
              "--record-steps", 5, "--iters", 20, "--act-iters", 10, "--gac-meta-iters", 3, "--recon-batch", 8,
              "--device", "cpu"]


@pytest.fixture(scope="module")
def quantized_one_process(model_dir, tmp_path_factory) -> Path:
    """The single-process checkpoint the data-parallel run is compared with."""
    out = tmp_path_factory.mktemp("dpref") / "one"
    ok(run([*QUANT_ARGS, "--model", model_dir, "--out", out]))
    return out


@pytest.mark.parametrize("nproc", [3])
def test_data_parallel_quantize_equals_one_process(model_dir, quantized_one_process, tmp_path, nproc):
    """gac W4A8 (TIB, AdaRound with learned weights, FSC): each minibatch split over the ranks with
    summed gradients (and GAC's validation groups split over them) gives the single-process checkpoint; rank 0 alone writes (no duplicate log
    lines). Minibatches of 8 split 3/3/2 over three ranks."""
    from safetensors.torch import load_file

    one = quantized_one_process
    ok(run([*QUANT_ARGS, "--model", model_dir, "--gpus", nproc, "--out", tmp_path / "dp"]))
    a, b = (load_file(str(d / "quantized.safetensors")) for d in (one, tmp_path / "dp"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("qweight"):  # rounding decisions
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    ga, gb = (load_file(str(d / "gac_weights.safetensors")) for d in (one, tmp_path / "dp"))
    assert ga.keys() == gb.keys()
    for k in ga:  # the meta-gradient's validation groups are split over the ranks: summation order only
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=0)
    logs = [(d / "recon_log.jsonl").read_text().splitlines() for d in (one, tmp_path / "dp")]
    assert len(logs[0]) == len(logs[1])
    meta = json.loads((tmp_path / "dp" / "quant_config.json").read_text())
    assert meta["world_size"] == nproc
    assert not (tmp_path / "dp.recon-ckpt").exists()
