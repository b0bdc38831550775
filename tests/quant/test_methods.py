"""TFMQ-DM's temporal block and per-step activation sets, Q-Diffusion's activation stage, and the
method registry end to end on a tiny real UNet2DModel."""

from __future__ import annotations

import copy

import pytest
import torch

from gacq.errors import GacqError
from gacq.models import LoadedModel, build_model
from gacq.quant.api import QuantConfig, quantize
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.fsc import FSCParams, finite_set_calibration
from gacq.quant.gac import GACConfig
from gacq.quant.methods import METHODS, float_input_layers, float_layers, method_spec
from gacq.quant.modules import QuantLayer
from gacq.quant.recon import ActReconConfig, ReconConfig, capture_unit_io, find_units, reconstruct_acts_unit
from gacq.quant.tfmq import TIB, reconstruct_tib
from gacq.quant.wrap import init_act_quantizers_minmax, observe_input_ranges, quant_layers, set_quant_state, wrap_layers
from gacq.sampling import SampleConfig, generate

STEPS = 6


@pytest.fixture(scope="module")
def fp():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def calib_all(fp):
    return collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(selection="all", n_trajectories=8),
                   progress=False)


def _wrapped(fp, wbits=3, abits=None):
    q = copy.deepcopy(fp)
    wrap_layers(q, wbits, abits)
    for _, m in quant_layers(q):
        m.init_weight("mse")
    set_quant_state(q, weights=True, acts=False)
    return q


def test_tib_features_match_the_model_forward(fp):
    """The TIB's temporal features equal what each resnet's time_emb_proj computes inside a full forward."""
    seen = {}
    hooks = [r.time_emb_proj.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.detach()))
             for n, r in TIB(fp).resnets]
    t = torch.tensor([3, 500, 999])
    with torch.no_grad():
        fp(torch.randn(3, 3, 16, 16), t)
        for h in hooks:
            h.remove()
        feats = TIB(fp).forward(t)
    assert len(feats) == len(seen) == len(TIB(fp).resnets) == 8
    for (n, _), a in zip(TIB(fp).resnets, feats):
        torch.testing.assert_close(a, seen[n])


def test_tib_reconstruction_beats_rtn_and_freezes(fp, calib_all):
    q = _wrapped(fp)
    tib = TIB(q)
    with torch.no_grad():
        tgt = TIB(fp).forward(calib_all.t)
        rtn = sum(float((o - g).pow(2).sum()) for o, g in zip(tib.forward(calib_all.t), tgt))
    stats = reconstruct_tib(q, fp, calib_all.t, ReconConfig(iters=60, batch_size=16, lr=1e-2), progress=False)
    with torch.no_grad():
        after = sum(float((o - g).pow(2).sum()) for o, g in zip(tib.forward(calib_all.t), tgt))
    assert after < rtn and stats["loss_after"] < stats["loss_before"]
    assert all(m.recon_frozen and m.adaround is not None and not m.adaround.soft for m in tib.layers())
    # block reconstruction leaves the frozen time-embedding layers out: no time_embedding layer units
    assert not any(n.startswith("time_embedding") for n, _ in find_units(q))


