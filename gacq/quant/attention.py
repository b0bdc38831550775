"""Quantized attention matmuls: fake quantizers on q, k, v and the softmax probabilities.

Q-Diffusion (shared/docs/baselines.md §2.1) puts four per-tensor quantizers inside attention, on the
inputs of the two matmuls: q and k (for q·kᵀ) and the softmax output and v (for probs·v). Here they
live in a diffusers attention processor, `QuantAttnProcessor`, set on every
`diffusers.models.attention_processor.Attention` (found by type), so one code path serves
UNet2DModel (DDPM self-attention), UNet2DConditionModel (self- and cross-attention) and DiT.

The processor reproduces diffusers' `AttnProcessor` (with `AttnProcessor2_0`'s optional q/k norms):
the 1/sqrt(d) scale is applied after q·kᵀ, as in Q-Diffusion's DDIM attention block. Per-tensor
quantization does not care where the head split happens. With `quant` off the output equals the
default processor's to float rounding.

The softmax quantizer has its own bit width (2..16) and one of two grids:
    'symmetric': signed grid, scale = max/(2^(b-1)-1), zero point 0 (Q-Diffusion CIFAR, `--a_sym`);
                 probabilities are >= 0, so only levels 0..2^(b-1)-1 are used.
    'zero':      unsigned grid 0..2^b-1 with the zero point fixed at 0, scale = max/(2^b-1)
                 (Q-Diffusion LDM/SD `always_zero`).
All four step sizes are Parameters (`learn_scale=True`) for an LSQ-style activation stage.
Because the processor is an nn.Module, `Attention.set_processor` registers it as a submodule, and
its quantizer state (`<attn>.processor.{q,k,v,softmax}.{scale,zero_point,initialized}`) is part of
the model's state dict.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import GacqError
from .primitives import MIN_SCALE, fake_quantize
from .quantizer import UniformQuantizer

SOFTMAX_MODES = ("symmetric", "zero")
TENSORS = ("q", "k", "v", "softmax")


def _softmax_qrange(bits: int, mode: str) -> tuple[int, int]:
    if mode == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class SoftmaxQuantizer(UniformQuantizer):
    """Per-tensor quantizer of attention probabilities: 2..16 bits, 'symmetric' or 'zero' grid.

    A UniformQuantizer (same buffers, `enabled` flag and forward) whose integer range and
    initialisation follow `mode`; 'zero' keeps the zero point at 0 (values below 0 clamp to 0).
    """

    def __init__(self, bits: int, mode: str = "symmetric", learn_scale: bool = True):
        if mode not in SOFTMAX_MODES:
            raise GacqError(f"softmax quantizer mode {mode!r} is unknown; use one of {', '.join(SOFTMAX_MODES)}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise GacqError(f"softmax bit width {bits!r} is not supported; use 2 to 16 bits")
        # the base class checks 2..8 bits; its grid is replaced below
        super().__init__(min(bits, 8), symmetric=mode == "symmetric", learn_scale=learn_scale)
        self.bits, self.mode = bits, mode
        self.qmin, self.qmax = _softmax_qrange(bits, mode)

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "symmetric":
            scale = torch.maximum(lo.abs(), hi.abs()) / self.qmax
        else:
            scale = hi.clamp(min=0) / self.qmax
        scale = scale.clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)

    def init_minmax(self, x: torch.Tensor) -> None:
        x = x.detach()
        self._set(*self._qparams(x.amin(), x.amax()))

    def init_mse(self, x: torch.Tensor, p: float = 2.4, n_candidates: int = 80) -> None:
        """The 80-candidate shrinking-range search of `choose_qparams_mse`, on this quantizer's grid."""
        x = x.detach()
        lo0, hi0 = x.amin(), x.amax()
        best = None
        for i in range(n_candidates):
            shrink = 1.0 - 0.01 * i
            scale, zp = self._qparams(lo0 * shrink, hi0 * shrink)
            err = (x - fake_quantize(x, scale, zp, self.qmin, self.qmax)).abs().pow(p).mean()
            if best is None or err < best[0]:
                best = (err, scale, zp)
        self._set(best[1], best[2])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, per-tensor"


