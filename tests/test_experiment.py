"""The experiment runner and report: real CLI runs on a tiny 32x32 model (the cifar10 features need 32x32)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gacq.errors import GacqError
from gacq.experiment import load_spec, parse_bits, quant_job_of
from gacq.metrics import evaluate
from gacq.models import NAMED_CONFIGS, build_model, save_model
from gacq.report import render

from .conftest import gacq_here


def gacq(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True, cwd=cwd)


# quick commands (list, report, diagnostics, refusals, runs with nothing left to do) go through the same entry point
# in this process; each test's first run that calibrates, quantizes or samples is a real subprocess (the command as
# a user starts it). A test's later runs (resuming, sampling further parts) may run here too: a new interpreter
# spends 8-11 s importing torch and diffusers on a 2-core AMD EPYC (session 46), around a second of work here
here = gacq_here


SPEC = """
name = "t"
model = "{model}"
device = "cpu"
[calib]
trajectories = 2
batch_size = 2
[quantize]
iters = 2
act_iters = 2
recon_batch = 4
[sample]
steps = 5
num = 10
batch_size = 10
[[grid]]
methods = ["fp", "rtn", "tfmq"]
bits = ["W4A8", "W4A32"]
"""


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    cfg = dict(NAMED_CONFIGS["tiny"], sample_size=32)
    torch.manual_seed(0)
    return save_model(build_model(cfg).eval(), tmp_path_factory.mktemp("m") / "tiny32")


@pytest.fixture(scope="module")
def ran(tiny32, tmp_path_factory):
    """One real run of a spec through the CLI, with two processes."""
    root = tmp_path_factory.mktemp("exp")
    (root / "spec.toml").write_text(SPEC.format(model=tiny32))
    r = gacq("experiment", "run", "spec.toml", "--parallel", "2", "--quiet", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_bits_and_spec_errors(tmp_path, tiny32):
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w8a32") == (8, None)
    for bad in ("4A8", "W4", "W9A8", "W4A1"):
        with pytest.raises(GacqError, match="bit width"):
            parse_bits(bad)
    p = tmp_path / "s.toml"
    cases = [("[[grid]]\nmethods = ['nope']\n", "unknown method 'nope'"),
             ("name = 'x'\n", "no \\[\\[grid\\]\\]"),
             ("[sample]\nstep = 3\n[[grid]]\nmethods = ['fp']\n", "unknown key.*step"),
             ("[[grid]]\nmethods = ['tfmq']\ngac = {tau = [1.0]}\n", "gac only"),
             ("[[grid\n", "not valid TOML"),
             # values of the wrong type or out of range: refused when the spec loads, not deep inside a run
             ("[sample]\nnum = 'ten'\n[[grid]]\nmethods = ['fp']\n", "num = 'ten': must be an integer"),
             ("[sample]\nnum = 0\n[[grid]]\nmethods = ['fp']\n", "num = 0: must be at least 1"),
             ("[quantize]\niters = 2.5\n[[grid]]\nmethods = ['fp']\n", "iters = 2.5: must be an integer"),
             ("[quantize]\niters = true\n[[grid]]\nmethods = ['fp']\n", "iters = True: must be an integer"),
             ("[sample]\neta = -1\n[[grid]]\nmethods = ['fp']\n", "eta = -1: must be at least 0"),
             ("[sample]\nscheduler = 3\n[[grid]]\nmethods = ['fp']\n", "scheduler = 3: must be a string"),
             ("[sample]\nseeds = ['a']\n[[grid]]\nmethods = ['fp']\n", "seeds must be integers of at least 0"),
             ("[[grid]]\nmethods = ['fp']\nsteps = [0]\n", "steps must be integers of at least 1")]
    for text, msg in cases:
        p.write_text(text)
        with pytest.raises(GacqError, match=msg):
            load_spec(p)
    with pytest.raises(GacqError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    p.write_text("[sample]\neta = 0\nsteps = 20\nseeds = 3\n[[grid]]\nmethods = ['fp']\n")  # an int for a float
    assert [(c.steps, c.seed) for c in load_spec(p).cells] == [(20, 3)]


def test_eval_settings_that_cannot_evaluate_are_refused_before_any_cell_runs(tmp_path, tiny32):
    """A cell's metrics come after its calibration and sampling: an [eval] feature network or reference that the
    evaluation would refuse stops `gacq experiment run` at once, with nothing made in its work folder."""
    from gacq.metrics.evaluate import bundled_stats_path
    from gacq.metrics.stats import FeatureStats, load_stats

    other = load_stats(bundled_stats_path("train"))
    FeatureStats(**{**other.__dict__, "feature_hash": "0123456789abcdef"}).save(tmp_path / "other.npz")
    cases = [("features = 'vgg'", "unknown feature network 'vgg'"),
             ("features = 'inception'", "--inception-weights"),
             ("features = 'nets/mine'", "nets/mine is not a CIFAR-10 feature network folder"),
             ("ref = 'missing.npz'", "the reference missing.npz does not exist"),
             ("ref = 'other.npz'", "hash 0123456789abcdef.*recompute")]
    for i, (line, msg) in enumerate(cases):
        spec = tmp_path / f"e{i}.toml"
        spec.write_text(SPEC.format(model=tiny32) + f"[eval]\n{line}\n")
        r = here("experiment", "run", spec, cwd=tmp_path)
        assert r.returncode == 2 and "[eval]" in r.stderr and re.search(msg, r.stderr), (line, r.stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_matmul_tf32_is_a_setting_only_when_on_and_set_for_the_run(tmp_path, tiny32, monkeypatch):
    import gacq.experiment as ex

    p = tmp_path / "s.toml"
    p.write_text(SPEC.format(model=tiny32))
    plain = load_spec(p)
    p.write_text("matmul_tf32 = false\n" + SPEC.format(model=tiny32))
    off = load_spec(p)
    p.write_text("matmul_tf32 = true\n" + SPEC.format(model=tiny32))
    on = load_spec(p)
    assert not plain.matmul_tf32 and not off.matmul_tf32 and on.matmul_tf32
    # specs written before the key keep their digest (their finished cells stay theirs); on is another setting
    assert ex.settings_digest(plain) == ex.settings_digest(off) != ex.settings_digest(on)
    assert ex.settings(on)["matmul_tf32"] is True and "matmul_tf32" not in ex.settings(off)
    p.write_text("matmul_tf32 = 'yes'\n" + SPEC.format(model=tiny32))
    with pytest.raises(GacqError, match="matmul_tf32 must be true or false"):
        load_spec(p)
    monkeypatch.setattr(ex, "_done", lambda spec, cell: True)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for s, want in ((on, True), (off, False)):
            assert ex.run_experiment(s, progress=False, echo=lambda *a: None) == []
            assert torch.backends.cuda.matmul.allow_tf32 is want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_cells_of_a_model_retrained_in_place_are_refused(tmp_path, tiny32):
    """A cell records its model's weights digest; a finished cell made from other weights at the same path (a model
    retrained in place, as every GPU session's DiT) is refused instead of being taken for the new model's."""
    import shutil

    import gacq.experiment as ex

    model = tmp_path / "model"
    shutil.copytree(tiny32, model)
    (tmp_path / "s.toml").write_text(SPEC.format(model=model))
    s = load_spec(tmp_path / "s.toml", results=tmp_path / "results")
    cell = s.cells[0]
    digest = ex.model_digest(str(model))
    assert digest is not None and len(digest) == 16 and ex.model_digest(str(tmp_path / "not-trained-yet")) is None
    weightless = tmp_path / "weightless"  # the configs without the weights file: unknown, not the digest of no files
    shutil.copytree(tiny32, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    assert any(weightless.rglob("config.json")) and ex.model_digest(str(weightless)) is None
    s.cell_dir.mkdir(parents=True)
    path = s.cell_dir / f"{cell.id}.json"
    for recorded in (digest, None):  # the same weights, and cells written before the digest was recorded
        path.write_text(json.dumps({"settings_digest": ex.settings_digest(s), "model_digest": recorded}))
        assert ex._done(s, cell)
    path.write_text(json.dumps({"settings_digest": ex.settings_digest(s), "model_digest": digest}))
    m = build_model(dict(NAMED_CONFIGS["tiny"], sample_size=32))  # "retrained": other weights, same folder
    save_model(m, model)
    assert ex.model_digest(str(model)) != digest
    with pytest.raises(GacqError, match="other weights than the model now at .*retrained"):
        ex._done(s, cell)


def test_grid_expansion_and_weight_only_reuse(tmp_path, tiny32):
    p = tmp_path / "s.toml"
    p.write_text(SPEC.format(model=tiny32) + "[[grid]]\nmethods = ['gac']\nbits = ['W4A32', 'W3A8']\n"
                 "steps = [5, 10]\ngac = {tau = [0.5, 2], groups = [2]}\n")
    s = load_spec(p)
    ids = [c.id for c in s.cells]
    assert len(ids) == len(set(ids)) == 1 + 2 * 2 + 2 * 2 * 2  # fp once, rtn/tfmq x 2 bits, gac: bits x steps x tau
    assert "gac_w4a32_groups2_tau0.5_steps10_seed0" in ids
    by = {c.id: c for c in s.cells}
    assert quant_job_of(s, by["rtn_w4a32_steps5_seed0"]) == ("rtn_w4a8_steps5", True, 8)
    # no W4A8 gac cell with these overrides: the W4A32 gac cell quantizes weight-only itself
    assert quant_job_of(s, by["gac_w4a32_groups2_tau0.5_steps5_seed0"]) == \
        ("gac_w4a32_groups2_tau0.5_steps5", False, None)


# the grids of the calib_seeds, gaussian_draws, bias_correction and act_granularity tests below (each test loads
# its own spec with the base spec and its grid)
SEEDS_GRID = "[[grid]]\nmethods = ['rtn']\nbits = ['W4A8', 'W4A32']\ncalib_seeds = [0, 1]\n"
DRAWS_GRID = "[[grid]]\nmethods = ['ptq4dm']\nbits = ['W8A8']\ngaussian_draws = [1, 4]\n"
BC_GRID = "[[grid]]\nmethods = ['tfmq']\nbits = ['W4A8']\nbias_correction = [false, true]\n"
GRAN_GRID = '[[grid]]\nmethods = ["rtn"]\nbits = ["W8A8"]\nact_granularity = "token"\n'
W8_GRID = '[[grid]]\nmethods = ["rtn"]\nbits = ["W4A8"]\nw8_layers = {sc = ["up_blocks.*.conv_shortcut"]}\n'
RECIPE_GRID = '[[grid]]\nmethods = ["tfmq"]\nbits = ["W4A8", "W4A32"]\n' \
              'recipe = {lsq = {act_mode = "lsq", split_shortcuts = true}}\n'
EXTRA_CELLS = ["rtn_w4a8_cs1_steps5_seed0", "ptq4dm_w8a8_gd4_steps5_seed0", "tfmq_w4a8_bc_steps5_seed0",
               "rtn_w8a8_tok_steps5_seed0", "rtn_w4a8_w8sc_steps5_seed0", "tfmq_w4a8_rlsq_steps5_seed0"]


@pytest.fixture(scope="module")
def extras(ran, tiny32):
    """The cells of those six tests, run by one `gacq experiment run` of a spec with the six grids, into `ran`'s
    folders (a process per cell would spend most of its time importing torch and diffusers again)."""
    (ran / "extras.toml").write_text(SPEC.format(model=tiny32) + SEEDS_GRID + DRAWS_GRID + BC_GRID + GRAN_GRID
                                     + W8_GRID + RECIPE_GRID)
    r = gacq("experiment", "run", "extras.toml", "--cells", ",".join(EXTRA_CELLS), "--quiet", cwd=ran)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 of 6 cells done, running 6" in r.stdout
    return ran


def test_cells_written_and_equal_to_the_manual_commands(ran, tiny32):
    cells = {p.stem: json.loads(p.read_text()) for p in (ran / "results/experiments/t/cells").glob("*.json")}
    from gacq.experiment import model_digest

    assert {c["model_digest"] for c in cells.values()} == {model_digest(str(tiny32))}
    assert sorted(cells) == sorted(["fp_steps5_seed0", "rtn_w4a8_steps5_seed0", "rtn_w4a32_steps5_seed0",
                                    "tfmq_w4a8_steps5_seed0", "tfmq_w4a32_steps5_seed0"])
    for c in cells.values():
        assert c["metrics"]["feature_network"]["name"] == "cifar10" and c["metrics"]["samples"]["n"] == 10
        assert c["command"].startswith("gacq experiment run") and c["commit"] and c["machine"]
    # one process per quantization job, then one per further cell of the job (its own log)
    logs = sorted(p.stem for p in (ran / "runs/experiments/t/logs").glob("*.log"))
    assert logs == sorted(cells), logs
    # each cell process logs its phases with times, --quiet too (the runner's children run quiet)
    for cid in cells:
        text = (ran / "runs/experiments/t/logs" / f"{cid}.log").read_text()
        assert f"{cid}: 10 samples drawn at" in text and f"{cid}: evaluated at" in text, text
        assert (f"{cid}: checkpoint " in text) == (not cid.startswith("fp_")), text
    w = cells["tfmq_w4a32_steps5_seed0"]["quantize"]
    assert w["float_acts"] and w["weights_from"] == "tfmq_w4a8_steps5" and w["wall_seconds"] > 0
    # the FP cell's metrics are gacq eval's on its samples
    work = ran / "runs/experiments/t"
    fp = cells["fp_steps5_seed0"]["metrics"]
    direct = evaluate(work / "samples/fp_steps5_seed0/samples.npz", progress=False)
    assert fp["fid"] == pytest.approx(direct["fid"], rel=1e-9) and fp["precision"] == direct["precision"]
    # the rtn W4A8 cell's images are those of `gacq quantize` + `gacq sample` with the same settings
    calib = next(work.glob("calib_all_*"))
    q, s = ran / "manual_q", ran / "manual_s"
    r = gacq("quantize", "--model", tiny32, "--method", "rtn", "--wbits", 4, "--abits", 8, "--calib", calib,
             "--record-steps", 5, "--steps", 5, "--out", q, "--device", "cpu", cwd=ran)
    assert r.returncode == 0, r.stderr
    r = gacq("sample", "--model", q, "--steps", 5, "--num", 10, "--batch-size", 10, "--out", s, "--device", "cpu",
             cwd=ran)
    assert r.returncode == 0, r.stderr
    a = np.load(s / "samples.npz")["images"]
    b = np.load(work / "samples/rtn_w4a8_steps5_seed0/samples.npz")["images"]
    assert np.array_equal(a, b)


def test_rerun_skips_done_cells_and_resumes_an_unfinished_one(ran):
    cell_dir = ran / "results/experiments/t/cells"
    before = {p.name: p.stat().st_mtime_ns for p in cell_dir.glob("*.json")}
    gone = cell_dir / "rtn_w4a32_steps5_seed0.json"
    old = json.loads(gone.read_text())
    gone.unlink()  # as if the run had been killed after sampling, before its result was written
    r = here("experiment", "run", "spec.toml", "--quiet", cwd=ran)
    assert r.returncode == 0, r.stderr
    assert "4 of 5 cells done, running 1" in r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in cell_dir.glob("*.json")}
    assert {k: v for k, v in after.items() if k != gone.name} == {k: v for k, v in before.items() if k != gone.name}
    new = json.loads(gone.read_text())
    assert new["metrics"]["fid"] == old["metrics"]["fid"]
    meta = json.loads((ran / "runs/experiments/t/samples/rtn_w4a32_steps5_seed0/meta.json").read_text())
    assert meta["images_made_this_run"] == 0 and meta["shards_resumed"] == 1
    # the cell records that its sampling time covers none of its images, and the listing says so for it alone
    assert (new["sample"]["images_made_this_run"], new["sample"]["shards_resumed"]) == (0, 1)
    assert "10 samples drawn (0 in this run, the rest in 1 shard(s) of an earlier one)" in r.stdout, r.stdout
    r = here("experiment", "list", "spec.toml", cwd=ran)
    assert r.stdout.count("done") == 5
    noted = [ln.split()[1] for ln in r.stdout.splitlines() if "[sampled " in ln]
    assert noted == ["rtn_w4a32_steps5_seed0"] and "[sampled 0 of its 10 images in that run]" in r.stdout, r.stdout
    # done cells show their recorded times: the cell's, its quantization job's (not FP's), its sampling's
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("done")}
    assert all("[cell " in ln and ", sample " in ln for ln in lines.values()), r.stdout
    assert ("quantize" in lines["tfmq_w4a8_steps5_seed0"]) and "quantize" not in lines["fp_steps5_seed0"], r.stdout
    from gacq.experiment import cell_times, load_spec

    spec = load_spec(ran / "spec.toml", results=cell_dir.parent)  # the CLI ran in `ran`: its results folder
    times = cell_times(spec, next(c for c in spec.cells if c.id == "tfmq_w4a8_steps5_seed0"))
    cell = json.loads((cell_dir / "tfmq_w4a8_steps5_seed0.json").read_text())
    assert times == {"cell": cell["wall_seconds_this_run"], "quantize": cell["quantize"]["wall_seconds"],
                     "sample": cell["sample"]["wall_seconds_last_run"]}
    r = here("experiment", "run", "spec.toml", "--cells", "nope", cwd=ran)
    assert r.returncode == 2 and "no cell(s) ['nope']" in r.stderr
    # --cells runs the cells named in its own order, not the spec's (fp comes first there); from the samples on disk
    for c in ("fp_steps5_seed0", "rtn_w4a32_steps5_seed0"):
        (cell_dir / f"{c}.json").unlink()
    r = here("experiment", "run", "spec.toml", "--cells", "rtn_w4a32_steps5_seed0,fp_steps5_seed0", "--quiet", cwd=ran)
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("[1/2] rtn_w4a32_steps5_seed0") < r.stdout.index("[2/2] fp_steps5_seed0"), r.stdout


def test_a_cell_sampled_in_parts_equals_one_run_and_resumes_per_part(tiny32, tmp_path):
    """`[sample] part_size`: the FP cell's 24 images in parts of 10, 10 and 4 (`SampleConfig.first`), each reduced to
    its feature statistics at once; FID and IS equal `gacq sample` + `gacq eval` of the same 24 images in one run (the
    parts' covariances are stored in float32). A rerun after losing one part's statistics (and the cell) samples that
    part only. A part size the IS splits do not divide is refused."""
    spec = SPEC.replace("num = 10\nbatch_size = 10", "num = 24\nbatch_size = 8\npart_size = 10").replace(
        'methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]', 'methods = ["fp"]').replace("steps = 5", "steps = 3")
    (tmp_path / "spec.toml").write_text(spec.format(model=tiny32))
    r = gacq("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cell = json.loads((tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").read_text())
    parts = tmp_path / "runs/experiments/t/parts/fp_steps3_seed0"
    assert sorted(p.name for p in parts.glob("stats_*.npz")) == ["stats_0000.npz", "stats_0001.npz", "stats_0002.npz"]
    assert cell["metrics"]["samples"]["n"] == 24 and cell["sample"]["n"] == 24
    r = here("sample", "--model", tiny32, "--steps", 3, "--num", 24, "--batch-size", 24, "--out", tmp_path / "one",
             "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    direct = evaluate(tmp_path / "one/samples.npz", progress=False)
    got = cell["metrics"]
    assert got["fid"] == pytest.approx(direct["fid"], rel=1e-4) and got["sfid"] == pytest.approx(direct["sfid"], rel=1e-3)
    # rel 1e-5, not equality: CPU kernels may sum in a batch-size-dependent order (parts of 10 against one batch of
    # 24; 4e-7 on an AMD EPYC in session 45, equal on the earlier machines; 2.7e-6 in session 53's fresh clone on a
    # Zen 4 EPYC, two pytest-xdist workers, where the same test in one process had passed at 1e-6 earlier that session)
    assert got["is_mean"] == pytest.approx(direct["is_mean"], rel=1e-5)
    assert got["pr_n"] == direct["pr_n"] == {"samples": 24, "reference": 10000}
    # lose the last part's statistics and the cell: the rerun samples that part alone
    (parts / "stats_0002.npz").unlink()
    (tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").unlink()
    r = here("experiment", "list", "spec.toml", cwd=tmp_path)
    assert "started  fp_steps3_seed0  [parts 2 of 3 sampled]" in r.stdout, r.stdout
    # --deadline: a part that would not end by it is not started, judged by the longest part recorded (here made
    # to read 1e6 s), and the run exits with code 3 having drawn nothing; a deadline already passed stops the cell
    # processes of a --parallel run too (two cells: seeds 0 and 1)
    m1 = parts / "meta_0001.json"
    saved = m1.read_text()
    m1.write_text(json.dumps({**json.loads(saved), "wall_seconds_this_run": 1e6}))
    r = here("experiment", "run", "spec.toml", "--quiet", "--deadline", 600, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "part 3 of 3 not started" in r.stdout and "a part takes about 1000000 s" in r.stdout, r.stdout
    assert not (parts / "stats_0002.npz").exists()
    m1.write_text(saved)
    (tmp_path / "two.toml").write_text(spec.format(model=tiny32).replace('methods = ["fp"]',
                                                                         'methods = ["fp"]\nseeds = [0, 1]'))
    r = here("experiment", "run", "two.toml", "--quiet", "--parallel", 2, "--deadline", 0, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "2 cell(s) stopped early" in r.stdout and r.stdout.count("stopped early by --deadline or --parts") == 2
    assert not (parts / "stats_0002.npz").exists() and not list((parts.parent / "fp_steps3_seed1").glob("stats_*"))
    r = here("experiment", "run", "spec.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "part 3 of 3 (24 of 24 images)" in out and "part 1 of 3" not in out and "part 2 of 3" not in out, out
    again = json.loads((tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").read_text())
    assert again["metrics"]["fid"] == pytest.approx(got["fid"], rel=1e-9)
    # each part's own run is recorded (parts can come from several device calls and commits)
    runs = again["sample"]["part_runs"]
    assert [r["part"] for r in runs] == [0, 1, 2] and {r["device"] for r in runs} == {"cpu"}
    assert runs[:2] == cell["sample"]["part_runs"][:2] and all(r["wall_seconds_this_run"] > 0 for r in runs[:2])
    # the third part's images were still on disk from the first run (its samples folder): the rerun only reassembled
    # them, which can take less than the 0.01 s its wall time is rounded to (session 51's fresh clone: 0.0)
    assert runs[2]["wall_seconds_this_run"] >= 0
    # --parts (1-based): a run samples only the parts named and leaves the others to other runs (exit 3); 'none'
    # samples nothing; the run that finds every part's statistics merges them into the same figures
    for k in (1, 2):
        (parts / f"stats_{k:04d}.npz").unlink()
    (tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").unlink()
    r = here("experiment", "run", "spec.toml", "--quiet", "--parts", "3", cwd=tmp_path)
    assert r.returncode == 3 and "1 of its 3 parts left to other runs (--parts): 2;" in r.stdout, r.stdout + r.stderr
    assert (parts / "stats_0002.npz").exists() and not (parts / "stats_0001.npz").exists()
    r = here("experiment", "run", "spec.toml", "--quiet", "--parts", "none", cwd=tmp_path)
    assert r.returncode == 3 and not (parts / "stats_0001.npz").exists(), r.stdout + r.stderr
    r = here("experiment", "run", "spec.toml", "--parts", "2-1", cwd=tmp_path)
    assert r.returncode == 2 and "--parts '2-1': expected 1-based part numbers" in r.stderr, r.stderr
    r = here("experiment", "run", "spec.toml", "--parts", "3-4", cwd=tmp_path)
    assert r.returncode == 2 and "cells have 3 parts of 10 samples (1-3); part 4 does not exist" in r.stderr, r.stderr
    r = here("experiment", "run", "spec.toml", "--quiet", "--parts", "1-2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    merged = json.loads((tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").read_text())
    assert merged["metrics"]["fid"] == pytest.approx(got["fid"], rel=1e-9)
    assert merged["sample"]["images_made_this_run"] == 10  # part 2 only
    assert "24 samples' statistics merged from 3 parts (10 images drawn in this run)" in r.stdout + r.stderr
    # one process, several cells (no --parallel): a cell that leaves parts to other runs does not stop the next (one
    # process compiles once for all), a deadline stops the run at the cell it stopped (seed 0 is done: 1 and 2 run)
    (tmp_path / "three.toml").write_text(spec.format(model=tiny32).replace('methods = ["fp"]',
                                                                           'methods = ["fp"]\nseeds = [0, 1, 2]'))
    r = here("experiment", "run", "three.toml", "--quiet", "--parts", "1", cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "stopped: fp_steps3_seed1: 2 of its 3 parts left to other runs (--parts): 2-3;" in r.stdout, r.stdout
    assert "2 cell(s) stopped early, the last: fp_steps3_seed2: 2 of its 3 parts" in r.stdout, r.stdout
    for seed in (1, 2):
        assert [p.name for p in (parts.parent / f"fp_steps3_seed{seed}").glob("stats_*")] == ["stats_0000.npz"]
    r = here("experiment", "run", "three.toml", "--quiet", "--parts", "2", "--deadline", 0, cwd=tmp_path)
    assert r.returncode == 3 and "fp_steps3_seed1: part 2 of 3 not started" in r.stdout, r.stdout + r.stderr
    assert "[2/2]" not in r.stdout and "seed2: part 2" not in r.stdout, r.stdout
    # `gacq experiment plan`: the next run's share of the missing parts, cell by cell, as per-cell --parts (a
    # machine without the earlier parts then samples only missing ones); cells not named in it sample nothing
    r = here("experiment", "plan", "three.toml", "-n", 3, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["CELLS=fp_steps3_seed1,fp_steps3_seed2",
                                     "PARTS='fp_steps3_seed1=2-3; fp_steps3_seed2=2'"], r.stdout
    assert "fp_steps3_seed1: parts 2-3 (1 of 3 here)" in r.stderr, r.stderr
    r = here("experiment", "run", "three.toml", "--quiet", "--parts", "fp_steps3_seed2=2; fp_steps3_seed1=2-3",
             cwd=tmp_path)
    assert r.returncode == 3 and "24 samples' statistics merged from 3 parts (14 images" in r.stdout + r.stderr, \
        r.stdout + r.stderr
    assert "fp_steps3_seed2: 1 of its 3 parts left to other runs (--parts): 3;" in r.stdout, r.stdout
    assert (tmp_path / "results/experiments/t/cells/fp_steps3_seed1.json").exists()
    assert sorted(p.name for p in (parts.parent / "fp_steps3_seed2").glob("stats_*")) == [
        "stats_0000.npz", "stats_0001.npz"]
    r = here("experiment", "plan", "three.toml", "-n", 5, cwd=tmp_path)
    assert r.stdout.splitlines() == ["CELLS=fp_steps3_seed2", "PARTS='fp_steps3_seed2=3'"], r.stdout + r.stderr
    r = here("experiment", "run", "three.toml", "--parts", "fp_steps3_seed9=3", cwd=tmp_path)
    assert r.returncode == 2 and "--parts names cell(s) ['fp_steps3_seed9']" in r.stderr, r.stderr
    r = here("experiment", "run", "three.toml", "--parts", "fp_steps3_seed2=4", cwd=tmp_path)
    assert r.returncode == 2 and "part 4 does not exist" in r.stderr, r.stderr
    r = here("experiment", "run", "three.toml", "--quiet", "--parts", "fp_steps3_seed2=3", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "results/experiments/t/cells/fp_steps3_seed2.json").exists(), r.stdout
    r = here("experiment", "plan", "three.toml", "-n", 5, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "" and "no part is missing" in r.stderr, r.stdout + r.stderr
    r = here("experiment", "plan", "spec.toml", "-n", 0, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    from gacq.experiment import cell_times, load_spec

    loaded = load_spec(tmp_path / "spec.toml", results=tmp_path / "results/experiments/t")
    times = cell_times(loaded, next(c for c in loaded.cells if c.id == "fp_steps3_seed0"))
    assert times["sample"] == pytest.approx(sum(p["wall_seconds_this_run"] for p in merged["sample"]["part_runs"]))
    # statistics of another run's part (here: another model) are refused, not merged
    meta = parts / "meta_0001.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": "elsewhere"}))
    (tmp_path / "results/experiments/t/cells/fp_steps3_seed0.json").unlink()
    r = here("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    assert r.returncode != 0 and "stats_0001.npz is not part 1 of this cell's run (model differ)" in r.stdout + r.stderr
    # `[sample] compile = true`: not in the settings digest, but parts sampled eagerly are refused (before any
    # compilation), so a cell's parts never mix compiled and eager images
    import gacq.experiment as ex

    compiled_toml = spec.format(model=tiny32).replace("part_size = 10", "part_size = 10\ncompile = true")
    (tmp_path / "compiled.toml").write_text(compiled_toml)
    compiled_spec = load_spec(tmp_path / "compiled.toml")
    assert ex.settings_digest(compiled_spec) == ex.settings_digest(load_spec(tmp_path / "spec.toml"))
    assert ex._sample_config(compiled_spec, 3, 0).compile is True
    # calibration trajectories are drawn eagerly under it (their recording model call is no compiled one): the same
    # set as the eager spec's (session 41's first GPU call failed here: "a custom model_fn runs eagerly")
    import dataclasses

    from gacq.models import load_model
    from gacq.quant.calib_data import CalibrationSet

    tiny = load_model(tiny32)
    sets = [CalibrationSet.load(ex.ensure_calib(dataclasses.replace(s, work=tmp_path / f"calib{i}"), 3, tiny, "cpu"))
            for i, s in enumerate([compiled_spec, load_spec(tmp_path / "spec.toml")])]
    assert len(sets[0].x) > 0 and torch.equal(sets[0].x, sets[1].x) and torch.equal(sets[0].t, sets[1].t)
    assert sets[0].meta["sampler"]["compile"] is False
    r = here("experiment", "run", "compiled.toml", "--quiet", cwd=tmp_path)
    assert r.returncode != 0
    assert "stats_0000.npz is not part 0 of this cell's run (compile differ)" in r.stdout + r.stderr
    (tmp_path / "compiled.toml").write_text(compiled_toml.replace("compile = true", "compile = 'yes'"))
    with pytest.raises(GacqError, match="compile must be true or false"):
        load_spec(tmp_path / "compiled.toml")
    (tmp_path / "bad.toml").write_text(spec.format(model=tiny32).replace("part_size = 10", "part_size = 15"))
    with pytest.raises(GacqError, match="multiple of 10"):
        load_spec(tmp_path / "bad.toml")


def test_report_renders_the_run(ran):
    r = here("report", "results/experiments/t", cwd=ran)
    assert r.returncode == 0, r.stderr
    md = (ran / "results/experiments/t/README.md").read_text()
    assert "Feature network: cifar10" in md and "| method | FP | W4A32 | W4A8 |" in md
    assert "biased upwards" in md and "W/A checkpoint rtn_w4a8_steps5, float acts" in md
    assert (ran / "results/experiments/t/README_fid.png").stat().st_size > 1000
    page = (ran / "results/experiments/t/README.html").read_text()
    assert page.count("<table>") == 3 and "grids/tfmq_w4a8_steps5_seed0.jpg" in page


def _cell(tmp: Path, method, bits, seed, fid, net="cifar10", h="abc", gac=None):
    w, a = (None, None) if bits == "FP" else parse_bits(bits)
    d = {"schema": "gacq-experiment-cell/1", "experiment": "e",
         "cell": {"id": f"{method}{bits}{seed}{net}{gac}", "method": method, "bits": bits, "wbits": w, "abits": a,
                  "steps": 100, "seed": seed, "gac": gac or {}},
         "metrics": {"feature_network": {"name": net, "hash": h, "note": "n"}, "samples": {"n": 10000},
                     "fid": fid, "sfid": 1.0, "is_mean": 2.0, "precision": 0.5, "recall": 0.5},
         "quantize": None}
    (tmp / f"{d['cell']['id']}.json").write_text(json.dumps(d))


def test_report_pools_seeds_and_separates_feature_networks(tmp_path):
    fids = [10.0, 11.5, 9.25]
    for s, f in enumerate(fids):
        _cell(tmp_path, "gac", "W4A8", s, f)
    _cell(tmp_path, "fp", "FP", 0, 8.0)
    _cell(tmp_path, "gac", "W4A8", 0, 99.0, net="inception", h="def")
    _cell(tmp_path, "gac", "W4A8", 0, 12.0, gac={"tau": 0.5})
    (tmp_path / "other.json").write_text("{\"not\": \"a cell\"}")
    info = render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    want = f"{statistics.mean(fids):.2f} ± {statistics.stdev(fids):.2f} (3 seeds)"
    assert want in md
    cif, inc = md.split("## Feature network: inception (def)")
    assert "99.00" in inc and "99.00" not in cif and want not in inc
    assert "| tau=0.5 | W4A8 | 100 | 12.00 | " + want + " |" in cif
    assert info["cells"] == 6 and "biased" not in md
    (tmp_path / "empty").mkdir()
    with pytest.raises(GacqError, match="no experiment cell results"):
        render(tmp_path / "empty", tmp_path / "x.md")
    with pytest.raises(GacqError, match="not a folder"):
        render(tmp_path / "missing", tmp_path / "x.md")


def test_report_leaves_out_cell_copies_that_an_unpack_did_not_merge(tmp_path):
    """gpu-unpack.sh keeps a call's copy of a cell already in the results folder under
    runs/<call>-logs/not-merged/: the report counts the cell once, not once per copy."""
    _cell(tmp_path, "gac", "W4A8", 0, 10.0)
    _cell(tmp_path, "gac", "W4A8", 1, 12.0)
    copy = tmp_path / "runs/c2-logs/not-merged"
    copy.mkdir(parents=True)
    _cell(copy, "gac", "W4A8", 1, 12.0)
    info = render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert info["cells"] == 2 and "11.00 ± 1.41 (2 seeds)" in md, md
    # only a folder of that name is left out, not a file or a results folder whose path holds the word
    (tmp_path / "not-merged-notes").mkdir()
    _cell(tmp_path / "not-merged-notes", "gac", "W4A8", 2, 14.0)
    assert render(tmp_path, tmp_path / "r.md")["cells"] == 3


def test_report_cost_table_names_bias_corrections_and_unrecorded_gpu_peaks(tmp_path):
    """A bias-corrected job is a correction of its base checkpoint, not a quantization; a GPU job
    without a recorded peak says so instead of claiming it ran on the CPU; a resumed job's peak says when it is the
    last run's alone."""
    rows = [("gac_w3a8", {"wall_seconds": 783.0, "peak_gpu_memory_bytes": 2**30 * 7.81}, "H200"),
            ("gac_w3a8_bc", {"wall_seconds": 65.0, "quantize_seconds_of_base": 783.0,
                             "bias_corrected_from": {"checkpoint": "gac_w3a8"}}, "H200"),
            ("tfmq_w3a8", {"wall_seconds": 900.0}, None),
            # resumed in a second call: the peak of the last run only, unless the resume points logged the others'
            ("tfmq_w4a8", {"wall_seconds": 485.2, "wall_seconds_runs": [462.78, 22.42],
                           "peak_gpu_memory_bytes": 2**30 * 0.26}, "H100"),
            ("gac_w4a8", {"wall_seconds": 395.6, "wall_seconds_runs": [61.42, 334.18], "peak_gpu_memory_of": "all runs",
                          "peak_gpu_memory_bytes": 2**30 * 8.03}, "H100")]
    for i, (job, q, gpu) in enumerate(rows):
        _cell(tmp_path, "gac", "W3A8", i, 50.0 + i)
        f = tmp_path / f"gacW3A8{i}cifar10None.json"
        d = json.loads(f.read_text())
        d["quantize"] = {"job": job, "float_acts": False, **q}
        d["machine"] = {"gpu": gpu}
        f.write_text(json.dumps(d))
    render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "| gac_w3a8 | quantization | 783 | 7.81 |" in md
    assert "| gac_w3a8_bc | bias correction of gac_w3a8 (base: 783 s) | 65 | not recorded |" in md
    assert "| tfmq_w3a8 | quantization | 900 | n/a (CPU) |" in md
    assert "| tfmq_w4a8 | quantization | 485 | 0.26 (last of 2 runs) |" in md
    assert "| gac_w4a8 | quantization | 396 | 8.03 |" in md


def test_report_counts_the_quantization_runs_that_pooled_seeds_sampled(tmp_path):
    """Seed 0 sampled a checkpoint of an earlier session, seeds 1 and 2 its requantization: the pooled entry
    says 2 runs, and the cost table lists both runs of the job."""
    runs = [("gac_w4a8", "6a958af0aa", 792.0), ("gac_w4a8", "583aa68", 608.5), ("gac_w4a8", "583aa68", 608.5)]
    for s, (job, commit, wall) in enumerate(runs):
        _cell(tmp_path, "gac", "W4A8", s, 48.0 + s)
        f = tmp_path / f"gacW4A8{s}cifar10None.json"
        d = json.loads(f.read_text())
        d["quantize"] = {"job": job, "float_acts": False, "commit": commit, "wall_seconds": wall}
        d["machine"] = {"gpu": "H200"}
        f.write_text(json.dumps(d))
    _cell(tmp_path, "tfmq", "W4A8", 0, 50.0)
    _cell(tmp_path, "tfmq", "W4A8", 1, 51.0)
    render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "49.00 ± 1.00 (3 seeds, 2 quantization runs)" in md
    assert "50.50 ± 0.71 (2 seeds) |" in md  # FP-like cells without a quantize record: no run count
    assert "| gac_w4a8 (run at 583aa68) | quantization | 608 |" in md
    assert "| gac_w4a8 (run at 6a958af) | quantization | 792 |" in md


def test_report_pairs_gac_and_tfmq_by_sampling_seed(tmp_path):
    """The report's gac − tfmq table: FID differences per shared seed, their mean ± sd and a 95% t interval of the
    mean (against scipy), with a verdict from the interval; seeds only one method has, ablations and other feature
    networks stay out."""
    from scipy import stats

    from gacq.report import paired_difference, t975

    gac = {"W4A8": [48.0, 50.5, 49.0, 60.0], "W4A32": [49.0, 49.2, 49.1], "W8A8": [47.0, 47.1], "W3A8": [55.0]}
    tfmq = {"W4A8": [49.0, 49.5, 48.7], "W4A32": [48.0, 48.1, 48.3], "W8A8": [48.0, 48.0], "W3A8": [70.0]}
    for bits in gac:
        for s, f in enumerate(gac[bits]):
            _cell(tmp_path, "gac", bits, s, f)
        for s, f in enumerate(tfmq[bits]):
            _cell(tmp_path, "tfmq", bits, s, f)
    _cell(tmp_path, "gac", "W4A8", 0, 10.0, gac={"tau": 0.5})  # an ablation: not paired
    _cell(tmp_path, "gac", "W4A8", 0, 99.0, net="inception", h="def")  # no tfmq on that network: no table there
    render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    cif, inc = md.split("## Feature network: inception (def)")
    assert "gac − tfmq, FID paired by sampling seed" in cif and "paired" not in inc
    for bits, verdict in (("W4A8", "not distinguishable"), ("W4A32", "tfmq lower (better)"),
                          ("W8A8", "gac lower (better)")):
        d = [a - b for a, b in zip(gac[bits], tfmq[bits])]  # zip: the seeds both have
        half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
        lo, hi = statistics.mean(d) - half, statistics.mean(d) + half
        row = (f"| {bits} | 100 | 10000 | {','.join(map(str, range(len(d))))} | "
               f"{', '.join(f'{x:+.2f}' for x in d)} | {statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f} | "
               f"{lo:+.2f} to {hi:+.2f} | {verdict} |")
        assert row in cif, (row, cif)
    assert "| W3A8 | 100 | 10000 | 0 | -15.00 | -15.00 |  | one seed: no interval |" in cif
    p = paired_difference({"0": 1.0, "1": 3.0, "2": 7.0}, {"1": 1.0, "2": 2.0, "3": 0.0})
    assert p["seeds"] == ["1", "2"] and p["diffs"] == [2.0, 5.0] and p["mean"] == 3.5
    assert p["interval"] == pytest.approx((3.5 - 12.706 * 1.5, 3.5 + 12.706 * 1.5))
    assert paired_difference({"0": 1.0}, {"1": 1.0}) is None
    # the t table and its expansion beyond 30 degrees of freedom against scipy
    assert max(abs(t975(df) - stats.t.ppf(0.975, df)) for df in range(1, 400)) < 1e-3
    with pytest.raises(ValueError, match="at least 1"):
        t975(0)


def test_a_spec_with_other_settings_is_refused_on_shared_folders(ran, tiny32):
    other = SPEC.format(model=tiny32).replace("iters = 2\n", "iters = 3\n", 1)
    other = other.replace('name = "t"', 'name = "t2"\nresults = "results/experiments/t"\nwork = "runs/experiments/t"')
    (ran / "other.toml").write_text(other)
    r = here("experiment", "run", "other.toml", "--quiet", cwd=ran)
    assert r.returncode == 2 and "made with other settings" in r.stderr
    # the same settings under another name share the finished cells
    same = SPEC.format(model=tiny32).replace('name = "t"', 'name = "t3"\nresults = "results/experiments/t"\n'
                                                           'work = "runs/experiments/t"')
    (ran / "same.toml").write_text(same)
    r = here("experiment", "run", "same.toml", "--quiet", cwd=ran)
    assert r.returncode == 0 and "5 of 5 cells done, running 0" in r.stdout


def test_a_finished_checkpoint_carried_to_another_machine_is_sampled_not_requantized(ran, tiny32, tmp_path):
    """What scripts/gpu-experiment.sh ships back (q/<job>/) in another checkout (another absolute
    path for the resume points) is reused: the cell samples it without calibrating or quantizing."""
    import shutil

    (tmp_path / "spec.toml").write_text(SPEC.format(model=tiny32))
    job = "tfmq_w4a8_steps5"
    shutil.copytree(ran / "runs/experiments/t/q" / job, tmp_path / "runs/experiments/t/q" / job)
    r = gacq("experiment", "run", "spec.toml", "--cells", "tfmq_w4a32_steps5_seed0", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "runs/experiments/t").glob("calib_all_*"))  # no calibration set: no quantization
    got = json.loads((tmp_path / "results/experiments/t/cells/tfmq_w4a32_steps5_seed0.json").read_text())
    want = json.loads((ran / "results/experiments/t/cells/tfmq_w4a32_steps5_seed0.json").read_text())
    assert got["quantize"]["wall_seconds"] == want["quantize"]["wall_seconds"]
    assert got["metrics"]["fid"] == want["metrics"]["fid"]


