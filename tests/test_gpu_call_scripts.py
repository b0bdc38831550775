"""scripts/gpu-dit-call.sh (cells mode, as a CPU dry run) packs only what its call wrote, and scripts/gpu-unpack.sh
merges a call's results into a results folder without replacing or dropping anything (run as the sessions run them)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from gacq.models import NAMED_CONFIGS, build_model, save_model

from .test_experiment import SPEC as EXPERIMENT_SPEC

ROOT = Path(__file__).resolve().parents[1]

# the runner tests' tiny spec, with two float cells (one cell runs in the runner's process and writes no cell log)
SPEC = EXPERIMENT_SPEC + """
[[grid]]
methods = ["fp"]
steps = [5, 10]
"""


def _old(path: Path, text: str) -> Path:
    """A file from an earlier call on the same machine (mtime an hour back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    past = path.stat().st_mtime - 3600
    os.utime(path, (past, past))
    return path


def _bash(*args, cwd, env=None):
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_call_packs_only_its_own_files_and_unpack_merges(tmp_path):
    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    dev = tmp_path / "device"  # the device's working tree, holding files of an earlier call
    dev.mkdir()
    (dev / "spec.toml").write_text(SPEC.format(model=model))
    _old(dev / "results/experiments/t/cells/fp_steps50_seed0.json", "{}")
    _old(dev / "runs/experiments/t/logs/fp_steps50_seed0.log", "old")
    out = tmp_path / "out"
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", out, cwd=dev,
              env={"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": "fp_steps5_seed0,fp_steps10_seed0", "DEADLINE": "500"})
    assert r.returncode == 0, r.stdout + r.stderr
    # no checkpoint to carry (FP cells only): no empty tar, no q parts, no tool complaining about either
    log = r.stdout + r.stderr
    assert "Cowardly" not in log and "cannot access" not in log and "checkpoints to carry" not in log, log
    assert not list((out / "q").glob("q.tgz.*"))
    with tarfile.open(out / "call.tgz") as t:
        names = {n.lstrip("./") for n in t.getnames()}
    assert "results/cells/fp_steps5_seed0.json" in names and "logs/fp_steps5_seed0.log" in names, names
    assert "experiment.log" in names
    assert not any("steps50" in n for n in names), names  # the earlier call's files stay behind
    assert not any(n.endswith(".start") for n in names)

    # here: a results folder with one finished cell of another call, and a stale copy of the new cell's grid
    res = tmp_path / "here/results/experiments/t"
    _old(res / "cells/fp_steps20_seed0.json", '{"keep": 1}')
    with tarfile.open(out / "call.tgz") as t:
        grid = t.extractfile("./results/grids/fp_steps5_seed0.jpg").read()
    (res / "grids").mkdir(parents=True)
    (res / "grids/fp_steps5_seed0.jpg").write_bytes(b"not the call's")
    r = _bash(ROOT / "scripts/gpu-unpack.sh", out / "call.tgz", res, "call1", "Title", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 new cell result(s)" in r.stdout, r.stdout
    assert json.loads((res / "cells/fp_steps5_seed0.json").read_text())["metrics"]["samples"]["n"] == 10
    assert json.loads((res / "cells/fp_steps20_seed0.json").read_text()) == {"keep": 1}
    # an existing, different file is kept, and the call's copy is not lost
    assert (res / "grids/fp_steps5_seed0.jpg").read_bytes() == b"not the call's"
    assert (res / "runs/call1-logs/not-merged/grids/fp_steps5_seed0.jpg").read_bytes() == grid
    assert "exists and differs" in r.stdout
    assert (res / "runs/call1-logs/logs/fp_steps5_seed0.log").exists()
    assert (res / "README.md").read_text().startswith("# Title")
    # each call unpacks once
    r = _bash(ROOT / "scripts/gpu-unpack.sh", out / "call.tgz", res, "call1", cwd=tmp_path)
    assert r.returncode == 1 and "exists: choose another RUN_NAME" in r.stdout
    # where the checkout has the report over every experiment (results/README.md), an unpack renders it again
    here = tmp_path / "here"
    r = subprocess.run([sys.executable, "-m", "gacq", "report", "results", "--out", "results/README.md", "--title",
                        "Everything"], cwd=here, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fresh = (here / "results/README.md").read_text()
    (here / "results/README.md").write_text(fresh.replace("| fp |", "| stale |"))
    r = _bash(ROOT / "scripts/gpu-unpack.sh", out / "call.tgz", res, "call2", cwd=here)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (here / "results/README.md").read_text() == fresh


def test_call_returns_unfinished_cells_checkpoints_and_a_later_call_only_samples(tmp_path):
    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    cell = "rtn_w4a8_steps5_seed0"
    # call 1: the cell quantizes, then fails at evaluation (a reference folder without images, which the run's
    # check before the cells lets through as it exists): its checkpoint returns
    dev1 = tmp_path / "device1"
    (dev1 / "empty-ref").mkdir(parents=True)
    (dev1 / "spec.toml").write_text(SPEC.format(model=model) + '[eval]\nref = "empty-ref"\n')
    out1 = tmp_path / "out1"
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", out1, cwd=dev1,
              env={"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": cell, "DEADLINE": "500"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (dev1 / f"results/experiments/t/cells/{cell}.json").exists()
    assert "checkpoints to carry: q/rtn_w4a8_steps5 " in r.stdout, r.stdout
    parts = sorted((out1 / "q").glob("q.tgz.*"))  # the parts a call returns; joined here
    assert parts and all(p.stat().st_size <= 15 << 20 for p in parts)
    here = tmp_path / "here"
    here.mkdir()
    r = _bash(ROOT / "scripts/gpu-q-carry.sh", out1 / "q", "no_such_job", cwd=here)
    assert r.returncode == 1 and "no checkpoint no_such_job" in r.stdout and "rtn_w4a8_steps5" in r.stdout
    r = _bash(ROOT / "scripts/gpu-q-carry.sh", out1 / "q", "rtn_w4a8_steps5", cwd=here)
    assert r.returncode == 0 and ".data/q.tgz holds rtn_w4a8_steps5" in r.stdout, r.stdout + r.stderr
    joined = here / ".data/q.tgz"
    with tarfile.open(joined) as t:
        assert "q/rtn_w4a8_steps5/quant_config.json" in t.getnames()
        from_parts = sorted(t.getnames())
    # the same from a work folder holding the checkpoint (kept here between sessions): same files, the folder kept
    work = dev1 / "runs/experiments/t"
    (work / "q/rtn_w4a8_steps5.recon-ckpt").mkdir()  # not a checkpoint: left out when no job is named
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _bash(ROOT / "scripts/gpu-q-carry.sh", work, cwd=elsewhere)
    assert r.returncode == 0 and ".data/q.tgz holds rtn_w4a8_steps5 (" in r.stdout, r.stdout + r.stderr
    with tarfile.open(elsewhere / ".data/q.tgz") as t:
        assert sorted(t.getnames()) == from_parts
    assert (work / "q/rtn_w4a8_steps5/quant_config.json").exists()
    r = _bash(ROOT / "scripts/gpu-q-carry.sh", tmp_path / "out2-none", cwd=elsewhere)
    assert r.returncode == 1 and "no q.tgz.* parts" in r.stdout

    # call 2, on a fresh machine, carries it: the cell samples from that very checkpoint and finishes
    dev2 = tmp_path / "device2"
    (dev2 / ".data").mkdir(parents=True)
    (dev2 / ".data/q.tgz").write_bytes(joined.read_bytes())
    (dev2 / "spec.toml").write_text(SPEC.format(model=model))
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", tmp_path / "out2", cwd=dev2,
              env={"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": cell, "DEADLINE": "500"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "carried checkpoints: 1" in r.stdout, r.stdout
    cfg = "runs/experiments/t/q/rtn_w4a8_steps5/quant_config.json"
    assert (dev2 / cfg).read_bytes() == (dev1 / cfg).read_bytes()  # not quantized again
    res = json.loads((dev2 / f"results/experiments/t/cells/{cell}.json").read_text())
    assert res["quantize"]["wall_seconds"] == json.loads((dev1 / cfg).read_text())["wall_seconds"]
    # the checkpoint goes on: the spec's W4A32 rtn cell, not run yet, samples from it too (its weights, float acts)
    assert "checkpoints to carry: q/rtn_w4a8_steps5 " in r.stdout, r.stdout


def _runner_pids(dev: Path) -> list[int]:
    """The `gacq experiment run` processes started in `dev` (the call starts its runner with setsid: a process group of
    its own, which killing the call's group leaves running)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if b"experiment" in cmd and b"run" in cmd and os.readlink(d / "cwd") == str(dev):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_a_call_killed_by_its_limit_still_returns_what_finished(tmp_path):
    """The call packs while its cells run: killed whole (as the device kills a call at its limit), $OUT holds the
    cells finished by then. The runner is paused once the float cell is written, so that the call is certainly still
    running when that cell is packed (racing it failed twice in session 50: under the suite's load a pack, which
    starts an interpreter, took longer than the quantized cells after it)."""
    import signal
    import time

    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    dev = tmp_path / "device"
    dev.mkdir()
    (dev / "spec.toml").write_text(SPEC.format(model=model))
    out = tmp_path / "out"
    env = {**os.environ, "SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": "fp_steps5_seed0,rtn_w4a8_steps5_seed0",
           "DEADLINE": "500", "P": "1", "PACK_EVERY": "1"}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts/gpu-dit-call.sh"), "cells", str(out)], cwd=dev, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cells = dev / "results/experiments/t/cells"

    def packed() -> set[str]:
        try:
            with tarfile.open(out / "call.tgz") as t:
                return {n.lstrip("./") for n in t.getnames()}
        except (FileNotFoundError, tarfile.TarError):
            return set()

    runners: list[int] = []
    try:
        t0 = time.time()
        while not (cells / "fp_steps5_seed0.json").exists() and time.time() - t0 < 300:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        runners = _runner_pids(dev)
        assert len(runners) == 1, runners  # one process runs the cells in turn
        os.kill(runners[0], signal.SIGSTOP)
        assert not (cells / "rtn_w4a8_steps5_seed0.json").exists()
        while "results/cells/fp_steps5_seed0.json" not in packed() and time.time() - t0 < 300:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        # the float cell is packed while the quantized one has not finished: the call still runs
        assert proc.poll() is None and not (cells / "rtn_w4a8_steps5_seed0.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in runners:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "results/cells/fp_steps5_seed0.json" in packed()  # a whole archive, left in place by the kill
    assert "results/cells/rtn_w4a8_steps5_seed0.json" not in packed()


def test_unpack_supersedes_the_gac_profile_of_a_requantized_job(tmp_path):
    """A call's GAC weight profile of another weights file (the job quantized again) replaces the one here, which
    moves to diagnostics/superseded/; a differing profile of the same weights file is kept, the call's beside the
    logs. (The folder has no cells, so the report at the end fails: the files are checked.)"""
    call = tmp_path / "call"
    (call / "results/diagnostics").mkdir(parents=True)
    (call / "results/diagnostics/requant.json").write_text(json.dumps({"gac_weights_sha256": "b" * 64, "v": "new"}))
    (call / "results/diagnostics/same.json").write_text(json.dumps({"gac_weights_sha256": "c" * 64, "v": "new"}))
    res = tmp_path / "res"
    (res / "diagnostics").mkdir(parents=True)
    (res / "diagnostics/requant.json").write_text(json.dumps({"commit": "0123456789abcdef", "v": "old"}))
    (res / "diagnostics/same.json").write_text(json.dumps({"gac_weights_sha256": "c" * 64, "v": "old"}))
    with tarfile.open(tmp_path / "call.tgz", "w:gz") as t:
        t.add(call, arcname=".")
    r = _bash(ROOT / "scripts/gpu-unpack.sh", tmp_path / "call.tgz", res, "c1", "T", cwd=tmp_path)
    assert "no cell results" in r.stdout and "no report" in r.stdout, r.stdout + r.stderr
    assert json.loads((res / "diagnostics/requant.json").read_text())["v"] == "new"
    assert json.loads((res / "diagnostics/superseded/requant-0123456789ab.json").read_text())["v"] == "old"
    assert json.loads((res / "diagnostics/same.json").read_text())["v"] == "old"
    assert json.loads((res / "runs/c1-logs/not-merged/diagnostics/same.json").read_text())["v"] == "new"
    assert "moved it to" in r.stdout and "exists and differs" in r.stdout, r.stdout


def test_a_quantization_stopped_in_one_call_goes_on_in_the_next(tmp_path):
    """A quantization stopped part-way (as a call's deadline stops it) returns its resume points with the call; a later
    call, on a fresh machine, carries them and goes on from the last finished unit (its run times add up)."""
    import sys

    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    cell, job = "tfmq_w4a8_steps5_seed0", "tfmq_w4a8_steps5"
    dev1 = tmp_path / "device1"
    dev1.mkdir()
    (dev1 / "spec.toml").write_text(SPEC.format(model=model))
    stop_after_two_units = """
import sys
import gacq.quant.recon as recon
from gacq.experiment import ensure_quantized, load_spec
done, real = [], recon.reconstruct_unit
def unit(*a, **k):
    if len(done) == 2:
        sys.exit(3)
    done.append(1)
    return real(*a, **k)
recon.reconstruct_unit = unit
spec = load_spec("spec.toml")
ensure_quantized(spec, next(c for c in spec.cells if c.id == sys.argv[1]), "cpu", progress=False)
"""
    r = subprocess.run([sys.executable, "-c", stop_after_two_units, cell], cwd=dev1, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 3, r.stdout + r.stderr
    points = dev1 / f"runs/experiments/t/q/{job}.recon-ckpt"
    assert len(list(points.glob("unit_*.safetensors"))) == 2
    # call 1 runs another cell; the stopped quantization's resume points come back with it
    out1 = tmp_path / "out1"
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", out1, cwd=dev1,
              env={"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": "fp_steps5_seed0", "DEADLINE": "500"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checkpoints to carry: q/{job}.recon-ckpt " in r.stdout, r.stdout
    here = tmp_path / "here"
    here.mkdir()
    r = _bash(ROOT / "scripts/gpu-q-carry.sh", out1 / "q", cwd=here)
    assert r.returncode == 0 and f".data/q.tgz holds {job}.recon-ckpt (" in r.stdout, r.stdout + r.stderr
    # call 2, on a fresh machine: the cell's quantization goes on from the two units and the cell finishes
    dev2 = tmp_path / "device2"
    (dev2 / ".data").mkdir(parents=True)
    (dev2 / ".data/q.tgz").write_bytes((here / ".data/q.tgz").read_bytes())
    (dev2 / "spec.toml").write_text(SPEC.format(model=model))
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", tmp_path / "out2", cwd=dev2,
              env={"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": cell, "DEADLINE": "500"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dev2 / f"results/experiments/t/cells/{cell}.json").exists(), r.stdout
    meta = json.loads((dev2 / f"runs/experiments/t/q/{job}/quant_config.json").read_text())
    assert len(meta["wall_seconds_runs"]) == 2, meta  # the stopped run's time up to its last unit, and the resumed run


def test_part_statistics_travel_between_calls_and_unpack_merges_a_cell_here(tmp_path):
    """A cell sampled in parts (`[sample] part_size`, 3 parts), over three calls on fresh machines:
    1. PARTS=1 (`gacq experiment run --parts`): samples part 1 only (exit 3: parts left to other runs) and returns
       its statistics in $OUT/p; gpu-unpack (SPEC set) keeps them in .data/parts and lists the cell's parts;
    2. carries .data/parts: samples only part 2 (PARTS=2), and returns only that part (not the carried one);
    3. carries nothing, PARTS=3: samples part 3; gpu-unpack then finds all three parts here and merges and evaluates
       the cell on this machine (sampling nothing), and drops the finished cell's parts from .data/parts.
    After each call gpu-unpack prints the next call's plan (`gacq experiment plan`)."""
    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    cell = "fp_steps5_seed0"
    spec = SPEC.format(model=model).replace("num = 10\nbatch_size = 10", "num = 30\nbatch_size = 10\npart_size = 10")
    here = tmp_path / "here"
    res = here / "results/experiments/t"
    res.mkdir(parents=True)
    (here / "spec.toml").write_text(spec)
    for k in (1, 2, 3):
        dev = tmp_path / f"device{k}"
        dev.mkdir()
        (dev / "spec.toml").write_text(spec)
        if k == 2:
            (dev / ".data").mkdir()
            subprocess.run(["cp", "-r", here / ".data/parts", dev / ".data/parts"], check=True)
        env = {"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": cell, "DEADLINE": "500", "PARTS": str(k)}
        r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", tmp_path / f"out{k}", cwd=dev, env=env)
        assert r.returncode == 0 and "experiment rc 3" in r.stdout, r.stdout + r.stderr
        assert ("carried part statistics: 1" in r.stdout) == (k == 2), r.stdout
        chunks = sorted((tmp_path / f"out{k}/p").glob("parts.tgz.*"))
        assert chunks and all(c.stat().st_size <= 15 << 20 for c in chunks)
        with tarfile.open(fileobj=io.BytesIO(b"".join(c.read_bytes() for c in chunks))) as t:
            returned = sorted(n for n in t.getnames() if n.endswith(".npz"))
        assert returned == [f"parts/{cell}/stats_{k - 1:04d}.npz"], returned  # this call's part only
        r = _bash(ROOT / "scripts/gpu-unpack.sh", tmp_path / f"out{k}/call.tgz", res, f"call{k}", "T", cwd=here,
                  env={"SPEC": "spec.toml"})
        assert r.returncode == 0, r.stdout + r.stderr
        if k < 3:
            assert f"{cell}: parts {'1' if k == 1 else '1-2'}\n" in r.stdout and "merging" not in r.stdout, r.stdout
            # and the next call's plan (`gacq experiment plan`): this cell's missing parts come first
            assert f"gpu-unpack:   PARTS='{cell}={'2-3' if k == 1 else '3'}; " in r.stdout, r.stdout
            assert not (res / f"cells/{cell}.json").exists()
    assert f"{cell}: parts 1-3\n" in r.stdout and f"merging the parts of {cell}" in r.stdout, r.stdout
    done = json.loads((res / f"cells/{cell}.json").read_text())
    assert done["metrics"]["samples"]["n"] == 30 and done["sample"]["images_made_this_run"] == 0
    assert [p["part"] for p in done["sample"]["part_runs"]] == [0, 1, 2]
    assert f"{cell} is finished: dropped its part statistics" in r.stdout and not (here / ".data/parts" / cell).exists()
    assert (res / "README.md").exists()


def test_a_one_process_call_samples_the_named_parts_of_each_cell(tmp_path):
    """`P=1` with two cells (docs/next-gpu-runs.md §3's calls): one runner process samples PARTS of both cells in turn
    (the first cell, left with parts to other runs, no longer stops the second) and the call returns both parts.
    PARTS per cell, as `gacq experiment plan` prints it (';' and spaces pass through the script's quoting)."""
    torch.manual_seed(0)
    model = save_model(build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32)).eval(), tmp_path / "tiny32")
    cells = ["fp_steps5_seed0", "fp_steps10_seed0"]
    dev = tmp_path / "device"
    dev.mkdir()
    (dev / "spec.toml").write_text(SPEC.format(model=model).replace("num = 10\nbatch_size = 10",
                                                                     "num = 20\nbatch_size = 10\npart_size = 10"))
    env = {"SPEC": "spec.toml", "DEVICE": "cpu", "CELLS": ",".join(cells), "DEADLINE": "500", "P": "1",
           "PARTS": "fp_steps5_seed0=2; fp_steps10_seed0=1"}
    r = _bash(ROOT / "scripts/gpu-dit-call.sh", "cells", tmp_path / "out", cwd=dev, env=env)
    assert r.returncode == 0 and "experiment rc 3" in r.stdout, r.stdout + r.stderr
    chunks = sorted((tmp_path / "out/p").glob("parts.tgz.*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(c.read_bytes() for c in chunks))) as t:
        returned = sorted(n for n in t.getnames() if n.endswith(".npz"))
    assert returned == ["parts/fp_steps10_seed0/stats_0000.npz", "parts/fp_steps5_seed0/stats_0001.npz"], returned
    with tarfile.open(tmp_path / "out/call.tgz") as t:  # the runner's log travels in call.tgz
        log = t.extractfile("./experiment.log").read().decode()
    assert "stopped: fp_steps5_seed0: 1 of its 2 parts left" in log and "2 cell(s) stopped early" in log, log
