"""Output bias correction: remove the per-channel mean error of a quantized noise prediction.

On the bundled CIFAR-10 model at W3A8, the quantized models' noise predictions carry a
per-colour-channel mean error that is nearly constant over the sampling steps, and its size
follows the colour cast of the sampled images (Pearson r 0.97 over seven checkpoints,
`results/output_bias`). This is bias correction in the sense of Nagel et al. (2019,
data-free quantization), applied to the model's output: measure

    b[c] = mean over calibration samples and pixels of (eps_q - eps_fp) in channel c

with the quantized model exactly as it runs at sampling time (a checkpoint with per-step
activation sets, TFMQ-DM's finite set calibration, gets the set of each sample's step), then
subtract b from the bias of the model's last layer, so every later prediction is shifted by -b.
Only that bias changes; the correction is saved with the checkpoint like any float parameter.

Last layer per model class: `conv_out` (UNet2DModel, UNet2DConditionModel); `proj_out_2`
(DiTTransformer2DModel), whose output feature f unpatchifies to channel f % out_channels; a
learned-variance output (out_channels = 2 x in_channels) has only its noise half corrected.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..conditioning import predict_eps, slice_cond
from ..errors import GacqError


@torch.no_grad()
def measure_output_bias(q_model: nn.Module, fp_model: nn.Module, calib, batch_size: int = 64,
                        device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Mean error of q_model's noise prediction against fp_model's, per channel, on `calib`.

    Samples are taken step by step (their sampling-step index, `calib.step`); before each step's
    batches the quantized model's per-step activation set is loaded when it has one
    (`q_model.gacq_fsc`), and set 0 is restored afterwards, as `quantize` leaves it.
    Returns {"bias": (C,) float64, "by_step": {step: (C,) float64}, "rms_by_step": {step: float}
    (root mean square of the whole error), "gain_by_step": {step: float}, "count": {step: n}}.
    The gain is the least-squares slope of the error on the float prediction over the step's samples,
    sum((eps_q - eps_fp) * eps_fp) / sum(eps_fp ** 2): +0.01 means the quantized model predicts 1 % more
    of the float model's noise on top of it (a scale error, which a per-channel bias cannot hold).
    """
    device = torch.device(device)
    fsc = getattr(q_model, "gacq_fsc", None)
    steps = sorted(set(calib.step.tolist()))
    if not steps:
        raise GacqError("the output bias needs calibration samples; the calibration set is empty")
    sampler = (getattr(calib, "meta", None) or {}).get("sampler") or {}
    keys = ("scheduler", "steps", "timestep_spacing")
    if fsc is not None and fsc.sampler and sampler and any(fsc.sampler.get(k) != sampler.get(k) for k in keys):
        raise GacqError(f"the model's per-step activation sets belong to the sampler "
                        f"{ {k: fsc.sampler.get(k) for k in keys} }, the calibration trajectories to "
                        f"{ {k: sampler.get(k) for k in keys} }; measure on trajectories of the same sampler")
    if fsc is not None and steps[-1] >= fsc.n_steps:
        raise GacqError(f"calibration samples at sampling step {steps[-1]} but the model has per-step activation "
                        f"sets for {fsc.n_steps} steps; measure on the calibration set the model was quantized with")
    total, n_total = None, 0
    by_step, rms, gain, count = {}, {}, {}, {}
    for k in tqdm(steps, desc="output bias", unit="step", disable=not progress):
        if fsc is not None:
            fsc.apply(q_model, k)
        idx = torch.nonzero(calib.step == k).flatten()
        acc, sq, cross, norm = None, 0.0, 0.0, 0.0
        for lo in range(0, len(idx), batch_size):
            b = idx[lo:lo + batch_size]
            x, t = calib.x[b].to(device), calib.t[b].to(device)
            cond = slice_cond(calib.cond, b, device)
            e_fp = predict_eps(fp_model, x, t, cond).double()
            d = predict_eps(q_model, x, t, cond).double() - e_fp
            cross += float((d * e_fp).sum())
            norm += float(e_fp.pow(2).sum())
            err = d.mean(dim=(2, 3)).sum(0)
            sq += float(d.pow(2).mean(dim=(1, 2, 3)).sum())
            acc = err if acc is None else acc + err
        by_step[k], count[k] = (acc / len(idx)).cpu(), len(idx)
        rms[k] = (sq / len(idx)) ** 0.5
        gain[k] = cross / norm if norm > 0 else float("nan")
        total = acc if total is None else total + acc
        n_total += len(idx)
    if fsc is not None:
        fsc.apply(q_model, 0)
    if total is None or not torch.isfinite(total).all():
        raise GacqError("the output bias could not be measured (no calibration samples, or non-finite outputs)")
    return {"bias": (total / n_total).cpu(), "by_step": by_step, "rms_by_step": rms, "gain_by_step": gain,
            "count": count}


def output_layer(model: nn.Module) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, module, channel of each bias entry, -1 where it is not a noise channel) of the last layer."""
    cls = type(model).__name__
    if cls in ("UNet2DModel", "UNet2DConditionModel"):
        name, layer = "conv_out", model.conv_out
        in_ch = model.config.in_channels
        channel = torch.arange(layer.weight.shape[0])
    elif cls == "DiTTransformer2DModel":
        name, layer = "proj_out_2", model.proj_out_2
        out_ch, in_ch = model.config.out_channels or model.config.in_channels, model.config.in_channels
        channel = torch.arange(layer.weight.shape[0]) % out_ch  # (p, q, c) order of the unpatchify
    else:
        raise GacqError(f"output bias correction does not know the last layer of {cls}; it supports UNet2DModel, "
                        "UNet2DConditionModel and DiTTransformer2DModel")
    channel = torch.where(channel < in_ch, channel, torch.full_like(channel, -1))  # learned variance: untouched
    if getattr(layer, "bias", None) is None:
        raise GacqError(f"{cls}.{name} has no bias to fold the correction into")
    return name, layer, channel


@torch.no_grad()
def fold_output_bias(model: nn.Module, bias: torch.Tensor) -> None:
    """Shift every noise prediction of `model` by -bias (one value per noise channel)."""
    _, layer, channel = output_layer(model)
    keep = channel >= 0
    if int(channel.max()) + 1 != len(bias):
        raise GacqError(f"a correction for {len(bias)} channels does not fit a model with {int(channel.max()) + 1}")
    delta = torch.zeros_like(layer.bias, dtype=torch.float64)
    delta[keep] = bias.to(delta.device, torch.float64)[channel[keep].to(delta.device)]
    layer.bias.copy_((layer.bias.double() - delta).to(layer.bias.dtype))


def correct_output_bias(q_model: nn.Module, fp_model: nn.Module, calib, batch_size: int = 64,
                        device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Measure and fold the output bias into q_model; returns the measurement (also kept on the
    model as `gacq_output_bias`, which the checkpoint records)."""
    m = measure_output_bias(q_model, fp_model, calib, batch_size, device, progress)
    fold_output_bias(q_model, m["bias"])
    q_model.gacq_output_bias = {"bias": [float(v) for v in m["bias"]], "samples": sum(m["count"].values()),
                                "steps": len(m["by_step"]), "layer": output_layer(q_model)[0]}
    return m
