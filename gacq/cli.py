"""The `gacq` command line: one thin function per subcommand over the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import GacqError

app = typer.Typer(
    help="gacq: post-training quantization of diffusion models (Gradient-Aligned Calibration and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

GPUS_HELP = ("Processes under torchrun, each with a disjoint share of the work: one per GPU with --device cuda "
             "(NCCL), or CPU processes with --device cpu (gloo). Leave it out inside torchrun.")
MODEL_HELP = "Local diffusers folder (model or pipeline layout) or hub id; default: the bundled CIFAR-10 model."


def _int_tuple(text: str, n: int, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n or min(vals) < 1:
        _fail(GacqError(f"{name} needs {n} positive integers separated by commas, got {text!r}"))
    return vals


def _fail(e: GacqError) -> None:
    rank = ""
    if "RANK" in os.environ:  # one of several processes: say which, and tell torchrun (gacq.distributed)
        from .distributed import record_failure

        rank = record_failure(e)
    typer.secho(f"error: {f'[{rank}] ' if rank else ''}{e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Training images: folder, zip, mosaic zip, idx file or npz."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, logs, grids, model/)."),
    config: str = typer.Option("small", help="Named model config: tiny, small or ddpm-cifar10."),
    batch_size: int = typer.Option(128, min=1, help="Images per step."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate after warm-up."),
    warmup_steps: int = typer.Option(1000, min=0, help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.0, min=0.0, help="AdamW weight decay."),
    grad_clip: float = typer.Option(1.0, min=0.0, help="Max gradient norm."),
    ema_decay: float = typer.Option(0.9999, help="EMA decay of the weights."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Total steps of the run."),
    time_budget: Optional[float] = typer.Option(None, min=0.1, help="Stop with a checkpoint after this many minutes."),
    ckpt_every: int = typer.Option(5000, min=1, help="Checkpoint and sample grid every N steps."),
    log_every: int = typer.Option(100, min=1, help="Log line every N steps."),
    hflip: bool = typer.Option(True, help="Random horizontal flips."),
    label_dropout: float = typer.Option(0.1, min=0.0, max=1.0, help="Class-conditional configs: share of labels dropped to the null label (for guidance)."),
    bf16: bool = typer.Option(True, help="bf16 autocast on CUDA."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    seed: int = typer.Option(0, help="Seed for weights, data order and noise."),
    grid_num: int = typer.Option(64, min=0, help="Images in each checkpoint grid (0: none)."),
    grid_steps: int = typer.Option(50, min=0, help="DDIM steps for the grid."),
    resize: bool = typer.Option(False, help="Resize and centre-crop images of another size."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
    init_from: Optional[str] = typer.Option(None, help="Start from this saved model's weights (fresh optimizer)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent diffusion: an AutoencoderKL folder (from `gacq train-autoencoder`); the denoiser learns its latents and the saved model carries it."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Train a full-precision DDPM denoiser (epsilon prediction, T=1000, linear betas), on pixels or on an
    autoencoder's latents (--vae)."""
    from .train import TrainConfig
    from .train import train as train_fn

    try:
        cfg = TrainConfig(
            data=str(data), config=config, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
            weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, max_steps=max_steps,
            time_budget_min=time_budget, ckpt_every=ckpt_every, log_every=log_every, hflip=hflip, bf16=bf16,
            label_dropout=label_dropout, compile=compile, seed=seed, grid_num=grid_num, grid_steps=grid_steps, resize=resize,
            init_from=init_from, vae=vae,
        )
        summary = train_fn(cfg, out, resume=resume, device=device)
    except GacqError as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))