def test_act_stage_learns_step_sizes_and_lowers_loss(fp, calib_all):
    q = _wrapped(fp, wbits=4, abits=4)
    batches = [(calib_all.x[:16], calib_all.t[:16])]
    init_act_quantizers_minmax(q, observe_input_ranges(q, batches, lambda m, x, t: m(x, t)))
    name, unit = next((n, m) for n, m in find_units(q) if type(m).__name__ == "ResnetBlock2D")
    run = lambda model, lo, hi: model(calib_all.x[lo:hi], calib_all.t[lo:hi])  # noqa: E731
    args, kwargs, target = capture_unit_io(fp, fp.get_submodule(name), run, len(calib_all), 16, want_output=True)
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.a_quant = True
    before = {n: p.detach().clone() for n, p in unit.named_parameters() if n.endswith("act_quantizer.scale")}
    frozen = {n: p.detach().clone() for n, p in unit.state_dict().items() if "act_quantizer" not in n}
    s = reconstruct_acts_unit(unit, args, kwargs, target, ActReconConfig(iters=40, batch_size=16, lr=1e-2))
    assert s["loss_after"] < s["loss_before"]
    after = dict(unit.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(float(after[n].detach().min()) > 0 for n in before)
    now = unit.state_dict()
    assert all(torch.equal(now[n], v) for n, v in frozen.items())  # weights, zero points, norms untouched


def test_fsc_per_step_ranges_match_a_naive_ema(fp, calib_all):
    q = _wrapped(fp, wbits=8, abits=8)
    sampler = {"scheduler": "ddim", "steps": STEPS, "timestep_spacing": "leading"}
    params = finite_set_calibration(q, calib_all.x, calib_all.t, calib_all.step, sampler, batch_size=3, seed=1,
                                    progress=False)
    assert params.n_steps == STEPS
    # naive EMA for one layer and one step, same shuffled order
    name, layer = next((n, m) for n, m in quant_layers(q) if n.endswith("conv1"))
    k = 2
    g = torch.Generator().manual_seed(1)
    orders = []
    for s in range(STEPS):
        idx = torch.nonzero(calib_all.step == s).flatten()
        orders.append(idx[torch.randperm(len(idx), generator=g)])
    xs = []
    h = layer.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for lo in range(0, len(orders[k]), 3):
            b = orders[k][lo:lo + 3]
            q(calib_all.x[b], calib_all.t[b])
    h.remove()
    lo_, hi_ = float(xs[0].min()), float(xs[0].max())
    for x in xs[1:]:
        lo_, hi_ = 0.95 * lo_ + 0.05 * float(x.min()), 0.95 * hi_ + 0.05 * float(x.max())
    lo_, hi_ = min(lo_, 0.0), max(hi_, 0.0)
    assert float(params.scale[name][k]) == pytest.approx((hi_ - lo_) / 255, rel=1e-5)
    assert float(params.zero_point[name][k]) == round(-lo_ / ((hi_ - lo_) / 255))
    # different steps get different ranges; apply() loads them
    assert len({round(float(v), 6) for v in params.scale[name]}) > 1
    params.apply(q, k)
    assert float(layer.act_quantizer.scale.detach()) == pytest.approx(float(params.scale[name][k]))
    back = FSCParams.from_state_dict(params.state_dict(), sampler)
    assert all(torch.equal(back.scale[n], params.scale[n]) for n in params.scale)
    with pytest.raises(GacqError, match="same settings"):
        params.check_sampler(SampleConfig(steps=STEPS + 1))
    with pytest.raises(GacqError, match="every one"):
        finite_set_calibration(q, calib_all.x, calib_all.t, calib_all.step, {**sampler, "steps": STEPS + 2},
                               progress=False)


def test_tfmq_layer_rules_by_type():
    model = build_model("ddpm-cifar10")
    fl = float_layers(model, "tfmq")
    assert "time_embedding.linear_1" in fl
    assert sum(n.endswith("conv_shortcut") for n in fl) > 0 and sum("downsamplers" in n for n in fl) == 3
    fi = float_input_layers(model, "tfmq")
    assert fi == {"time_embedding.linear_2", "down_blocks.0.resnets.0.conv1"}


@pytest.mark.parametrize("method", ["rtn", "ptq4dm", "qdiffusion", "tfmq"])
def test_methods_end_to_end(fp, method, calib_all):
    """Each method quantizes the tiny UNet, samples, and (with FSC) follows the sampler's steps."""
    cfg = QuantConfig(method=method, wbits=4, abits=8, recon=ReconConfig(iters=4, batch_size=8),
                      act_recon=ActReconConfig(iters=3, batch_size=8),
                      calib=CalibDataConfig(n_trajectories=8, n_steps=3))
    sel = cfg.calib_config()
    cs = calib_all if sel.selection == "all" else collect(LoadedModel(fp), SampleConfig(steps=STEPS), sel, progress=False)
    q = quantize(LoadedModel(fp), cfg, cs)
    assert not any(n in ("conv_in", "conv_out") for n, _ in quant_layers(q))  # common layer set
    assert all(m.a_quant for _, m in quant_layers(q) if m.act_quantizer is not None)
    loaded = LoadedModel(q)
    if method == "tfmq":
        loaded.step_hook = q.gacq_fsc.step_hook(q)
    imgs = generate(loaded, SampleConfig(steps=STEPS), range(2))
    assert imgs.shape == (2, 16, 16, 3)
    if method == "tfmq":
        with pytest.raises(GacqError, match="same settings"):
            generate(loaded, SampleConfig(steps=STEPS - 1), range(1))


def test_method_registry_errors(fp):
    assert set(METHODS) >= {"rtn", "ptq4dm", "qdiffusion", "tfmq", "gac"}
    with pytest.raises(GacqError, match="unknown method 'foo'"):
        QuantConfig(method="foo")
    with pytest.raises(GacqError, match="unknown preset"):
        QuantConfig(method="rtn", preset="paper")
    assert method_spec("qdiffusion", "faithful").skip == () and method_spec("qdiffusion", "faithful").attn_quant
    cs = collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(n_trajectories=2, n_steps=2), progress=False)
    with pytest.raises(GacqError, match="selection all|'all'"):
        quantize(LoadedModel(fp), QuantConfig(method="tfmq"), cs)
    with pytest.raises(GacqError, match="needs calibration"):
        quantize(LoadedModel(fp), QuantConfig(method="qdiffusion"), None)


