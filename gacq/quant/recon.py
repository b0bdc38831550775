"""BRECQ-style block reconstruction with AdaRound, with per-sample loss weights (the hook GAC needs).

Units are found by type: a module of one of `block_types()` is a block; a quantized layer outside
any block is a layer unit. Units are reconstructed in execution order, found by running the model
once (definition order differs: diffusers' Attn*Block2D define their attentions before their resnets).

Inputs and targets follow the baselines' weight stage (baselines.md §3.2): the unit's input comes
from the quantized model (weights quantized everywhere; already reconstructed units hard-rounded,
the rest round-to-nearest; activations in FP), the target is the FP model's output of that unit on
its FP input. Models run in eval mode (dropout off): the "sane" choice, unlike the released code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import GacqError
from ..utils import atomic_path, write_json
from .config import ActReconConfig, ReconConfig  # noqa: F401 (defined there, torch-free)
from .modules import QuantLayer
from .quantizer import beta_schedule


def block_types() -> tuple[type, ...]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, Attention, BasicTransformerBlock)


def trainable_layers(unit: nn.Module) -> list[QuantLayer]:
    """The quantized layers of a unit that block reconstruction trains: all but those marked
    `recon_frozen` (layers already reconstructed elsewhere, e.g. TFMQ-DM's temporal block)."""
    return [m for m in unit.modules() if isinstance(m, QuantLayer) and not getattr(m, "recon_frozen", False)]


def find_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-most blocks and the quantized layers outside any block, in definition order.

    Blocks whose quantized layers are all frozen, and frozen layers, are not units."""
    types = block_types()
    units, inside = [], None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if isinstance(m, types) and any(isinstance(c, QuantLayer) for c in m.modules()):
            inside = name
            if trainable_layers(m):
                units.append((name, m))
        elif isinstance(m, QuantLayer) and not getattr(m, "recon_frozen", False):
            units.append((name, m))
    return units


@torch.no_grad()
def order_by_execution(model: nn.Module, units: list[tuple[str, nn.Module]], run_once: Callable[[nn.Module], None]
                       ) -> list[tuple[str, nn.Module]]:
    """Sort units by the first time each is called in `run_once(model)`."""
    seen: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(name) if name not in seen else None)
               for name, m in units]
    try:
        run_once(model)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in units if name not in seen]
    if missing:
        raise GacqError(f"units never called by the model's forward: {', '.join(missing)}")
    rank = {name: i for i, name in enumerate(seen)}
    return sorted(units, key=lambda u: rank[u[0]])


def lp_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The baselines' lp_loss before the batch mean: |pred - target|^p summed over dim 1 (channels),
    averaged over the remaining non-batch dims; one value per sample."""
    err = (pred - target).abs().pow(p)
    if err.ndim == 1:
        return err
    err = err.sum(1)
    return err.flatten(1).mean(1) if err.ndim > 1 else err


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_unit_io(model: nn.Module, unit: nn.Module, run: Callable[[nn.Module, int, int], None], n: int,
                    batch_size: int, want_output: bool) -> tuple[list[torch.Tensor], dict, torch.Tensor | None]:
    """Record the unit's tensor positional args (and output) for samples 0..n-1.

    `run(model, lo, hi)` must call the model on calibration samples lo..hi-1. Non-tensor kwargs
    and tensor kwargs are recorded as well (tensor kwargs per sample).
    """
    args_store: list[list[torch.Tensor]] = []
    kw_store: dict[str, list] = {}
    outs: list[torch.Tensor] = []

    def keep(v):
        # contiguous(): up-block inputs arrive with channels-last strides (diffusers' torch.cat), and
        # backward through a ResnetBlock2D on such a tensor segfaulted in torch 2.13.0 (CPU).
        return v.detach().cpu().contiguous() if torch.is_tensor(v) else v

    def hook(mod, args, kwargs, output):
        args_store.append([keep(a) for a in args])
        for k, v in kwargs.items():
            kw_store.setdefault(k, []).append(keep(v))
        if want_output:
            outs.append(output.detach().cpu() if torch.is_tensor(output) else output[0].detach().cpu())
        raise _Stop

    h = unit.register_forward_hook(hook, with_kwargs=True)
    try:
        for lo in range(0, n, batch_size):
            try:
                run(model, lo, min(n, lo + batch_size))
            except _Stop:
                pass
    finally:
        h.remove()
    if not args_store:
        raise GacqError(f"no calibration sample reached unit {type(unit).__name__}")
    n_args = len(args_store[0])
    args = [torch.cat([a[i] for a in args_store]) if torch.is_tensor(args_store[0][i]) else args_store[0][i]
            for i in range(n_args)]
    kwargs = {k: (torch.cat(v) if torch.is_tensor(v[0]) else v[0]) for k, v in kw_store.items()}
    return args, kwargs, (torch.cat(outs) if want_output else None)


class UnitData:
    """A unit's cached inputs (positional + keyword) and targets, on the device, with per-sample
    loss weights; `losses(idx)` gives N * w_i * lp_i for a minibatch (the mean of which is the
    plain batch mean for uniform weights, GAC Algorithm 1)."""

    def __init__(self, unit: nn.Module, args: list, kwargs: dict, target: torch.Tensor, p: float,
                 sample_weights: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        self.unit, self.p = unit, p
        self.n = n = len(target)
        if sample_weights is not None and sample_weights.shape != (n,):
            raise GacqError(f"sample weights have shape {tuple(sample_weights.shape)}, expected ({n},)")
        self.device = torch.device(device)
        self.w = (sample_weights if sample_weights is not None else torch.full((n,), 1.0 / n)).to(self.device)
        # The whole cache goes to the device once (baselines.md §7.15: per-iteration copies are the slow path).
        self.args = [a.to(self.device) if torch.is_tensor(a) else a for a in args]
        self.per_sample = {k for k, v in kwargs.items() if torch.is_tensor(v) and v.shape[:1] == (n,)}
        self.kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.target = target.to(self.device)

    def inputs(self, idx: torch.Tensor) -> tuple[list, dict]:
        a = [x[idx] if torch.is_tensor(x) else x for x in self.args]
        k = {key: (v[idx] if key in self.per_sample else v) for key, v in self.kwargs.items()}
        return a, k

    def output(self, idx: torch.Tensor) -> torch.Tensor:
        a, k = self.inputs(idx)
        out = self.unit(*a, **k)
        return out if torch.is_tensor(out) else out[0]

    def per_sample_loss(self, idx: torch.Tensor) -> torch.Tensor:
        return lp_loss_per_sample(self.output(idx), self.target[idx], self.p)

    def losses(self, idx: torch.Tensor) -> torch.Tensor:
        return self.n * self.w[idx] * self.per_sample_loss(idx)

    @torch.no_grad()
    def full_loss(self, chunk: int = 256) -> float:
        total = sum(float(self.losses(torch.arange(lo, min(self.n, lo + chunk), device=self.device)).sum())
                    for lo in range(0, self.n, chunk))
        return total / self.n

    def plan(self, iters: int, batch_size: int, seed: int) -> torch.Tensor:
        return batch_plan(self.n, iters, batch_size, seed, self.device)


def batch_plan(n: int, iters: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The minibatches of a reconstruction: row `it` is the first `batch_size` entries of a random
    permutation of n drawn from a CPU generator seeded with `seed`; an (iters, min(batch_size, n))
    index tensor on `device` (made up front, so a captured step only copies a row per iteration)."""
    g = torch.Generator().manual_seed(seed)
    plan = torch.stack([torch.randperm(n, generator=g)[:batch_size] for _ in range(iters)]) if iters else \
        torch.zeros((0, min(batch_size, n)), dtype=torch.long)
    return plan.to(device)


def use_cuda_graph(device: torch.device | str, enabled: bool) -> bool:
    from .. import distributed as gdist

    if gdist.world_size() > 1:  # data-parallel steps all-reduce between kernels: run them eagerly
        return False
    return enabled and torch.device(device).type == "cuda"


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    """Set every group's learning rate in place (a tensor lr, as a captured Adam needs, keeps its address)."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def make_adam(params: list[torch.Tensor], lr: float, graph: bool) -> torch.optim.Adam:
    """Adam, capturable with a device-tensor learning rate when the step runs as a CUDA graph."""
    if graph:
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=params[0].device), capturable=True)
    return torch.optim.Adam(params, lr=lr)


def _capture_step(step: Callable[[], torch.Tensor], params: list[torch.Tensor], opt: torch.optim.Optimizer):
    """Capture one optimiser step (forward, backward, Adam, post-step) as a CUDA graph.

    The warm-up steps that capture needs run on a side stream and change the parameters and the
    optimiser state; both are restored afterwards, so the replays follow the same trajectory as
    an eager loop from the same start (up to capturable Adam's device-side arithmetic)."""
    snap = [p.detach().clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():
        for p, v in zip(params, snap):
            p.copy_(v)
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()  # Adam's step count and moments: a fresh optimiser
    return graph, static_loss


def optimise(params: list[torch.Tensor], opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor], torch.Tensor],
             plan: torch.Tensor, what: str, graph: bool = False, before_iter: Callable[[int], None] | None = None,
             post_step: Callable[[], None] | None = None, bar=None, check_every: int = 256) -> list[float]:
    """Run one optimiser step per row of `plan` (minibatch indices) on `batch_loss(idx)`.

    `before_iter(it)` sets per-iteration values in place (annealed beta, learning rate) before a
    step; `post_step()` runs under no_grad after each optimiser step (e.g. clamping). With
    `graph`, the step is captured once as a CUDA graph and replayed: reconstruction steps of a
    small block are launch-bound, and replaying removes the per-kernel CPU cost. Losses are kept
    on the device and checked for NaN/inf every `check_every` iterations (no per-step host sync);
    a non-finite loss raises GacqError naming the first bad iteration. Returns the mean loss of
    each window of `check_every` iterations.
    """
    from .. import distributed as gdist

    if len(plan) == 0:
        return []
    idx = plan[0].clone()
    hist = torch.zeros(check_every, device=plan.device)
    means: list[float] = []
    world, rank = gdist.world_size(), gdist.rank()
    if world > 1 and plan.shape[1] < world:
        raise GacqError(f"{what}: minibatches of {plan.shape[1]} samples cannot be split over {world} processes")

    def step() -> torch.Tensor:
        if world == 1:
            loss = batch_loss(idx)
            loss.backward()
        else:  # data parallel: each rank its share of the minibatch; summed gradients = the full batch's
            sub = idx[rank::world]
            loss = batch_loss(sub) * (len(sub) / len(idx))  # per-sample means reweighted, regularisers split
            loss.backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            loss = loss.detach().clone()
            gdist.all_reduce_sum([p.grad for p in params] + [loss])
        opt.step()
        if post_step is not None:
            with torch.no_grad():
                post_step()
        return loss.detach()

    captured = None
    if graph:
        if before_iter is not None:
            before_iter(0)
        captured = _capture_step(step, params, opt)
    n_iters = len(plan)
    for it in range(n_iters):
        if before_iter is not None:
            before_iter(it)
        idx.copy_(plan[it])
        if captured is not None:
            captured[0].replay()
            loss = captured[1]
        else:
            opt.zero_grad(set_to_none=True)
            loss = step()
        hist[it % check_every].copy_(loss)
        if bar is not None:
            bar.update(1)
        if (it + 1) % check_every == 0 or it == n_iters - 1:
            filled = it % check_every + 1
            window = hist[:filled].cpu()
            bad = torch.nonzero(~torch.isfinite(window)).flatten()
            if len(bad):
                first = it - filled + 1 + int(bad[0])
                raise GacqError(f"{what} diverged (loss {float(window[bad[0]])}) at iteration {first}")
            means.append(float(window.mean()))
    return means


