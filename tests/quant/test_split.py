"""Q-Diffusion's shortcut splitting (baselines.md §2.4) on diffusers up blocks."""

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gacq.errors import GacqError
from gacq.models import DDPM_SCHEDULE, build_model, load_model
from gacq.quant.checkpoint import save_quantized
from gacq.quant.modules import QuantConv2d, QuantLayer
from gacq.quant.primitives import choose_qparams_mse, fake_quantize, qparams_from_range
from gacq.quant.recon import ReconConfig, capture_unit_io, reconstruct_unit
from gacq.quant.wrap import (
    apply_shortcut_splits, find_shortcut_splits, init_act_quantizers_minmax, observe_input_ranges, quant_layers,
    set_quant_state, split_range_key, wrap_layers,
)


# ------------------------------------------------------------------ finding splits ---
def _measure_splits(model: nn.Module, run) -> dict[str, int]:
    """Runtime measurement, independent of find_shortcut_splits: for every resnet of an up block, the
    channels of hidden_states in its input = input channels - channels of the skip popped for it.
    Also checks that the input is cat([hidden_states, skip]) and that conv_shortcut sees it unchanged."""
    found, handles = {}, []
    for name, block in model.named_modules():
        if "Up" not in type(block).__name__ or not isinstance(getattr(block, "resnets", None), nn.ModuleList):
            continue
        state: dict = {}

        def block_hook(mod, args, kwargs, state=state):
            bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
            state["h"], state["skips"] = bound["hidden_states"], bound["res_hidden_states_tuple"]

        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        for i, r in enumerate(block.resnets):
            def res_hook(mod, args, kwargs, state=state, i=i, name=name):
                x = args[0] if args else kwargs["input_tensor"]
                skip = state["skips"][-1 - i]
                k = x.shape[1] - skip.shape[1]
                assert torch.equal(x[:, k:], skip), "the skip is not the second part of the resnet input"
                if i == 0:
                    assert torch.equal(x[:, :k], state["h"]), "the first part is not the block's hidden_states"
                state["x"] = x
                if mod.conv_shortcut is not None:
                    found[f"{name}.resnets.{i}.conv_shortcut"] = k

            def shortcut_hook(mod, args, state=state):
                assert torch.equal(args[0], state["x"]), "conv_shortcut does not see the raw concatenation"

            handles.append(r.register_forward_pre_hook(res_hook, with_kwargs=True))
            if r.conv_shortcut is not None:
                handles.append(r.conv_shortcut.register_forward_pre_hook(shortcut_hook))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return found


def test_splits_tiny_unet_match_runtime():
    model = build_model("tiny").eval()
    splits = find_shortcut_splits(model)
    measured = _measure_splits(model, lambda m: m(torch.randn(2, 3, 16, 16), torch.tensor([5, 700])))
    assert splits == measured == {"up_blocks.0.resnets.0.conv_shortcut": 16, "up_blocks.0.resnets.1.conv_shortcut": 16,
                                  "up_blocks.1.resnets.0.conv_shortcut": 16, "up_blocks.1.resnets.1.conv_shortcut": 8}
    # the same names once wrapped; conv1 is never split
    wrap_layers(model, 4, 8)
    assert find_shortcut_splits(model) == splits
    assert not any(n.endswith("conv1") for n in splits)


def test_splits_ddpm_cifar10_all_12_up_resnets():
    """Q-Diffusion splits all 12 up-path ResnetBlocks of the DDPM CIFAR-10 UNet; in diffusers' layout all
    12 up-path ResnetBlock2Ds have a conv_shortcut (their input is wider than their output)."""
    model = build_model("ddpm-cifar10").eval()
    up_resnets = [(n, m) for n, m in model.named_modules()
                  if n.startswith("up_blocks.") and type(m).__name__ == "ResnetBlock2D"]
    with_shortcut = [n for n, m in up_resnets if m.conv_shortcut is not None]
    assert len(up_resnets) == len(with_shortcut) == 12
    splits = find_shortcut_splits(model)
    assert sorted(splits) == sorted(f"{n}.conv_shortcut" for n in with_shortcut)
    assert splits == _measure_splits(model, lambda m: m(torch.randn(1, 3, 32, 32), torch.tensor([10])))


def test_splits_unet2dcondition_crossattn_match_runtime():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    splits = find_shortcut_splits(model)
    measured = _measure_splits(model, lambda m: m(torch.randn(2, 3, 8, 8), torch.tensor([5, 700]),
                                                  encoder_hidden_states=torch.randn(2, 4, 8)))
    assert splits == measured and len(splits) == 4
    assert any(type(model.get_submodule(n.split(".resnets.")[0])).__name__ == "CrossAttnUpBlock2D" for n in splits)