@pytest.mark.parametrize("method", ["ptq4dm", "qdiffusion", "tfmq", "gac"])
def test_faithful_presets_save_and_load_bit_exact(fp, method, calib_all, tmp_path):
    """Mixed bit widths (PTQ4DM's W8A8 first/last), attention quantizers and split shortcuts
    (Q-Diffusion), float-input layers and per-step activation sets (TFMQ-DM) survive a checkpoint."""
    from gacq.models import load_model
    from gacq.quant.checkpoint import save_quantized

    cfg = QuantConfig(method=method, preset="faithful", wbits=4, abits=8, recon=ReconConfig(iters=3, batch_size=8),
                      act_recon=ActReconConfig(iters=2, batch_size=8), calib=CalibDataConfig(n_trajectories=8, n_steps=3),
                      gac=GACConfig(meta_iters=2, groups=2))
    sel = cfg.calib_config()
    cs = calib_all if sel.selection == "all" else collect(LoadedModel(fp), SampleConfig(steps=STEPS), sel, progress=False)
    q = quantize(LoadedModel(fp), cfg, cs)
    layers = dict(quant_layers(q))
    if method == "ptq4dm":
        assert layers["conv_in"].weight_quantizer.bits == 8 and layers["down_blocks.0.resnets.0.conv1"].wbits == 4
    if method == "qdiffusion":
        assert any(m.split for m in layers.values()) and "conv_in" in layers
    if method in ("tfmq", "gac"):  # TFMQ-DM's float layers (GAC's faithful preset is TFMQ-DM's plus GAC)
        assert "time_embedding.linear_1" not in layers and layers["time_embedding.linear_2"].act_quantizer is None
        assert not any(n.endswith("conv_shortcut") for n in layers) and "conv_in" not in layers
    save_quantized(q, tmp_path / "q", {"method": method}, dict(fp.config), {})
    back = load_model(tmp_path / "q")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        if method in ("tfmq", "gac"):
            for k in (0, STEPS - 1):
                q.gacq_fsc.apply(q, k)
                back.step_hook(k, SampleConfig(steps=STEPS))
                assert torch.equal(q(x, t).sample, back.model(x, t).sample)
        else:
            assert torch.equal(q(x, t).sample, back.model(x, t).sample)