def adaround_optimise(layers: list[QuantLayer], batch_loss: Callable[[torch.Tensor], torch.Tensor], plan: torch.Tensor,
                      cfg: ReconConfig, what: str = "reconstruction", bar=None) -> list[float]:
    """AdaRound on `layers`: Adam on the rounding variables against batch_loss(idx) plus the
    annealed rounding regulariser after the warm-up (baselines.md §1.3); hardens them at the end.

    The regulariser is always computed and multiplied by a gate that is 0 during the warm-up, so
    one step (capturable as a CUDA graph) serves every iteration; 0 * finite adds exact zeros."""
    adas = [m.enable_adaround() for m in layers]
    alphas = [a.alpha for a in adas]
    graph = use_cuda_graph(plan.device, cfg.cuda_graph)
    opt = make_adam(alphas, cfg.lr, graph)
    beta = torch.tensor(cfg.beta_start, device=plan.device)
    gate = torch.tensor(0.0, device=plan.device)

    def before_iter(it: int) -> None:
        beta.fill_(beta_schedule(it, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end))
        gate.fill_(1.0 if it >= cfg.warmup * cfg.iters else 0.0)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return batch_loss(idx) + cfg.reg_weight * gate * sum(a.regularizer(beta) for a in adas)

    means = optimise(alphas, opt, loss_fn, plan, what, graph, before_iter, bar=bar)
    for a in adas:
        a.harden()
    return means


