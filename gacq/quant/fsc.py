"""TFMQ-DM's finite set calibration (FSC), baselines.md §2.2 and §5: one set of activation
quantizer parameters per sampling step, used at the matching step of inference.

For each sampling step k, every input quantizer's range is an exponential moving average
(momentum 0.95) of the per-batch min and max over that step's calibration samples, taken in
shuffled batches of 16; the final grid is min-max over [min(ema_min, 0), max(ema_max, 0)].
(TFMQ-DM first runs an MSE init on 16 samples, which the EMA then overwrites: it is skipped.)
Ranges are observed with weights quantized and the activations of the preceding layers in
float. The parameters are keyed by the sampling-step index, never by t (the quad schedule
repeats t = 0).

At inference `FSCParams.apply(model, k)` loads set k before the k-th model call; `gacq.sample`
does this through `LoadedModel.step_hook`, and refuses a sampler other than the calibration one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..conditioning import model_forward, slice_cond
from ..errors import GacqError
from .modules import QuantLayer
from .primitives import qparams_from_range


def static_act_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The layers with a stored input grid (dynamic per-token layers compute theirs per call: no per-step set)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QuantLayer) and m.act_quantizer is not None and not m.a_dynamic]


@dataclass
class FSCParams:
    """Per-step (scale, zero point) of every input quantizer, and the sampler they belong to."""

    scale: dict[str, torch.Tensor]  # name -> (S,)
    zero_point: dict[str, torch.Tensor]
    sampler: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return len(next(iter(self.scale.values())))

    def apply(self, model: nn.Module, step: int) -> None:
        if not 0 <= step < self.n_steps:
            raise GacqError(f"sampling step {step} has no calibrated activation set (there are {self.n_steps})")
        layers = dict(static_act_layers(model))
        missing = [n for n in self.scale if n not in layers]
        if missing:
            raise GacqError(f"per-step activation parameters name layers the model lacks: {', '.join(missing[:5])}")
        for name, s in self.scale.items():
            layers[name].act_quantizer._set(s[step], self.zero_point[name][step])

    def check_sampler(self, cfg) -> None:
        """Refuse a sampler other than the one the sets were calibrated for."""
        want = {k: self.sampler.get(k) for k in ("scheduler", "steps", "timestep_spacing")}
        got = {"scheduler": cfg.scheduler, "steps": cfg.steps, "timestep_spacing": cfg.timestep_spacing}
        if self.sampler and want != got:
            raise GacqError(
                f"this model has per-step activation parameters (TFMQ-DM's finite set calibration) for "
                f"{want}; sample with the same settings (got {got})")

    def step_hook(self, model: nn.Module):
        def hook(step: int, cfg) -> None:
            if step == 0:
                self.check_sampler(cfg)
            self.apply(model, step)
        return hook

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.scale:
            out[f"{n}.scale"] = self.scale[n].contiguous()
            out[f"{n}.zero_point"] = self.zero_point[n].contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], sampler: dict) -> "FSCParams":
        names = sorted({k.rsplit(".", 1)[0] for k in state})
        return cls({n: state[f"{n}.scale"] for n in names}, {n: state[f"{n}.zero_point"] for n in names}, sampler)


@torch.no_grad()
def finite_set_calibration(model: nn.Module, x: torch.Tensor, t: torch.Tensor, step: torch.Tensor, sampler: dict,
                           momentum: float = 0.95, batch_size: int = 16, seed: int = 0,
                           device: torch.device | str = "cpu", progress: bool = True,
                           cond: dict | None = None) -> FSCParams:
    """Per-step activation ranges (see the module docstring); `step` holds each sample's sampling-step index.

    The model must be wrapped with activation quantizers; its quantization state is restored afterwards.
    """
    device = torch.device(device)
    layers = static_act_layers(model)
    if not layers:
        raise GacqError("finite set calibration needs activation quantizers (abits is float?)")
    split = [n for n, m in layers if m.split]
    if split:
        raise GacqError(f"finite set calibration does not support split shortcut layers ({split[0]}, ...); "
                        "TFMQ-DM does not split them")
    n_steps = int(sampler.get("steps", 0))
    present = set(step.tolist())
    if n_steps < 1 or present != set(range(n_steps)):
        raise GacqError(
            f"finite set calibration needs calibration samples at every one of the sampler's {n_steps} steps, "
            f"got {len(present)} distinct steps; collect them with `gacq calib --selection all`")
    state = {n: (m.w_quant, m.a_quant) for n, m in layers}
    for _, m in layers:
        m.a_quant = False
    ema: dict[str, list[torch.Tensor]] = {}

    def make_hook(name):
        def hook(mod, args):
            v = mod.smoothed_input(args[0].detach())  # the quantizer's input (x / s on a smoothed layer)
            lo, hi = v.amin().float(), v.amax().float()
            if name in ema:
                ema[name][0] = momentum * ema[name][0] + (1 - momentum) * lo
                ema[name][1] = momentum * ema[name][1] + (1 - momentum) * hi
            else:
                ema[name] = [lo, hi]
        return hook

    scales = {n: torch.empty(n_steps) for n, _ in layers}
    zps = {n: torch.empty(n_steps) for n, _ in layers}
    g = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers]
    try:
        for k in tqdm(range(n_steps), desc="finite set calibration", unit="step", disable=not progress):
            idx = torch.nonzero(step == k).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            ema.clear()
            for lo in range(0, len(idx), batch_size):
                b = idx[lo:lo + batch_size]
                model_forward(model, x[b].to(device), t[b].to(device), slice_cond(cond, b, device))
            for n, m in layers:
                if n not in ema:
                    raise GacqError(f"no calibration sample of step {k} reached layer {n}")
                q = m.act_quantizer
                lo_, hi_ = torch.clamp(ema[n][0], max=0.0), torch.clamp(ema[n][1], min=0.0)
                s, z = qparams_from_range(lo_.cpu(), hi_.cpu(), q.bits, q.symmetric, q.fmt)
                scales[n][k], zps[n][k] = s.reshape(()), z.reshape(())
    finally:
        for h in handles:
            h.remove()
        for n, m in layers:
            m.w_quant, m.a_quant = state[n]
    return FSCParams(scales, zps, dict(sampler))
