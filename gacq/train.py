"""Training the full-precision denoisers: DDPM epsilon-prediction (Ho et al. 2020).

One call of `train` runs until `max_steps` or the time budget, then writes a
checkpoint; `resume=True` continues from it bit for bit (weights, EMA,
optimizer, step, RNG states), so a long run can span many short GPU calls.

Data are held in memory (on the training device) as uint8 and drawn with
replacement by a seeded generator: no DataLoader workers, no epoch state.

Run folder layout:
    config.json         the TrainConfig
    ckpt/               model, EMA and optimizer safetensors + state.json (resume point)
    model/              the EMA model as a diffusers DDPM pipeline folder (what you sample from)
    log.jsonl           one JSON line per `log_every` steps
    grids/step_N.png    a sample grid at each checkpoint
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import load_images
from .errors import GacqError
from .models import DDPM_SCHEDULE, NAMED_CONFIGS, LoadedModel, build_model, count_parameters, save_model
from .utils import atomic_dir, git_commit, image_grid, machine_info, resolve_device, save_image, write_json


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (saved as config.json in the run folder).

    Attributes:
        data: dataset path (image folder, zip, mosaic zip, idx, npz).
        config: named model config ('tiny', 'small', 'ddpm-cifar10').
        batch_size: images per step.
        lr: AdamW learning rate after warm-up (constant afterwards, as in DDPM).
        warmup_steps: linear learning-rate warm-up.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm.
        ema_decay: EMA decay; the effective decay is min(ema_decay, (1+step)/(10+step)).
        max_steps: stop after this many steps in total (None: only the time budget stops).
        time_budget_min: stop cleanly, with a checkpoint, after this many minutes of this call.
        ckpt_every: checkpoint (and grid) every this many steps.
        log_every: write a log line every this many steps.
        hflip: random horizontal flips.
        label_dropout: class-conditional configs: share of labels replaced by the null label (the
            unconditional branch of classifier-free guidance).
        bf16: bf16 autocast on CUDA (ignored on CPU).
        compile: torch.compile the model (default mode).
        seed: seeds the initial weights, data order, noise and timesteps.
        grid_num, grid_steps: size of the sample grid and its DDIM steps (0 disables grids).
        resize: allow resizing data whose size differs from the model's.
        init_from: start model and EMA from the weights of this saved model (a new leg of
            training with a fresh optimizer, e.g. when the full checkpoint could not be kept).
        vae: latent diffusion: an autoencoder folder (`gacq train-autoencoder`'s model/, AutoencoderKL). The images
            are encoded once; the denoiser (the named config with the latents' size and channels) learns the
            latents times the autoencoder's `scaling_factor`, and the saved model carries the autoencoder as vae/.
    """

    data: str
    config: str = "small"
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    max_steps: int | None = None
    time_budget_min: float | None = None
    ckpt_every: int = 5000
    log_every: int = 100
    hflip: bool = True
    bf16: bool = True
    compile: bool = False
    seed: int = 0
    grid_num: int = 64
    grid_steps: int = 50
    resize: bool = False
    init_from: str | None = None
    label_dropout: float = 0.1
    vae: str | None = None

    def __post_init__(self) -> None:
        if self.config not in NAMED_CONFIGS:
            raise GacqError(f"unknown --config {self.config!r}; choose one of {', '.join(NAMED_CONFIGS)}")
        if self.max_steps is None and self.time_budget_min is None:
            raise GacqError("give --max-steps or --time-budget (or both) so that the run ends")
        for name in ("batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise GacqError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise GacqError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise GacqError(f"--lr must be positive, got {self.lr}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Fields that may change between a run and its resumption without changing its maths.
_RESUMABLE_CHANGES = {"max_steps", "time_budget_min", "ckpt_every", "log_every", "compile", "grid_num", "grid_steps"}


# ---------------------------------------------------------------- state I/O ---
def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, folder / "optim.safetensors")
    (folder / "optim.json").write_text(json.dumps({"param_groups": sd["param_groups"]}))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(folder / "optim.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = json.loads((folder / "optim.json").read_text())["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.data": gen.get_state(), "rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(gen: torch.Generator, t: dict[str, torch.Tensor]) -> None:
    gen.set_state(t["rng.data"])
    torch.set_rng_state(t["rng.torch_cpu"])
    if "rng.torch_cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.torch_cuda"])