def reconstruct_unit(unit: nn.Module, args: list, kwargs: dict, target: torch.Tensor, cfg: ReconConfig,
                     sample_weights: torch.Tensor | None = None, device: torch.device | str = "cpu") -> dict:
    """AdaRound all trainable quantized layers of `unit` to match `target` from the cached inputs; hardens them.

    sample_weights: one weight per cached sample (summing to 1); the loss of a minibatch B is
    mean_{i in B} (N * w_i * lp_i), which is the plain mean for uniform weights (GAC Algorithm 1).
    Returns the weighted reconstruction loss on all samples before and after.
    """
    layers = trainable_layers(unit)
    if not layers:
        raise GacqError("unit has no quantized layers to reconstruct")
    data = UnitData(unit, args, kwargs, target, cfg.p, sample_weights, device)
    for m in layers:
        m.w_quant = True
    before = data.full_loss()
    curve = adaround_optimise(layers, lambda idx: data.losses(idx).mean(),
                              data.plan(cfg.iters, cfg.batch_size, cfg.seed), cfg)
    return {"loss_before": before, "loss_after": data.full_loss(), "loss_curve": curve}


def act_step_sizes(unit: nn.Module) -> list[nn.Parameter]:
    """Learnable activation step sizes inside a unit: the `scale` Parameter of every input
    quantizer of its quantized layers and of any other learnable-scale quantizer (attention),
    except 16-bit ones (Q-Diffusion does not learn a 16-bit softmax quantizer)."""
    from .quantizer import UniformQuantizer

    params = []
    for m in unit.modules():
        if isinstance(m, UniformQuantizer) and isinstance(m.scale, nn.Parameter) and m.enabled and m.bits < 16:
            params.append(m.scale)
    return params