def test_calibration_seeds_repeat_the_whole_quantization(extras, tiny32):
    """`calib_seeds` in a grid: the spec's own seed is its ordinary cell; another seed gets its own
    calibration trajectories and reconstruction seed, its own job (shared by its W4A32 cell) and id."""
    ran = extras
    text = SPEC.format(model=tiny32) + SEEDS_GRID
    (ran / "seeds.toml").write_text(text)
    s = load_spec(ran / "seeds.toml")
    by = {c.id: c for c in s.cells}
    assert "rtn_w4a8_cs0_steps5_seed0" not in by and by["rtn_w4a8_steps5_seed0"].cseed is None
    assert quant_job_of(s, by["rtn_w4a32_cs1_steps5_seed0"]) == ("rtn_w4a8_cs1_steps5", True, 8)
    assert "rtn_w4a8_cs1_steps5_seed0" in by  # run by `extras`
    work = ran / "runs/experiments/t"
    assert (work / "calib_all_ddim5_leading_traj2_seed1/calib.json").exists()
    cells = ran / "results/experiments/t/cells"
    got = json.loads((cells / "rtn_w4a8_cs1_steps5_seed0.json").read_text())
    assert got["cell"]["calib_seed"] == 1 and got["cell"]["recon_seed"] == 1 and got["cell"]["seed"] == 0
    cfg = got["quantize"]["config"]
    assert cfg["calib"]["seed"] == 1 and cfg["recon"]["seed"] == 1
    a = np.load(work / "samples/rtn_w4a8_cs1_steps5_seed0/samples.npz")["images"]
    b = np.load(work / "samples/rtn_w4a8_steps5_seed0/samples.npz")["images"]
    assert a.shape == b.shape and not np.array_equal(a, b)  # other calibration data, other activation ranges
    r = here("report", "results/experiments/t", "--out", "seeds.md", cwd=ran)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in (ran / "seeds.md").read_text().splitlines() if ln.startswith("| rtn | W4A8 |")]
    assert len(rows) == 1 and "| 0,0/cs1 |" in rows[0] and "(2 seeds)" in rows[0]
    (ran / "bad.toml").write_text(SPEC.format(model=tiny32) + "[[grid]]\nmethods = ['rtn']\ncalib_seeds = ['x']\n")
    with pytest.raises(GacqError, match="calib_seeds must be a list of integers"):
        load_spec(ran / "bad.toml")


