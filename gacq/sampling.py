"""Sampling with diffusers schedulers: per-sample seeds, sharded resumable output.

Seeds belong to samples, not batches: sample i of seed s starts from noise
drawn by its own CPU `torch.Generator` (seeded by `sample_seed(s, i)`), and every
later random draw of that sample (DDPM, DDIM with eta > 0) comes from the same
generator. The same seed therefore gives the same images whatever the batch
size, the shard size or the device the noise is used on.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import GacqError
from .models import LoadedModel
from .utils import atomic_path, git_commit, image_grid, machine_info, save_image, write_json

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "ddpm", "dpm")
# SampleConfig fields a run records only when set otherwise, so that folders (and experiment parts) sampled before the
# field existed still resume: their run.json / meta.json read as these values
RUN_DEFAULTS = {"first": 0, "compile": False}
SPACINGS = ("leading", "trailing", "linspace", "quad")


@dataclass(frozen=True)
class SampleConfig:
    """How to sample.

    Attributes:
        scheduler: 'ddim', 'ddpm' (ancestral) or 'dpm' (DPM-Solver++ 2M, a fast option).
        steps: number of denoising steps.
        eta: DDIM's eta (0 = deterministic DDIM).
        num: number of images.
        batch_size: images per model call (does not change the images).
        seed: base seed; sample i uses the generator seed `sample_seed(seed, i)`.
        shard_size: images per shard file; a killed run resumes at the first missing shard.
        timestep_spacing: diffusers' timestep spacing ('leading', 'trailing', 'linspace'), or 'quad'
            (DDIM only: the original DDIM code's quadratic skip, used by Q-Diffusion / TFMQ-DM on CIFAR-10).
        precision: 'fp32' or 'bf16' (autocast; GPU only).
        class_label: class-conditional models: this label for every image (None: balanced,
            image i gets label i mod classes).
        guidance_scale: classifier-free guidance (1: the conditional prediction alone).
        prompt_embeds: text-conditioned models: a safetensors file of stored encoder states
            (`gacq.conditioning.load_prompt_embeds`); image i uses prompt i mod P.
        first: the index of the first image: images first .. first + num - 1 of the run of `seed` (their noise,
            labels and prompts are those images'), so that one run can be made in parts (`gacq experiment run`
            samples large cells in parts of 5,000 so).
        compile: torch.compile the model call (one static graph per batch shape) and, on CUDA, replay each
            denoising step as one CUDA graph (`gacq bench`'s fastest modes): faster where launches or unfused
            elementwise work (fake quantization, exported low-bit layers) dominate. Compiled kernels round
            differently from eager ones, so the images are close to, not bitwise equal to, the eager run's;
            a folder records it and refuses to mix the two.
    """

    scheduler: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    num: int = 64
    batch_size: int = 64
    seed: int = 0
    shard_size: int = 5000
    timestep_spacing: str = "leading"
    precision: str = "fp32"
    class_label: int | None = None
    guidance_scale: float = 1.0
    prompt_embeds: str | None = None
    first: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise GacqError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.timestep_spacing not in SPACINGS:
            raise GacqError(f"unknown timestep spacing {self.timestep_spacing!r}; choose {', '.join(SPACINGS)}")
        for name in ("steps", "num", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise GacqError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.eta <= 1.0:
            raise GacqError(f"--eta must be in [0, 1], got {self.eta}")
        if self.first < 0:
            raise GacqError(f"--first must be at least 0, got {self.first}")
        if not 0 <= self.seed < 2**31:
            raise GacqError(f"--seed must be in [0, 2^31), got {self.seed}")
        if self.guidance_scale < 0:
            raise GacqError(f"--guidance-scale must be at least 0, got {self.guidance_scale}")
        if self.precision not in ("fp32", "bf16"):
            raise GacqError(f"--precision must be fp32 or bf16, got {self.precision!r}")


def make_scheduler(cfg: SampleConfig, scheduler_config: dict[str, Any]):
    """A diffusers scheduler for the model's noise schedule, set to `cfg.steps` steps."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    base["timestep_spacing"] = cfg.timestep_spacing
    if cfg.timestep_spacing == "quad":
        if cfg.scheduler != "ddim":
            raise GacqError("--timestep-spacing quad exists only for the ddim scheduler (as in the DDIM code)")
        base["timestep_spacing"] = "leading"  # diffusers does not know 'quad'; QuadDDIMScheduler overrides it
        sched = quad_ddim_class().from_config(base)
    elif cfg.scheduler == "ddim":
        sched = DDIMScheduler.from_config(base)
    elif cfg.scheduler == "ddpm":
        sched = DDPMScheduler.from_config(base)
    else:
        sched = DPMSolverMultistepScheduler.from_config(
            {**base, "algorithm_type": "dpmsolver++", "solver_order": 2}
        )
    num_train = sched.config.num_train_timesteps
    if cfg.steps > num_train:
        raise GacqError(f"--steps {cfg.steps} exceeds the model's {num_train} training timesteps")
    sched.set_timesteps(cfg.steps)
    return sched


@functools.lru_cache(maxsize=None)
def quad_ddim_class():
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class QuadDDIMScheduler(DDIMScheduler):
        """DDIM with the original code's 'quad' skip type (Song et al., `ddim` repo, used by Q-Diffusion
        and TFMQ-DM on CIFAR-10): seq = int(linspace(0, sqrt(0.8 T), steps)^2), walked from the top;
        the step from seq[i] goes to seq[i-1] (to 'alpha = 1' after seq[0]).

        diffusers' DDIMScheduler assumes a constant stride (prev = t - T // steps), so the step is
        written out here (the same generalized DDIM update; `clip_sample` as configured). The
        sequence keeps the original's repeated 0s (four of them at 100 steps): those steps leave
        x unchanged at eta 0, as in the original.
        """

        def set_timesteps(self, num_inference_steps: int, device=None):
            T = self.config.num_train_timesteps
            seq = (np.linspace(0, np.sqrt(T * 0.8), num_inference_steps) ** 2).astype(np.int64)
            self.num_inference_steps = num_inference_steps
            self.timesteps = torch.from_numpy(seq[::-1].copy()).to(device)
            self._pos = 0  # position-based: repeated t values need the step counter, not t

        def _alpha(self, t: int) -> torch.Tensor:
            return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0, dtype=self.alphas_cumprod.dtype)

        def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, variance_noise=None,
                 return_dict: bool = True, **_):
            seq = self.timesteps.tolist()
            i = self._pos
            if int(seq[i]) != int(timestep):
                raise GacqError(f"quad DDIM stepped out of order: expected t={seq[i]}, got {int(timestep)}")
            t, t_next = int(seq[i]), (int(seq[i + 1]) if i + 1 < len(seq) else -1)
            self._pos = (i + 1) % len(seq)
            at, at_next = self._alpha(t).to(sample.dtype), self._alpha(t_next).to(sample.dtype)
            x0 = (sample - (1 - at).sqrt() * model_output) / at.sqrt()
            if self.config.clip_sample:
                x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
            c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).clamp(min=0).sqrt()
            c2 = ((1 - at_next) - c1 ** 2).clamp(min=0).sqrt()
            prev = at_next.sqrt() * x0 + c2 * model_output
            if eta > 0:
                if variance_noise is None:
                    variance_noise = randn_tensor(model_output.shape, generator=generator,
                                                  device=model_output.device, dtype=model_output.dtype)
                prev = prev + c1 * variance_noise
            if not return_dict:
                return (prev, x0)
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    return QuadDDIMScheduler


