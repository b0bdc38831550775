"""Diagnostics of the paper's two figures (`shared/docs/method.md`, "Figures worth reproducing").

Figure 1a, `timestep_gradient_cosine`: for each block, the gradient of the mean block
reconstruction loss over the samples of one sampling step, taken with respect to the block's
quantization parameters theta_Q, and the cosine distance 1 - cos between the gradients of every
pair of steps (large = the timesteps pull the shared parameters in different directions).

Figure 2, `weight_alignment`: for each block calibrated by GAC, every training sample's own
gradient and its cosine similarity ("alignment") with the gradient of the mean validation loss;
samples sorted by learned weight into equal groups; the correlation between the groups' mean
weight and mean alignment (positive = GAC up-weights samples that agree with the validation set).

What is measured, and the choices made here:
- theta_Q are the AdaRound rounding variables V of the block's trainable quantized layers (the
  parameters GAC's inner step moves). For the measurement each layer gets a temporary soft
  AdaRound whose weight equals the layer's current quantized weight: from its float weight when it
  has no AdaRound yet (a grid-initialised model: exactly GAC's starting point, soft rounding at the
  grid init), from its current (soft or hard) rounded weight otherwise. Afterwards the layer is put
  back exactly as it was (state dict, flags and attributes).
- A weight already on the grid (hard rounding, a loaded checkpoint) sits at the edge of AdaRound's
  rectified sigmoid (h(V) = 0 or 1), where the clamp's derivative is 0 or 1 depending on float
  round-off. Both clamps (h to [0, 1], the integer to [qmin, qmax]) are therefore taken with their
  derivative from inside: they pass the gradient for values within 1e-3 of the interval and block it
  beyond. Wherever h(V) lies strictly inside (0, 1) and the integer inside the range, this is
  AdaRound's own gradient; at a hard point it is the gradient w.r.t. V of the limit from inside.
- Block inputs come from the quantized model (weights quantized, activations float), the targets
  from the FP model, as in block reconstruction (`recon.py`). `input_model` lets inputs come from a
  second model with the same block names: the GAC alignment uses the calibrated checkpoint as input
  model and the FP weights on the checkpoint's grid as the measured model, i.e. the conditions under
  which GAC learned each block's weights (upstream blocks calibrated, this block at its grid init).
- The loss is the reconstruction's per-sample lp loss (p = 2) averaged over the samples.
- Per-sample gradients use torch.func (vmap of grad over functional_call) when it reproduces the
  plain autograd gradient of the first sample; otherwise a loop over samples.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import GacqError
from .quant.modules import QuantLayer
from .quant.quantizer import GAMMA, ZETA
from .quant.recon import (UnitData, capture_unit_io, find_units, lp_loss_per_sample, order_by_execution,
                          trainable_layers)
from .plots import figure as _figure, plot_gac_profiles, save_png as _save_png  # noqa: F401 (plot_gac_profiles: API)
from .utils import atomic_path, git_commit, write_json

EDGE_TOL = 1e-3  # how far outside a clamp's interval its derivative is still taken from inside


# ----------------------------------------------------------- measurement state ---
def _pass_clamp(v: torch.Tensor, lo, hi, tol: float = EDGE_TOL) -> torch.Tensor:
    """clamp(v, lo, hi) in value; derivative 1 within `tol` of [lo, hi] (the one from inside), 0 beyond."""
    c = v.clamp(lo, hi)
    inside = (v >= lo - tol) & (v <= hi + tol)
    return torch.where(inside, v + (c - v).detach(), c)


class _MeasureRounding(nn.Module):
    """Soft AdaRound used only while measuring: the AdaRoundQuantizer `ada`'s weight, with both of
    its clamps differentiated from inside (see the module docstring)."""

    def __init__(self, ada: nn.Module):
        super().__init__()
        self.ada = ada

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        a = self.ada
        h = _pass_clamp(torch.sigmoid(a.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        w_int = _pass_clamp(a.w_floor + h + a.zero_point, a.qmin, a.qmax)
        return (w_int - a.zero_point) * a.scale


@contextlib.contextmanager
def soft_rounding(unit: nn.Module):
    """Give every trainable quantized layer of `unit` a temporary soft rounding at its current
    quantized weight; yields {parameter name in `unit`: V}. Restores each layer exactly on exit."""
    layers = trainable_layers(unit)
    if not layers:
        raise GacqError(f"block {type(unit).__name__} has no quantized layers to measure")
    saved = []
    try:
        for m in layers:
            prev = m.adaround
            saved.append((m, prev, "adaround" in m._modules, m.w_quant))
            current = None
            if prev is not None:
                with torch.no_grad():
                    current = prev().detach()
            ada = m.enable_adaround()  # grid from the layer's quantizer(s), V from its float weight
            if current is not None:  # re-seat V on the current (soft or hard) rounded weight
                with torch.no_grad():
                    ada.w_floor.copy_(torch.floor(current / ada.scale))
                    rest = (current / ada.scale - ada.w_floor).clamp(0, 1)
                    ada.alpha.copy_(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
            m.adaround = _MeasureRounding(ada)
            m.w_quant = True
        prefix = {id(m): n for n, m in unit.named_modules()}
        yield {(f"{prefix[id(m)]}." if prefix[id(m)] else "") + "adaround.ada.alpha": m.adaround.ada.alpha
               for m in layers}
    finally:
        for m, prev, registered, w_quant in reversed(saved):
            if registered:
                m.adaround = prev
            else:  # it was a plain attribute (None), as QuantLayer.__init__ leaves it
                m._modules.pop("adaround", None)
                object.__setattr__(m, "adaround", prev)
            m.w_quant = w_quant


def _attention_processors(model: nn.Module) -> list:
    return [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "quant")]


@contextlib.contextmanager
def measure_state(*models: nn.Module | None):
    """Eval mode, weights quantized, activations (and attention matmuls) float; restored on exit."""
    saved = []
    for model in models:
        if model is None:
            continue
        saved.append((model, model.training,
                      [(m, m.w_quant, m.a_quant) for m in model.modules() if isinstance(m, QuantLayer)],
                      [(p, p.quant) for p in _attention_processors(model)]))
    try:
        for model, _, layers, procs in saved:
            model.eval()
            for m, _, _ in layers:
                m.w_quant, m.a_quant = True, False
            for p, _ in procs:
                p.quant = False
        yield
    finally:
        for model, training, layers, procs in saved:
            model.train(training)
            for m, w, a in layers:
                m.w_quant, m.a_quant = w, a
            for p, q in procs:
                p.quant = q


# ------------------------------------------------------------------ helpers ---
def _units(model: nn.Module, calib, device: torch.device, names: Iterable[str] | None
           ) -> list[tuple[str, nn.Module]]:
    """The model's reconstruction units in execution order, or the named ones among them."""
    from .conditioning import model_forward, slice_cond

    x0, t0, c0 = calib.x[:1].to(device), calib.t[:1].to(device), slice_cond(calib.cond, slice(0, 1), device)
    units = order_by_execution(model, find_units(model), lambda m: model_forward(m, x0, t0, c0))
    if names is None:
        return units
    names = list(names)
    known = dict(units)
    missing = [n for n in names if n not in known]
    if missing:
        shown = ", ".join(list(known)[:12]) + (", ..." if len(known) > 12 else "")
        raise GacqError(f"no block named {', '.join(repr(n) for n in missing)} in the quantized model; its blocks "
                        f"(reconstruction units) are: {shown}")
    wanted = set(names)
    return [(n, u) for n, u in units if n in wanted]


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise GacqError(f"block {name} is not in the {what}; the models do not share an architecture") from e