def test_gaussian_draws_calibrate_ptq4dm_at_equal_data(extras, tiny32):
    """`gaussian_draws` in a grid: ptq4dm's trajectories recorded at d Gaussian-drawn steps each (cell and job
    `_gd<d>`), the count in the checkpoint's config, a row of its own in the report; refused for other methods."""
    ran = extras
    text = SPEC.format(model=tiny32) + DRAWS_GRID
    (ran / "draws.toml").write_text(text)
    s = load_spec(ran / "draws.toml")
    by = {c.id: c for c in s.cells}
    assert by["ptq4dm_w8a8_steps5_seed0"].draws == 1 and by["ptq4dm_w8a8_gd4_steps5_seed0"].draws == 4
    assert quant_job_of(s, by["ptq4dm_w8a8_gd4_steps5_seed0"])[0] == "ptq4dm_w8a8_gd4_steps5"  # run by `extras`
    got = json.loads((ran / "results/experiments/t/cells/ptq4dm_w8a8_gd4_steps5_seed0.json").read_text())
    assert got["cell"]["gaussian_draws"] == 4 and got["quantize"]["config"]["calib"]["draws"] == 4
    q = json.loads((ran / "runs/experiments/t/q/ptq4dm_w8a8_gd4_steps5/quant_config.json").read_text())
    assert q["calibration_samples"] == 2 * 4  # 2 trajectories x 4 draws (PTQ4DM's own selection: 2)
    r = here("report", "results/experiments/t", "--out", "draws.md", cwd=ran)
    assert r.returncode == 0, r.stderr
    assert "| ptq4dm (4 draws) | W8A8 |" in (ran / "draws.md").read_text()
    for grid, msg in [("methods = ['tfmq']\ngaussian_draws = 4\n", "Gaussian-drawn timesteps"),
                      ("methods = ['ptq4dm']\ngaussian_draws = 0\n", "positive integer")]:
        (ran / "bad.toml").write_text(SPEC.format(model=tiny32) + "[[grid]]\n" + grid)
        with pytest.raises(GacqError, match=msg):
            load_spec(ran / "bad.toml")