def cosine_lr(it: int, iters: int, base: float, eta_min: float = 0.0) -> float:
    """Cosine annealing from `base` at it = 0 to `eta_min` at it = iters (closed form)."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * it / max(iters, 1))) / 2


def reconstruct_acts_unit(unit: nn.Module, args: list, kwargs: dict, target: torch.Tensor, cfg: ActReconConfig,
                          sample_weights: torch.Tensor | None = None, device: torch.device | str = "cpu") -> dict:
    """Learn the unit's activation step sizes (weights frozen at their rounded values) to match
    `target`; Adam + cosine annealing, plain straight-through gradients, zero points frozen."""
    params = act_step_sizes(unit)
    if not params:
        raise GacqError("unit has no learnable activation step sizes")
    data = UnitData(unit, args, kwargs, target, cfg.p, sample_weights, device)
    before = data.full_loss()
    plan = data.plan(cfg.iters, cfg.batch_size, cfg.seed)
    graph = use_cuda_graph(plan.device, cfg.cuda_graph)
    opt = make_adam(params, cfg.lr, graph)

    def clamp() -> None:
        for prm in params:
            prm.clamp_(min=1e-8)  # a step size must stay positive

    curve = optimise(params, opt, lambda idx: data.losses(idx).mean(), plan, "activation calibration", graph,
                     before_iter=lambda it: set_lr(opt, cosine_lr(it, cfg.iters, cfg.lr)), post_step=clamp)
    return {"loss_before": before, "loss_after": data.full_loss(), "loss_curve": curve}


# ------------------------------------------------------------ whole model ---
WeightFn = Callable[[str, nn.Module, list, dict, torch.Tensor], "torch.Tensor | None"]


def _unit_file(ckpt_dir, i: int, stage: str = "weights") -> Path:
    return Path(ckpt_dir) / (f"unit_{i:03d}.safetensors" if stage == "weights" else f"act_unit_{i:03d}.safetensors")


# Resume points hold what reconstruction learned and nothing the resumed run rebuilds itself. A QuantLayer's weight
# and bias are never trained, and its AdaRound `w_floor` is floor(weight / scale), made again by `enable_adaround`;
# once hardened, only the sign of each rounding variable matters (`AdaRoundQuantizer`: up = 1[alpha >= 0]). So a
# resume point stores the signs packed eight to a byte and drops those tensors, keeping a sha256 of them in its
# metadata: loading checks it against the resumed model's own and refuses a mismatch (another model, other weight
# grids). For the bundled 9.0M-parameter UNet at W4 the weight stage's resume points shrink from 107.6 MB (three
# float32 copies of every weight) to 1.49 MB (measured in session 28; a method with an activation stage writes as
# much again), small enough to come back from a device call and go on in the next (scripts/gpu-dit-call.sh). Files
# without the metadata (the full state, as before session 28) still load.
_SIGNS = ".alpha_signs"  # suffix of the packed signs' key: "<layer>.adaround.alpha" + _SIGNS
_COMPACT = "gacq_resume_compact"


def _rebuilt_keys(parts: list[tuple[str, nn.Module]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Over `parts` ((key prefix, module) pairs), the tensors a resumed run rebuilds itself (the hardened AdaRound
    layers' weight, bias and w_floor), by key, and the keys of their rounding variables."""
    rebuilt, alphas = {}, []
    for prefix, module in parts:
        for name, m in module.named_modules():
            ada = getattr(m, "adaround", None) if isinstance(m, QuantLayer) else None
            if ada is None or ada.soft:
                continue
            pre = f"{prefix}{name}." if name else prefix
            rebuilt[f"{pre}weight"] = m.weight
            if m.bias is not None:
                rebuilt[f"{pre}bias"] = m.bias
            rebuilt[f"{pre}adaround.w_floor"] = ada.w_floor
            alphas.append(f"{pre}adaround.alpha")
    return rebuilt, alphas


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def append_recon_log(folder, entry: dict, device: torch.device | str) -> None:
    """One line of a resume folder's recon_log.jsonl. On CUDA it holds the peak GPU memory so far, so that a
    quantization resumed by later runs can report the peak over every run (`logged_peak`)."""
    device = torch.device(device)
    if device.type == "cuda":
        entry = {**entry, "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated(device))}
    with open(Path(folder) / "recon_log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def logged_peak(folder) -> tuple[int, bool]:
    """The highest peak GPU memory the resume points' log (`recon_log.jsonl`) holds, and whether every line holds
    one: lines written before gacq logged peaks (or on the CPU) do not, and then a resumed run knows only its own."""
    path = Path(folder) / "recon_log.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    peaks = [x["peak_gpu_memory_bytes"] for x in lines if "peak_gpu_memory_bytes" in x]
    return max(peaks, default=0), bool(lines) and len(peaks) == len(lines)


def save_resume_point(path, parts: list[tuple[str, nn.Module]]) -> None:
    """Write the state of `parts` ((key prefix, module) pairs) to the safetensors file `path` (atomically), compact:
    see the comment above `_rebuilt_keys`."""
    import numpy as np

    rebuilt, alphas = _rebuilt_keys(parts)
    state = {f"{prefix}{k}": v for prefix, module in parts for k, v in module.state_dict().items()}
    out = {}
    for k, v in state.items():
        if k in rebuilt:
            continue
        v = v.detach().contiguous().cpu()
        if k in alphas:
            out[k + _SIGNS] = torch.from_numpy(np.packbits((v >= 0).flatten().numpy()))
        else:
            out[k] = v
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={_COMPACT: "1", "rebuilt_sha256": tensors_sha256(rebuilt)})


def load_resume_point(path, parts: list[tuple[str, nn.Module]], device) -> None:
    """Load a resume point `save_resume_point` (or, before it, a full state dict) wrote into `parts`, whose hardened
    AdaRound layers must already exist (`enable_adaround`, then `harden`)."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get(_COMPACT) == "1":
        rebuilt, alphas = _rebuilt_keys(parts)
        if tensors_sha256(rebuilt) != meta.get("rebuilt_sha256"):
            raise GacqError(f"the resume point {path} was made from other weights or weight grids than this run's "
                            "(another model, or other quantizer settings); delete its folder to start over")
        own = {f"{prefix}{k}": v for prefix, module in parts for k, v in module.state_dict().items()}
        for k in alphas:
            signs = state.pop(k + _SIGNS, None)
            if signs is None:
                raise GacqError(f"the resume point {path} has no rounding of {k[:-len('.adaround.alpha')]}; "
                                "delete its folder to start over")
            bits = np.unpackbits(signs.numpy())[:own[k].numel()].astype(bool)
            # +1 / -1: the hardened rounding reads only alpha >= 0
            state[k] = torch.where(torch.from_numpy(bits), 1.0, -1.0).to(own[k].dtype).reshape(own[k].shape)
        state.update(rebuilt)
    for prefix, module in parts:
        module.load_state_dict({k[len(prefix):]: v.to(device) for k, v in state.items() if k.startswith(prefix)})


def _set_unit_act_quant(unit: nn.Module, on: bool) -> None:
    from .attention import QuantAttnProcessor

    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.a_quant = on
        elif isinstance(m, QuantAttnProcessor):
            m.quant = on


def reconstruct_model(q_model: nn.Module, fp_model: nn.Module, x: torch.Tensor, t: torch.Tensor, cfg,
                      ckpt_dir=None, weight_fn: WeightFn | None = None, device: torch.device | str = "cpu",
                      capture_batch: int = 64, on_unit_done: Callable[[int, str, dict], None] | None = None,
                      progress: bool = True, fingerprint: dict | None = None, stage: str = "weights",
                      cond: dict | None = None) -> list[dict]:
    """Reconstruct every unit of `q_model` in execution order, checkpointing each finished unit.

    stage 'weights' (cfg: ReconConfig): AdaRound; the unit's input comes from the quantized model
    (weights quantized, activations float), the target from the FP model (baselines.md §3.2);
    q_model must be wrapped, weight-initialised and in the weights-only quantization state.
    stage 'acts' (cfg: ActReconConfig): learn the activation step sizes of each unit with its
    activations quantized; inputs and targets both from the FP model, as Q-Diffusion's act stage.
    `weight_fn(name, unit, args, kwargs, target)` may return per-sample loss weights (GAC).
    With `ckpt_dir`, units already saved there are loaded instead of recomputed, so a killed run
    resumes at the next unit and ends bit-identical to an uninterrupted one (each unit's minibatch
    order is seeded by cfg.seed + its index). `fingerprint` (settings that define the run) is stored
    in `ckpt_dir/run.json` (`run_acts.json` for the act stage); resuming with another is refused.
    `cond`: the samples' conditioning (class labels, ...; `gacq.conditioning`), batch-aligned with x.
    """
    from ..conditioning import model_forward, slice_cond

    from .. import distributed as gdist

    if stage not in ("weights", "acts"):
        raise GacqError(f"unknown reconstruction stage {stage!r}")
    if ckpt_dir is not None:
        run_file = Path(ckpt_dir) / ("run.json" if stage == "weights" else "run_acts.json")
        fp_json = json.loads(json.dumps({"recon": dataclasses.asdict(cfg), "n_samples": len(t), **(fingerprint or {})}))
        if run_file.exists() and (had := json.loads(run_file.read_text())) != fp_json:
            differ = sorted(k for k in {**had, **fp_json} if had.get(k) != fp_json.get(k))
            raise GacqError(f"{ckpt_dir} holds reconstruction checkpoints of another run (it differs in: "
                            f"{', '.join(differ)}); delete it or change --out")
        gdist.barrier("checking the reconstruction checkpoints")
        if gdist.rank() == 0:
            write_json(run_file, fp_json)
    run = lambda model, lo, hi: model_forward(model, x[lo:hi].to(device), t[lo:hi].to(device),  # noqa: E731
                                              slice_cond(cond, slice(lo, hi), device))
    units = order_by_execution(q_model, find_units(q_model), lambda m: run(m, 0, 1))
    if stage == "acts":
        units = [(name, u) for name, u in units if act_step_sizes(u)]
    stats = []
    bar = tqdm(units, desc=f"reconstruction ({stage})", unit="unit", disable=not progress)
    for i, (name, unit) in enumerate(bar):
        layers = trainable_layers(unit)
        path = _unit_file(ckpt_dir, i, stage) if ckpt_dir is not None else None
        if path is not None and path.exists():
            if stage == "weights":
                for m in layers:
                    m.enable_adaround().harden()
            load_resume_point(path, [("", unit)], device)
            if stage == "acts":
                _set_unit_act_quant(unit, True)
            stats.append({"unit": name, "stage": stage, "resumed": True})
            continue
        fp_unit = fp_model.get_submodule(name)
        if stage == "weights":
            args, kwargs, _ = capture_unit_io(q_model, unit, run, len(t), capture_batch, want_output=False)
            _, _, target = capture_unit_io(fp_model, fp_unit, run, len(t), capture_batch, want_output=True)
        else:
            args, kwargs, target = capture_unit_io(fp_model, fp_unit, run, len(t), capture_batch, want_output=True)
        weights = weight_fn(name, unit, args, kwargs, target) if weight_fn is not None else None
        unit_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        try:
            if stage == "weights":
                s = reconstruct_unit(unit, args, kwargs, target, unit_cfg, weights, device)
            else:
                _set_unit_act_quant(unit, True)
                s = reconstruct_acts_unit(unit, args, kwargs, target, unit_cfg, weights, device)
        except GacqError as e:
            raise GacqError(f"unit {i} ({name}, {stage} stage): {e}; the {i} units before it are kept in "
                            f"{ckpt_dir}") from e
        s = {"unit": name, "kind": type(unit).__name__, "stage": stage, **s}
        stats.append(s)
        bar.set_postfix(loss=f"{s['loss_before']:.3g}->{s['loss_after']:.3g}")
        if path is not None and gdist.rank() == 0:  # data-parallel ranks hold the same unit: one writes
            save_resume_point(path, [("", unit)])
            append_recon_log(path.parent, {"index": i, **s}, device)
        gdist.barrier(f"reconstruction of unit {i} ({name})")
        if on_unit_done is not None:
            on_unit_done(i, name, s)
    return stats
