"""A latent model trained here: `gacq train-autoencoder` (AutoencoderKL), then `gacq train --vae` (a denoiser on its
latents), on tiny configs and real image files, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gacq.errors import GacqError
from gacq.models import load_model
from gacq.sampling import SampleConfig, generate
from gacq.train_ae import AETrainConfig, latent_scale, reconstruction_psnr, train_autoencoder
from tests.conftest import write_images


def gacq(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("latent") / "imgs", per_class=16, size=16)


@pytest.fixture(scope="module")
def ae_run(images) -> Path:
    out = images.parent / "ae"
    r = gacq("train-autoencoder", "--data", images, "--out", out, "--config", "ae-tiny", "--max-steps", 4,
             "--ckpt-every", 2, "--log-every", 2, "--batch-size", 8, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out


def test_train_autoencoder_cli(ae_run, images):
    summary = json.loads((ae_run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["latent_shape"] == [4, 8, 8]
    assert len((ae_run / "log.jsonl").read_text().splitlines()) == 2
    assert (ae_run / "recon.png").exists()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ae_run / "model", use_safetensors=True).eval()
    # the saved scaling factor is 1 / std of the latents, measured again here in float64 on posterior means
    # (the run measured posterior samples of 32 images: the posterior noise is small next to the means' spread)
    from gacq.data import load_images

    data = torch.from_numpy(load_images(images, size=16).images).permute(0, 3, 1, 2)
    with torch.no_grad():
        post = vae.encode(data.float() / 127.5 - 1).latent_dist
    ref = 1 / torch.sqrt(post.mean.double().var() + post.var.double().mean()).item()
    assert vae.config.scaling_factor == pytest.approx(ref, rel=0.05)
    assert vae.config.scaling_factor == pytest.approx(latent_scale(vae, data), rel=1e-6)
    assert summary["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    # the PSNR in the summary is the model's: recomputed image by image (batched kernels round differently)
    with torch.no_grad():
        psnr = []
        for img in data[-1000:]:
            x = img[None].float() / 127.5 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            psnr.append(-10 * np.log10(((rec - x) / 2).pow(2).mean().item()))
    assert summary["test_psnr_db"] == pytest.approx(np.mean(psnr), abs=0.02)
    assert "seen in training" in summary["test_images"]


def test_autoencoder_resume_is_exact(images, tmp_path):
    cfg = dict(data=str(images), config="ae-tiny", batch_size=4, ckpt_every=100, log_every=100)
    train_autoencoder(AETrainConfig(**cfg, max_steps=4), tmp_path / "one", device="cpu", progress=False)
    train_autoencoder(AETrainConfig(**cfg, max_steps=2), tmp_path / "two", device="cpu", progress=False)
    s = train_autoencoder(AETrainConfig(**cfg, max_steps=4), tmp_path / "two", resume=True, device="cpu",
                          progress=False)
    assert s["steps_this_call"] == 2
    a = load_file(tmp_path / "one" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "two" / "ckpt" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GacqError, match="kl_weight"):
        train_autoencoder(AETrainConfig(**cfg, max_steps=6, kl_weight=1e-3), tmp_path / "two", resume=True,
                          device="cpu", progress=False)
    with pytest.raises(GacqError, match="already holds"):
        train_autoencoder(AETrainConfig(**cfg, max_steps=6), tmp_path / "two", device="cpu", progress=False)
    with pytest.raises(GacqError, match="ae-f4"):
        AETrainConfig(data=str(images), config="ae-huge", max_steps=1)


def test_reconstruction_psnr_of_identity_like_decoder():
    """PSNR against a reference on known errors: a 'decoder' off by a constant 0.1 (in [-1, 1]) gives 26.02 dB."""

    class Shift(torch.nn.Module):
        def encode(self, x):
            return type("E", (), {"latent_dist": type("D", (), {"mean": x})()})()

        def decode(self, z):
            return type("S", (), {"sample": z + 0.1})()

    imgs = torch.full((3, 3, 4, 4), 100, dtype=torch.uint8)
    assert reconstruction_psnr(Shift(), imgs) == pytest.approx(-10 * np.log10(0.05 ** 2), abs=1e-4)


def test_train_on_latents_cli(ae_run, images, tmp_path):
    out = tmp_path / "ldm"
    r = gacq("train", "--data", images, "--out", out, "--config", "tiny", "--vae", ae_run / "model",
             "--max-steps", 3, "--ckpt-every", 3, "--batch-size", 4, "--grid-num", 2, "--grid-steps", 2,
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = load_model(out / "model")
    assert loaded.vae is not None and type(loaded.vae).__name__ == "AutoencoderKL"
    cfg = loaded.model.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels) == (8, 4, 4)  # the latents', not tiny's 16x16x3
    assert loaded.scheduler_config["clip_sample"] is False  # unit-variance latents must not be clipped to [-1, 1]
    assert list((out / "grids").glob("step_*.png"))
    # the saved autoencoder is the one trained, unchanged
    a = load_file(ae_run / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "model" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    imgs = generate(loaded, SampleConfig(steps=2, num=2, batch_size=2, seed=0), range(2), "cpu")
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8


def test_train_on_latents_errors(images, tmp_path):
    r = gacq("train", "--data", images, "--out", tmp_path / "x", "--config", "tiny", "--vae", tmp_path,
             "--max-steps", 1, "--device", "cpu")
    assert r.returncode == 2 and "not an autoencoder folder" in r.stderr