def test_bias_correction_cells_derive_from_the_plain_checkpoint(extras, tiny32, tmp_path, monkeypatch):
    """A `bias_correction` cell whose plain job has a checkpoint corrects that checkpoint instead of
    quantizing again; the result equals a from-scratch quantization with bias correction."""
    from safetensors.torch import load_file

    from gacq.experiment import _quant_config
    from gacq.models import load_model
    from gacq.quant.api import quantize_to_dir

    ran = extras
    monkeypatch.chdir(ran)  # the spec's work folder is relative to it
    text = SPEC.format(model=tiny32) + BC_GRID
    (ran / "bc.toml").write_text(text)
    s = load_spec(ran / "bc.toml")
    cell = next(c for c in s.cells if c.bc)
    assert cell.id == "tfmq_w4a8_bc_steps5_seed0" and quant_job_of(s, cell)[0] == "tfmq_w4a8_bc_steps5"  # `extras`
    work = ran / "runs/experiments/t"
    got = json.loads((ran / f"results/experiments/t/cells/{cell.id}.json").read_text())
    assert got["cell"]["bias_correction"] is True
    assert got["quantize"]["bias_corrected_from"]["checkpoint"] == "tfmq_w4a8_steps5"
    assert got["quantize"]["config"]["bias_correction"] is True
    # from scratch, through the API, into another folder: the same checkpoint
    scratch = tmp_path / "scratch"
    quantize_to_dir(load_model(str(tiny32)), _quant_config(s, cell, 8, "x"), scratch,
                    work / "calib_all_ddim5_leading_traj2_seed0", progress=False)
    derived = work / "q" / "tfmq_w4a8_bc_steps5"
    for f in ("quantized.safetensors", "float.safetensors", "fsc.safetensors"):
        a, b = load_file(str(derived / f)), load_file(str(scratch / f))
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (f, k)
    plain = load_file(str(work / "q" / "tfmq_w4a8_steps5" / "float.safetensors"))
    assert not torch.equal(plain["conv_out.bias"], load_file(str(derived / "float.safetensors"))["conv_out.bias"])
    r = here("report", "results/experiments/t", "--out", "bc.md", cwd=ran)
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("| tfmq+bc | W4A8 |") for ln in (ran / "bc.md").read_text().splitlines())
    (ran / "bad.toml").write_text(SPEC.format(model=tiny32) + "[[grid]]\nmethods = ['rtn']\nbits = ['W4A32']\n"
                                  "bias_correction = true\n")
    with pytest.raises(GacqError, match="need quantized activations"):
        load_spec(ran / "bad.toml")


