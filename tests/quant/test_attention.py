"""Attention matmul quantization on real tiny diffusers models (DDPM UNet, cross-attention UNet, DiT)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, SlicedAttnProcessor

from gacq.errors import GacqError
from gacq.models import NAMED_CONFIGS, build_model
from gacq.quant.attention import (
    QuantAttnProcessor, SoftmaxQuantizer, attention_quantizers, init_attention_quantizers,
    install_attention_quantizers, set_attention_quant,
)
from gacq.quant.wrap import quant_layers, set_quant_state, wrap_layers


# ---- tiny models, batches and forward functions ------------------------------------------------

def _unet(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny").eval()


def _cond(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
    ).eval()


def _dit(seed=0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2,
                                 attention_head_dim=4, norm_num_groups=2).eval()


def _b_unet(g):
    return torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g)


def _b_cond(g):
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
            torch.randn(2, 5, 8, generator=g))


def _b_dit(g):
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
            torch.randint(0, 1000, (2,), generator=g))


def _f_unet(m, x, t):
    return m(x, t).sample


def _f_cond(m, x, t, e):
    return m(x, t, encoder_hidden_states=e).sample


def _f_dit(m, x, t, c):
    return m(x, t, class_labels=c).sample


CASES = {"unet2d": (_unet, _b_unet, _f_unet), "cond": (_cond, _b_cond, _f_cond), "dit": (_dit, _b_dit, _f_dit)}


def _data(case, n_cal=3, seed=1):
    _, batch, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    return [batch(g) for _ in range(n_cal)], batch(g)


def _quantized(case, abits=8, softmax_bits=8, symmetric=False, softmax_mode="symmetric", seed=0):
    make, _, fwd = CASES[case]
    model = make(seed)
    install_attention_quantizers(model, abits, softmax_bits, symmetric, softmax_mode)
    cal, _ = _data(case)
    init_attention_quantizers(model, cal, fwd)
    set_attention_quant(model, True)
    return model


def _rel_err(ref, out):
    return float((out - ref).norm() / ref.norm())


# ---- install: by type, registered as submodules, state in the state dict -----------------------

@pytest.mark.parametrize("case", list(CASES))
def test_install_by_type_registers_processor_state(case):
    model = CASES[case][0]()
    expected = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    names = install_attention_quantizers(model, 8)
    assert names == expected and len(names) >= 1
    assert [n for n, _ in attention_quantizers(model)] == names
    modules = dict(model.named_modules())
    sd = model.state_dict()
    for n, proc in attention_quantizers(model):
        assert isinstance(proc, QuantAttnProcessor) and proc.quant is False
        assert modules[f"{n}.processor"] is proc  # registered by Attention.set_processor
        for t in ("q", "k", "v", "softmax"):
            for buf in ("scale", "zero_point", "initialized"):
                assert f"{n}.processor.{t}.{buf}" in sd
            assert isinstance(getattr(proc, t).scale, torch.nn.Parameter)
    assert set_attention_quant(model, True) == len(names)
    assert all(p.quant for _, p in attention_quantizers(model))


# ---- quant off == diffusers' default processor ---------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_quant_off_matches_default_processor(case):
    make, _, fwd = CASES[case]
    fp = make()
    _, (batch) = _data(case)
    # module level: the same Attention with its default processor, the legacy AttnProcessor and ours
    captured = []
    handles = [m.register_forward_hook(lambda mod, args, kwargs, out: captured.append((mod, args, kwargs)),
                                       with_kwargs=True)
               for m in fp.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        ref = fwd(fp, *batch)
    for h in handles:
        h.remove()
    assert captured
    with torch.no_grad():
        for attn, args, kwargs in captured:
            default = attn.processor
            outs = [attn(*args, **kwargs)]
            for proc in (AttnProcessor(), QuantAttnProcessor(8)):
                attn.set_processor(proc)
                outs.append(attn(*args, **kwargs))
            attn.set_processor(default)
            torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=1e-5)
    # model level, and quant off after init is still FP
    q = copy.deepcopy(fp)
    install_attention_quantizers(q, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fwd(q, *batch), ref, rtol=0, atol=1e-5)
        init_attention_quantizers(q, _data(case)[0], fwd)
        torch.testing.assert_close(fwd(q, *batch), ref, rtol=0, atol=1e-5)


# ---- 8 bits close to FP, 4 bits clearly farther -------------------------------------------------

@pytest.mark.parametrize("mode", ["symmetric", "zero"])
@pytest.mark.parametrize("case", list(CASES))
def test_8bit_close_and_4bit_farther(case, mode):
    make, _, fwd = CASES[case]
    _, batch = _data(case)
    with torch.no_grad():
        ref = fwd(make(), *batch)
        err = {b: _rel_err(ref, fwd(_quantized(case, b, b, softmax_mode=mode), *batch)) for b in (8, 4)}
    # measured: 8 bits 2e-4..3e-3, 4 bits 6e-3..6e-2 (16-40x larger)
    assert err[8] < 1e-2
    assert err[4] > 5 * err[8]


# ---- softmax grids -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["symmetric", "zero"])
def test_softmax_grid_levels_and_zero_point(mode):
    case = "cond"
    model = _quantized(case, 8, 8, softmax_mode=mode)
    probs = []
    handles = [p.softmax.register_forward_hook(lambda mod, args, out: probs.append((mod, out)))
               for _, p in attention_quantizers(model)]
    cal, _ = _data(case)
    with torch.no_grad():
        for batch in cal:  # the calibration batches: the top level must be reached in one of them
            CASES[case][2](model, *batch)
    for h in handles:
        h.remove()
    assert len(probs) == len(cal) * len(attention_quantizers(model))
    top = 127 if mode == "symmetric" else 255  # symmetric: probabilities use only levels 0..127
    peak: dict[int, float] = {}
    for sq, out in probs:
        assert sq.zero_point.item() == 0.0
        assert (out >= 0).all()
        levels = torch.round(out / sq.scale)
        assert levels.min() >= 0 and levels.max() <= top
        peak[id(sq)] = max(peak.get(id(sq), 0.0), levels.max().item())
        torch.testing.assert_close(levels * sq.scale, out, rtol=0, atol=1e-6)
    assert set(peak.values()) == {float(top)}  # max-initialised: the top level is used


def test_softmax_quantizer_wide_grid_and_mse():
    x = torch.softmax(torch.randn(4, 16, 16), dim=-1)
    for mode, qmax in (("symmetric", 2**15 - 1), ("zero", 2**16 - 1)):
        sq = SoftmaxQuantizer(16, mode)
        assert sq.qmax == qmax and sq.bits == 16
        sq.init_minmax(x)
        torch.testing.assert_close(sq.scale, x.max() / qmax, rtol=1e-6, atol=0)
        assert sq.zero_point.item() == 0.0
        assert (sq(x) - x).abs().max() <= sq.scale / 2 + 1e-7
    sq = SoftmaxQuantizer(4, "zero")
    sq.init_mse(x)
    assert sq.zero_point.item() == 0.0 and sq.scale.item() <= float(x.max()) / 15 + 1e-7
    assert (sq(x) >= 0).all()


# ---- numerics against a naive reference ----------------------------------------------------------

def _fq(x, quantizer):
    s, z = quantizer.scale.item(), quantizer.zero_point.item()
    return (torch.clamp(torch.round(x / s) + z, quantizer.qmin, quantizer.qmax) - z) * s


def _naive_attention(attn, proc, x, enc):
    """Attention from the Linear weights, with q, k, v, probs fake-quantized by round/clamp."""
    residual = x
    four_d = x.ndim == 4
    if four_d:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    enc = x if enc is None else enc
    q = F.linear(x, attn.to_q.weight, attn.to_q.bias)
    k = F.linear(enc, attn.to_k.weight, attn.to_k.bias)
    v = F.linear(enc, attn.to_v.weight, attn.to_v.bias)
    q, k, v = _fq(q, proc.q), _fq(k, proc.k), _fq(v, proc.v)
    heads, d = attn.heads, q.shape[-1] // attn.heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * d**-0.5, dim=-1)
    out = _fq(probs, proc.softmax) @ split(v)
    out = out.permute(0, 2, 1, 3).reshape(out.shape[0], -1, heads * d)
    out = F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)
    if four_d:
        out = out.transpose(1, 2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_numerics_match_naive_reference(case, symmetric):
    model = _quantized(case, 4, 6, symmetric=symmetric, softmax_mode="zero" if symmetric else "symmetric")
    captured = []
    handles = [m.register_forward_hook(lambda mod, args, kwargs, out: captured.append((mod, args, kwargs, out)),
                                       with_kwargs=True)
               for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        CASES[case][2](model, *_data(case)[1])
    for h in handles:
        h.remove()
    assert len(captured) == len(attention_quantizers(model))
    kinds = set()
    with torch.no_grad():
        for attn, args, kwargs, out in captured:
            assert kwargs.get("attention_mask") is None
            x = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get("encoder_hidden_states")
            kinds.add((x.ndim, enc is not None))
            ref = _naive_attention(attn, attn.processor, x, enc)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if case == "unet2d":
        assert (4, False) in kinds
    if case == "cond":
        assert (3, True) in kinds and (3, False) in kinds


def test_minmax_init_matches_observed_ranges():
    case = "cond"
    make, _, fwd = CASES[case]
    model = make()
    install_attention_quantizers(model, 8, 8, symmetric=False, softmax_mode="zero")
    cal, _ = _data(case)
    # independent observation: the to_q / to_k / to_v outputs of the FP model, probabilities recomputed
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    handles = []
    for name, attn in model.named_modules():
        if isinstance(attn, Attention):
            for t in ("q", "k", "v"):
                handles.append(getattr(attn, f"to_{t}").register_forward_hook(
                    lambda mod, args, out, key=(name, t): seen.setdefault(key, []).append(out)))
    with torch.no_grad():
        for batch in cal:
            fwd(model, *batch)
    for h in handles:
        h.remove()
    init_attention_quantizers(model, cal, fwd)
    for name, proc in attention_quantizers(model):
        attn = model.get_submodule(name)
        heads = attn.heads
        for t in ("q", "k", "v"):
            x = torch.cat([o.flatten() for o in seen[(name, t)]])
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            q = getattr(proc, t)
            assert q.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
            assert q.zero_point.item() == round(-lo / q.scale.item())
        pmax = 0.0
        for qo, ko in zip(seen[(name, "q")], seen[(name, "k")]):
            d = qo.shape[-1] // heads
            qh = qo.reshape(*qo.shape[:2], heads, d).transpose(1, 2)
            kh = ko.reshape(*ko.shape[:2], heads, d).transpose(1, 2)
            pmax = max(pmax, float(torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, -1).max()))
        assert proc.softmax.scale.item() == pytest.approx(pmax / 255, rel=1e-5)
        assert proc.softmax.zero_point.item() == 0.0


# ---- state dict, learned step sizes, interplay with wrapped layers ------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_exact(case):
    make, _, fwd = CASES[case]
    a = _quantized(case, 6, 8, symmetric=True, softmax_mode="zero")
    b = make(seed=123)  # different weights: everything must come from the state dict
    install_attention_quantizers(b, 6, 8, symmetric=True, softmax_mode="zero")
    b.load_state_dict(a.state_dict(), strict=True)
    set_attention_quant(b, True)
    assert all(bool(getattr(p, t).initialized) for _, p in attention_quantizers(b) for t in ("q", "k", "v", "softmax"))
    _, batch = _data(case)
    with torch.no_grad():
        assert torch.equal(fwd(a, *batch), fwd(b, *batch))


@pytest.mark.parametrize("case", ["unet2d", "cond"])
def test_gradient_reaches_step_sizes(case):
    model = _quantized(case, 8, 8)
    for p in model.parameters():
        p.requires_grad_(False)
    procs = attention_quantizers(model)
    scales = [getattr(p, t).scale for _, p in procs for t in ("q", "k", "v", "softmax")]
    for s in scales:
        s.requires_grad_(True)
    out = CASES[case][2](model, *_data(case)[1])
    out.pow(2).mean().backward()
    for _, p in procs:
        for t in ("q", "k", "v", "softmax"):
            g = getattr(p, t).scale.grad
            assert g is not None and torch.isfinite(g).all()
    assert any(float(p.q.scale.grad.abs()) > 0 for _, p in procs)


def test_works_with_wrapped_linear_layers():
    case = "cond"
    make, _, fwd = CASES[case]
    fp = make()
    cal, batch = _data(case)
    model = make()
    wrap_layers(model, 8, 8)  # to_q/to_k/to_v/to_out.0 become QuantLinear
    names = install_attention_quantizers(model, 8)
    assert not any(n.split(".")[-1] in ("q", "k", "v", "softmax") for n, _ in quant_layers(model))
    set_quant_state(model, weights=False, acts=False)
    with torch.no_grad():
        ref = fwd(fp, *batch)
        torch.testing.assert_close(fwd(model, *batch), ref, rtol=0, atol=1e-5)
    init_attention_quantizers(model, cal, fwd)
    set_attention_quant(model, True)
    with torch.no_grad():
        assert _rel_err(ref, fwd(model, *batch)) < 1e-2
    assert len(names) == len(attention_quantizers(model))


def test_init_restores_quant_flag_and_observes_unquantized():
    case = "dit"
    make, _, fwd = CASES[case]
    model = make()
    install_attention_quantizers(model, 8)
    set_attention_quant(model, True)  # uninitialised: init must observe with quant off
    init_attention_quantizers(model, _data(case)[0], fwd)
    assert all(p.quant and not p.observing and not p.observed for _, p in attention_quantizers(model))


# ---- errors --------------------------------------------------------------------------------------

def test_errors():
    model = _unet()
    for kwargs, match in (({"abits": 1}, "2 to 8"), ({"abits": 9}, "2 to 8"), ({"abits": True}, "2 to 8"),
                          ({"abits": 8, "softmax_bits": 1}, "2 to 16"), ({"abits": 8, "softmax_bits": 17}, "2 to 16"),
                          ({"abits": 8, "softmax_mode": "asym"}, "softmax mode")):
        with pytest.raises(GacqError, match=match):
            install_attention_quantizers(model, **kwargs)
    assert not attention_quantizers(model)  # nothing installed by a failed call
    no_attn = build_model({**NAMED_CONFIGS["tiny"], "down_block_types": ("DownBlock2D", "DownBlock2D"),
                           "up_block_types": ("UpBlock2D", "UpBlock2D"), "add_attention": False})
    with pytest.raises(GacqError, match="no diffusers Attention"):
        install_attention_quantizers(no_attn, 8)
    with pytest.raises(GacqError, match="no diffusers Attention"):
        install_attention_quantizers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 8)
    with pytest.raises(GacqError, match="install_attention_quantizers first"):
        init_attention_quantizers(model, _data("unet2d")[0], _f_unet)
    # an unsupported processor on one module
    sliced = _unet()
    name = next(n for n, m in sliced.named_modules() if isinstance(m, Attention))
    sliced.get_submodule(name).set_processor(SlicedAttnProcessor(2))
    with pytest.raises(GacqError, match=f"{name} uses SlicedAttnProcessor"):
        install_attention_quantizers(sliced, 8)
    # used before initialisation
    install_attention_quantizers(model, 8)
    set_attention_quant(model, True)
    x, t = _data("unet2d")[1]
    with pytest.raises(GacqError, match="before initialisation"):
        model(x, t)
    # no calibration batch reached the attention modules
    first = attention_quantizers(model)[0][0]
    with pytest.raises(GacqError, match=f"no calibration input reached attention module {first};"):
        init_attention_quantizers(model, [], _f_unet)
    assert not any(bool(p.q.initialized) for _, p in attention_quantizers(model))