def _load_vae(source: str, device: torch.device) -> torch.nn.Module:
    """The frozen autoencoder of a latent run: an AutoencoderKL folder (or a pipeline folder holding vae/)."""
    from .models import _load_autoencoder

    folder = Path(source).expanduser()
    if (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    if not (folder / "config.json").exists():
        raise GacqError(f"--vae {source} is not an autoencoder folder (no config.json); pass the model/ folder of "
                        "`gacq train-autoencoder`")
    vae = _load_autoencoder(folder, device).requires_grad_(False)
    if type(vae).__name__ != "AutoencoderKL":
        raise GacqError(f"--vae {source} holds a {type(vae).__name__}; `gacq train --vae` takes an AutoencoderKL")
    return vae


@torch.no_grad()
def _encode_all(vae: torch.nn.Module, data: torch.Tensor, hflip: bool, progress: bool,
                batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (and of its mirror image when `hflip`)."""
    means, stds = [], []
    views = [False, True] if hflip else [False]
    total = len(views) * len(data)
    with tqdm(total=total, desc="encoding", unit="img", disable=not progress, mininterval=5.0) as bar:
        for flip in views:
            for i in range(0, len(data), batch):
                x = data[i:i + batch].float() / 127.5 - 1.0
                post = vae.encode(x.flip(3) if flip else x).latent_dist
                means.append(post.mean)
                stds.append(post.std)
                bar.update(len(x))
    return torch.cat(means), torch.cat(stds)


def _init_weights(model: torch.nn.Module, source: str, config: str, arch: dict[str, Any] | None = None) -> None:
    from .models import load_model

    loaded = load_model(source)
    want = dict(model.config)
    got = dict(loaded.model.config)
    diff = sorted(k for k in (arch or NAMED_CONFIGS[config]) if not k.startswith("_") and list(np.atleast_1d(want.get(k))) != list(np.atleast_1d(got.get(k))))
    if diff:
        raise GacqError(f"--init-from {source} is not a {config!r} model ({', '.join(diff)} differ)")
    model.load_state_dict(loaded.model.state_dict())


# ---------------------------------------------------------------- training ---
class _Run:
    """The mutable state of one training run."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, arch: dict[str, Any] | None = None,
                 vae: torch.nn.Module | None = None):
        self.cfg, self.out, self.device, self.vae = cfg, out, device, vae
        # latents are not bounded to [-1, 1] as pixels are: no clipping of the predicted x0 when sampling them
        self.schedule = {**DDPM_SCHEDULE, "clip_sample": False} if vae is not None else dict(DDPM_SCHEDULE)
        self.commit = git_commit()  # read once, before the first step: the code this call runs
        torch.manual_seed(cfg.seed)
        self.model = build_model(arch or cfg.config).to(device).train()
        if cfg.init_from is not None:
            _init_weights(self.model, cfg.init_from, cfg.config, arch)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
        )
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step = 0
        self.images_seen = 0
        self.train_seconds = 0.0
        self.calls = 0

    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps <= 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (step + 1) / self.cfg.warmup_steps)

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_p = [p for p in self.ema.parameters()]
        mod_p = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_p, mod_p, 1.0 - decay)

    def save(self) -> None:
        with atomic_dir(self.out / "ckpt") as tmp:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, tmp / "model.safetensors")
            save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()}, tmp / "ema.safetensors")
            _save_optimizer(self.opt, tmp)
            save_file({k: v.cpu() for k, v in _rng_tensors(self.gen).items()}, tmp / "rng.safetensors")
            state = {
                "step": self.step,
                "images_seen": self.images_seen,
                "train_seconds": round(self.train_seconds, 3),
                "calls": self.calls,
                "commit": self.commit,
            }
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        save_model(self.ema, self.out / "model", self.schedule, vae=self.vae)

    def load(self) -> None:
        folder = self.out / "ckpt"
        dev = self.device
        self.model.load_state_dict(load_file(folder / "model.safetensors", device=str(dev)))
        self.ema.load_state_dict(load_file(folder / "ema.safetensors", device=str(dev)))
        _load_optimizer(self.opt, folder)
        _restore_rng(self.gen, load_file(folder / "rng.safetensors"))
        state = json.loads((folder / "state.json").read_text())
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.train_seconds, self.calls = state["train_seconds"], state["calls"]