def _cache(q_model: nn.Module, fp_model: nn.Module, name: str, unit: nn.Module, calib, idx: torch.Tensor,
           device: torch.device, p: float, input_model: nn.Module | None, batch: int = 64) -> UnitData:
    """Inputs of block `name` (from `input_model` or `q_model`) and FP targets for calib samples `idx`."""
    from .conditioning import model_forward, slice_cond

    x, t, cond = calib.x[idx], calib.t[idx], slice_cond(calib.cond, idx)
    run = lambda model, lo, hi: model_forward(model, x[lo:hi].to(device), t[lo:hi].to(device),  # noqa: E731
                                              slice_cond(cond, slice(lo, hi), device))
    src = input_model if input_model is not None else q_model
    args, kwargs, _ = capture_unit_io(src, _submodule(src, name, "input model"), run, len(idx), batch,
                                      want_output=False)
    _, _, target = capture_unit_io(fp_model, _submodule(fp_model, name, "FP model"), run, len(idx), batch,
                                   want_output=True)
    if len(target) != len(idx):
        raise GacqError(f"block {name} saw {len(target)} inputs for {len(idx)} samples (is it called more than "
                        "once per forward?)")
    return UnitData(unit, args, kwargs, target, p, None, device)


def _loss(data: UnitData, pos: torch.Tensor) -> torch.Tensor:
    """Per-sample lp losses of cached samples `pos` (the math attention kernel: differentiable everywhere)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return data.per_sample_loss(pos)


def _flat(grads, theta: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1).double()
                      for g, t in zip(grads, theta)])


def mean_gradient(data: UnitData, pos: torch.Tensor, theta: list[torch.Tensor], chunk: int = 32) -> torch.Tensor:
    """Gradient (flat, float64) of the mean loss over cached samples `pos` w.r.t. `theta`."""
    total = None
    n = len(pos)
    for lo in range(0, n, chunk):
        loss = _loss(data, pos[lo:lo + chunk]).sum() / n
        g = _flat(torch.autograd.grad(loss, theta, allow_unused=True), theta)
        total = g if total is None else total + g
    return total


def _per_sample_loop(data: UnitData, pos: torch.Tensor, theta: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_flat(torch.autograd.grad(_loss(data, pos[i:i + 1]).sum(), theta, allow_unused=True), theta)
                        for i in range(len(pos))])


def _per_sample_vmap(data: UnitData, pos: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    unit, names = data.unit, list(theta)
    arg_pos = [i for i, a in enumerate(data.args) if torch.is_tensor(a)]
    kw_keys = sorted(data.per_sample)
    params = {k: v.detach() for k, v in theta.items()}

    def one(params, target, *xs):
        a = list(data.args)
        for i, x in zip(arg_pos, xs):
            a[i] = x.unsqueeze(0)
        k = dict(data.kwargs)
        for key, x in zip(kw_keys, xs[len(arg_pos):]):
            k[key] = x.unsqueeze(0)
        with sdpa_kernel([SDPBackend.MATH]):
            out = functional_call(unit, params, tuple(a), k)
        out = out if torch.is_tensor(out) else out[0]
        return lp_loss_per_sample(out, target.unsqueeze(0), data.p).sum()

    xs = [data.args[i][pos] for i in arg_pos] + [data.kwargs[k][pos] for k in kw_keys]
    g = vmap(grad(one), in_dims=(None, 0, *([0] * len(xs))))(params, data.target[pos], *xs)
    return torch.cat([g[n].detach().reshape(len(pos), -1).double() for n in names], dim=1)


def per_sample_gradients(data: UnitData, pos: torch.Tensor, theta: dict[str, torch.Tensor], chunk: int = 32,
                         method: str = "auto"):
    """An iterable of (positions, per-sample gradients (B, P) float64), chunk by chunk; method 'vmap',
    'loop' or 'auto' (vmap when its first gradient matches the loop's, else the loop). After
    iterating, `.method` is the method used."""
    return _PerSample(data, pos, theta, chunk, method)


class _PerSample:
    def __init__(self, data, pos, theta, chunk, method):
        if method not in ("auto", "vmap", "loop"):
            raise GacqError(f"per-sample gradient method must be auto, vmap or loop, not {method!r}")
        self.data, self.pos, self.theta, self.chunk, self.method = data, pos, theta, chunk, method

    def _decide(self) -> None:
        if self.method != "auto" or len(self.pos) == 0:
            return
        first = self.pos[:1]
        ref = _per_sample_loop(self.data, first, list(self.theta.values()))
        try:
            got = _per_sample_vmap(self.data, first, self.theta)
            ok = got.shape == ref.shape and float((got - ref).norm()) <= 1e-4 * float(ref.norm()) + 1e-30
        except Exception:  # torch.func has no batching rule for some op of the block: fall back
            ok = False
        self.method = "vmap" if ok else "loop"

    def __iter__(self):
        self._decide()
        theta = list(self.theta.values())
        for lo in range(0, len(self.pos), self.chunk):
            sub = self.pos[lo:lo + self.chunk]
            if self.method == "vmap":
                yield sub, _per_sample_vmap(self.data, sub, self.theta)
            else:
                yield sub, _per_sample_loop(self.data, sub, theta)


def cosine_distance_matrix(grads: torch.Tensor) -> torch.Tensor:
    """1 - cos between the rows of (S, P) `grads`: symmetric, zero diagonal, in [0, 2]; rows and
    columns of zero (or non-finite) gradients are NaN (their direction is undefined)."""
    g = grads.double()
    norms = g.norm(dim=1)
    bad = ~(torch.isfinite(norms) & (norms > 0))
    gn = g / torch.where(bad, torch.ones_like(norms), norms)[:, None]
    d = (1 - gn @ gn.T).clamp(0, 2)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    d[bad, :] = math.nan
    d[:, bad] = math.nan
    return d


def _offdiag_mean(d: torch.Tensor) -> float:
    mask = ~torch.eye(len(d), dtype=torch.bool) & ~torch.isnan(d)
    return float(d[mask].mean()) if mask.any() else math.nan


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length sequences (NaN pairs dropped; NaN if either is constant)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise GacqError(f"correlation of sequences of different lengths ({len(a)} and {len(b)})")
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum()) / den if den > 0 else math.nan


def _steps(calib) -> tuple[list[int], list[int]]:
    steps = sorted(int(s) for s in torch.unique(calib.step))
    ts = [int(calib.t[calib.step == s][0]) for s in steps]
    return steps, ts


# --------------------------------------------------------------- Figure 1a ---
def timestep_gradient_cosine(q_model: nn.Module, fp_model: nn.Module, calib, block_names=None,
                             max_per_step: int = 32, device: torch.device | str = "cpu", p: float = 2.0,
                             input_model: nn.Module | None = None, chunk: int = 32, label: str = "",
                             progress: bool = False) -> dict:
    """Per block: the S x S cosine distances (1 - cos) between the gradients w.r.t. theta_Q of the
    mean reconstruction loss of each sampling step (at most `max_per_step` samples per step: the
    first ones of the set). Returns {'label', 'steps', 'timesteps', 'n_per_step', 'blocks': {name:
    {'kind', 'n_params', 'distance' (S x S tensor), 'grad_norm' (S), 'mean_distance'}}, 'mean': {...}}
    with 'mean' the entry-wise average over blocks (NaN entries left out). The models are unchanged."""
    from tqdm.auto import tqdm

    if max_per_step < 1:
        raise GacqError(f"--max-per-step must be at least 1, got {max_per_step}")
    device = torch.device(device)
    steps, ts = _steps(calib)
    per_step = [torch.nonzero(calib.step == s).flatten()[:max_per_step] for s in steps]
    sel = torch.cat(per_step)
    bounds = torch.tensor([0] + [len(i) for i in per_step]).cumsum(0).tolist()
    res = {"label": label, "steps": steps, "timesteps": ts, "n_per_step": [len(i) for i in per_step], "blocks": {}}
    with measure_state(q_model, fp_model, input_model), torch.enable_grad():
        units = _units(q_model, calib, device, block_names)
        for name, unit in tqdm(units, desc=f"gradient cosine {label}".strip(), unit="block", disable=not progress):
            data = _cache(q_model, fp_model, name, unit, calib, sel, device, p, input_model)
            with soft_rounding(unit) as theta:
                params = list(theta.values())
                grads = torch.stack([mean_gradient(data, torch.arange(bounds[k], bounds[k + 1], device=data.device),
                                                   params, chunk) for k in range(len(steps))])
            d = cosine_distance_matrix(grads)
            res["blocks"][name] = {"kind": type(unit).__name__, "n_params": int(grads.shape[1]), "distance": d,
                                   "grad_norm": grads.norm(dim=1), "mean_distance": _offdiag_mean(d)}
            del data, grads
    res["mean"] = _mean_block(res["blocks"])
    return res


def _mean_block(blocks: dict) -> dict:
    if not blocks:
        raise GacqError("no blocks to measure")
    stack = torch.stack([b["distance"] for b in blocks.values()])
    d = torch.nanmean(stack, dim=0)
    return {"kind": "mean over blocks", "n_blocks": len(blocks), "distance": d, "mean_distance": _offdiag_mean(d)}


# ---------------------------------------------------------------- Figure 2 ---
def check_weights(weights: dict, calib, val_fraction: float | None = None, groups: int | None = None,
                  seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """Validate GAC weights against a calibration set; returns (float64 weights, validation mask
    (weight exactly 0), how the split was checked)."""
    from .quant.gac import validation_split

    if not weights:
        raise GacqError("no GAC weights given")
    n = len(calib)
    wts = {}
    for name, w in weights.items():
        w = torch.as_tensor(w).double().flatten().cpu()
        if len(w) != n:
            raise GacqError(f"the GAC weights of block {name} cover {len(w)} samples but the calibration set has "
                            f"{n}: pass the calibration set the checkpoint was calibrated on")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise GacqError(f"the GAC weights of block {name} are not non-negative finite numbers")
        wts[name] = w
    val_mask = next(iter(wts.values())) == 0
    for name, w in wts.items():
        if not torch.equal(w == 0, val_mask):
            raise GacqError(f"the GAC weights of block {name} hold out other validation samples than those of "
                            f"block {next(iter(wts))}")
    split_check = "not checked (no GAC settings)"
    if val_fraction is not None and groups is not None:
        _, gidx = validation_split(calib.step, val_fraction, groups, seed)
        expect = torch.zeros(n, dtype=torch.bool)
        expect[torch.cat(gidx)] = True
        if not torch.equal(expect, val_mask):
            raise GacqError(f"the GAC weights' validation samples (weight 0) are not the timestep-balanced split of "
                            f"this calibration set (val_fraction={val_fraction}, groups={groups}, seed={seed}): "
                            "pass the calibration set the checkpoint was calibrated on")
        split_check = "agrees"
    return wts, val_mask, split_check


def weight_alignment(q_model: nn.Module, fp_model: nn.Module, calib, weights: dict[str, torch.Tensor],
                     val_fraction: float | None = None, groups: int | None = None, seed: int = 0,
                     n_groups: int = 50, block_names=None, device: torch.device | str = "cpu", p: float = 2.0,
                     input_model: nn.Module | None = None, chunk: int = 32, per_sample: str = "auto",
                     max_train: int | None = None, progress: bool = False) -> dict:
    """GAC's learned weights against gradient alignment, per block with weights.

    weights: {block name: weight of every calibration sample (0 for validation samples)}, as in a
    checkpoint's gac_weights.safetensors. The validation samples are those of weight exactly 0;
    with `val_fraction` and `groups`, `validation_split(calib.step, val_fraction, groups, seed)` is
    recomputed and must agree. For each block: alignment_i = cos(grad l_i, grad mean_val l) of every
    training sample i (all of them, or `max_train` drawn with `seed`), the training samples sorted by
    weight into min(n_groups, N_train) equal groups, each group's mean weight and mean alignment,
    their Pearson correlation, and the mean weight of each sampling step's training samples
    ('relative': times N_train, so 1 = uniform). 'mean' averages the group curves over blocks.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    wts, val_mask, split_check = check_weights(weights, calib, val_fraction, groups, seed)
    val = torch.nonzero(val_mask).flatten()
    train = torch.nonzero(~val_mask).flatten()
    if len(val) == 0 or len(train) < 2:
        raise GacqError(f"the GAC weights leave {len(val)} validation (weight 0) and {len(train)} training samples; "
                        "need at least 1 and 2")
    measured = train
    if max_train is not None and max_train < len(train):
        g = torch.Generator().manual_seed(seed)
        measured = train[torch.randperm(len(train), generator=g)[:max_train]].sort().values
    steps, ts = _steps(calib)
    n_train = len(train)
    k_groups = min(n_groups, len(measured))
    if k_groups < 2:
        raise GacqError(f"need at least 2 weight groups, got {k_groups}")
    res = {"steps": steps, "timesteps": ts, "n_train": n_train, "n_val": len(val), "n_measured": len(measured),
           "n_groups": k_groups, "split_check": split_check, "blocks": {}}
    sel = torch.cat([measured, val])
    with measure_state(q_model, fp_model, input_model), torch.enable_grad():
        units = _units(q_model, calib, device, block_names)
        known = {name for name, _ in _units(q_model, calib, device, None)} if block_names is not None else \
            {name for name, _ in units}
        unknown = [name for name in wts if name not in known]
        if unknown:
            raise GacqError(f"GAC weights for {', '.join(unknown[:5])}, which the quantized model has no block of")
        units = [(name, u) for name, u in units if name in wts]
        if not units:
            raise GacqError("none of the requested blocks has GAC weights")
        for name, unit in tqdm(units, desc="weight alignment", unit="block", disable=not progress):
            w = wts[name]
            data = _cache(q_model, fp_model, name, unit, calib, sel, device, p, input_model)
            m_pos = torch.arange(len(measured), device=data.device)
            v_pos = torch.arange(len(measured), len(sel), device=data.device)
            with soft_rounding(unit) as theta:
                g_val = mean_gradient(data, v_pos, list(theta.values()), chunk)
                gen = per_sample_gradients(data, m_pos, theta, chunk, per_sample)
                align = torch.empty(len(measured), dtype=torch.float64)
                vnorm = float(g_val.norm())
                for pos, g in gen:
                    norms = g.norm(dim=1)
                    cos = (g @ g_val) / (norms * vnorm)
                    cos[(norms == 0) | torch.tensor(vnorm == 0)] = math.nan
                    align[pos.cpu()] = cos.cpu()
            wm = w[measured]
            order = torch.sort(wm, stable=True).indices
            parts = torch.tensor_split(order, k_groups)
            gw = torch.stack([wm[i].mean() for i in parts])
            ga = torch.stack([torch.nanmean(align[i]) for i in parts])
            per_step = torch.stack([w[train[calib.step[train] == s]].mean() if (calib.step[train] == s).any()
                                    else torch.tensor(math.nan, dtype=torch.float64) for s in steps])
            res["blocks"][name] = {
                "kind": type(unit).__name__, "group_weight": gw, "group_relative_weight": gw * n_train,
                "group_alignment": ga, "group_size": [len(i) for i in parts], "correlation": pearson(gw, ga),
                "sample_correlation": pearson(wm, align), "alignment": align, "weight": wm,
                "val_grad_norm": vnorm, "weight_per_step": per_step, "relative_weight_per_step": per_step * n_train,
                "per_sample_method": gen.method}
            del data
    blocks = res["blocks"]
    gw = torch.stack([b["group_weight"] for b in blocks.values()]).mean(0)
    ga = torch.nanmean(torch.stack([b["group_alignment"] for b in blocks.values()]), 0)
    ps = torch.nanmean(torch.stack([b["weight_per_step"] for b in blocks.values()]), 0)
    res["mean"] = {"kind": "mean over blocks", "n_blocks": len(blocks), "group_weight": gw,
                   "group_relative_weight": gw * n_train, "group_alignment": ga, "correlation": pearson(gw, ga),
                   "mean_block_correlation": _nanmean([b["correlation"] for b in blocks.values()]),
                   "weight_per_step": ps, "relative_weight_per_step": ps * n_train}
    return res


def _nanmean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


# ------------------------------------------------------------------ writers ---
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def _save_csv(rows: list[list], path: Path) -> Path:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6g}"


