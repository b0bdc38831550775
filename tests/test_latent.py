"""Latent diffusion: diffusers pipeline folders with an autoencoder (LDMPipeline's VQModel, DiTPipeline's
AutoencoderKL), tiny random configs saved to disk; only the denoiser is quantized."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gacq.errors import GacqError
from gacq.models import load_model
from gacq.sampling import SampleConfig, generate, to_uint8


def gacq(*args):
    return subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True)


AE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
          down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
          up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16)


def _ldm(root: Path) -> Path:
    """diffusers' unconditional LDM layout: vqvae/ (VQModel), unet/ (latent UNet2DModel), scheduler/."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(**AE, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(root, safe_serialization=True)
    return root


def _dit(root: Path) -> Path:
    """diffusers' DiT layout: transformer/ (class-conditional latent DiT), vae/ (AutoencoderKL), scheduler/."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(**AE, latent_channels=4)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=2)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module", params=["ldm", "dit"])
def pipe_dir(request, tmp_path_factory) -> Path:
    return (_ldm if request.param == "ldm" else _dit)(tmp_path_factory.mktemp(request.param) / "pipe")


def test_sampling_decodes_latents(pipe_dir):
    loaded = load_model(pipe_dir)
    assert loaded.vae is not None and loaded.sample_shape[1:] == (8, 8)
    cfg = SampleConfig(steps=3, num=2)
    images = generate(loaded, cfg, range(2))
    assert images.shape == (2, 16, 16, 3)
    # the same thing by hand: the sampler's latents through the pipeline's own decode rule
    vae = loaded.vae
    captured = {}
    orig = loaded.decode

    def spy(x):
        captured["x"] = x.clone()
        return orig(x)

    loaded.decode = spy
    again = generate(loaded, cfg, range(2))
    assert np.array_equal(again, images)
    x = captured["x"]
    if type(vae).__name__ == "AutoencoderKL":
        want = vae.decode(x / vae.config.scaling_factor).sample
    else:
        want = vae.decode(x).sample
    assert np.array_equal(to_uint8(want), images)


def test_quantized_latent_checkpoint_keeps_the_autoencoder(pipe_dir, tmp_path):
    q, s = tmp_path / "q", tmp_path / "s"
    r = gacq("quantize", "--model", pipe_dir, "--method", "qdiffusion", "--wbits", 4, "--abits", 8, "--steps", 5,
             "--record-steps", 3, "--calib-trajectories", 2, "--iters", 3, "--act-iters", 3, "--device", "cpu",
             "--out", q)
    assert r.returncode == 0, r.stderr
    assert (q / "vae" / "config.json").exists() and any((q / "vae").glob("*.safetensors"))
    r = gacq("sample", "--model", q, "--steps", 5, "--num", 2, "--device", "cpu", "--out", s)
    assert r.returncode == 0, r.stderr
    assert np.load(s / "samples.npz")["images"].shape == (2, 16, 16, 3)
    fp, qm = load_model(pipe_dir), load_model(q)
    # the autoencoder is the float one, untouched; the denoiser is quantized
    for a, b in zip(fp.vae.state_dict().values(), qm.vae.state_dict().values()):
        assert torch.equal(a, b)
    from gacq.quant.wrap import quant_layers

    assert quant_layers(qm.model) and not any(True for _ in quant_layers(qm.vae))


def test_pickled_autoencoder_is_refused(pipe_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pipe_dir, bad)
    sub = next(p for p in (bad / "vae", bad / "vqvae") if p.exists())
    for f in sub.glob("*.safetensors"):
        f.unlink()
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(GacqError, match="never unpickles"):
        load_model(bad)