def test_recipe_overrides_change_only_what_they_name(fp, calib_all, tmp_path):
    """QuantConfig.act_mode / split_shortcuts: tfmq with learned step sizes has the same weights as tfmq with
    min-max ranges (the act stage comes after the weights) and other activation grids, no per-step sets; with split
    shortcuts it has split layers and survives a checkpoint; impossible pairs are refused; the JSON round trip keeps
    the overrides and leaves them out when unset."""
    from gacq.models import load_model
    from gacq.quant.api import config_from_json
    from gacq.quant.checkpoint import save_quantized

    kw = dict(wbits=4, abits=8, recon=ReconConfig(iters=4, batch_size=8), act_recon=ActReconConfig(iters=5, batch_size=8),
              calib=CalibDataConfig(n_trajectories=8, n_steps=3))
    base = method_spec("tfmq", "common")
    cfg = QuantConfig(method="tfmq", act_mode="lsq", split_shortcuts=True, **kw)
    assert cfg.spec() == method_spec("tfmq", "common").__class__(**{**base.__dict__, "act_mode": "lsq",
                                                                     "split_shortcuts": True})
    assert config_from_json(cfg.to_json()) == cfg
    plain = QuantConfig(method="tfmq", **kw).to_json()
    assert "act_mode" not in plain and "split_shortcuts" not in plain  # earlier resume fingerprints stay valid
    assert not QuantConfig(method="qdiffusion", split_shortcuts=False).spec().split_shortcuts
    with pytest.raises(GacqError, match="needs calibration samples at every"):
        QuantConfig(method="qdiffusion", act_mode="fsc")
    with pytest.raises(GacqError, match="does not support split layers"):
        QuantConfig(method="tfmq", split_shortcuts=True)
    with pytest.raises(GacqError, match="--act-mode must be"):
        QuantConfig(method="tfmq", act_mode="ema")

    lsq = quantize(LoadedModel(fp), QuantConfig(method="tfmq", act_mode="lsq", **kw), calib_all)
    mm = quantize(LoadedModel(fp), QuantConfig(method="tfmq", act_mode="minmax", **kw), calib_all)
    assert not hasattr(lsq, "gacq_fsc") and not hasattr(mm, "gacq_fsc")
    la, lb = dict(quant_layers(lsq)), dict(quant_layers(mm))
    assert la.keys() == lb.keys()
    assert all(torch.equal(la[n].integer_weight(), lb[n].integer_weight()) for n in la)
    scales = [(la[n].act_quantizer.scale, lb[n].act_quantizer.scale) for n in la if la[n].act_quantizer is not None]
    assert scales and any(not torch.equal(a, b) for a, b in scales)  # the learned step sizes moved

    q = quantize(LoadedModel(fp), cfg, calib_all)
    assert any(m.split for _, m in quant_layers(q))
    # GAC's meta-step learns through a split layer's one rounding variable over both halves
    g = quantize(LoadedModel(fp), QuantConfig(method="gac", act_mode="lsq", split_shortcuts=True,
                                              gac=GACConfig(meta_iters=2, groups=2), **kw), calib_all)
    assert any(m.split for _, m in quant_layers(g)) and not hasattr(g, "gacq_fsc")
    save_quantized(q, tmp_path / "q", {"method": "tfmq"}, dict(fp.config), {})
    back = load_model(tmp_path / "q")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(q(x, t).sample, back.model(x, t).sample)


def test_gac_with_zero_meta_iterations_is_tfmq(fp, calib_all):
    kw = dict(wbits=4, abits=8, recon=ReconConfig(iters=5, batch_size=8), calib=CalibDataConfig(n_trajectories=8, n_steps=3))
    a = quantize(LoadedModel(fp), QuantConfig(method="tfmq", **kw), calib_all)
    b = quantize(LoadedModel(fp), QuantConfig(method="gac", gac=GACConfig(meta_iters=0), **kw), calib_all)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gac_end_to_end_saves_learned_weights(fp, tmp_path):
    from safetensors.torch import load_file

    from gacq.diagnostics import gac_weight_profile
    from gacq.quant.checkpoint import load_gac_weights, save_quantized

    cs = collect(LoadedModel(fp), SampleConfig(steps=STEPS), CalibDataConfig(selection="all", n_trajectories=12),
                 progress=False)
    cfg = QuantConfig(method="gac", wbits=4, abits=8, recon=ReconConfig(iters=4, batch_size=8),
                      calib=CalibDataConfig(n_trajectories=12, n_steps=6),
                      gac=GACConfig(meta_iters=3, batch_size=8, val_fraction=0.1, groups=3))
    q = quantize(LoadedModel(fp), cfg, cs)
    store = q.gacq_gac_weights
    assert len(store) == len(find_units(q))  # one weight vector per reconstructed block
    w = next(iter(store.values()))["weights"]
    assert len(w) == len(cs) and (w == 0).sum() == 6 and abs(float(w.sum()) - 1) < 1e-5  # 1 validation sample/step
    save_quantized(q, tmp_path / "q", {"method": "gac"}, dict(fp.config), {})
    saved, samples = load_gac_weights(tmp_path / "q" / "gac_weights.safetensors")
    assert set(saved) == set(store) and torch.equal(saved[next(iter(store))], w)
    # each weighted sample's sampling step and timestep travel with the weights (reserved keys, not blocks)
    raw = load_file(str(tmp_path / "q" / "gac_weights.safetensors"))
    assert set(raw) == set(store) | {"__sampling_step", "__timestep"}
    assert torch.equal(samples["sampling_step"], cs.step) and torch.equal(samples["timestep"], cs.t)
    # the report's profile: mean weight / uniform per sampling step over the training samples, against a naive loop
    import json as _json

    (tmp_path / "q" / "quant_config.json").write_text(_json.dumps({"config": cfg.to_json()}))
    prof = gac_weight_profile(tmp_path / "q")
    assert prof["step_source"] == "recorded in the checkpoint" and prof["steps"] == sorted(set(cs.step.tolist()))
    name = next(iter(store))
    wd = w.double()
    train_mean = sum(float(v) for v in wd if v > 0) / sum(1 for v in wd if v > 0)
    for j, st in enumerate(prof["steps"]):
        vals = [float(wd[i]) / train_mean for i in range(len(wd)) if int(cs.step[i]) == st and wd[i] > 0]
        assert abs(prof["blocks"][name]["mean_rel_per_step"][j] - sum(vals) / len(vals)) < 1e-9
    tw = [float(v) for v in wd if v > 0]
    assert abs(prof["blocks"][name]["ess_over_n"] - sum(tw) ** 2 / sum(v * v for v in tw) / len(tw)) < 1e-9
    assert prof["timesteps"] == [int(cs.t[cs.step == st][0]) for st in prof["steps"]]