def _ticks(ax, labels: list[int], axis: str) -> None:
    stride = max(1, math.ceil(len(labels) / 20))
    pos = list(range(0, len(labels), stride))
    getattr(ax, f"set_{axis}ticks")(pos)
    getattr(ax, f"set_{axis}ticklabels")([str(labels[i]) for i in pos], rotation=90 if axis == "x" else 0,
                                         fontsize=7)


def write_cosine_heatmap(result: dict, out_dir: str | Path, blocks: Iterable[str] | None = None) -> list[Path]:
    """cosine_<block>.png/.csv for every block of `result` (or those named) and cosine_mean.png/.csv."""
    out = Path(out_dir)
    ts = result["timesteps"]
    label = f" [{result['label']}]" if result.get("label") else ""
    entries = [(n, b) for n, b in result["blocks"].items() if blocks is None or n in set(blocks)]
    entries.append(("mean", result["mean"]))
    files = []
    for name, b in entries:
        d = b["distance"]
        stem = f"cosine_{_safe(name)}"
        rows = [["timestep"] + ts] + [[ts[i]] + [_num(float(v)) for v in d[i]] for i in range(len(ts))]
        files.append(_save_csv(rows, out / f"{stem}.csv"))
        fig = _figure()
        ax = fig.add_subplot()
        finite = d[~torch.isnan(d)]
        vmax = max(float(finite.max()) if len(finite) else 1.0, 1e-6)
        im = ax.imshow(d.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        _ticks(ax, ts, "x")
        _ticks(ax, ts, "y")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("timestep t")
        what = "mean over blocks" if name == "mean" else f"{name} ({b.get('kind', '')})"
        ax.set_title(f"{what}{label}\ncosine distance 1 - cos(grad_t, grad_t') of the quantization loss, "
                     f"mean {b['mean_distance']:.4f}", fontsize=9)
        fig.colorbar(im, ax=ax, label="1 - cosine")
        files.append(_save_png(fig, out / f"{stem}.png"))
    return files


def write_alignment(result: dict, out_dir: str | Path) -> list[Path]:
    """alignment.png/.csv (group mean weight vs mean alignment) and weight_per_timestep.png/.csv."""
    out = Path(out_dir)
    blocks, mean = result["blocks"], result["mean"]
    files = []
    rows = [["block", "group", "n", "mean_weight", "mean_relative_weight", "mean_alignment", "correlation"]]
    for name, b in list(blocks.items()) + [("mean", mean)]:
        sizes = b.get("group_size", next(iter(blocks.values()))["group_size"])
        for k in range(len(b["group_weight"])):
            rows.append([name, k, sizes[k], _num(float(b["group_weight"][k])),
                         _num(float(b["group_relative_weight"][k])), _num(float(b["group_alignment"][k])),
                         _num(b["correlation"])])
    files.append(_save_csv(rows, out / "alignment.csv"))
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    for b in blocks.values():
        ax.plot(b["group_relative_weight"].numpy(), b["group_alignment"].numpy(), ".", color="0.75", ms=3)
    ax.plot(mean["group_relative_weight"].numpy(), mean["group_alignment"].numpy(), "o-", color="C0", ms=4,
            label=f"mean over {len(blocks)} block(s)")
    if len(blocks) > 1:
        ax.plot([], [], ".", color="0.75", label="single blocks")
    ax.axvline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(f"mean learned weight of the group (x N_train = {result['n_train']}; 1 = uniform)")
    ax.set_ylabel("mean alignment: cos(sample gradient, validation gradient)")
    ax.set_title(f"GAC weight vs gradient alignment, {result['n_groups']} groups sorted by weight\n"
                 f"Pearson r = {mean['correlation']:.3f} (mean curve), "
                 f"{mean['mean_block_correlation']:.3f} (mean of the blocks' r)", fontsize=9)
    ax.legend(fontsize=8)
    files.append(_save_png(fig, out / "alignment.png"))

    ts, steps = result["timesteps"], result["steps"]
    rows = [["block", "step", "timestep", "mean_weight", "relative_weight"]]
    for name, b in list(blocks.items()) + [("mean", mean)]:
        for i, s in enumerate(steps):
            rows.append([name, s, ts[i], _num(float(b["weight_per_step"][i])),
                         _num(float(b["relative_weight_per_step"][i]))])
    files.append(_save_csv(rows, out / "weight_per_timestep.csv"))
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for b in blocks.values():
        ax.plot(ts, b["relative_weight_per_step"].numpy(), color="0.75", lw=0.8)
    ax.plot(ts, mean["relative_weight_per_step"].numpy(), "o-", color="C1", ms=3,
            label=f"mean over {len(blocks)} block(s)")
    if len(blocks) > 1:
        ax.plot([], [], color="0.75", label="single blocks")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("mean learned weight x N_train (1 = uniform)")
    ax.set_title("GAC: mean learned weight of the training samples per timestep", fontsize=9)
    ax.legend(fontsize=8)
    files.append(_save_png(fig, out / "weight_per_timestep.png"))
    return files


# ------------------------------------------------------------ orchestration ---
def fp_init_model(q_model: nn.Module, fp_model: nn.Module) -> nn.Module:
    """A copy of `q_model` with every quantized layer's weight set back to the FP model's, on the
    same grid, rounding to nearest: the grid-initialised model calibration started from."""
    init = copy.deepcopy(q_model)
    with torch.no_grad():
        for name, m in init.named_modules():
            if isinstance(m, QuantLayer):
                m.weight.copy_(_submodule(fp_model, name, "FP model").weight)
                m.adaround = None
    return init


def _check_pair(q_model: nn.Module, fp_model: nn.Module, qdir, model_spec) -> None:
    for name, m in q_model.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        try:
            ref = fp_model.get_submodule(name)
        except AttributeError:
            ref = None
        if ref is None or getattr(ref, "weight", None) is None or ref.weight.shape != m.weight.shape:
            raise GacqError(f"checkpoint {qdir} was not made from model {model_spec or 'bundled'} (its layer {name} "
                            "has no counterpart of the same shape there); pass the base model with --model")


def _base_model_spec(meta: dict) -> str | None:
    src = meta.get("base_model")
    if not isinstance(src, str) or not src or src.startswith("bundled:"):
        return None
    return src[len("hub:"):] if src.startswith("hub:") else src


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else round(v, 6)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _weight_calib(calib, meta: dict, n_weights: int):
    """The calibration samples the GAC weights refer to: the whole set, or the weight-stage subset
    that TFMQ-DM/GAC reconstruct on (`api._weight_subset`), from the checkpoint's settings."""
    if n_weights == len(calib):
        return calib, "the whole calibration set"
    cfg = meta.get("config") or {}
    try:
        from .quant.api import _weight_subset
        from .quant.methods import method_spec

        spec = method_spec(cfg.get("method", meta.get("method")), cfg.get("preset", "common"))
        sub = _weight_subset(calib, spec, int(cfg["calib"]["n_steps"]))
    except (GacqError, KeyError, TypeError, ValueError):
        sub = None
    if sub is None or len(sub) != n_weights:
        raise GacqError(f"the checkpoint's GAC weights cover {n_weights} calibration samples but the calibration set "
                        f"has {len(calib)}" + (f" ({len(sub)} in its weight-stage subset)" if sub is not None else "")
                        + ": pass the calibration set the checkpoint was calibrated on")
    return sub, f"the weight-stage subset ({len(sub)} of {len(calib)} samples, as the calibration used)"


def diagnose(qdir: str | Path | None, model: str | None, calib_folder: str | Path, out_dir: str | Path,
             blocks: list[str] | None = None, max_per_step: int = 32, device: torch.device | str = "cpu",
             n_groups: int = 50, wbits: int = 4, alignment: bool | None = None, per_sample: str = "auto",
             command: str | None = None, progress: bool = True) -> dict:
    """Write the diagnostics of a model (and a quantized checkpoint) into `out_dir`.

    - cosine_init/: Figure 1a for the grid-initialised model (round-to-nearest weights). With a
      checkpoint: its own layers and grid with the FP weights (`fp_init_model`; for the `common`
      presets the same model as `quantize(QuantConfig(method='rtn', abits=None))`); without one:
      that rtn model at `wbits`.
    - cosine_calibrated/: Figure 1a for the checkpoint's calibrated model.
    - alignment.png/.csv, weight_per_timestep.png/.csv: Figure 2, when the checkpoint holds GAC
      weights (`alignment=None`), required (`True`) or skipped (`False`).
    - diagnose.json: the numbers, inputs, command and commit.
    """
    from .models import LoadedModel, load_model
    from .quant.calib_data import CalibrationSet
    from .quant.checkpoint import is_quantized_folder, load_gac_weights

    t0 = time.time()
    device = torch.device(device)
    out = Path(out_dir)
    try:
        calib = CalibrationSet.load(calib_folder)
    except GacqError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GacqError(f"{calib_folder} is not a readable calibration set ({type(e).__name__}: {e})") from e
    if len(calib) == 0:
        raise GacqError(f"calibration set {calib_folder} is empty")
    meta: dict = {}
    gac_file = None
    if qdir is not None:
        qdir = Path(qdir)
        if not is_quantized_folder(qdir):
            raise GacqError(f"{qdir} is not a quantized checkpoint (no quant_config.json); make one with `gacq quantize`")
        try:
            meta = json.loads((qdir / "quant_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GacqError(f"{qdir}/quant_config.json is not readable JSON: {e}") from e
        gac_file = qdir / "gac_weights.safetensors"
        if not gac_file.exists():
            gac_file = None
        if model is None:
            model = _base_model_spec(meta)
    if alignment and gac_file is None:
        raise GacqError(f"{qdir if qdir is not None else 'no --qdir given'}: the weight/alignment figures need a GAC "
                        "checkpoint (method gac with meta-iterations > 0), which holds gac_weights.safetensors")
    fp_loaded = load_model(model, device=device)
    fp = fp_loaded.model.eval()
    files: list[Path] = []
    summary: dict[str, Any] = {
        "command": command, "commit": git_commit(), "model": fp_loaded.source, "qdir": str(qdir) if qdir else None,
        "calib": str(calib_folder), "n_calib": len(calib), "max_per_step": max_per_step, "device": str(device),
        "theta_Q": "AdaRound rounding variables V of each block's quantized layers (soft rounding at the current "
                   "quantized weight; clamps differentiated from inside)",
        "loss": "block reconstruction lp loss, p = 2, against the FP block output"}
    q = None
    if qdir is not None:
        q = load_model(qdir, device=device).model.eval()
        _check_pair(q, fp, qdir, model)
        init = fp_init_model(q, fp)
        summary["init_model"] = "the checkpoint's layers and weight grids with the FP weights, round-to-nearest"
    else:
        from .quant.api import QuantConfig, quantize

        init = quantize(LoadedModel(fp, fp_loaded.scheduler_config, fp_loaded.source),
                        QuantConfig(method="rtn", wbits=wbits, abits=None), None, device=device, progress=False)
        summary["init_model"] = f"rtn (common preset), W{wbits}, round-to-nearest on the MSE-searched grid"
    # a bad block name, or weights that do not fit the calibration set, fail before any measurement
    with measure_state(init):
        _units(init, calib, device, blocks)
    weights = wcal = which = None
    if gac_file is not None and alignment is not False:
        try:
            weights, _ = load_gac_weights(gac_file)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise GacqError(f"{gac_file} is not readable ({e})") from e
        if not weights:
            raise GacqError(f"{gac_file} holds no GAC weights")
        if blocks is not None:
            weights = {k: v for k, v in weights.items() if k in set(blocks)}
            if not weights:
                raise GacqError(f"none of the blocks {', '.join(blocks)} has GAC weights in {gac_file}")
        n_w = {len(v) for v in weights.values()}
        if len(n_w) != 1:
            raise GacqError(f"{gac_file}: the blocks' weights have different lengths {sorted(n_w)}")
        wcal, which = _weight_calib(calib, meta, n_w.pop())
        gcfg = (meta.get("config") or {}).get("gac") or {}
        check_weights(weights, wcal, gcfg.get("val_fraction"), gcfg.get("groups"), int(gcfg.get("seed", 0)))
        known = {name for name, _ in _units(init, calib, device, None)}
        unknown = [name for name in weights if name not in known]
        if unknown:
            raise GacqError(f"{gac_file} has weights for {', '.join(unknown[:5])}, which the checkpoint has no "
                            "block of")

    res_init = timestep_gradient_cosine(init, fp, calib, blocks, max_per_step, device, label="grid init (RTN)",
                                        progress=progress)
    files += write_cosine_heatmap(res_init, out / "cosine_init")
    res_cal = None
    if q is not None:
        res_cal = timestep_gradient_cosine(q, fp, calib, blocks, max_per_step, device, label="calibrated",
                                           progress=progress)
        files += write_cosine_heatmap(res_cal, out / "cosine_calibrated")
    cos = {"steps": res_init["steps"], "timesteps": res_init["timesteps"], "n_per_step": res_init["n_per_step"],
           "mean_distance": {}}
    for name in list(res_init["blocks"]) + ["mean"]:
        b = res_init["blocks"].get(name, res_init["mean"])
        row = {"init": b["mean_distance"]}
        if res_cal is not None:
            c = res_cal["blocks"].get(name) if name != "mean" else res_cal["mean"]
            row["calibrated"] = c["mean_distance"] if c is not None else None
        cos["mean_distance"][name] = row
    cos["mean_matrix"] = {"init": res_init["mean"]["distance"]}
    if res_cal is not None:
        cos["mean_matrix"]["calibrated"] = res_cal["mean"]["distance"]
    summary["cosine"] = cos

    if weights is not None:
        al = weight_alignment(init, fp, wcal, weights, gcfg.get("val_fraction"), gcfg.get("groups"),
                              int(gcfg.get("seed", 0)), n_groups, block_names=None, device=device,
                              input_model=q, per_sample=per_sample, progress=progress)
        files += write_alignment(al, out)
        summary["alignment"] = {
            "samples": which, "n_train": al["n_train"], "n_val": al["n_val"], "n_groups": al["n_groups"],
            "split_check": al["split_check"],
            "measured_at": "each block at its grid init (FP weights, soft rounding) with inputs from the calibrated "
                           "checkpoint: the conditions under which GAC learned the block's weights",
            "correlation": {**{n: b["correlation"] for n, b in al["blocks"].items()}, "mean": al["mean"]["correlation"],
                            "mean_over_blocks": al["mean"]["mean_block_correlation"]},
            "sample_correlation": {n: b["sample_correlation"] for n, b in al["blocks"].items()},
            "per_sample_method": {n: b["per_sample_method"] for n, b in al["blocks"].items()},
            "weight_per_timestep": {"steps": al["steps"], "timesteps": al["timesteps"],
                                    "relative_weight_mean": al["mean"]["relative_weight_per_step"],
                                    "relative_weight": {n: b["relative_weight_per_step"] for n, b in al["blocks"].items()}}}
    elif gac_file is None:
        summary["alignment"] = None if qdir is None else "the checkpoint has no GAC weights (gac_weights.safetensors)"
    else:
        summary["alignment"] = "skipped (--no-alignment)"
    summary["wall_seconds"] = round(time.time() - t0, 2)
    files.append(out / "diagnose.json")
    summary["files"] = sorted(str(f.relative_to(out)) for f in files)
    write_json(out / "diagnose.json", _jsonable(summary))
    return summary


# ------------------------------------------------------- GAC weights per sampling step (experiment reports) ---
def gac_weight_profile(qdir: str | Path) -> dict:
    """GAC's learned sample weights of a checkpoint, per block: the effective sample size over the training
    samples (ESS / N: 1 = uniform) and the mean relative weight (1 = uniform) of each recorded sampling step's
    training samples (validation samples, weight 0, are left out).

    Each weighted sample's sampling step comes from the checkpoint (`gac_weights.safetensors`, gacq from
    2026-12-02). Older checkpoints are read as gacq lays its weight subsets out: step-major, equal counts, the
    `calib.n_steps` steps taken uniformly from the calibration sampler's steps (j * steps // n_steps); the result
    says which (`step_source`)."""
    from .quant.checkpoint import load_gac_weights

    qdir = Path(qdir)
    gac_file = qdir / "gac_weights.safetensors"
    if not gac_file.exists():
        raise GacqError(f"{qdir} holds no GAC weights (gac_weights.safetensors): not a gac checkpoint with "
                        "meta-iterations > 0")
    try:
        meta = json.loads((qdir / "quant_config.json").read_text())
        weights, samples = load_gac_weights(gac_file)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise GacqError(f"{qdir}: the GAC weights or quant_config.json are not readable ({e})") from e
    if not weights:
        raise GacqError(f"{gac_file} holds no GAC weights")
    n = len(next(iter(weights.values())))
    timestep = samples.get("timestep")
    if "sampling_step" in samples:
        step, source = samples["sampling_step"].long(), "recorded in the checkpoint"
    else:
        cfg = meta.get("config", {})
        k = int(cfg.get("calib", {}).get("n_steps") or 0)
        total = int((meta.get("calibration_meta") or {}).get("sampler", {}).get("steps") or 0)
        if k <= 0 or n % k or total < k:
            raise GacqError(f"{qdir}: the checkpoint does not record its samples' sampling steps, and {n} weights do "
                            f"not split into its {k} calibration steps of a {total}-step sampler")
        step = (torch.arange(k) * (total // k)).repeat_interleave(n // k)
        source = f"inferred: step-major, {k} equal groups at steps j * {total // k} (the checkpoint predates the record)"
    steps = sorted(int(s) for s in torch.unique(step))
    blocks = {}
    for name, w in sorted(weights.items()):
        w = w.double().flatten()
        if len(w) != len(step):
            raise GacqError(f"{qdir}: block {name} has {len(w)} weights for {len(step)} samples")
        train = w > 0
        rel = w / w[train].mean()
        blocks[name] = {"ess_over_n": float(w[train].sum() ** 2 / (w[train] ** 2).sum() / int(train.sum())),
                        "mean_rel_per_step": [float(rel[(step == s) & train].mean()) for s in steps]}
    curves = torch.tensor([b["mean_rel_per_step"] for b in blocks.values()])
    return {"qdir": str(qdir), "job": qdir.name, "method": meta.get("config", {}).get("method"),
            "wbits": meta.get("config", {}).get("wbits"), "abits": meta.get("config", {}).get("abits"),
            "commit": meta.get("commit"), "n_samples": n, "steps": steps, "step_source": source,
            "timesteps": None if timestep is None else [int(timestep[step == s][0]) for s in steps],
            "mean_over_blocks": curves.mean(0).tolist(),
            "min_over_blocks": curves.min(0).values.tolist(), "max_over_blocks": curves.max(0).values.tolist(),
            "blocks": blocks}