_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A bijection of 32-bit integers (the 'lowbias32' integer hash)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` under base `seed`.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so
    (seed, index) is mapped into 32 bits: `_mix32((_mix32(seed) + index) mod 2^32)`.
    For a fixed seed this is injective in the index, so no two samples of one
    run (fewer than 2^32 of them) share their noise.
    """
    return _mix32((_mix32(seed & _M32) + index) & _M32)


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per sample index."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, int(i))) for i in indices]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    cfg: SampleConfig,
    indices: range | list[int],
    device: torch.device | str = "cpu",
    model_fn: Callable[..., torch.Tensor] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> np.ndarray:
    """Sample the images with the given indices in one batch; returns uint8 (N, H, W, C).

    `model_fn(x, t, cond)` replaces the model's noise prediction (`gacq.conditioning.predict_eps`);
    with guidance it sees the conditional and the unconditional branch in one batch.
    `on_step(fraction_of_batch_done)` is called after every denoising step (progress bars).
    Conditioning (class labels or stored encoder states, and the unconditional branch under
    guidance) comes from `gacq.conditioning.sample_conditioning`.
    """
    from .conditioning import guided_eps, predict_eps, sample_conditioning, slice_cond

    device = torch.device(device)
    model = loaded.model
    c, h, w = loaded.sample_shape
    gens = sample_generators(cfg.seed, indices)
    cond, uncond = sample_conditioning(model, indices, cfg.class_label, cfg.prompt_embeds, cfg.guidance_scale)
    cond, uncond = slice_cond(cond, slice(None), device), slice_cond(uncond, slice(None), device)
    x = torch.stack([torch.randn((c, h, w), generator=g) for g in gens]).to(device)
    sched = make_scheduler(cfg, loaded.scheduler_config)
    x = x * sched.init_noise_sigma
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    step_kwargs = {"eta": cfg.eta} if cfg.scheduler == "ddim" else {}
    if cfg.scheduler != "dpm":
        step_kwargs["generator"] = gens
    if cfg.compile and model_fn is not None:
        raise GacqError("compile applies to gacq's own model call; a custom model_fn runs eagerly")
    if model_fn is not None:
        fn = model_fn
    elif cfg.compile:
        fn = functools.partial(_compiled_predict_eps(), model)
    else:
        fn = functools.partial(predict_eps, model)

    def eps_of(inp: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            return guided_eps(fn, inp, tt, cond, uncond, cfg.guidance_scale)

    from .quant.modules import frozen_weights

    with frozen_weights(model):  # quantize each weight once, not at every step
        step_eps = eps_of
        for i, t in enumerate(sched.timesteps):
            if loaded.step_hook is not None:
                loaded.step_hook(i, cfg)  # in place: a captured graph reads the step's set
            inp = sched.scale_model_input(x, t)
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            if cfg.compile and device.type == "cuda" and step_eps is eps_of:  # captured at the first step
                step_eps = graphed_call(eps_of, inp, tt)
            eps = step_eps(inp, tt)
            x = sched.step(eps.float(), t, x, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(len(gens) / len(sched.timesteps))
    if loaded.vae is not None:  # latent diffusion: only the denoiser above is (ever) quantized
        x = loaded.decode(x)
    return to_uint8(x)


@functools.cache
def _compiled_predict_eps():
    """`predict_eps` under torch.compile, made once per process: Dynamo caches a static graph per model, batch shape
    and conditioning (guarded on each), so later batches and runs of the same model reuse the compilation."""
    from .conditioning import predict_eps

    return torch.compile(predict_eps, dynamic=False)


def cuda_graph_replay(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """`fn` captured as one CUDA graph (warm-up calls on a side stream first, as torch.cuda.graphs
    requires): the returned replay runs every kernel of one call with a single launch, which takes the
    host's per-kernel launch cost out of the step. (`gacq bench` times its graph modes with it.)"""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_call(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor):
    """`fn(x, t)` captured as one CUDA graph on static copies of x and t (`cuda_graph_replay`, two warm-up calls).
    The returned call copies its inputs into the static ones, replays the graph and returns a copy of the output (a
    later replay overwrites the graph's own). Buffers the model reads (weights, per-step activation grids written in
    place by a step hook) are read at replay time."""
    x_in, t_in = x.clone(), t.clone()
    out: dict[str, torch.Tensor] = {}

    def call() -> None:
        out["eps"] = fn(x_in, t_in)

    replay_graph = cuda_graph_replay(call, x.device, warmup=2)

    def replay(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        x_in.copy_(xs)
        t_in.copy_(ts)
        replay_graph()
        return out["eps"].clone()

    return replay


def advance(bar) -> Callable[[float], None]:
    """`generate`'s on_step for a tqdm bar counting images: advances it by each step's fraction of the batch, clamped
    to the bar's total (the fractions' float sum can pass it by a rounding error, and tqdm then warns)."""
    return lambda fraction: bar.update(min(fraction, bar.total - bar.n))


def _check_run(out: Path, run: dict[str, Any]) -> None:
    run_file = out / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old != run:
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            raise GacqError(
                f"{out} holds samples made with other settings ({', '.join(diff)} differ); "
                "use another --out, or delete the folder to start over"
            )
    else:
        write_json(run_file, run)


def sample(
    loaded: LoadedModel,
    cfg: SampleConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    model_fn: Callable[..., torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample `cfg.num` images into `out/` (samples.npz, grid.png, meta.json); resumable.

    Shards of `cfg.shard_size` images are written to `out/shards/` as they
    finish; rerunning the same command skips the finished shards.
    Under a process group (`gacq.distributed`) every rank calls this: shard k is made by
    rank k mod world, and rank 0 assembles the output after all shards are in. The images
    are those of one process (per-image seeds); a rerun resumes with any number of ranks.
    Returns the metadata written to meta.json (on every rank).
    """
    from . import distributed as gdist
    from .conditioning import sample_conditioning

    out = Path(out)
    # refuses missing or mismatched conditioning before anything is written
    sample_conditioning(loaded.model, range(1), cfg.class_label, cfg.prompt_embeds, cfg.guidance_scale)
    if loaded.step_hook is not None:
        loaded.step_hook(0, cfg)  # a model calibrated for one sampler refuses another before anything is written
    device = torch.device(device)
    run = {"model": loaded.source, **{k: v for k, v in asdict(cfg).items()
                                      if k != "batch_size" and not (k in RUN_DEFAULTS and v == RUN_DEFAULTS[k])}}
    shard_dir = out / "shards"
    n_shards = -(-cfg.num // cfg.shard_size)
    start = time.time()
    done_before = gdist.on_rank0(lambda: _prepare(out, run, n_shards), "checking the output folder")
    rank, world = gdist.rank(), gdist.world_size()
    if world > n_shards and rank == 0:
        log.warning("%d shard(s) for %d ranks: some ranks idle; lower --shard-size", n_shards, world)
    mine = gdist.owned(n_shards, rank, world)
    bar = tqdm(total=sum(min(cfg.num, (k + 1) * cfg.shard_size) - k * cfg.shard_size for k in mine),
               desc="sampling" + (f" (rank 0 of {world})" if world > 1 else ""), unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]")
    made = written = 0
    for k in mine:
        lo, hi = k * cfg.shard_size, min(cfg.num, (k + 1) * cfg.shard_size)
        path = shard_dir / f"shard_{k:05d}.npz"
        if path.exists():
            bar.update(hi - lo)
            continue
        parts = []
        for b in range(lo, hi, cfg.batch_size):
            idx = range(cfg.first + b, cfg.first + min(hi, b + cfg.batch_size))
            parts.append(generate(loaded, cfg, idx, device, model_fn, on_step=advance(bar)))
            made += len(idx)
            bar.n = round(bar.n)  # undo float drift of the per-step fractions
            bar.set_postfix(img_s=f"{made / max(time.time() - start, 1e-9):.2f}")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=np.concatenate(parts))
        written += 1
        gdist.fail_for_test(written, f"writing {written} shard(s), the last {path.name}")
    bar.close()
    gdist.barrier("waiting for every rank's shards")
    made = sum(gdist.all_gather_object(made, "counting the images made"))
    from .quant import primitives

    stats = {"device": str(device), "world_size": world, "images_made_this_run": made, "shards_resumed": done_before,
             "fused_fake_quant": primitives._FUSED,
             "matmul_tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
    return gdist.on_rank0(lambda: _assemble(loaded, cfg, out, n_shards, run, stats, start), "writing samples.npz")


def _prepare(out: Path, run: dict[str, Any], n_shards: int) -> int:
    """Create the output folder (or check that it holds this run); returns the finished shards."""
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, run)
    (out / "shards").mkdir(exist_ok=True)
    return sum((out / "shards" / f"shard_{k:05d}.npz").exists() for k in range(n_shards))


def _assemble(loaded: LoadedModel, cfg: SampleConfig, out: Path, n_shards: int, run: dict[str, Any],
              stats: dict[str, Any], start: float) -> dict[str, Any]:
    """Join the shards into samples.npz, grid.png and meta.json."""
    from .conditioning import sample_labels

    shard_dir = out / "shards"
    missing = [k for k in range(n_shards) if not (shard_dir / f"shard_{k:05d}.npz").exists()]
    if missing:
        raise GacqError(f"{shard_dir} lacks shard(s) {missing[:5]} after every rank finished; rerun to make them")
    images = np.concatenate([np.load(shard_dir / f"shard_{k:05d}.npz")["images"] for k in range(n_shards)])
    labels = sample_labels(loaded.model, range(cfg.first, cfg.first + cfg.num), cfg.class_label)
    extra = {"labels": labels.numpy()} if labels is not None else {}
    with atomic_path(out / "samples.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, **extra)
    save_image(image_grid(images[:64]), out / "grid.png")
    meta = {
        **run,
        "batch_size": cfg.batch_size,
        "shape": list(images.shape),
        "device": stats["device"],
        "world_size": stats["world_size"],
        "wall_seconds_this_run": round(time.time() - start, 2),
        "images_made_this_run": stats["images_made_this_run"],
        "shards_resumed": stats["shards_resumed"],
        "fused_fake_quant": stats["fused_fake_quant"],
        "matmul_tf32": stats["matmul_tf32"],
        "commit": git_commit(),
        "machine": machine_info(),
    }
    write_json(out / "meta.json", meta)
    return meta
