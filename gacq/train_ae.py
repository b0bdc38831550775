"""Training the autoencoder of a latent diffusion model (diffusers' AutoencoderKL).

The loss is the reconstruction's mean squared error plus a small KL term on the latent posterior, as in the LDM
paper's KL-regularised autoencoders, but without their perceptual and adversarial losses: on 32x32 images the pixel
loss alone gives a usable decoder, and no perceptual network's weights can be downloaded here. At the end, the latent
scale is set as Stable Diffusion's was: `scaling_factor` = 1 / std of the latents of a batch of training images, so
that the denoiser sees latents of unit variance.

One call runs until `max_steps` or the time budget, then writes a checkpoint; `resume=True` continues from it (weights,
optimizer, step, RNG). Run folder:
    config.json     the AETrainConfig
    ckpt/           weights, optimizer, RNG and state.json (resume point)
    model/          the autoencoder as a diffusers folder (what `gacq train --vae` takes)
    log.jsonl       one line per `log_every` steps
    recon.png       8 test images (top row) over their reconstructions (bottom row)
    summary.json    this call's summary, with reconstruction PSNR on the test images
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import load_images
from .errors import GacqError
from .models import AE_CONFIGS, build_autoencoder, count_parameters
from .train import _load_optimizer, _restore_rng, _rng_tensors, _save_optimizer
from .utils import atomic_dir, git_commit, image_grid, machine_info, resolve_device, save_image, write_json


@dataclass(frozen=True)
class AETrainConfig:
    """Settings of an autoencoder training run (saved as config.json in the run folder).

    Attributes:
        data: training images (any format `gacq train` reads).
        test: held-out images for the reconstruction PSNR (None: the last 1,000 training images, and the summary
            says that they were seen in training).
        config: named autoencoder config (gacq.models.AE_CONFIGS).
        batch_size, lr, warmup_steps: Adam with a linear warm-up.
        kl_weight: weight of the KL term (summed over latent elements, averaged over the batch) against the
            per-pixel mean squared error.
        max_steps, time_budget_min: when the call stops (at least one must be given).
        ckpt_every, log_every: checkpoint and log intervals in steps.
        hflip: random horizontal flips.
        seed: seeds the initial weights, the data order and the posterior samples.
    """

    data: str
    test: str | None = None
    config: str = "ae-f4"
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 500
    kl_weight: float = 1e-6
    max_steps: int | None = None
    time_budget_min: float | None = None
    ckpt_every: int = 2000
    log_every: int = 100
    hflip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.config not in AE_CONFIGS:
            raise GacqError(f"unknown --config {self.config!r}; choose one of {', '.join(AE_CONFIGS)}")
        if self.max_steps is None and self.time_budget_min is None:
            raise GacqError("give --max-steps or --time-budget (or both) so that the run ends")
        for name in ("batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise GacqError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.kl_weight < 0:
            raise GacqError("--lr must be positive and --kl-weight not negative")


_RESUMABLE_CHANGES = {"max_steps", "time_budget_min", "ckpt_every", "log_every", "test"}


def _images(path: str, size: int, device: torch.device) -> torch.Tensor:
    ds = load_images(path, size=size, channels=3)
    return torch.from_numpy(ds.images).to(device).permute(0, 3, 1, 2).contiguous()  # uint8 N,C,H,W


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, images: torch.Tensor, n: int = 2048, batch: int = 256) -> float:
    """1 / std of the posterior samples of up to `n` images (Stable Diffusion's rule for `scaling_factor`)."""
    gen = torch.Generator(device=images.device).manual_seed(0)
    zs = []
    for i in range(0, min(n, len(images)), batch):
        post = vae.encode(_to_float(images[i:i + batch])).latent_dist
        zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=images.device))
    std = torch.cat(zs).double().std().item()
    if not std > 0:
        raise GacqError("the autoencoder's latents have zero spread; it did not train")
    return 1.0 / std