def test_w8_layers_cells_derive_from_the_plain_checkpoint(extras, tiny32, monkeypatch):
    """A `w8_layers` cell is its plain job's checkpoint (quantized by `ran`) with the matched layers' weights at 8
    bits and nothing else changed; it groups behind the plain job's cells; the report gives it its own row."""
    from safetensors.torch import load_file

    from gacq.experiment import _groups

    ran = extras
    monkeypatch.chdir(ran)
    got = json.loads((ran / "results/experiments/t/cells/rtn_w4a8_w8sc_steps5_seed0.json").read_text())
    assert got["cell"]["w8_layers"] == {"sc": ["up_blocks.*.conv_shortcut"]}
    w8 = got["quantize"]["w8_from"]
    assert w8["checkpoint"] == "rtn_w4a8_steps5" and len(w8["layers"]) == 4
    work = ran / "runs/experiments/t/q"
    a, b = (load_file(str(work / j / "quantized.safetensors")) for j in ("rtn_w4a8_w8sc_steps5", "rtn_w4a8_steps5"))
    assert sorted(a) == sorted(b)
    changed = {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == set(w8["layers"])
    layers = json.loads((work / "rtn_w4a8_w8sc_steps5" / "quant_config.json").read_text())["layers"]
    assert sorted(n for n, e in layers.items() if e["wbits"] == 8) == w8["layers"]
    # the w8 grid before the plain one: its cell still runs after the plain job's
    (ran / "w8.toml").write_text(SPEC.format(model=tiny32).replace("[[grid]]", W8_GRID + "[[grid]]", 1))
    s = load_spec(ran / "w8.toml")
    groups = {g[0].id: [c.id for c in g] for g in _groups(s, s.cells)}
    assert groups["rtn_w4a8_steps5_seed0"] == ["rtn_w4a8_steps5_seed0", "rtn_w4a32_steps5_seed0",
                                               "rtn_w4a8_w8sc_steps5_seed0"]
    r = here("report", "results/experiments/t", "--out", "w8.md", cwd=ran)
    assert r.returncode == 0, r.stderr
    md = (ran / "w8.md").read_text()
    assert any(ln.startswith("| rtn+w8sc | W4A8 |") for ln in md.splitlines()), md
    assert "| rtn_w4a8_w8sc_steps5 | 8-bit weights for 4 layer(s) of rtn_w4a8_steps5" in md
    bad = {"w8_layers = {sc = ['*conv_shortcut']}\nbias_correction = true": "not with bias_correction",
           "w8_layers = {'s-c' = ['*conv_shortcut']}": "letters and digits",
           "w8_layers = {sc = []}": "non-empty list",
           "w8_layers = {sc = ['*conv1']}\n[[grid]]\nmethods = ['rtn']\nw8_layers = {sc = ['*conv2']}":
               "one name, one pattern list"}
    for text, msg in bad.items():
        (ran / "bad.toml").write_text(SPEC.format(model=tiny32) + "[[grid]]\nmethods = ['rtn']\n" + text + "\n")
        with pytest.raises(GacqError, match=msg):
            load_spec(ran / "bad.toml")


def test_parallel_runs_start_cells_in_the_order_given(tiny32, tmp_path):
    """`--parallel N --cells ...` hands its N process slots the cells in the order given once their checkpoints are
    made, instead of each quantization job's cells as a block (whose processes then raced for the slots: session 53
    wanted GAC and TFMQ-DM at seed 1 side by side, and `--parallel 2` over both seeds could start GAC's two first).
    A group whose checkpoint is still to be made stays whole (its first cell quantizes, the others wait for it)."""
    from gacq.experiment import _cells_named, _groups, _launch_units

    (tmp_path / "s.toml").write_text(SPEC.format(model=tiny32).replace(
        'methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]', 'methods = ["rtn", "tfmq"]\nbits = ["W4A8"]\n'
        'seeds = [0, 1]'))
    s = load_spec(tmp_path / "s.toml")
    order = ["rtn_w4a8_steps5_seed0", "tfmq_w4a8_steps5_seed0", "rtn_w4a8_steps5_seed1", "tfmq_w4a8_steps5_seed1"]
    todo = _cells_named(s, order)
    groups = _groups(s, todo)
    assert [[c.id for c in g] for g in groups] == [order[0::2], order[1::2]]  # one per quantization job

    def ids(ready):
        return [[c.id for c in u] for u in _launch_units(todo, groups, ready)]

    assert ids(lambda c: True) == [[i] for i in order]
    assert ids(lambda c: c.method == "rtn") == [[order[0]], order[1::2], [order[2]]]
    assert ids(lambda c: False) == [order[0::2], order[1::2]]


def test_checkpoints_of_an_older_gacq_keep_their_cells(ran, tiny32, monkeypatch):
    """A checkpoint whose config predates a QuantConfig field (here bias_correction) is read with the
    field's default, not refused as 'other settings' (which would stop a whole GPU run)."""
    from gacq.experiment import ensure_quantized

    monkeypatch.chdir(ran)  # the spec's work folder is relative to it
    (ran / "old.toml").write_text(SPEC.format(model=tiny32))
    s = load_spec(ran / "old.toml")
    cell = next(c for c in s.cells if c.id == "tfmq_w4a8_steps5_seed0")
    path = ran / "runs/experiments/t/q/tfmq_w4a8_steps5/quant_config.json"
    meta = json.loads(path.read_text())
    meta["config"].pop("bias_correction")
    path.write_text(json.dumps(meta))
    assert ensure_quantized(s, cell, "cpu", progress=False)[0] == path.parent
    meta["config"]["bias_correction"] = True  # a real difference is still refused
    path.write_text(json.dumps(meta))
    with pytest.raises(GacqError, match="other settings"):
        ensure_quantized(s, cell, "cpu", progress=False)
    meta["config"]["bias_correction"] = False
    path.write_text(json.dumps(meta))


def test_gac_cells_write_weight_profiles_that_the_report_plots(tiny32, tmp_path):
    """A gac cell's checkpoint gets its learned-weights profile in <results>/diagnostics (the runner writes it);
    `gacq experiment diagnostics` writes missing ones from the work folder; the report has a diagnostics section
    with its plot, in markdown and HTML."""
    spec = SPEC.format(model=tiny32).replace('methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]',
                                             'methods = ["gac"]\nbits = ["W4A32"]')
    spec = spec.replace("act_iters = 2\n", "act_iters = 2\ngac_meta_iters = 2\n")
    (tmp_path / "spec.toml").write_text(spec)
    r = gacq("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    prof_file = tmp_path / "results" / "experiments" / "t" / "diagnostics" / "gac_w4a32_steps5.json"
    prof = json.loads(prof_file.read_text())
    assert prof["step_source"] == "recorded in the checkpoint" and prof["qdir"] == "<work>/q/gac_w4a32_steps5"
    assert prof["blocks"] and all(len(b["mean_rel_per_step"]) == len(prof["steps"]) for b in prof["blocks"].values())
    prof_file.unlink()
    r = here("experiment", "diagnostics", "spec.toml", cwd=tmp_path)
    assert r.returncode == 0 and "1 new GAC weight profile(s)" in r.stdout, r.stdout + r.stderr
    assert json.loads(prof_file.read_text())["blocks"] == prof["blocks"]
    r = here("experiment", "diagnostics", "spec.toml", cwd=tmp_path)
    assert "0 new GAC weight profile(s)" in r.stdout  # written once
    # the job quantized again (another run's weights): the old profile is kept under superseded/, a new one written
    from safetensors.torch import load_file, save_file

    wfile = tmp_path / "runs/experiments/t/q/gac_w4a32_steps5/gac_weights.safetensors"
    tensors = load_file(wfile)
    first = next(k for k in tensors if tensors[k].is_floating_point())
    tensors[first] = tensors[first] * 2
    save_file(tensors, wfile)
    old = json.loads(prof_file.read_text())
    r = here("experiment", "diagnostics", "spec.toml", cwd=tmp_path)
    assert "1 new GAC weight profile(s)" in r.stdout, r.stdout + r.stderr
    new = json.loads(prof_file.read_text())
    assert new["gac_weights_sha256"] != old["gac_weights_sha256"]  # (one block scaled: its relative weights stay)
    kept = tmp_path / "results/experiments/t/diagnostics/superseded" / f"gac_w4a32_steps5-{old['gac_weights_sha256'][:12]}.json"
    assert json.loads(kept.read_text()) == old
    # a copy with 8-bit layers carries its base's GAC weights unchanged: no profile of its own
    from gacq.models import load_model
    from gacq.quant.api import w8_checkpoint

    work_q = tmp_path / "runs/experiments/t/q"
    w8_checkpoint(work_q / "gac_w4a32_steps5", work_q / "gac_w4a32_w8sc_steps5", load_model(str(tiny32)),
                  ("up_blocks.*.conv_shortcut",))
    assert (work_q / "gac_w4a32_w8sc_steps5" / "gac_weights.safetensors").exists()
    r = here("experiment", "diagnostics", "spec.toml", cwd=tmp_path)
    assert "0 new GAC weight profile(s)" in r.stdout, r.stdout + r.stderr
    assert not (prof_file.parent / "gac_w4a32_w8sc_steps5.json").exists()
    r = here("report", "results/experiments/t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "results" / "experiments" / "t" / "README.md").read_text()
    assert "## Diagnostics: GAC's learned sample weights" in md and "| gac_w4a32_steps5 | W4A32 |" in md
    assert (tmp_path / "results" / "experiments" / "t" / "README_gac_weights.png").stat().st_size > 1000
    assert 'src="README_gac_weights.png"' in (tmp_path / "results" / "experiments" / "t" / "README.html").read_text()


def test_a_class_conditional_dit_spec_with_guidance_runs_every_method(tmp_path):
    """experiments/dit-cifar10.toml's shape on a tiny random DiT: fp, tfmq and gac cells with classifier-free
    guidance run through the runner, and the cells record the guidance scale in their settings."""
    cfg = {"_class_name": "DiTTransformer2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
           "patch_size": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
           "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero", "dropout": 0.0}
    torch.manual_seed(0)
    model = save_model(build_model(cfg).eval(), tmp_path / "tinydit")
    spec = SPEC.format(model=model).replace("steps = 5\n", "steps = 5\nguidance_scale = 1.5\n")
    spec = spec.replace('methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]',
                        'methods = ["fp", "tfmq", "gac"]\nbits = ["W4A8"]')
    spec = spec.replace("recon_batch = 4\n", "recon_batch = 4\ngac_meta_iters = 2\n")
    (tmp_path / "spec.toml").write_text("matmul_tf32 = true\n" + spec)  # as the GPU spec (no effect on the CPU)
    r = gacq("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)  # one process (the parallel path: `ran`)
    assert r.returncode == 0, r.stdout + r.stderr
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results/experiments/t/cells").glob("*.json")}
    assert sorted(cells) == ["fp_steps5_seed0", "gac_w4a8_steps5_seed0", "tfmq_w4a8_steps5_seed0"]
    for c in cells.values():
        assert c["settings"]["sample"]["guidance_scale"] == 1.5 and c["metrics"]["samples"]["n"] == 10
        assert c["settings"]["matmul_tf32"] is True and c["sample"]["matmul_tf32"] is False  # CPU
    q = json.loads((tmp_path / "runs/experiments/t/q/gac_w4a8_steps5/quant_config.json").read_text())
    # calibrated on the guided sampler, both branches: 2 trajectories x 5 steps x (conditional, unconditional)
    assert q["config"]["method"] == "gac" and q["calibration_meta"]["sampler"]["guidance_scale"] == 1.5
    assert q["calibration_samples"] == 2 * 5 * 2


def test_smooth_is_an_optional_quantize_setting(tmp_path, tiny32):
    import gacq.experiment as ex

    p = tmp_path / "s.toml"
    p.write_text(SPEC.format(model=tiny32).replace('bits = ["W4A8", "W4A32"]', 'bits = ["W4A8"]'))
    plain = load_spec(p)
    p.write_text(p.read_text().replace("[quantize]\n", "[quantize]\nsmooth = 0.5\n"))
    on = load_spec(p)
    # absent from the settings (and digests) of specs without it; another setting when given
    assert "smooth" not in plain.quantize and on.quantize["smooth"] == 0.5
    assert ex.settings_digest(plain) != ex.settings_digest(on)
    cell = next(c for c in on.cells if c.method != "fp")
    assert ex._quant_config(on, cell, 8, "x").smooth == 0.5
    assert ex._quant_config(plain, cell, 8, "x").smooth is None
    p.write_text(p.read_text().replace("smooth = 0.5", "smooth = 2"))
    with pytest.raises(GacqError, match=r"smooth must be a number in \[0, 1\]"):
        load_spec(p)
    p.write_text(SPEC.format(model=tiny32).replace("[quantize]\n", "[quantize]\nsmooth = 0.5\n"))
    with pytest.raises(GacqError, match="needs quantized activations"):
        load_spec(p)


def test_act_granularity_grid_key(tmp_path, tiny32, extras):
    """`act_granularity` in a grid: token cells (and jobs) of their own, the setting reaching the quantization,
    W/A32 bits refused; the W4A32 cell keeps sampling the plain (per-tensor) W4A8 job."""
    import gacq.experiment as ex

    p = tmp_path / "g.toml"
    base = SPEC.format(model=tiny32)
    p.write_text(base + '[[grid]]\nmethods = ["rtn"]\nbits = ["W4A8"]\nact_granularity = ["tensor", "token"]\n')
    s = load_spec(p)
    by = {c.id: c for c in s.cells}
    tok = by["rtn_w4a8_tok_steps5_seed0"]
    assert tok.gran == "token" and by["rtn_w4a8_steps5_seed0"].gran == "tensor"
    assert quant_job_of(s, tok) == ("rtn_w4a8_tok_steps5", False, 8)
    assert ex._quant_config(s, tok, 8, "x").act_granularity == "token"
    assert ex._quant_config(s, by["rtn_w4a8_steps5_seed0"], 8, "x").act_granularity == "tensor"
    w4a32 = next(c for c in s.cells if c.method == "tfmq" and c.abits is None)
    assert quant_job_of(s, w4a32)[0] == "tfmq_w4a8_steps5"
    assert ex.settings_digest(s) == ex.settings_digest(load_spec_text(tmp_path, base))  # a grid key, not a setting
    p.write_text(base + '[[grid]]\nmethods = ["rtn"]\nbits = ["W4A32"]\nact_granularity = "token"\n')
    with pytest.raises(GacqError, match="W4A32 cells keep them float"):
        load_spec(p)
    p.write_text(base + '[[grid]]\nmethods = ["rtn"]\nact_granularity = "row"\n')
    with pytest.raises(GacqError, match="act_granularity must be 'tensor', 'token'"):
        load_spec(p)
    p.write_text(base + GRAN_GRID)
    assert "rtn_w8a8_tok_steps5_seed0" in {c.id for c in load_spec(p).cells}  # run by `extras`, into `ran`'s folders
    cell = json.loads((extras / "results/experiments/t/cells/rtn_w8a8_tok_steps5_seed0.json").read_text())
    assert cell["cell"]["act_granularity"] == "token"
    qc = json.loads((extras / "runs/experiments/t/q/rtn_w8a8_tok_steps5/quant_config.json").read_text())
    assert qc["config"]["act_granularity"] == "token" and qc["format_version"] == 4


def test_recipe_grid_key_overrides_the_methods_recipe(extras, tiny32):
    """`recipe` in a grid: cells and jobs `_r<name>` whose quantization takes the overrides (tfmq with learned
    activation step sizes and split shortcuts: split layers, no per-step sets), a W/A32 cell sampling that job, a
    report row `<method>+<name>`; bad tables refused when the spec loads."""
    import gacq.experiment as ex
    from gacq.models import load_model
    from gacq.quant.wrap import quant_layers

    ran = extras
    (ran / "recipe.toml").write_text(SPEC.format(model=tiny32) + RECIPE_GRID)
    s = load_spec(ran / "recipe.toml")
    by = {c.id: c for c in s.cells}
    cell = by["tfmq_w4a8_rlsq_steps5_seed0"]
    assert cell.recipe == ("lsq", (("act_mode", "lsq"), ("split_shortcuts", True)))
    assert quant_job_of(s, by["tfmq_w4a32_rlsq_steps5_seed0"]) == ("tfmq_w4a8_rlsq_steps5", True, 8)
    assert quant_job_of(s, by["tfmq_w4a32_steps5_seed0"])[0] == "tfmq_w4a8_steps5"  # the plain job stays plain
    cfg = ex._quant_config(s, cell, 8, "x")
    assert (cfg.spec().act_mode, cfg.spec().split_shortcuts, cfg.spec().tib) == ("lsq", True, True)
    got = json.loads((ran / "results/experiments/t/cells/tfmq_w4a8_rlsq_steps5_seed0.json").read_text())
    assert got["cell"]["recipe"] == {"lsq": {"act_mode": "lsq", "split_shortcuts": True}}
    assert got["quantize"]["config"]["recipe"]["act_mode"] == "lsq"
    q = load_model(ran / "runs/experiments/t/q/tfmq_w4a8_rlsq_steps5")
    plain = load_model(ran / "runs/experiments/t/q/tfmq_w4a8_steps5")
    assert any(m.split for _, m in quant_layers(q.model)) and not any(m.split for _, m in quant_layers(plain.model))
    assert q.step_hook is None and plain.step_hook is not None  # no per-step activation sets with lsq
    r = here("report", "results/experiments/t", "--out", "recipe.md", cwd=ran)
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("| tfmq+lsq | W4A8 |") for ln in (ran / "recipe.md").read_text().splitlines())
    bad = {"methods = ['qdiffusion']\nrecipe = {f = {act_mode = 'fsc'}}": "needs calibration samples at every",
           "methods = ['tfmq']\nrecipe = {s = {split_shortcuts = true}}": "does not support split layers",
           "methods = ['tfmq']\nrecipe = {s = {split = true}}": "keys among",
           "methods = ['tfmq']\nrecipe = {s = {split_shortcuts = 'yes'}}": "must be a bool",
           "methods = ['fp', 'tfmq']\nrecipe = {l = {act_mode = 'lsq'}}": "not with method fp",
           "methods = ['tfmq']\nrecipe = {'l-1' = {act_mode = 'lsq'}}": "letters and digits",
           "methods = ['tfmq']\nrecipe = {f = {fmt = 'fp8'}}": "--format fp8",
           "methods = ['tfmq']\nrecipe = {l = {act_mode = 'lsq'}}\n[[grid]]\nmethods = ['gac']\n"
           "recipe = {l = {act_mode = 'minmax'}}": "one name, one set of overrides"}
    for text, msg in bad.items():
        (ran / "bad.toml").write_text(SPEC.format(model=tiny32) + "[[grid]]\n" + text + "\n")
        with pytest.raises(GacqError, match=msg):
            load_spec(ran / "bad.toml")


def load_spec_text(tmp_path, text):
    q = tmp_path / "plain.toml"
    q.write_text(text)
    return load_spec(q)


@pytest.mark.parametrize("spec", sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.toml")))
def test_every_shipped_spec_loads(spec, tmp_path):
    """The specs in experiments/ are what the GPU sessions run: each parses and validates, and expands to cells."""
    from gacq.experiment import load_spec

    loaded = load_spec(Path(__file__).parents[1] / "experiments" / spec, results=tmp_path)
    assert loaded.cells


def test_cells_and_parts_keep_their_quantization_run(tiny32, tmp_path):
    """Which quantization run a cell or part was sampled from is kept (`checkpoint_digest`): a part drawn from another
    run of the job is refused, and a job whose checkpoint is gone is not quantized again under its name while cells or
    parts sampled from the lost run remain (a new run would differ, and the table would pool the two)."""
    from gacq.experiment import checkpoint_digest

    spec = SPEC.replace("num = 10\nbatch_size = 10", "num = 24\nbatch_size = 8\npart_size = 10").replace(
        'methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]', 'methods = ["rtn"]\nbits = ["W4A32"]').replace(
        "steps = 5", "steps = 3")
    (tmp_path / "spec.toml").write_text(spec.format(model=tiny32))
    r = gacq("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cell_file = tmp_path / "results/experiments/t/cells/rtn_w4a32_steps3_seed0.json"
    qdir, parts = tmp_path / "runs/experiments/t/q/rtn_w4a32_steps3", tmp_path / "runs/experiments/t/parts"
    digest = checkpoint_digest(qdir)
    assert re.fullmatch("[0-9a-f]{16}", digest) and json.loads(cell_file.read_text())["quantize"]["checkpoint_digest"] \
        == digest
    metas = sorted((parts / "rtn_w4a32_steps3_seed0").glob("meta_*.json"))
    assert len(metas) == 3 and {json.loads(m.read_text())["checkpoint_digest"] for m in metas} == {digest}
    # a part of another run of the same job (same folder name, other weights) is not merged
    cell = cell_file.read_text()
    cell_file.unlink()
    saved = metas[1].read_text()
    metas[1].write_text(json.dumps({**json.loads(saved), "checkpoint_digest": "0123456789abcdef"}))
    r = here("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    assert r.returncode != 0 and "stats_0001.npz is not part 1 of this cell's run: it was drawn from another " \
        f"quantization run of <work>/q/rtn_w4a32_steps3 (checkpoint digest 0123456789abcdef, now {digest})" \
        in r.stdout + r.stderr, r.stdout + r.stderr
    assert not cell_file.exists()
    metas[1].write_text(saved)
    # the checkpoint lost: its parts, then its finished cell, stop a second quantization run under the same name
    import shutil

    shutil.rmtree(qdir)
    r = here("experiment", "run", "spec.toml", "--quiet", cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and f"rtn_w4a32_steps3: its checkpoint is not in {qdir}, but these were sampled from " \
        "an earlier quantization run of it: parts 1-3 of rtn_w4a32_steps3_seed0." in out, out
    assert "give a new run a spec of its own" in out and not qdir.exists()
    cell_file.write_text(cell)
    shutil.rmtree(parts)
    (tmp_path / "two.toml").write_text(spec.format(model=tiny32).replace("bits = [\"W4A32\"]",
                                                                         "bits = [\"W4A32\"]\nseeds = [0, 1]"))
    r = here("experiment", "run", "two.toml", "--quiet", cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "run of it: cell rtn_w4a32_steps3_seed0. Quantizing again" in out, out
    assert not qdir.exists() and not (tmp_path / "results/experiments/t/cells/rtn_w4a32_steps3_seed1.json").exists()


def test_with_parts_every_cell_of_a_quantization_group_samples_its_parts(tiny32, tmp_path):
    """--parts and a quantization group (seeds 0 and 1 of one checkpoint): run 1 quantizes in the first cell's
    process, which samples part 1 and stops (exit 3), and then the second cell samples its part 1 (before, the
    first cell's exit 3 held it back); run 2 finds the checkpoint made and runs both cells at once, each sampling
    part 2 and merging its two parts."""
    text = SPEC.replace("num = 10\nbatch_size = 10", "num = 20\nbatch_size = 10\npart_size = 10").replace(
        'methods = ["fp", "rtn", "tfmq"]\nbits = ["W4A8", "W4A32"]', 'methods = ["rtn"]\nbits = ["W4A8"]\nseeds = [0, 1]')
    (tmp_path / "spec.toml").write_text(text.replace("steps = 5", "steps = 3").format(model=tiny32))
    work = tmp_path / "runs/experiments/t"
    r = gacq("experiment", "run", "spec.toml", "--quiet", "--parallel", 2, "--parts", "1", cwd=tmp_path)
    assert r.returncode == 3 and r.stdout.count("stopped early by --deadline or --parts") == 2, r.stdout + r.stderr
    for seed in (0, 1):
        assert [p.name for p in (work / f"parts/rtn_w4a8_steps3_seed{seed}").glob("stats_*")] == ["stats_0000.npz"]
    # the parts name the checkpoint relative to the work folder (machines' checkouts may lie elsewhere)
    meta = json.loads((work / "parts/rtn_w4a8_steps3_seed0/meta_0000.json").read_text())
    assert meta["model"] == "<work>/q/rtn_w4a8_steps3", meta["model"]
    r = here("experiment", "run", "spec.toml", "--quiet", "--parallel", 2, "--parts", "2", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count(": done") == 2, r.stdout + r.stderr
    for seed in (0, 1):
        cell = json.loads((tmp_path / f"results/experiments/t/cells/rtn_w4a8_steps3_seed{seed}.json").read_text())
        assert cell["metrics"]["samples"]["n"] == 20 and cell["sample"]["images_made_this_run"] == 10


def test_parse_parts():
    from gacq.experiment import _ranges, parse_parts

    assert parse_parts("8-10") == {8, 9, 10} and parse_parts(" 1, 3,5-6 ") == {1, 3, 5, 6}
    assert parse_parts("none") == frozenset() and parse_parts("4-4") == {4}
    for bad in ("0", "3-2", "a", "1,,2", "-1", ""):
        with pytest.raises(GacqError, match="expected 1-based part numbers"):
            parse_parts(bad)
    assert _ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8" and _ranges([4]) == "4"
    from gacq.experiment import parse_cell_parts

    assert parse_cell_parts("8-10") == {8, 9, 10}  # one set for every cell
    assert parse_cell_parts("a=1-2; b=none;c=4,6 ;") == {"a": {1, 2}, "b": frozenset(), "c": {4, 6}}
    for bad, msg in (("a=1;a=2", "cell a is named twice"), ("=3", "is not CELL=PARTS"), ("a=1; 2", "is not CELL"),
                     ("a=0", "expected 1-based part numbers")):
        with pytest.raises(GacqError, match=msg):
            parse_cell_parts(bad)


def test_part_fits_the_deadline():
    from gacq.experiment import part_fits

    assert part_fits(None, 100.0, 1e9)  # no deadline
    assert part_fits(200.0, 100.0, None) and not part_fits(200.0, 200.0, None)  # time left, no estimate
    assert part_fits(200.0, 100.0, 100.0) and not part_fits(200.0, 100.0, 100.5)


def test_a_report_over_several_experiments_names_each_rows_experiment(tmp_path):
    """`gacq report results/` over two experiments' folders: every table that mixes them gets an experiment column
    (the same job name in two experiments stays two rows of the cost table), each FID table shows only its own
    experiment's methods, the plot has a panel per experiment, and the GAC diagnostics of both folders are read.
    A report of one experiment keeps its tables without that column."""
    for exp, fids in (("a", {"gac": [48.0, 49.0], "tfmq": [48.5, 48.0]}), ("b", {"gac": [60.0], "rtn": [250.0]})):
        d = tmp_path / "experiments" / exp
        (d / "cells").mkdir(parents=True)
        for m, vals in fids.items():
            for s, f in enumerate(vals):
                _cell(d / "cells", m, "W4A8", s, f)
                p = d / "cells" / f"{m}W4A8{s}cifar10None.json"
                c = json.loads(p.read_text())
                c["experiment"] = exp
                c["quantize"] = {"job": f"{m}_w4a8", "float_acts": False, "commit": exp * 7, "wall_seconds": 100.0}
                c["grid"] = f"grids/{m}{s}.jpg"
                p.write_text(json.dumps(c))
                if m == "gac":  # the other cells' grids were not kept: the page shows no broken image for them
                    (d / "grids").mkdir(exist_ok=True)
                    (d / "grids" / f"{m}{s}.jpg").write_bytes(b"jpg")
        (d / "diagnostics").mkdir()
        (d / "diagnostics" / "gac_w4a8.json").write_text(json.dumps({
            "job": "gac_w4a8", "wbits": 4, "abits": 8, "steps": [0, 1], "mean_over_blocks": [0.9, 1.1],
            "min_over_blocks": [0.8, 1.0], "max_over_blocks": [1.0, 1.2], "step_source": "recorded",
            "blocks": {"b0": {"ess_over_n": 0.99}}}))
    info = render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert info["cells"] == 6 and Path(info["diagnostics"]).stat().st_size > 1000
    table_a = md.split("### FID, 100 sampling steps (a:")[1].split("###")[0]
    table_b = md.split("### FID, 100 sampling steps (b:")[1].split("###")[0]
    assert "| tfmq |" in table_a and "| rtn |" not in table_a and "| rtn | 250.00 |" in table_b
    assert "| tfmq |" not in table_b
    assert "| experiment | method | bits | steps | seeds | samples | FID |" in md
    assert "| b | rtn | W4A8 | 100 | 0 | 10000 | 250.00 |" in md
    assert "| a | W4A8 | 100 | 10000 | 0,1 | -0.50, +1.00 |" in md  # paired gac − tfmq, experiment a only
    assert "| a | gac_w4a8 | quantization | 100 |" in md and "| b | gac_w4a8 | quantization | 100 |" in md
    assert "| experiments/a | gac_w4a8 | W4A8 |" in md and "| experiments/b | gac_w4a8 | W4A8 |" in md
    page = (tmp_path / "r.html").read_text()
    assert page.count("<figure") == 3 and 'src="experiments/a/grids/gac1.jpg"' in page and "tfmq0.jpg" not in page
    from gacq.report import build

    assert {r[0][1:] for r in build(tmp_path, tmp_path / "r.md")["plot_rows"]} == {("a", 100), ("b", 100)}
    # one experiment's own report: no experiment or folder column
    render(tmp_path / "experiments/a", tmp_path / "a.md")
    one = (tmp_path / "a.md").read_text()
    assert "| experiment |" not in one and "| folder |" not in one
    assert "| gac_w4a8 | quantization | 100 |" in one and "| gac_w4a8 | W4A8 |" in one


def test_a_report_never_pools_cells_of_different_models(tmp_path):
    """Three FP cells of one spec's settings, each seed 0, sampled from three trainings of the model (sessions
    12-14 of the DiT did this): three entries, not one of "3 seeds". Cells without a model digest (older than the
    field) pool with the one model the others name, and stand apart where the others name several."""
    def cell(name, digest, fid, seed=0):
        _cell(tmp_path, "fp", "FP", seed, fid)
        p = tmp_path / f"fpFP{seed}cifar10None.json"
        d = json.loads(p.read_text())
        d["model_digest"] = digest
        p.rename(tmp_path / f"{name}.json")
        (tmp_path / f"{name}.json").write_text(json.dumps(d))

    cell("a", None, 70.0)
    cell("b", "5035896fd8d0e6bdff", 69.0)
    cell("c", "5267c65289420603aa", 71.0)
    render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "(3 seeds)" not in md and "(2 seeds)" not in md, md
    for model in ("model not recorded", "model 5035896fd8d0", "model 5267c6528942"):
        assert f"(e: settings e, {model}; 10000 samples per seed)" in md, md
    assert "| e (settings e, model 5035896fd8d0) | fp | FP | 100 | 0 | 10000 | 69.00 |" in md
    # one model named, and a cell older than the field: that model's seeds, pooled as before
    (tmp_path / "a.json").unlink()
    (tmp_path / "c.json").unlink()
    cell("d", None, 71.0, seed=1)
    render(tmp_path, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "| fp | 70.00 ± 1.41 (2 seeds) |" in md and "model" not in md.split("### Every cell")[0], md