class QuantAttnProcessor(nn.Module):
    """Diffusers attention processor with fake-quantized q, k, v and softmax probabilities.

    Args:
        abits: bit width of the q, k and v quantizers (2..8).
        softmax_bits: bit width of the softmax quantizer (2..16).
        symmetric: symmetric q/k/v quantizers (else asymmetric with a zero point).
        softmax_mode: 'symmetric' or 'zero' (see the module docstring).

    `quant` (default False) switches all four quantizers; each one's `enabled` flag can turn it off
    alone. `observing` (set by `init_attention_quantizers`) records per-tensor min/max instead.
    """

    def __init__(self, abits: int, softmax_bits: int = 8, symmetric: bool = False, softmax_mode: str = "symmetric"):
        super().__init__()
        _check_bits(abits, softmax_bits, softmax_mode)
        self.q = UniformQuantizer(abits, symmetric=symmetric, learn_scale=True)
        self.k = UniformQuantizer(abits, symmetric=symmetric, learn_scale=True)
        self.v = UniformQuantizer(abits, symmetric=symmetric, learn_scale=True)
        self.softmax = SoftmaxQuantizer(softmax_bits, softmax_mode, learn_scale=True)
        self.quant = False
        self.observing = False
        self.observed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # Attention.forward filters keyword arguments by the signature of `processor.__call__`, so
    # __call__ keeps diffusers' signature and goes through nn.Module.__call__ (hooks work).
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _tap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = x.detach().amin(), x.detach().amax()
            if name in self.observed:
                lo, hi = torch.minimum(lo, self.observed[name][0]), torch.maximum(hi, self.observed[name][1])
            self.observed[name] = (lo, hi)
            return x
        if not self.quant:
            return x
        return getattr(self, name)(x).to(x.dtype)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # diffusers AttnProcessor, step for step
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        # AttnProcessor2_0 applies the optional per-head q/k norms here
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # the matmul inputs, per tensor (the head split does not change a per-tensor grid)
        query, key, value = self._tap("q", query), self._tap("k", key), self._tap("v", value)

        # attn.get_attention_scores, with the probabilities quantized before probs·v
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            baddbmm_input = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                        device=query.device)
            beta = 0
        else:
            baddbmm_input, beta = attention_mask, 1
        scores = torch.baddbmm(baddbmm_input, query, key.transpose(-1, -2), beta=beta, alpha=attn.scale)
        if attn.upcast_softmax:
            scores = scores.float()
        probs = self._tap("softmax", scores.softmax(dim=-1)).to(dtype)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def extra_repr(self) -> str:
        return f"quant={self.quant}"


def _check_bits(abits: int, softmax_bits: int, softmax_mode: str) -> None:
    if isinstance(abits, bool) or not isinstance(abits, int) or not 2 <= abits <= 8:
        raise GacqError(f"attention activation bit width {abits!r} is not supported; use 2 to 8 bits")
    if isinstance(softmax_bits, bool) or not isinstance(softmax_bits, int) or not 2 <= softmax_bits <= 16:
        raise GacqError(f"softmax bit width {softmax_bits!r} is not supported; use 2 to 16 bits")
    if softmax_mode not in SOFTMAX_MODES:
        raise GacqError(f"softmax mode {softmax_mode!r} is unknown; use one of {', '.join(SOFTMAX_MODES)}")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def install_attention_quantizers(model: nn.Module, abits: int, softmax_bits: int = 8, symmetric: bool = False,
                                 softmax_mode: str = "symmetric") -> list[str]:
    """Set a fresh `QuantAttnProcessor` (quant off, uninitialised) on every diffusers `Attention`, in place.

    Only Attention modules running diffusers' default processor (`AttnProcessor` or
    `AttnProcessor2_0`, or an earlier QuantAttnProcessor, which is replaced) are supported.
    Returns the Attention module names in order.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    _check_bits(abits, softmax_bits, softmax_mode)
    targets = _attention_modules(model)
    if not targets:
        raise GacqError("the model has no diffusers Attention modules, so there is no attention to quantize")
    for name, attn in targets:
        if not isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0, QuantAttnProcessor)):
            raise GacqError(
                f"attention module {name} uses {type(attn.processor).__name__}; attention quantization supports "
                "only diffusers' default AttnProcessor / AttnProcessor2_0"
            )
    ref = next(model.parameters(), None)
    for _, attn in targets:
        proc = QuantAttnProcessor(abits, softmax_bits, symmetric, softmax_mode)
        if ref is not None:
            proc.to(ref.device)
        attn.set_processor(proc)
    return [name for name, _ in targets]


def attention_quantizers(model: nn.Module) -> list[tuple[str, QuantAttnProcessor]]:
    """(Attention module name, its QuantAttnProcessor) for every installed processor, in order."""
    return [(n, m.processor) for n, m in _attention_modules(model) if isinstance(m.processor, QuantAttnProcessor)]


def set_attention_quant(model: nn.Module, on: bool) -> int:
    """Switch fake quantization of every attention processor; returns how many were switched."""
    procs = attention_quantizers(model)
    for _, p in procs:
        p.quant = bool(on)
    return len(procs)


@torch.no_grad()
def init_attention_quantizers(model: nn.Module, batches: Iterable[tuple], forward: Callable[..., object]) -> None:
    """Min-max initialisation of every attention quantizer over `forward(model, *batch)` for each batch.

    The attention quantizers observe with quantization off (other layers run in whatever state they
    are in); afterwards each processor's `quant` flag is what it was before. Per tensor:
    asymmetric q/k/v: scale = (max - min)/(2^b - 1) over a range widened to include 0;
    symmetric: absmax/(2^(b-1) - 1); softmax 'zero': max/(2^b - 1), zero point 0.
    """
    procs = attention_quantizers(model)
    if not procs:
        raise GacqError("the model has no attention quantizers; call install_attention_quantizers first")
    states = [p.quant for _, p in procs]
    for _, p in procs:
        p.observed, p.observing, p.quant = {}, True, False
    try:
        for batch in batches:
            forward(model, *batch)
    finally:
        for (_, p), quant in zip(procs, states):
            p.observing, p.quant = False, quant
    try:
        for name, p in procs:
            if set(p.observed) != set(TENSORS):
                raise GacqError(f"no calibration input reached attention module {name}; "
                                "the calibration batches or the forward function do not cover it")
        for _, p in procs:
            for t in TENSORS:
                lo, hi = p.observed[t]
                getattr(p, t).init_minmax(torch.stack([lo, hi]))
    finally:
        for _, p in procs:
            p.observed = {}
