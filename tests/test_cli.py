"""The `gacq` command run as a real subprocess, end to end on a tiny model (quick commands and refusals through the same
entry point in this process: `gacq_here`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import gacq_here


def _checked(proc, args, check):
    if check and proc.returncode != 0:
        raise AssertionError(f"gacq {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def gacq(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    return _checked(proc, args, check)


def here(*args, check=True, cwd=None):
    """`gacq ARGS` through the same entry point in this process (no new interpreter importing torch and diffusers)."""
    return _checked(gacq_here(*args, cwd=cwd), args, check)


@pytest.mark.parametrize("sub", [None, "train", "sample", "calib", "quantize", "info", "configs"])
def test_help(sub):
    # the bare command in a new interpreter (`python -m gacq`), each subcommand's help through its entry point here
    proc = gacq("--help") if sub is None else here(sub, "--help")
    assert "Usage" in proc.stdout


def test_methods_lists_every_method_and_preset():
    """`gacq methods`: one line per registered method, then each preset's recipe as the registry holds it."""
    from gacq.quant.methods import METHODS, method_spec

    out = here("methods").stdout.splitlines()
    heads = [line.split(":")[0] for line in out if not line.startswith(" ")]
    assert heads == list(METHODS) and {"rtn", "ptq4dm", "qdiffusion", "tfmq", "gac"} <= set(heads)
    gac = out[out.index(next(line for line in out if line.startswith("gac:"))):]
    assert gac[1].startswith("  common: calib=all ") and "tib=True acts=fsc" in gac[1]
    faithful = next(line for line in gac if line.startswith("  faithful:"))
    assert "'tfmq-rule'" in faithful  # the released code's float layers, by rule
    deviations = [line for line in out if line.startswith("    deviation: ")]
    assert len(deviations) == sum(len(method_spec(m, p).deviations) for m in METHODS for p in ("common", "faithful"))