@pytest.mark.parametrize("method,preset", [("qdiffusion", "faithful"), ("tfmq", "common")])
def test_w_only_model_is_the_wa_checkpoint_with_float_acts(fp, method, preset, calib_all, tmp_path):
    """The weight stage runs with float activations, so a W4A32 quantize equals the W4A8 checkpoint
    loaded with act_quant=False (what `gacq sample --float-acts` does): the comparison table takes
    its W-only rows from the W/A runs."""
    from dataclasses import replace

    from gacq.models import load_model
    from gacq.quant.checkpoint import save_quantized

    cfg = QuantConfig(method=method, preset=preset, wbits=4, abits=8, recon=ReconConfig(iters=4, batch_size=8),
                      act_recon=ActReconConfig(iters=3, batch_size=8), calib=CalibDataConfig(n_trajectories=8, n_steps=3))
    q8 = quantize(LoadedModel(fp), cfg, calib_all)
    q32 = quantize(LoadedModel(fp), replace(cfg, abits=None), calib_all)
    w8, w32 = dict(quant_layers(q8)), dict(quant_layers(q32))
    assert w8.keys() == w32.keys()
    for name in w8:
        assert torch.equal(w8[name].integer_weight(), w32[name].integer_weight()), name
    save_quantized(q8, tmp_path / "q", {"method": method}, dict(fp.config), {})
    back = load_model(tmp_path / "q", act_quant=False)
    assert back.step_hook is None and back.source.endswith("(activations float)")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        # the same weights reached two ways (AdaRound's modules vs the saved integers): float32 outputs of magnitude
        # about 2 (one ulp 2.4e-7) differ by up to 9.5e-7 (8 inputs, 1 and 2 threads; session 47)
        assert torch.allclose(back.model(x, t).sample, q32(x, t).sample, rtol=0, atol=5e-6)
        assert not torch.allclose(load_model(tmp_path / "q").model(x, t).sample, q32(x, t).sample, atol=5e-6)


def test_common_preset_keeps_each_model_class_input_and_output_layers_float():
    """The common preset's float layers are the model's first and last layer, whatever the class: conv_in/conv_out
    of a UNet (its nested attention proj_out stay quantized), pos_embed.proj/proj_out_2 of a DiT (its final adaLN
    modulation proj_out_1 is quantized), pos_embed.proj/proj_out of a PixArt-style Transformer2DModel."""
    from diffusers import Transformer2DModel, UNet2DConditionModel
    from torch import nn

    from gacq.quant.api import _match

    unet_x = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, layers_per_block=1, norm_num_groups=4, attention_head_dim=2)
    pixart = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                num_layers=1, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                cross_attention_dim=16, caption_channels=16)
    cases = [(build_model("tiny"), {"conv_in", "conv_out"}), (unet_x, {"conv_in", "conv_out"}),
             (build_model("tiny-dit"), {"pos_embed.proj", "proj_out_2"}), (pixart, {"pos_embed.proj", "proj_out"})]
    skip = method_spec("tfmq", "common").skip
    for model, want in cases:
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert {n for n in layers if _match(n, skip)} == want, type(model).__name__
    assert any(n.endswith(".proj_out") for n, m in unet_x.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    dit = build_model("tiny-dit")
    wrap_layers(dit, 4, 8, skip=lambda n, m: _match(n, skip))
    assert not isinstance(dit.pos_embed.proj, QuantLayer) and not isinstance(dit.proj_out_2, QuantLayer)
    assert isinstance(dit.proj_out_1, QuantLayer) and isinstance(dit.transformer_blocks[0].attn1.to_q, QuantLayer)