def _prepare_run_folder(cfg: TrainConfig, out: Path, resume: bool) -> None:
    cfg_file = out / "config.json"
    if resume:
        if not (out / "ckpt" / "state.json").exists():
            raise GacqError(f"--resume given but {out} has no checkpoint (ckpt/state.json)")
        old = TrainConfig.from_json(json.loads(cfg_file.read_text()))
        changed = {f.name for f in fields(TrainConfig) if getattr(old, f.name) != getattr(cfg, f.name)}
        bad = changed - _RESUMABLE_CHANGES
        if bad:
            raise GacqError(
                f"cannot resume {out} with different {', '.join(sorted(bad))}; keep those as in "
                f"{cfg_file} or start a new run folder"
            )
    elif (out / "ckpt").exists():
        raise GacqError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    write_json(cfg_file, cfg.to_json())


def _grid(run: _Run) -> None:
    from .sampling import SampleConfig, generate

    cfg = run.cfg
    if cfg.grid_num <= 0 or cfg.grid_steps <= 0:
        return
    loaded = LoadedModel(run.ema, dict(run.schedule), vae=run.vae)
    scfg = SampleConfig(steps=cfg.grid_steps, num=cfg.grid_num, batch_size=cfg.grid_num, seed=0,
                        precision="bf16" if cfg.bf16 else "fp32")
    images = generate(loaded, scfg, range(cfg.grid_num), run.device)
    save_image(image_grid(images), run.out / "grids" / f"step_{run.step:07d}.png")


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, device: str | None = "auto",
          progress: bool = True) -> dict[str, Any]:
    """Train (or continue training) a denoiser; returns a summary of this call.

    Args:
        cfg: the run's settings.
        out: run folder (see the module docstring for its layout).
        resume: continue from `out/ckpt`.
        device: 'auto', 'cpu', 'cuda', ...
    """
    out = Path(out)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_run_folder(cfg, out, resume)
    arch = NAMED_CONFIGS[cfg.config]
    vae = latents = None
    if cfg.vae is not None:
        vae = _load_vae(cfg.vae, dev)
        size, channels = vae.config.sample_size, vae.config.in_channels
    else:
        size, channels = arch["sample_size"], arch["in_channels"]
    ds = load_images(cfg.data, size=size, channels=channels, resize=cfg.resize)
    data = torch.from_numpy(ds.images).to(dev).permute(0, 3, 1, 2).contiguous()  # uint8 N,C,H,W
    if vae is not None:
        latents = _encode_all(vae, data, cfg.hflip, progress)  # (mean, std), the flipped images after the others
        c, h, w = latents[0].shape[1:]
        arch = {**arch, "sample_size": h, "in_channels": c, "out_channels": c * arch["out_channels"] // arch["in_channels"]}
        if h != w:
            raise GacqError(f"the autoencoder {cfg.vae} gives {h}x{w} latents; gacq's denoisers want square ones")
    from .conditioning import is_class_conditional, model_forward, null_label, num_classes

    cond_model = is_class_conditional(build_model(cfg.config))
    if cond_model:
        k = num_classes(build_model(cfg.config))
        if len(ds.labels) and int(ds.labels.max()) >= k:
            raise GacqError(f"{cfg.data} has labels up to {int(ds.labels.max())}, but --config {cfg.config} has "
                            f"{k} classes")
        labels_all = torch.from_numpy(ds.labels).to(dev)

    run = _Run(cfg, out, dev, arch, vae)
    if resume:
        run.load()
    run.calls += 1
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler(**DDPM_SCHEDULE).alphas_cumprod.to(dev)
    T = DDPM_SCHEDULE["num_train_timesteps"]
    fwd = torch.compile(run.model) if cfg.compile else run.model
    use_bf16 = cfg.bf16 and dev.type == "cuda"

    def train_step() -> torch.Tensor:
        g, B = run.gen, cfg.batch_size
        if latents is not None:  # a posterior sample of each drawn image's latent (flips were encoded up front)
            pick = torch.randint(0, len(latents[0]), (B,), device=dev, generator=g)
            idx = pick % len(data)
            mean, std = latents[0][pick], latents[1][pick]
            x0 = (mean + std * torch.randn(mean.shape, device=dev, generator=g)) * vae.config.scaling_factor
        else:
            idx = torch.randint(0, len(data), (B,), device=dev, generator=g)
            x0 = data[idx].float() / 127.5 - 1.0
            if cfg.hflip:
                flip = torch.rand(B, device=dev, generator=g) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, T, (B,), device=dev, generator=g)
        noise = torch.randn(x0.shape, device=dev, generator=g)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = None
        if cond_model:  # label dropout to the null label trains the unconditional branch (guidance)
            y = labels_all[idx]
            drop = torch.rand(B, device=dev, generator=g) < cfg.label_dropout
            cond = {"class_labels": torch.where(drop, torch.full_like(y, null_label(run.model)), y)}
        with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            pred = model_forward(fwd, xt, t, cond).sample
        if pred.shape[1] == 2 * x0.shape[1]:  # learned-variance channels (DiT): only eps is trained here
            pred = pred[:, : x0.shape[1]]
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        for group in run.opt.param_groups:
            group["lr"] = run.lr_at(run.step)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.opt.step()
        run.step += 1
        run.images_seen += B
        run.update_ema()
        return loss.detach()

    call_start = time.monotonic()
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
    # time kept for the final checkpoint; grows to 1.5x the measured checkpoint time
    reserve_s = min(10.0, 0.1 * budget_s)
    target = cfg.max_steps
    first_step, train_seconds_before = run.step, run.train_seconds
    bar = tqdm(total=target, initial=run.step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=5.0)
    losses: list[torch.Tensor] = []
    last_log_t, last_log_step = time.monotonic(), run.step
    stopped_by = "max_steps"

    def checkpoint() -> float:
        t0 = time.monotonic()
        run.train_seconds = train_seconds_before + (t0 - call_start)
        run.save()
        _grid(run)
        return time.monotonic() - t0

    with open(out / "log.jsonl", "a") as log_f:
        try:
            while target is None or run.step < target:
                if time.monotonic() - call_start > budget_s - reserve_s:
                    stopped_by = "time_budget"
                    break
                losses.append(train_step())
                bar.update(1)
                if run.step % cfg.log_every == 0:
                    now = time.monotonic()
                    loss_v = torch.stack(losses).mean().item()
                    if not math.isfinite(loss_v):
                        raise GacqError(f"training diverged at step {run.step} (loss {loss_v}); lower --lr")
                    ips = (run.step - last_log_step) * cfg.batch_size / (now - last_log_t)
                    rec = {"step": run.step, "loss": round(loss_v, 6), "lr": run.lr_at(run.step - 1),
                           "images_per_s": round(ips, 1), "images_seen": run.images_seen,
                           "train_seconds": round(train_seconds_before + now - call_start, 1)}
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                    bar.set_postfix(loss=f"{loss_v:.4f}", img_s=f"{ips:.0f}")
                    losses.clear()
                    last_log_t, last_log_step = time.monotonic(), run.step
                if run.step % cfg.ckpt_every == 0:
                    reserve_s = max(reserve_s, 1.5 * checkpoint())
                    last_log_t = time.monotonic()
        finally:
            bar.close()
    if run.step % cfg.ckpt_every != 0 or run.step == first_step:
        checkpoint()
    summary = {
        "step": run.step,
        "steps_this_call": run.step - first_step,
        "images_seen": run.images_seen,
        "train_seconds_total": round(run.train_seconds, 1),
        "wall_seconds_this_call": round(time.monotonic() - call_start, 1),
        "stopped_by": stopped_by,
        "params": count_parameters(run.model),
        "device": str(dev),
        "machine": machine_info(),
        "commit": run.commit,
    }
    write_json(out / "summary.json", summary)
    return summary