def test_train_sample_info_end_to_end(image_folder, tmp_path):
    run = tmp_path / "run"
    gacq("train", "--data", image_folder, "--config", "tiny", "--out", run, "--max-steps", 12, "--batch-size", 4,
         "--log-every", 4, "--ckpt-every", 6, "--grid-num", 4, "--grid-steps", 2, "--device", "cpu")
    gacq("train", "--data", image_folder, "--config", "tiny", "--out", run, "--max-steps", 16, "--batch-size", 4,
         "--log-every", 4, "--ckpt-every", 6, "--grid-num", 4, "--grid-steps", 2, "--device", "cpu", "--resume")
    assert json.loads((run / "ckpt" / "state.json").read_text())["step"] == 16
    out = tmp_path / "samples"
    # the trained model sampled through the CLI's entry point in this process (models load in new interpreters in
    # the tests below)
    proc = here("sample", "--model", run / "model", "--num", 5, "--batch-size", 2, "--steps", 3, "--out", out,
                "--device", "cpu")
    assert "wrote 5 images" in proc.stdout
    assert np.load(out / "samples.npz")["images"].shape == (5, 16, 16, 3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scheduler"] == "ddim" and meta["steps"] == 3 and meta["model"] == str(run / "model")
    info = json.loads(here("info", "--model", run / "model").stdout)
    assert info["class"] == "UNet2DModel" and info["sample_shape"] == [3, 16, 16]


@pytest.mark.parametrize("args,msg", [
    (["sample", "--model", "/nonexistent/model", "--out", "x"], "does not exist"),
    (["info", "--model", "weights.ckpt"], "never unpickles"),
    (["sample", "--scheduler", "euler", "--out", "x"], "unknown scheduler"),
    (["train", "--data", "/nonexistent", "--out", "r", "--max-steps", "1", "--config", "tiny"], "does not exist"),
    (["train", "--data", ".", "--out", "r", "--config", "tiny"], "--max-steps or --time-budget"),
    # np.load would read these as pickles and suggest allow_pickle; gacq says what the file is not
    (["eval", "--samples", "notes.npz"], "notes.npz: not an .npz archive"),
    (["eval", "--samples", "gray.npz"], "grayscale images need a channel axis of 1"),
    # the file system's refusals name the path instead of a traceback
    (["sample", "--num", "1", "--steps", "1", "--out", "weights.ckpt/x"], "Not a directory: weights.ckpt/x"),
    (["info", "--model", "classifier"], "has no _class_name: not a diffusers model config"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, msg):
    # through the entry point in this process (an uncaught exception would be exit status 1 with its traceback on
    # stderr, as in a new interpreter); test_hub_id_uses_real_hub_code_offline checks a refusal in a real subprocess
    (tmp_path / "weights.ckpt").write_bytes(b"not really a pickle")
    (tmp_path / "notes.npz").write_text("a text file named like an array archive")
    np.savez(tmp_path / "gray.npz", images=np.zeros((12, 32, 32), np.uint8))
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "config.json").write_text('{"widths": [64, 128]}')  # a folder of another kind
    proc = gacq_here(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert msg in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "samples.npz").exists()


def test_hub_id_uses_real_hub_code_offline(tmp_path):
    proc = gacq("info", "--model", "nobody-here/no-such-model", check=False,
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "could not fetch 'nobody-here/no-such-model'" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_id_resolves_from_the_hub_cache(tmp_path, tiny_model_dir):
    """A hub id goes through huggingface_hub's real snapshot lookup (offline, cache filled by hand)."""
    import shutil

    rev = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-ddpm"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    proc = gacq("info", "--model", "someone/tiny-ddpm", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    info = json.loads(proc.stdout)
    assert info["source"] == "hub:someone/tiny-ddpm" and info["sample_shape"] == [3, 16, 16]


def test_calib_command(tiny_model_dir, tmp_path):
    out = tmp_path / "calib"
    proc = gacq("calib", "--model", tiny_model_dir, "--trajectories", 3, "--record-steps", 2, "--steps", 4,
                "--out", out, "--device", "cpu")
    assert "wrote 6 calibration samples over 2 timesteps" in proc.stdout
    from gacq.quant.calib_data import CalibrationSet

    cs = CalibrationSet.load(out)
    assert cs.x.shape == (6, 3, 16, 16) and cs.meta["selection"]["n_trajectories"] == 3


def test_quantize_then_sample(tiny_model_dir, tmp_path):
    q = tmp_path / "q"
    # quantized through the CLI's entry point in this process; the checkpoint is sampled by new interpreters below
    proc = here("quantize", "--model", tiny_model_dir, "--method", "rtn", "--wbits", 4, "--abits", 8,
                "--calib-trajectories", 4, "--record-steps", 5, "--steps", 5, "--out", q, "--device", "cpu")
    assert "wrote W4A8 rtn (common) checkpoint" in proc.stdout
    info = json.loads(here("info", "--model", q).stdout)
    assert info["class"] == "UNet2DModel" and info["sample_shape"] == [3, 16, 16]
    gacq("sample", "--model", q, "--num", 3, "--steps", 4, "--out", tmp_path / "s", "--device", "cpu",
         "--no-fused-fake-quant")
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (3, 16, 16, 3)
    # --fused-fake-quant (the default) is recorded; on the CPU (no kernel) the torch ops run: the same images
    gacq("sample", "--model", q, "--num", 3, "--steps", 4, "--out", tmp_path / "f", "--device", "cpu")
    assert json.loads((tmp_path / "f" / "meta.json").read_text())["fused_fake_quant"] is True
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["fused_fake_quant"] is False
    assert np.array_equal(np.load(tmp_path / "f" / "samples.npz")["images"],
                          np.load(tmp_path / "s" / "samples.npz")["images"])
    # --compile reaches the sampler: an eager folder is not resumed compiled (test_sampling compiles for real)
    bad = here("sample", "--model", q, "--num", 3, "--steps", 4, "--out", tmp_path / "s", "--device", "cpu",
               "--compile", check=False)
    assert bad.returncode == 2 and "(compile differ)" in bad.stderr, bad.stderr
    bad = here("quantize", "--model", tiny_model_dir, "--method", "foo", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "unknown method 'foo'" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_quantize_brecq(tiny_model_dir, tmp_path):
    calib = tmp_path / "c"
    # the calibration set through the CLI's entry point in this process (test_calib_command runs `calib` in its own
    # interpreter), the quantization in a new interpreter
    here("calib", "--model", tiny_model_dir, "--trajectories", 4, "--record-steps", 3, "--steps", 6, "--out", calib,
         "--device", "cpu")
    q = tmp_path / "q"
    proc = gacq("quantize", "--model", tiny_model_dir, "--method", "brecq", "--wbits", 4, "--abits", 8,
                "--calib", calib, "--iters", 4, "--recon-batch", 4, "--out", q, "--device", "cpu")
    assert "wrote W4A8 brecq (common) checkpoint" in proc.stdout
    assert not (tmp_path / "q.recon-ckpt").exists()
    meta = json.loads((q / "quant_config.json").read_text())
    assert meta["config"]["method"] == "brecq" and meta["config"]["recon"]["iters"] == 4


def test_quantize_tfmq_then_sample_needs_its_sampler(tiny_model_dir, tmp_path):
    """TFMQ-DM end to end through the CLI: all-steps calibration, per-step activation sets in the
    checkpoint, sampling with the calibration sampler, and a clear refusal of another step count."""
    q = tmp_path / "q"
    # quantized through the CLI's entry point in this process; the checkpoint is sampled by a new interpreter
    proc = here("quantize", "--model", tiny_model_dir, "--method", "tfmq", "--wbits", 4, "--abits", 8,
                "--calib-trajectories", 4, "--record-steps", 2, "--steps", 4, "--iters", 3, "--recon-batch", 4,
                "--out", q, "--device", "cpu")
    assert "wrote W4A8 tfmq (common) checkpoint" in proc.stdout and (q / "fsc.safetensors").exists()
    gacq("sample", "--model", q, "--num", 2, "--steps", 4, "--out", tmp_path / "s", "--device", "cpu")
    bad = here("sample", "--model", q, "--num", 2, "--steps", 5, "--out", tmp_path / "s2", "--device", "cpu",
               check=False)
    assert bad.returncode == 2 and "same settings" in bad.stderr and not (tmp_path / "s2").exists()


def test_quantize_gac_with_compare(tiny_model_dir, tmp_path):
    """The README's main job in miniature: gac (faithful preset) at W4A8, then FP vs quantized from the same noise."""
    q = tmp_path / "q"
    proc = gacq("quantize", "--model", tiny_model_dir, "--method", "gac", "--preset", "faithful", "--wbits", 4,
                "--abits", 8, "--quick", "--calib-trajectories", 6, "--record-steps", 3, "--steps", 6, "--iters", 2,
                "--gac-meta-iters", 2, "--gac-val-fraction", 0.1, "--gac-groups", 3, "--compare", 3, "--out", q,
                "--device", "cpu", "--save-calib", tmp_path / "calib")
    assert "gac (faithful, quick) checkpoint" in proc.stdout and "mean PSNR" in proc.stdout
    assert (q / "gac_weights.safetensors").exists()
    assert json.loads((tmp_path / "calib" / "calib.json").read_text())["count"] == 6 * 6  # all steps kept
    rep = json.loads((q / "compare" / "report.json").read_text())
    assert rep["num"] == 3 and rep["psnr_db_mean"] > 0 and (q / "compare" / "side_by_side.png").exists()
    # `gacq compare` through its entry point in this process (a gac checkpoint is loaded by a new interpreter in
    # test_conditional)
    proc = here("compare", "--model", q, "--fp-model", tiny_model_dir, "--num", 2, "--steps", 6,
                "--out", tmp_path / "c", "--device", "cpu")
    assert "mean PSNR" in proc.stdout and (tmp_path / "c" / "report.md").exists()


def test_subprocesses_run_without_the_test_extras():
    """tests/conftest.py starts every interpreter as after the README's base install: the `test` extra's transformers
    and scipy are hidden (tests/base_install/sitecustomize.py), so `gacq` works without them and starts faster."""
    code = ("import importlib.util, sys; import gacq.cli; from diffusers import UNet2DModel; "
            "print([importlib.util.find_spec(m) is None for m in ('transformers', 'scipy')], "
            "sys.modules.get('scipy') is not None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["[True,", "True]", "False"], r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "GACQ_TEST_HIDE": ""})
    assert r.stdout.split()[:2] == ["[False,", "False]"], r.stdout + r.stderr