def test_apply_errors():
    model = build_model("tiny")
    splits = find_shortcut_splits(model)
    with pytest.raises(GacqError, match="not a quantized"):
        apply_shortcut_splits(model, splits)  # not wrapped yet
    wrap_layers(model, 4, 8)
    with pytest.raises(GacqError, match="not a quantized"):
        apply_shortcut_splits(model, {"up_blocks.9.resnets.0.conv_shortcut": 3})
    apply_shortcut_splits(model, splits)
    apply_shortcut_splits(model, splits)  # same split again: no-op
    m = model.get_submodule("up_blocks.1.resnets.1.conv_shortcut")
    assert m.split == 8 and m.weight_quantizer_0 is not None and m.act_quantizer_0 is not None
    with pytest.raises(GacqError, match="already split"):
        m.set_split(4)
    with pytest.raises(GacqError, match="outside"):
        QuantConv2d(nn.Conv2d(6, 4, 1), 4, 8).set_split(6)
    with pytest.raises(GacqError, match="grouped"):
        QuantConv2d(nn.Conv2d(6, 4, 1, groups=2), 4, 8).set_split(3)


def test_split_after_init_needs_reinit():
    q = QuantConv2d(nn.Conv2d(6, 4, 1), 4, None)
    q.init_weight("minmax")
    q.set_split(2)
    with pytest.raises(GacqError, match="before initialisation"):
        q(torch.randn(1, 6, 3, 3))
    q.init_weight("minmax")
    q(torch.randn(1, 6, 3, 3))