@app.command("train-autoencoder")
def train_autoencoder(
    data: Path = typer.Option(..., "--data", help="Training images: folder, zip, mosaic zip, idx file or npz."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoint, log, recon.png, model/)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Held-out images for the reconstruction PSNR."),
    config: str = typer.Option("ae-f4", help="Named autoencoder config: ae-f4 (32x32 -> 8x8x4) or ae-tiny."),
    batch_size: int = typer.Option(64, min=1, help="Images per step."),
    lr: float = typer.Option(5e-4, help="Adam learning rate after warm-up."),
    warmup_steps: int = typer.Option(500, min=0, help="Linear warm-up steps."),
    kl_weight: float = typer.Option(1e-6, min=0.0, help="Weight of the latent KL term against the pixel MSE."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Total steps of the run."),
    time_budget: Optional[float] = typer.Option(None, min=0.1, help="Stop with a checkpoint after this many minutes."),
    ckpt_every: int = typer.Option(2000, min=1, help="Checkpoint every N steps."),
    log_every: int = typer.Option(100, min=1, help="Log line every N steps."),
    hflip: bool = typer.Option(True, help="Random horizontal flips."),
    seed: int = typer.Option(0, help="Seed for weights, data order and posterior samples."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Train the autoencoder (AutoencoderKL) of a latent diffusion model; then `gacq train --vae OUT/model`."""
    from .train_ae import AETrainConfig
    from .train_ae import train_autoencoder as train_fn

    try:
        cfg = AETrainConfig(data=str(data), test=str(test) if test else None, config=config, batch_size=batch_size,
                            lr=lr, warmup_steps=warmup_steps, kl_weight=kl_weight, max_steps=max_steps,
                            time_budget_min=time_budget, ckpt_every=ckpt_every, log_every=log_every, hflip=hflip,
                            seed=seed)
        summary = train_fn(cfg, out, resume=resume, device=device)
    except GacqError as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))


@app.command("train-classifier")
def train_classifier(
    data: Path = typer.Option(..., "--data", help="Labelled training images (class folders, zip or mosaic zip)."),
    out: Path = typer.Option(..., "--out", help="New folder for model.safetensors, config.json, log.jsonl."),
    test: Optional[Path] = typer.Option(None, "--test", help="Labelled test images, evaluated during training."),
    epochs: int = typer.Option(80, min=1, help="Passes over the training data."),
    cutout: int = typer.Option(16, min=0, help="Cutout square side (0: none)."),
    widths: str = typer.Option("64,128,256,384", help="Channel widths of prep,layer1,layer2,layer3."),
    weight_decay: float = typer.Option(5e-4, min=0.0, help="SGD weight decay."),
    batch_size: int = typer.Option(512, min=1, help="Images per step."),
    lr: float = typer.Option(0.4, min=0.0, help="Peak SGD learning rate."),
    seed: int = typer.Option(0, help="Seed for weights, data order and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Train the CIFAR-10 feature network used by `gacq eval --features cifar10`."""
    from .metrics.train_classifier import ClassifierConfig
    from .metrics.train_classifier import train_classifier as train_fn

    try:
        cfg = ClassifierConfig(data=str(data), test=str(test) if test else None, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, cutout=cutout,
                               weight_decay=weight_decay, widths=_int_tuple(widths, 4, "--widths"))
        summary = train_fn(cfg, out, device=device)
    except GacqError as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))


@app.command()
def sample(
    out: Path = typer.Option(..., "--out", help="Output folder: samples.npz, grid.png, meta.json."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    scheduler: str = typer.Option("ddim", help="ddim, ddpm or dpm (DPM-Solver++ 2M)."),
    steps: int = typer.Option(100, min=1, help="Denoising steps."),
    eta: float = typer.Option(0.0, min=0.0, max=1.0, help="DDIM eta."),
    num: int = typer.Option(64, min=1, help="Number of images."),
    batch_size: int = typer.Option(64, min=1, help="Images per model call (images do not depend on it)."),
    seed: int = typer.Option(0, min=0, help="Base seed; every image has its own generator derived from (seed, index)."),
    shard_size: int = typer.Option(5000, min=1, help="Images per resumable shard."),
    first: int = typer.Option(0, "--first", min=0, help="Index of the first image: images FIRST .. FIRST+NUM-1 of "
                              "this seed's run (one run made in parts)."),
    timestep_spacing: str = typer.Option("leading", help="leading, trailing, linspace, or quad (DDIM only: the DDIM code's quadratic skip, as Q-Diffusion/TFMQ-DM on CIFAR-10)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (GPU)."),
    class_label: Optional[int] = typer.Option(None, "--class-label", min=0, help="Class-conditional models: this class for every image (default: balanced over the classes)."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", min=0.0, help="Classifier-free guidance scale (1: none)."),
    prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds", help="Text-conditioned models: safetensors with 'encoder_hidden_states' (prompts, tokens, dim) [+ 'negative_encoder_hidden_states' for guidance]."),
    float_acts: bool = typer.Option(False, "--float-acts", help="Quantized model: keep activations in float "
                                    "(weight-only inference of a W/A checkpoint; its weight stage ran with float "
                                    "activations, so this is the W-only model)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    gpus: int = typer.Option(1, "--gpus", "--procs", min=1, help=GPUS_HELP + " Shard k goes to process k mod N."),
    fused_fake_quant: bool = typer.Option(True, "--fused-fake-quant/--no-fused-fake-quant", help="Quantized model "
                                          "on CUDA: quantize activations with one fused Triton kernel instead of six "
                                          "torch ops (bitwise the same values: checked in Triton's interpreter and on "
                                          "an H200)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model call and, on CUDA, replay each "
                                 "step as one CUDA graph (faster; images close to, not bitwise equal to, eager "
                                 "ones; compiles once per batch shape)."),
) -> None:
    """Sample images from a diffusers model; rerun the same command to resume."""
    import contextlib

    from . import distributed as gdist
    from .models import load_model
    from .quant.primitives import use_fused_fake_quant
    from .sampling import SampleConfig
    from .sampling import sample as sample_fn
    from .utils import resolve_device

    try:
        if gdist.relaunch(gpus, device, "gacq sample"):
            return
        cfg = SampleConfig(scheduler=scheduler, steps=steps, eta=eta, num=num, batch_size=batch_size, seed=seed,
                           shard_size=shard_size, timestep_spacing=timestep_spacing, precision=precision,
                           class_label=class_label, guidance_scale=guidance_scale,
                           prompt_embeds=str(prompt_embeds) if prompt_embeds else None, first=first,
                           compile=compile)
        with gdist.session(resolve_device(device)) as dev:
            loaded = load_model(model, device=dev, act_quant=not float_acts)
            if float_acts and not loaded.source.endswith("(activations float)"):
                raise GacqError("--float-acts applies to quantized models only (a folder written by gacq quantize)")
            with use_fused_fake_quant() if fused_fake_quant else contextlib.nullcontext():
                meta = sample_fn(loaded, cfg, out, device=dev)
            if gdist.rank() != 0:
                return
    except GacqError as e:
        _fail(e)
    typer.echo(f"wrote {meta['shape'][0]} images to {out / 'samples.npz'} and {out / 'grid.png'} "
               f"in {meta['wall_seconds_this_run']:.1f} s")


@app.command()
def calib(
    out: Path = typer.Option(..., "--out", help="Output folder: calib_*.safetensors shards + calib.json."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    selection: str = typer.Option("uniform", help="uniform (Q-Diffusion), gaussian (PTQ4DM) or all (every step)."),
    trajectories: int = typer.Option(256, min=1, help="FP sampling trajectories to run."),
    record_steps: int = typer.Option(20, min=1, help="Recorded sampling steps for 'uniform'."),
    mu: float = typer.Option(0.5, help="Gaussian selection: mean timestep as a fraction of T."),
    sigma: float = typer.Option(0.35, help="Gaussian selection: std as a fraction of T."),
    gaussian_draws: int = typer.Option(1, min=1, help="Gaussian selection: steps drawn per trajectory (1: PTQ4DM's one sample each; with replacement)."),
    scheduler: str = typer.Option("ddim", help="Sampler that produces the trajectories (use the evaluation one)."),
    steps: int = typer.Option(100, min=1, help="Sampling steps."),
    eta: float = typer.Option(0.0, min=0.0, max=1.0, help="DDIM eta."),
    seed: int = typer.Option(0, min=0, help="Seed of the trajectories and of the Gaussian draw."),
    batch_size: int = typer.Option(64, min=1, help="Trajectories per model call."),
    class_label: Optional[int] = typer.Option(None, "--class-label", min=0, help="Class-conditional models: this class for every trajectory (default: balanced over the classes)."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", min=0.0, help="Classifier-free guidance scale (1: none); with guidance both branches are recorded."),
    prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds", help="Text-conditioned models: safetensors with 'encoder_hidden_states' (prompts, tokens, dim) [+ 'negative_encoder_hidden_states' for guidance]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    gpus: int = typer.Option(1, "--gpus", "--procs", min=1, help=GPUS_HELP + " Batch j of trajectories goes to process j mod N."),
) -> None:
    """Collect calibration data (x_t, t) along full-precision sampling trajectories."""
    from . import distributed as gdist
    from .models import load_model
    from .quant.calib_data import CalibDataConfig, collect, timestep_histogram
    from .sampling import SampleConfig
    from .utils import resolve_device

    try:
        if gdist.relaunch(gpus, device, "gacq calib"):
            return
        cfg = CalibDataConfig(selection=selection, n_trajectories=trajectories, n_steps=record_steps, mu=mu,
                              sigma=sigma, seed=seed, batch_size=batch_size, draws=gaussian_draws)
        scfg = SampleConfig(scheduler=scheduler, steps=steps, eta=eta, seed=seed, class_label=class_label,
                            guidance_scale=guidance_scale, prompt_embeds=str(prompt_embeds) if prompt_embeds else None)
        with gdist.session(resolve_device(device)) as dev:
            cs = collect(load_model(model, device=dev), scfg, cfg, device=dev)
            gdist.on_rank0(lambda: cs.save(out), "saving the calibration set")
            if gdist.rank() != 0:
                return
    except GacqError as e:
        _fail(e)
    hist = timestep_histogram(cs)
    typer.echo(f"wrote {len(cs)} calibration samples over {len(hist)} timesteps to {out}")


@app.command()
def quantize(
    out: Path = typer.Option(..., "--out", help="Quantized checkpoint folder (QDIR)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    method: str = typer.Option("rtn", help="rtn, brecq, ptq4dm, qdiffusion, tfmq or gac (`gacq methods` describes them)."),
    preset: str = typer.Option("common", help="common (the comparison's shared layer set) or faithful (the released code's choices)."),
    wbits: int = typer.Option(4, help="Weight bits (2-8)."),
    abits: int = typer.Option(8, help="Activation bits (2-8; 32 = float activations)."),
    weight_init: Optional[str] = typer.Option(None, help="Override the recipe's weight grid init: mse or minmax."),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help="Override the recipe's float layers: name pattern (repeatable)."),
    act_mode: Optional[str] = typer.Option(None, "--act-mode", help="Override the recipe's activation quantizer (ablations across recipes): minmax (calibrated ranges), lsq (learned step sizes: qdiffusion, ptq4dm) or fsc (per-step sets: tfmq, gac; only methods that calibrate on every step)."),
    split_shortcuts: Optional[bool] = typer.Option(None, "--split-shortcuts/--no-split-shortcuts", help="Override the recipe's shortcut splitting (qdiffusion's): the up blocks' concatenated skip inputs get two separately quantized halves. Not with --act-mode fsc."),
    calib: Optional[Path] = typer.Option(None, help="Calibration set from `gacq calib`; collected if omitted."),
    save_calib: Optional[Path] = typer.Option(None, "--save-calib", help="Keep the collected calibration set in this folder (for `gacq diagnose` or other methods)."),
    calib_trajectories: Optional[int] = typer.Option(None, min=1, help="Trajectories when collecting calibration data [64; --quick 16]."),
    record_steps: int = typer.Option(20, min=1, help="Recorded steps per trajectory (uniform selection; tfmq's weight subset)."),
    gaussian_draws: int = typer.Option(1, min=1, help="ptq4dm: Gaussian-drawn steps per calibration trajectory (1: PTQ4DM's own; = --record-steps for as many samples as the uniform selection)."),
    steps: int = typer.Option(100, min=1, help="DDIM steps of the calibration sampler (and of sampling, for tfmq)."),
    timestep_spacing: str = typer.Option("leading", help="Calibration sampler spacing (as `gacq sample`): leading, trailing, linspace, or quad (the baselines' CIFAR-10 protocol)."),
    seed: int = typer.Option(0, min=0, help="Calibration and reconstruction seed."),
    class_label: Optional[int] = typer.Option(None, "--class-label", min=0, help="Class-conditional models: this class for every calibration trajectory (default: balanced over the classes)."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", min=0.0, help="Classifier-free guidance scale of the calibration sampler (1: none; use the evaluation sampler's)."),
    prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds", help="Text-conditioned models: safetensors with 'encoder_hidden_states' (prompts, tokens, dim) [+ 'negative_encoder_hidden_states' for guidance]."),
    iters: Optional[int] = typer.Option(None, min=1, help="AdaRound iterations per unit and for tfmq's temporal block [20000; --quick 100]."),
    act_iters: Optional[int] = typer.Option(None, min=1, help="Activation step-size iterations per unit (qdiffusion, ptq4dm) [5000; --quick 50]."),
    recon_batch: int = typer.Option(32, min=1, help="Reconstruction batch size."),
    recon_lr: float = typer.Option(1e-3, help="Adam learning rate of the rounding variables."),
    gac_meta_iters: Optional[int] = typer.Option(None, min=0, help="gac: meta-iterations per block, 0 = tfmq [100; --quick 10]."),
    gac_inner_lr: float = typer.Option(1.0, help="gac: step size of the differentiable inner update."),
    gac_meta_lr: float = typer.Option(0.2, help="gac: learning rate of the sample scores."),
    gac_meta_optimizer: str = typer.Option("adam", help="gac: adam (the minibatch's scores only), sgd, or dense-adam (all scores; biased towards visited samples, see GACConfig)."),
    gac_tau: float = typer.Option(1.0, help="gac: softmax temperature of the weights."),
    gac_val_fraction: float = typer.Option(0.05, help="gac: validation share, balanced over timesteps."),
    gac_groups: int = typer.Option(5, help="gac: timestep groups K of the validation split."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Then fold the per-channel mean error of the noise prediction (against the float model, on the calibration set) into the last layer's bias; see gacq.quant.bias_correction. Not part of any paper's method."),
    smooth: Optional[float] = typer.Option(None, "--smooth", min=0.0, max=1.0, help="Activation smoothing (SmoothQuant) of the Linear layers' quantized inputs at this migration strength alpha (0.5 is SmoothQuant's default): per input channel, max|X|^alpha / max|W|^(1-alpha) moves from the input into the weight. Off by default; not part of any paper's method; `gacq export` refuses smoothed checkpoints for now."),
    w8_layer: Optional[list[str]] = typer.Option(None, "--w8-layer", help="Give the layers this name pattern matches 8-bit weights (mixed precision; repeatable; their inputs keep --abits), e.g. 'up_blocks.3.resnets.*.conv_shortcut'. Not part of any paper's method."),
    act_granularity: str = typer.Option("tensor", "--act-granularity", help="tensor: one calibrated grid per layer input (the papers'); token: every quantized Linear's input gets one grid per token, computed at run time from its min and max (dynamic per-token quantization, against outlier tokens in transformers; convolutions stay per tensor). Not part of any paper's method."),
    fmt: str = typer.Option("int", "--format", help="Number format of the quantized weights and inputs: int (uniform integer grids, the papers') or fp8 (FP8 E4M3, the 8-bit float of Hopper's and Ada's tensor cores; needs --wbits 8, --abits 8 or 32 and a method without learned rounding, e.g. rtn). Not part of any paper's method."),
    act_fmt: Optional[str] = typer.Option(None, "--act-format", help="Number format of the quantized inputs where it differs from --format: fp8 with integer weights, e.g. --wbits 4 --abits 8 --act-format fp8 (W4 weights, learned rounding and all, with FP8 E4M3 inputs: the fp8 export backend runs such layers on FP8 tensor cores). Not part of any paper's method."),
    quick: bool = typer.Option(False, "--quick", help="A CPU-sized run: 16 trajectories, 100 AdaRound / 50 step-size iterations, 10 GAC meta-iterations (far below the papers' settings)."),
    compare_num: int = typer.Option(0, "--compare", min=0, help="Then sample N images from the FP and the quantized model with the same noise: QDIR/compare/ (side-by-side grid, report)."),
    gpus: int = typer.Option(1, "--gpus", "--procs", min=1, help=GPUS_HELP + " Each reconstruction minibatch is split over the processes and their gradients summed."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Quantize a model and write a quantized checkpoint (sample it with `gacq sample --model QDIR`)."""
    from . import distributed as gdist
    from .models import load_model
    from .quant.api import quantize_to_dir
    from .quant.config import ActReconConfig, CalibDataConfig, GACConfig, QuantConfig, ReconConfig
    from .sampling import SampleConfig
    from .utils import resolve_device

    budget = {"calib_trajectories": 16, "iters": 100, "act_iters": 50, "gac_meta_iters": 10} if quick else \
        {"calib_trajectories": 64, "iters": 20000, "act_iters": 5000, "gac_meta_iters": 100}
    calib_trajectories = calib_trajectories if calib_trajectories is not None else budget["calib_trajectories"]
    iters = iters if iters is not None else budget["iters"]
    act_iters = act_iters if act_iters is not None else budget["act_iters"]
    gac_meta_iters = gac_meta_iters if gac_meta_iters is not None else budget["gac_meta_iters"]
    try:
        gac = GACConfig(meta_iters=gac_meta_iters, inner_lr=gac_inner_lr, meta_lr=gac_meta_lr, tau=gac_tau,
                        meta_optimizer=gac_meta_optimizer,
                        val_fraction=gac_val_fraction, groups=gac_groups, seed=seed)
        cfg = QuantConfig(method=method, preset=preset, wbits=wbits, abits=None if abits == 32 else abits,
                          weight_init=weight_init, skip=tuple(skip) if skip else None, act_mode=act_mode,
                          split_shortcuts=split_shortcuts,
                          recon=ReconConfig(iters=iters, batch_size=recon_batch, lr=recon_lr, seed=seed),
                          act_recon=ActReconConfig(iters=act_iters, batch_size=recon_batch, seed=seed),
                          recon_checkpoints=str(out) + ".recon-ckpt", gac=gac, bias_correction=bias_correction,
                          smooth=smooth, act_granularity=act_granularity, w8_layers=tuple(w8_layer) if w8_layer else None,
                          fmt=fmt, act_fmt=act_fmt, calib=CalibDataConfig(n_trajectories=calib_trajectories, n_steps=record_steps, seed=seed,
                                                draws=gaussian_draws))
        if gdist.relaunch(gpus, device, "gacq quantize"):
            return
        with gdist.session(resolve_device(device)) as dev:
            loaded = load_model(model, device=dev)
            pe = str(prompt_embeds) if prompt_embeds else None
            calib_sampler = SampleConfig(steps=steps, seed=seed, timestep_spacing=timestep_spacing,
                                         class_label=class_label, guidance_scale=guidance_scale, prompt_embeds=pe)
            meta = quantize_to_dir(loaded, cfg, out, calib, calib_sampler, save_calib=save_calib, device=dev,
                                   extra_meta={"quick": quick})
            if gdist.rank() != 0:  # the checkpoint is written; the comparison runs once
                return
            fmts = "".join(f", {what} {f}" for what, f in (("format", fmt), ("inputs", act_fmt)) if f not in (None, "int"))
            typer.echo(f"wrote W{wbits}A{abits} {method} ({preset}{', quick' if quick else ''}{fmts}) checkpoint to "
                       f"{out} in {meta['wall_seconds']:.1f} s")
            if compare_num:
                from .compare import compare as compare_fn

                scfg = SampleConfig(num=compare_num, steps=steps, timestep_spacing=timestep_spacing, seed=seed,
                                    class_label=class_label, guidance_scale=guidance_scale, prompt_embeds=pe)
                rep = compare_fn(loaded, load_model(out, device=dev), scfg, out / "compare", device=dev,
                                 label=f"W{wbits}A{abits} {method}")
                typer.echo(f"compared with the FP model on {compare_num} images (same noise): mean PSNR "
                           f"{rep['psnr_db_mean']:.2f} dB; see {out / 'compare' / 'side_by_side.png'} and report.md")
    except GacqError as e:
        _fail(e)


@app.command("compare")
def compare_cmd(
    model: str = typer.Option(..., "--model", help="The quantized checkpoint (QDIR) or any second model."),
    out: Path = typer.Option(..., "--out", help="Output folder: side_by_side.png, report.md/json, fp/quantized npz."),
    fp_model: Optional[str] = typer.Option(None, "--fp-model", help="The float model; default: the bundled model."),
    num: int = typer.Option(16, min=1, help="Images from each model (same noise)."),
    steps: int = typer.Option(100, min=1, help="DDIM steps."),
    timestep_spacing: str = typer.Option("leading", help="leading, trailing, linspace or quad."),
    seed: int = typer.Option(0, min=0, help="Noise seed."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Sample a float and a quantized model from the same noise; side-by-side grid and a metrics report."""
    from .compare import compare as compare_fn
    from .models import load_model
    from .sampling import SampleConfig
    from .utils import resolve_device

    try:
        dev = resolve_device(device)
        rep = compare_fn(load_model(fp_model, device=dev), load_model(model, device=dev),
                         SampleConfig(num=num, steps=steps, timestep_spacing=timestep_spacing, seed=seed), out,
                         device=dev)
    except GacqError as e:
        _fail(e)
    typer.echo(f"mean PSNR {rep['psnr_db_mean']:.2f} dB over {num} images; wrote {out / 'side_by_side.png'} and "
               f"{out / 'report.md'}")


@app.command()
def methods() -> None:
    """The registered quantization methods and their presets."""
    from .quant.methods import METHOD_DOCS, METHODS, method_spec

    for name in METHODS:
        typer.echo(f"{name}: {METHOD_DOCS.get(name, '')}")
        for preset in ("common", "faithful"):
            s = method_spec(name, preset)
            typer.echo(f"  {preset}: calib={s.calib_selection} init={s.weight_init} recon={s.weight_recon} "
                       f"tib={s.tib} acts={s.act_mode} split={s.split_shortcuts} attn={s.attn_quant} "
                       f"float={list(s.skip) + ([s.skip_fn + '-rule'] if s.skip_fn else [])}")
            for d in s.deviations:
                typer.echo(f"    deviation: {d}")


FEATURES_HELP = ("Feature network: cifar10 (the bundled classifier, default), inception (needs --inception-weights), "
                 "or the folder of a classifier trained with `gacq train-classifier`.")


@app.command("eval")
def eval_cmd(
    samples: Path = typer.Option(..., "--samples", help="samples.npz from `gacq sample`, an image folder or zip, or a stats .npz."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference: stats .npz, dataset or samples; default: bundled CIFAR-10 train stats."),
    features: str = typer.Option("cifar10", "--features", help=FEATURES_HELP),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="FID Inception-v3 weights (.pth state dict or .safetensors)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every metric to this JSON file."),
    batch_size: int = typer.Option(500, min=1, help="Images per feature-network call."),
    pr_k: int = typer.Option(3, min=1, help="Nearest neighbours for precision/recall."),
    pr_max: int = typer.Option(10000, min=2, help="Features kept (uniform subset) for precision/recall."),
    seed: int = typer.Option(0, help="Seed of the precision/recall subset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    gpus: int = typer.Option(1, "--gpus", "--procs", min=1, help=GPUS_HELP + " Feature batch j goes to process j mod N."),
) -> None:
    """FID, sFID, Inception Score and precision/recall of samples against a reference."""
    from . import distributed as gdist
    from .metrics import evaluate, format_result
    from .utils import resolve_device, write_json

    try:
        if gdist.relaunch(gpus, device, "gacq eval"):
            return
        with gdist.session(resolve_device(device)) as dev:
            res = evaluate(samples, ref, features=features, inception_weights=inception_weights, device=dev,
                           batch_size=batch_size, pr_k=pr_k, pr_max=pr_max, seed=seed)
            res["command"] = " ".join(["gacq"] + sys.argv[1:])
            if gdist.rank() != 0:
                return
            if json_out is not None:
                write_json(json_out, res)
    except GacqError as e:
        _fail(e)
    typer.echo(format_result(res))


@app.command()
def stats(
    data: Optional[Path] = typer.Option(None, "--data", help="Images: dataset folder/zip/mosaic zip/npz or samples.npz."),
    out: Path = typer.Option(..., "--out", help="Statistics file to write (.npz)."),
    part_of: Optional[str] = typer.Option(None, "--part-of", metavar="FIRST:TOTAL", help="--data holds images "
                                          "FIRST.. of a run of TOTAL (e.g. `gacq sample --first FIRST`): write part "
                                          "statistics for --merge (FIRST a multiple of 10)."),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="Part statistics files (--part-of) covering one "
                                               "run: write that run's statistics (repeat the option per file)."),
    features: str = typer.Option("cifar10", "--features", help=FEATURES_HELP),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="FID Inception-v3 weights."),
    batch_size: int = typer.Option(500, min=1, help="Images per feature-network call."),
    pr_max: int = typer.Option(10000, min=2, help="Features kept (uniform subset) for precision/recall."),
    seed: int = typer.Option(0, help="Seed of the precision/recall subset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Precompute reference statistics (means, covariances, P/R features, IS sums) of a dataset; or of one part of
    a run sampled in parts (--part-of), and of the whole run from its parts (--merge)."""
    from .metrics import make_part_stats, make_stats, merge_stats_files

    try:
        if (data is None) == (not merge):
            raise GacqError("give --data (images) or --merge (part statistics files), one of them")
        if merge:
            st = merge_stats_files(merge, out)
        elif part_of is not None:
            try:
                first, total = (int(v) for v in part_of.split(":"))
            except ValueError:
                raise GacqError(f"--part-of takes FIRST:TOTAL, e.g. 5000:50000, not {part_of!r}") from None
            st = make_part_stats(data, out, first, total, features=features, inception_weights=inception_weights,
                                 device=device, batch_size=batch_size, pr_max=pr_max, seed=seed)
        else:
            st = make_stats(data, out, features=features, inception_weights=inception_weights, device=device,
                            batch_size=batch_size, pr_max=pr_max, seed=seed)
    except GacqError as e:
        _fail(e)
    typer.echo(f"wrote {out}: {st.n} images, features {st.feature_name} (hash {st.feature_hash})")


@app.command()
def ranges(
    calib: Path = typer.Option(..., "--calib", help="Calibration set from `gacq calib` (best: --selection all, every sampling step)."),
    out: Path = typer.Option(..., "--out", help="Output folder: ranges.json/.csv/.md, ranges_heatmap.png, outliers.png."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    max_per_step: int = typer.Option(32, "--max-per-step", min=1, help="Calibration samples per sampling step."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Input range of every conv/linear layer per sampling step, and its outliers (heatmap, bar plot, CSV)."""
    from .act_ranges import ranges as ranges_fn
    from .utils import resolve_device

    try:
        summary = ranges_fn(model, calib, out, max_per_step=max_per_step, device=resolve_device(device),
                            command=" ".join(["gacq"] + sys.argv[1:]))
    except GacqError as e:
        _fail(e)
    typer.echo(f"{summary['layers']} layers x {summary['steps']} steps: median step range "
               f"{summary['median_step_width_over_all']:.3f} of the all-steps range; largest outlier ratio "
               f"{summary['outlier_ratio_max']['ratio']:.2f} ({summary['outlier_ratio_max']['layer']}); wrote {out}")


@app.command()
def diagnose(
    calib: Path = typer.Option(..., "--calib", help="Calibration set from `gacq calib` (its sampling steps are the heatmaps' axes; with a gac --qdir: the set it was calibrated on)."),
    out: Path = typer.Option(..., "--out", help="Output folder: cosine_init/ and cosine_calibrated/ heatmaps, alignment and weight-per-timestep plots, CSVs, diagnose.json."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " With --qdir: the checkpoint's base model when it names one."),
    qdir: Optional[Path] = typer.Option(None, "--qdir", help="Quantized checkpoint: adds its calibrated model's heatmaps and, for gac, learned weight vs gradient alignment."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Comma-separated block (reconstruction unit) names; default: all."),
    max_per_step: int = typer.Option(32, "--max-per-step", min=1, help="Calibration samples per sampling step in each step's gradient."),
    groups: int = typer.Option(50, "--groups", min=2, help="Weight-sorted sample groups of the alignment figure (paper: 50)."),
    wbits: int = typer.Option(4, "--wbits", help="Weight bits of the round-to-nearest model when no --qdir is given."),
    alignment: Optional[bool] = typer.Option(None, "--alignment/--no-alignment", help="Require (or skip) the GAC weight figures; default: when the checkpoint has GAC weights."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Gradient diagnostics (the GAC paper's Figures 1a and 2): timestep gradient conflict and learned weights."""
    from .diagnostics import diagnose as diagnose_fn
    from .utils import resolve_device

    try:
        names = [b.strip() for b in blocks.split(",") if b.strip()] if blocks is not None else None
        if names is not None and not names:
            raise GacqError("--blocks needs at least one block name")
        summary = diagnose_fn(qdir, model, calib, out, blocks=names, max_per_step=max_per_step,
                              device=resolve_device(device), n_groups=groups, wbits=wbits, alignment=alignment,
                              command=" ".join(["gacq"] + sys.argv[1:]))
    except GacqError as e:
        _fail(e)
    md = summary["cosine"]["mean_distance"]["mean"]
    line = f"mean cosine distance between timestep gradients: {md['init']:.4f} at the grid init"
    if md.get("calibrated") is not None:
        line += f", {md['calibrated']:.4f} calibrated"
    typer.echo(line)
    if isinstance(summary.get("alignment"), dict):
        r = summary["alignment"]["correlation"]["mean"]
        typer.echo(f"learned weight vs gradient alignment: Pearson r = {r if r is not None else float('nan'):.3f} "
                   f"({summary['alignment']['n_groups']} groups)")
    typer.echo(f"wrote {len(summary['files'])} files to {out} (summary: {out / 'diagnose.json'})")


@app.command()
def info(model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP)) -> None:
    """Describe a model: class, parameters, sample shape, noise schedule."""
    from .models import count_parameters, load_model

    try:
        loaded = load_model(model)
    except GacqError as e:
        _fail(e)
    m = loaded.model
    desc = {
        "source": loaded.source,
        "class": type(m).__name__,
        "parameters": count_parameters(m),
        "sample_shape": list(loaded.sample_shape),
        "scheduler": {k: loaded.scheduler_config[k] for k in ("num_train_timesteps", "beta_schedule",
                                                                "beta_start", "beta_end", "prediction_type")
                      if k in loaded.scheduler_config},
    }
    typer.echo(json.dumps(desc, indent=2))


@app.command()
def configs() -> None:
    """List the named model configs and their parameter counts."""
    from .models import NAMED_CONFIGS, build_model, count_parameters

    for name, cfg in NAMED_CONFIGS.items():
        n = count_parameters(build_model(name))
        shape = f"channels {tuple(cfg['block_out_channels'])}" if "block_out_channels" in cfg else \
            f"{cfg['num_layers']} blocks, width {cfg['num_attention_heads'] * cfg['attention_head_dim']}"
        kind = cfg.get("_class_name", "UNet2DModel") + (", class-conditional" if "num_class_embeds" in cfg or
                                                         "num_embeds_ada_norm" in cfg else "")
        typer.echo(f"{name:14s} {n / 1e6:8.3f}M params  {cfg['sample_size']}x{cfg['sample_size']}  {shape}  ({kind})")
    from .models import AE_CONFIGS, build_autoencoder

    typer.echo("autoencoders (gacq train-autoencoder):")
    for name, cfg in AE_CONFIGS.items():
        n = count_parameters(build_autoencoder(name))
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        s, c = cfg["sample_size"], cfg["latent_channels"]
        typer.echo(f"{name:14s} {n / 1e6:8.3f}M params  {s}x{s} -> {s // f}x{s // f}x{c} latents  "
                   f"channels {tuple(cfg['block_out_channels'])}  (AutoencoderKL)")

experiment_app = typer.Typer(no_args_is_help=True, help="Run a grid of table cells from a TOML spec (see gacq.experiment).")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def experiment_run(
    spec: Path = typer.Argument(..., help="Experiment spec (TOML)."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Comma-separated cell ids to run, in this order (default: all, in the spec's order)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Cell groups run at once as separate processes."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    results: Optional[Path] = typer.Option(None, "--results", help="Write (and look for) cell results here "
                                           "instead of the spec's results folder."),
    fused_fake_quant: bool = typer.Option(True, "--fused-fake-quant/--no-fused-fake-quant", help="Sample quantized "
                                          "cells with `gacq sample --fused-fake-quant`'s one-kernel activation "
                                          "quantization (bitwise the same values; recorded in each cell's JSON)."),
    deadline: Optional[float] = typer.Option(None, "--deadline", min=0, help="Seconds from now after which no "
                                             "new part of a cell sampled in parts is started, nor one that would "
                                             "not end by then (judged by the last part's time); such a run exits "
                                             "with code 3 and a rerun resumes. For device calls of fixed length."),
    parts: Optional[str] = typer.Option(None, "--parts", help="Sample only these parts (1-based: 8-10, 1,3) of "
                                        "cells sampled in parts, leaving the others to other runs (exit code 3 "
                                        "while a cell misses parts; a run that finds all its parts merges them); "
                                        "'none' quantizes and samples nothing; per cell, 'CELL=8-10; CELL2=1-4' "
                                        "(cells not named sample nothing), as `gacq experiment plan` prints."),
) -> None:
    """Calibrate, quantize, sample and evaluate every unfinished cell; rerun to resume."""
    import contextlib
    import os
    import time

    from .experiment import (DEADLINE_ENV, PARTS_ENV, STOPPED_EXIT, StoppedEarly, load_spec, parse_cell_parts,
                             run_experiment)
    from .quant.primitives import use_fused_fake_quant

    try:
        if deadline is not None:
            os.environ[DEADLINE_ENV] = str(time.time() + deadline)  # the --parallel processes inherit it
        if parts is not None:
            parse_cell_parts(parts)  # a bad value fails here, not in each cell process
            os.environ[PARTS_ENV] = parts
        s = load_spec(spec, results=results)
        only = [c.strip() for c in cells.split(",") if c.strip()] if cells else None
        if fused_fake_quant:
            os.environ["GACQ_FUSED_FAKE_QUANT"] = "1"  # the --parallel processes read it at import
        with use_fused_fake_quant() if fused_fake_quant else contextlib.nullcontext():
            run_experiment(s, only=only, parallel=parallel, command=" ".join(["gacq"] + sys.argv[1:]),
                           progress=not quiet, echo=typer.echo)
    except StoppedEarly as e:
        typer.echo(f"stopped: {e}")
        raise typer.Exit(code=STOPPED_EXIT) from None
    except GacqError as e:
        _fail(e)
    typer.echo(f"cell results in {s.cell_dir}; render them with `gacq report {s.results}`")


@experiment_app.command("list")
def experiment_list(
    spec: Path = typer.Argument(..., help="Experiment spec (TOML)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Look for cell results here instead of "
                                           "the spec's results folder."),
) -> None:
    """The spec's cells, their quantization jobs and whether they are done; for done cells their recorded wall times
    (the whole cell's last run, its quantization job's, its sampling's), to size the next runs."""
    from .experiment import cell_parts, cell_status, cell_times, load_spec, quant_job_of, sampled_in_last_run

    try:
        s = load_spec(spec, results=results)
    except GacqError as e:
        _fail(e)
    for c in s.cells:
        job, float_acts, _ = quant_job_of(s, c)
        how = "" if job is None else f"  <- {job}" + (" (float acts)" if float_acts else "")
        times = cell_times(s, c)
        took = "" if not times else "  [" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "]"
        share = sampled_in_last_run(s, c)
        took += f"  [sampled {share[0]} of its {share[1]} images in that run]" if share else ""
        parts = None if times else cell_parts(s, c)
        took += f"  [parts {parts[0]} of {parts[1]} sampled]" if parts else ""
        typer.echo(f"{cell_status(s, c):8s} {c.id}{how}{took}")


@experiment_app.command("plan")
def experiment_plan(
    spec: Path = typer.Argument(..., help="Experiment spec (TOML)."),
    parts_per_call: int = typer.Option(..., "--parts-per-call", "-n", min=1, help="Parts the next run (a device "
                                       "call) should sample: about (its seconds - first part) / a part's seconds."),
    cells: Optional[str] = typer.Option(None, "--cells", help="Comma-separated cell ids to plan, in this order "
                                        "(default: all, in spec order)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Look for cell results here instead of "
                                           "the spec's results folder."),
) -> None:
    """The next run's share of the parts not yet in the work folder, cell by cell: prints CELLS=... and PARTS=...
    lines for `gacq experiment run --cells "$CELLS" --parts "$PARTS"` (or scripts/gpu-dit-call.sh), so that a run on
    a machine that has none of the parts samples only missing ones."""
    from .experiment import load_spec, plan_parts

    try:
        s = load_spec(spec, results=results)
        only = [c.strip() for c in cells.split(",") if c.strip()] if cells else None
        chosen, parts, notes = plan_parts(s, parts_per_call, only=only)
    except GacqError as e:
        _fail(e)
    for line in notes:
        typer.echo(f"# {line}", err=True)
    if not chosen:
        typer.echo("# no part is missing: every cell sampled in parts is done or has all its parts here", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"CELLS={','.join(chosen)}")
    typer.echo(f"PARTS='{parts}'")


@experiment_app.command("diagnostics")
def experiment_diagnostics(
    spec: Path = typer.Argument(..., help="Experiment spec (TOML)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Write into this results folder instead of "
                                           "the spec's."),
) -> None:
    """For every finished gac checkpoint in the spec's work folder (say, fetched back from a GPU run), its learned
    sample weights per sampling step as <results>/diagnostics/<job>.json, which `gacq report` plots
    (`gacq experiment run` writes them itself for the checkpoints it makes or uses)."""
    from .experiment import load_spec, write_gac_diagnostics

    try:
        written = write_gac_diagnostics(load_spec(spec, results=results))
    except GacqError as e:
        _fail(e)
    for f in written:
        typer.echo(f"wrote {f}")
    typer.echo(f"{len(written)} new GAC weight profile(s)")


@app.command()
def report(
    results: Path = typer.Argument(..., help="Folder with experiment cell JSONs (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write [RESULTS/README.md]; the HTML page and FID plot go next to it."),
    title: Optional[str] = typer.Option(None, "--title", help="Heading of the report."),
) -> None:
    """Render experiment results as markdown + HTML tables, an FID plot, the sample grids and the diagnostics
    (GAC's learned sample weights per sampling step, where `gacq experiment run` or `gacq experiment diagnostics`
    wrote them)."""
    from .report import render

    try:
        info = render(results, out or results / "README.md", title)
    except GacqError as e:
        _fail(e)
    typer.echo(f"{info['cells']} cells in {info['groups']} table entries: wrote {info['markdown']} and {info['html']}")


from .cli_export import register as _register_export  # noqa: E402

_register_export(app)


def main() -> None:
    """The `gacq` entry point. A torchrun worker that formed a process group leaves through
    `distributed.exit_now`, skipping the interpreter's finalization, where gloo can abort the process
    after the command succeeded."""
    try:
        _main()
    except SystemExit as e:
        _leave_if_formed_group(e.code)
        raise
    _leave_if_formed_group(0)


def _leave_if_formed_group(code: int | str | None) -> None:
    gdist = sys.modules.get(f"{__package__}.distributed")  # not imported: no group (and no torch import here)
    if gdist is not None and gdist.formed_group():
        gdist.exit_now(code)


def _main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = app
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun worker: its summary shows uncaught errors
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(app)
    try:
        run()
    except GacqError as e:  # errors raised outside a command's own handler
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as e:  # the file system refused (missing folder, no permission, disk full): say which path
        if os.environ.get("GACQ_TRACEBACK"):
            raise
        where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        typer.secho(f"error: {e.strerror or e}{': ' + where if where else ''} (GACQ_TRACEBACK=1 shows where it "
                    "was raised)", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