@torch.no_grad()
def reconstruction_psnr(vae: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the posterior-mean reconstructions of `images` (uint8 N,C,H,W)."""
    vals = []
    for i in range(0, len(images), batch):
        x = _to_float(images[i:i + batch])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        vals.append(-10 * torch.log10(mse))
    return torch.cat(vals).mean().item()


def train_autoencoder(cfg: AETrainConfig, out: str | Path, resume: bool = False, device: str | None = "auto",
                      progress: bool = True) -> dict[str, Any]:
    """Train (or continue training) an AutoencoderKL; returns a summary of this call."""
    out = Path(out)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    if resume:
        if not (out / "ckpt" / "state.json").exists():
            raise GacqError(f"--resume given but {out} has no checkpoint (ckpt/state.json)")
        old = json.loads(cfg_file.read_text())
        bad = sorted(k for k in old if k not in _RESUMABLE_CHANGES and old[k] != getattr(cfg, k, None))
        if bad:
            raise GacqError(f"cannot resume {out} with different {', '.join(bad)}; keep those as in {cfg_file} "
                            "or start a new run folder")
    elif (out / "ckpt").exists():
        raise GacqError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    write_json(cfg_file, asdict(cfg))
    size = AE_CONFIGS[cfg.config]["sample_size"]
    data = _images(cfg.data, size, dev)
    test = _images(cfg.test, size, dev)[:1000] if cfg.test else data[-1000:]

    commit = git_commit()
    torch.manual_seed(cfg.seed)
    vae = build_autoencoder(cfg.config).to(dev).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    state = {"step": 0, "images_seen": 0, "train_seconds": 0.0, "calls": 0}
    if resume:
        vae.load_state_dict(load_file(out / "ckpt" / "model.safetensors", device=str(dev)))
        _load_optimizer(opt, out / "ckpt")
        _restore_rng(gen, load_file(out / "ckpt" / "rng.safetensors"))
        state.update(json.loads((out / "ckpt" / "state.json").read_text()))
    state["calls"] += 1
    first_step, seconds_before = state["step"], state["train_seconds"]

    def step() -> tuple[float, float]:
        B = cfg.batch_size
        idx = torch.randint(0, len(data), (B,), device=dev, generator=gen)
        x = _to_float(data[idx])
        if cfg.hflip:
            flip = torch.rand(B, device=dev, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, device=dev, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + cfg.kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (state["step"] + 1) / max(1, cfg.warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        state["images_seen"] += B
        return mse.detach(), kl.detach()

    def checkpoint() -> None:
        state["train_seconds"] = round(seconds_before + time.monotonic() - t0, 3)
        vae.eval()
        with atomic_dir(out / "ckpt") as tmp:
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp / "model.safetensors")
            _save_optimizer(opt, tmp)
            save_file({k: v.cpu() for k, v in _rng_tensors(gen).items()}, tmp / "rng.safetensors")
            (tmp / "state.json").write_text(json.dumps({**state, "commit": commit}, indent=2))
        vae.register_to_config(scaling_factor=latent_scale(vae, data))
        with atomic_dir(out / "model") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        with torch.no_grad():
            x = test[:8]
            rec = vae.decode(vae.encode(_to_float(x)).latent_dist.mean).sample.clamp(-1, 1)
            both = torch.cat([_to_float(x), rec])
            save_image(image_grid(((both + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(),
                                  ncols=len(x)), out / "recon.png")
        vae.train()

    t0 = time.monotonic()
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
    reserve_s = min(10.0, 0.1 * budget_s)
    stopped_by = "max_steps"
    sums = []
    last_t, last_step = time.monotonic(), state["step"]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="autoencoder", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=5.0)
    with open(out / "log.jsonl", "a") as log_f:
        try:
            while cfg.max_steps is None or state["step"] < cfg.max_steps:
                if time.monotonic() - t0 > budget_s - reserve_s:
                    stopped_by = "time_budget"
                    break
                sums.append(torch.stack(step()))
                bar.update(1)
                if state["step"] % cfg.log_every == 0:
                    mse, kl = torch.stack(sums).mean(0).tolist()
                    if not math.isfinite(mse):
                        raise GacqError(f"training diverged at step {state['step']} (mse {mse}); lower --lr")
                    now = time.monotonic()
                    rec = {"step": state["step"], "mse": round(mse, 6), "kl": round(kl, 3),
                           "psnr_train": round(10 * math.log10(4 / max(mse, 1e-12)), 2),
                           "images_per_s": round((state["step"] - last_step) * cfg.batch_size / (now - last_t), 1),
                           "train_seconds": round(seconds_before + now - t0, 1)}
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                    bar.set_postfix(mse=f"{mse:.4f}")
                    sums.clear()
                    last_t, last_step = now, state["step"]
                if state["step"] % cfg.ckpt_every == 0:
                    c0 = time.monotonic()
                    checkpoint()
                    reserve_s = max(reserve_s, 1.5 * (time.monotonic() - c0))
        finally:
            bar.close()
    if state["step"] % cfg.ckpt_every != 0 or state["step"] == first_step:
        checkpoint()
    vae.eval()
    with torch.no_grad():
        latent_shape = list(vae.encode(_to_float(test[:1])).latent_dist.mean.shape[1:])
    summary = {
        "step": state["step"], "steps_this_call": state["step"] - first_step, "images_seen": state["images_seen"],
        "train_seconds_total": state["train_seconds"], "wall_seconds_this_call": round(time.monotonic() - t0, 1),
        "stopped_by": stopped_by, "params": count_parameters(vae),
        "latent_shape": latent_shape,
        "scaling_factor": vae.config.scaling_factor,
        "test_psnr_db": round(reconstruction_psnr(vae, test), 2),
        "test_images": cfg.test or f"the last {len(test)} training images (seen in training)",
        "device": str(dev), "machine": machine_info(), "commit": commit,
    }
    write_json(out / "summary.json", summary)
    return summary