# ------------------------------------------------------------- the split layer ---
def _two_range_conv(k=5, c_in=12, c_out=6, ksize=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, ksize, padding=ksize // 2)
    with torch.no_grad():
        conv.weight[:, k:] *= 6  # the two halves' weights have different ranges
    return conv


def _two_range_inputs(k=5, c_in=12, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, c_in, 5, 5, generator=g)
        x[:, k:] = x[:, k:] * 10 + 3  # ...and so do the two input groups
        out.append(x)
    return out


def test_split_layer_equals_float_when_quantization_off():
    conv, k = _two_range_conv(ksize=3), 5
    q = QuantConv2d(conv, 4, 8)
    q.set_split(k)
    q.w_quant = q.a_quant = False
    x = _two_range_inputs()[0]
    torch.testing.assert_close(q(x), conv(x), rtol=0, atol=0)


def _naive_minmax_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel asymmetric min-max fake quantization, written out channel by channel."""
    qmax = 2**bits - 1
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        lo, hi = w[o].min().clamp(max=0), w[o].max().clamp(min=0)
        s = (hi - lo) / qmax
        z = torch.round(-lo / s)
        out[o] = (torch.clamp(torch.round(w[o] / s) + z, 0, qmax) - z) * s
    return out


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("ksize", [1, 3])
def test_split_layer_matches_naive_reference(method, ksize):
    k, wbits, abits = 5, 4, 8
    conv = _two_range_conv(k=k, ksize=ksize)
    model = nn.Sequential(copy.deepcopy(conv))
    wrap_layers(model, wbits, abits)
    apply_shortcut_splits(model, {"0": k})
    q = model[0]
    q.init_weight(method)
    calib = _two_range_inputs(k=k)
    ranges = observe_input_ranges(model, [(x,) for x in calib], lambda m, x: m(x))
    assert set(ranges) == {"0", split_range_key("0")}
    init_act_quantizers_minmax(model, ranges)

    # the naive reference: each half of W per output channel with its own parameters, each half of x
    # per tensor with its own min-max range over the calibration batches, then a plain conv
    w = conv.weight.detach()
    if method == "minmax":
        wq = torch.cat([_naive_minmax_weight(w[:, :k], wbits), _naive_minmax_weight(w[:, k:], wbits)], 1)
    else:
        halves = []
        for wh in (w[:, :k], w[:, k:]):
            s, z = choose_qparams_mse(wh, wbits, False, 0)
            halves.append(fake_quantize(wh, s, z, 0, 2**wbits - 1))
        wq = torch.cat(halves, 1)
    allx = torch.cat(calib)
    x = _two_range_inputs(k=k, n=1, seed=7)[0]
    xq = []
    for sl in (slice(None, k), slice(k, None)):
        s, z = qparams_from_range(allx[:, sl].min(), allx[:, sl].max(), abits, False)
        xq.append(fake_quantize(x[:, sl], s, z, 0, 2**abits - 1))
    xq = torch.cat(xq, 1)

    with torch.no_grad():
        set_quant_state(model, weights=True, acts=False)
        torch.testing.assert_close(model(x), F.conv2d(x, wq, conv.bias, padding=ksize // 2), rtol=0, atol=1e-6)
        set_quant_state(model, weights=True, acts=True)
        got = model(x)
        torch.testing.assert_close(got, F.conv2d(xq, wq, conv.bias, padding=ksize // 2), rtol=0, atol=1e-6)
        # the halves got their own grids: weights ~6x, inputs ~10x apart
        assert float((q.weight_quantizer_0.scale / q.weight_quantizer.scale).median()) > 3
        assert float(q.act_quantizer_0.scale / q.act_quantizer.scale) > 5
        # and the narrow-range halves are quantized far more finely than on one grid over the whole concatenation
        plain = nn.Sequential(copy.deepcopy(conv))
        wrap_layers(plain, wbits, abits)
        plain[0].init_weight(method)
        init_act_quantizers_minmax(plain, observe_input_ranges(plain, [(c,) for c in calib], lambda m, x: m(x)))
        set_quant_state(plain, weights=True, acts=True)
        p = plain[0]
        werr = lambda m: (m.quantized_weight() - w)[:, :k].pow(2).mean()  # noqa: E731
        xc = calib[0]  # inside the calibrated ranges (no clipping)
        xerr = lambda m: (m.quantized_input(xc) - xc)[:, :k].pow(2).mean()  # noqa: E731
        assert werr(q) < 0.2 * werr(p) and xerr(q) < 0.1 * xerr(p)


def test_split_linear_matches_naive_reference():
    torch.manual_seed(0)
    lin, k = nn.Linear(10, 4), 3
    model = nn.Sequential(copy.deepcopy(lin))
    wrap_layers(model, 4, 8)
    apply_shortcut_splits(model, {"0": k})
    model[0].init_weight("minmax")
    x = torch.randn(6, 10)
    x[:, k:] *= 20
    init_act_quantizers_minmax(model, observe_input_ranges(model, [(x,)], lambda m, x: m(x)))
    set_quant_state(model, weights=True, acts=True)
    w = lin.weight.detach()
    wq = torch.cat([_naive_minmax_weight(w[:, :k], 4), _naive_minmax_weight(w[:, k:], 4)], 1)
    xq = []
    for sl in (slice(None, k), slice(k, None)):
        s, z = qparams_from_range(x[:, sl].min(), x[:, sl].max(), 8, False)
        xq.append(fake_quantize(x[:, sl], s, z, 0, 255))
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(torch.cat(xq, 1), wq, lin.bias), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- reconstruction ---
def _split_model(fp, wbits, abits):
    q = copy.deepcopy(fp)
    wrap_layers(q, wbits, abits)
    apply_shortcut_splits(q, find_shortcut_splits(q))
    for _, m in quant_layers(q):
        m.init_weight("mse")
    set_quant_state(q, weights=True, acts=False)
    return q


@pytest.fixture(scope="module")
def tiny_fp():
    torch.manual_seed(0)
    fp = build_model("tiny").eval()
    g = torch.Generator().manual_seed(3)
    return fp, torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 1000, (48,), generator=g)


def test_reconstruction_on_split_unit(tiny_fp):
    fp, x, t = tiny_fp
    q = _split_model(fp, 3, None)
    name = "up_blocks.1.resnets.1"
    unit = q.get_submodule(name)
    sc = unit.conv_shortcut
    assert isinstance(sc, QuantLayer) and sc.split == 8
    rtn_ints = sc.integer_weight().clone()
    run = lambda model, lo, hi: model(x[lo:hi], t[lo:hi])  # noqa: E731
    args, kwargs, target = capture_unit_io(fp, fp.get_submodule(name), run, len(t), 16, want_output=True)
    stats = reconstruct_unit(unit, args, kwargs, target, ReconConfig(iters=200, batch_size=16, lr=1e-2))
    assert stats["loss_after"] < 0.8 * stats["loss_before"], stats
    # one AdaRound over the whole weight, hard, on the two halves' own per-channel grids
    assert sc.adaround.alpha.shape == sc.weight.shape and not sc.adaround.soft
    k = sc.split
    w_hat = sc.quantized_weight()
    for sl, wq in ((slice(None, k), sc.weight_quantizer), (slice(k, None), sc.weight_quantizer_0)):
        ints = w_hat[:, sl] / wq.scale + wq.zero_point
        torch.testing.assert_close(ints, ints.round(), rtol=0, atol=1e-4)
        assert float(ints.round().min()) >= 0 and float(ints.round().max()) <= 7
        # both halves were learned (Q-Diffusion's layer_recon leaves the `_0` half at its rounding)
        assert not torch.equal(sc.integer_weight()[:, sl], rtn_ints[:, sl])
    assert not torch.allclose(sc.weight_quantizer.scale, sc.weight_quantizer_0.scale)


# -------------------------------------------------------------------- checkpoints ---
def test_save_load_bit_exact_with_splits(tiny_fp, tmp_path):
    fp, x, t = tiny_fp
    q = _split_model(fp, 4, 8)
    splits = find_shortcut_splits(q)
    # one split layer with hardened AdaRound, the others round-to-nearest
    name = "up_blocks.1.resnets.0"
    run = lambda model, lo, hi: model(x[lo:hi], t[lo:hi])  # noqa: E731
    args, kwargs, target = capture_unit_io(fp, fp.get_submodule(name), run, len(t), 16, want_output=True)
    reconstruct_unit(q.get_submodule(name), args, kwargs, target, ReconConfig(iters=20, batch_size=16, lr=1e-2))
    ranges = observe_input_ranges(q, [(x[:24], t[:24]), (x[24:], t[24:])], lambda m, a, b: m(a, b))
    init_act_quantizers_minmax(q, ranges)
    set_quant_state(q, weights=True, acts=True)
    d = save_quantized(q, tmp_path / "q", {"method": "test"}, dict(fp.config), dict(DDPM_SCHEDULE))
    meta = json.loads((d / "quant_config.json").read_text())
    assert {n: e["split"] for n, e in meta["layers"].items() if "split" in e} == splits
    back = load_model(d).model
    layers = dict(quant_layers(back))
    for n, m in quant_layers(q):
        b = layers[n]
        assert b.split == m.split
        if m.split:
            for a_q, b_q in ((m.weight_quantizer, b.weight_quantizer), (m.weight_quantizer_0, b.weight_quantizer_0),
                             (m.act_quantizer, b.act_quantizer), (m.act_quantizer_0, b.act_quantizer_0)):
                assert torch.equal(a_q.scale.detach(), b_q.scale.detach())
                assert torch.equal(a_q.zero_point, b_q.zero_point)
        assert torch.equal(m.integer_weight(), b.integer_weight()), n
    xt, tt = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9)), torch.tensor([3, 400, 950])
    with torch.no_grad():
        torch.testing.assert_close(back(xt, tt).sample, q(xt, tt).sample, rtol=0, atol=0)


def test_format_1_folders_still_load(tiny_fp, tmp_path):
    fp, x, t = tiny_fp
    q = copy.deepcopy(fp)
    wrap_layers(q, 4, None)
    for _, m in quant_layers(q):
        m.init_weight("minmax")
    d = save_quantized(q, tmp_path / "q1", {}, dict(fp.config), dict(DDPM_SCHEDULE))
    meta = json.loads((d / "quant_config.json").read_text())
    meta["format_version"] = 1
    (d / "quant_config.json").write_text(json.dumps(meta))
    back = load_model(d).model
    with torch.no_grad():
        torch.testing.assert_close(back(x[:2], t[:2]).sample, q(x[:2], t[:2]).sample, rtol=0, atol=0)


def test_reconstruct_model_resumes_split_units(tiny_fp, tmp_path):
    """Whole-model reconstruction with splits, and its per-unit checkpoints reload into split layers."""
    from gacq.quant.recon import reconstruct_model

    fp, x, t = tiny_fp
    cfg = ReconConfig(iters=4, batch_size=8, lr=1e-2)
    a = _split_model(fp, 4, None)
    reconstruct_model(a, fp, x[:16], t[:16], cfg, ckpt_dir=tmp_path / "r", progress=False)
    b = _split_model(fp, 4, None)
    stats = reconstruct_model(b, fp, x[:16], t[:16], cfg, ckpt_dir=tmp_path / "r", progress=False)
    assert all(s.get("resumed") for s in stats)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith("weight_quantizer_0.scale") for k in sa)
    for k in sa:
        if k.endswith("adaround.alpha"):  # resume points keep the signs only, all a hardened rounding reads
            assert torch.equal(sa[k] >= 0, sb[k] >= 0), k
        else:
            assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x[:4], t[:4]).sample, b(x[:4], t[:4]).sample)
