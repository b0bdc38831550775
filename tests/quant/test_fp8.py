"""The FP8 E4M3 format (`--format fp8`, `UniformQuantizer(fmt="fp8")`) and the `fp8` export backend.

The rounding is checked against a table of all E4M3FN values built from the bit layout in float64 (not torch's
cast), the STE gradients against their formulas, a tiny UNet quantized, saved and loaded bit-exactly, the exported
layers against a float64 computation on the codes, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gacq.errors import GacqError
from gacq.export import convert, export, load_exported
from gacq.export.fp8 import FP8Conv2d, FP8Linear
from gacq.models import LoadedModel, build_model, load_model
from gacq.quant.api import QuantConfig, config_from_json, quantize
from gacq.quant.calib_data import CalibDataConfig, collect
from gacq.quant.checkpoint import save_quantized
from gacq.quant.modules import QuantConv2d, QuantLinear
from gacq.quant.primitives import choose_qparams_minmax, choose_qparams_mse, fp8_fake_quantize
from gacq.quant.quantizer import UniformQuantizer
from gacq.quant.wrap import quant_layers
from gacq.sampling import SampleConfig

from ..conftest import gacq_here


def e4m3fn_table() -> tuple[np.ndarray, np.ndarray]:
    """Every finite E4M3FN value (sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 subnormal; only
    S.1111.111 is NaN, so the largest is 1.75 * 2^8 = 448), from the bit layout in float64, sorted, with whether
    its mantissa's last bit is 0 (the tie-breaking "even")."""
    vals, even = [], []
    for code in range(256):
        s, e, m = code >> 7, (code >> 3) & 0xF, code & 0x7
        if e == 0xF and m == 0x7:
            continue
        v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        vals.append(-v if s else v)
        even.append(m % 2 == 0)
    vals, even = np.array(vals), np.array(even)
    order = np.argsort(vals, kind="stable")
    vals, even = vals[order], even[order]
    keep = np.concatenate([[True], np.diff(vals) > 0])  # +0 and -0
    return vals[keep], even[keep]


def naive_fp8(v: np.ndarray) -> np.ndarray:
    """Round each value (clamped to [-448, 448]) to the nearest table value, ties to the even mantissa."""
    table, even = e4m3fn_table()
    out = np.empty_like(v, dtype=np.float64)
    for i, x in enumerate(np.clip(v.astype(np.float64).ravel(), -448, 448)):
        d = np.abs(table - x)
        best = np.flatnonzero(d == d.min())
        out.ravel()[i] = table[best[0]] if len(best) == 1 else table[best[even[best]][0]]
    return out


def test_e4m3_table_is_the_format():
    table, _ = e4m3fn_table()
    assert len(table) == 253 and table.max() == 448 and table[table > 0].min() == 2.0 ** -9  # 254 codes, +-0 one value
    assert np.array_equal(np.sort(np.unique(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
                                            .numpy()[~np.isnan(torch.arange(256, dtype=torch.uint8)
                                                               .view(torch.float8_e4m3fn).float().numpy())])), table)


def test_fake_quantize_matches_a_float64_table():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.37)
    x = torch.cat([torch.randn(400, generator=g) * 40,  # the whole range, clamping beyond 448 * scale
                   torch.randn(200, generator=g) * 0.01,  # subnormals
                   torch.tensor([0.0, 448 * 0.37, -1000.0, 17 * 0.37, 19 * 0.37, 0.37 * 2**-10])])  # ties, clamp
    got = fp8_fake_quantize(x, scale).double().numpy()
    v = (x / scale).numpy()  # the same float32 quotient
    ref = naive_fp8(v) * np.float64(scale.item())
    # the product code * scale is rounded to float32 once: half an ulp of it
    assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0 ** -24)
    codes = got / np.float64(scale.item())  # on the table, up to that rounding
    dist = np.abs(codes[:, None] - e4m3fn_table()[0][None, :]).min(1)
    assert np.all(dist <= np.abs(codes) * 2.0 ** -23)
    ref_codes = np.abs(naive_fp8(v))
    assert ref_codes.max() == 448 and (ref_codes == 2.0 ** -9).any()  # the inputs reach the clamp and the subnormals


def test_gradients_are_the_straight_through_ones():
    x = torch.tensor([-300.0, -0.7, 0.0, 1.3, 170.0, 5.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = fp8_fake_quantize(x, scale)
    y.backward(torch.ones_like(y))
    v = (x / scale).detach()
    inside = (v.abs() <= 448).double()
    torch.testing.assert_close(x.grad, inside, rtol=0, atol=0)
    # d/ds [q(x / s) s] with the rounding passed straight through: q - inside * x / s
    q = torch.from_numpy(naive_fp8(v.numpy()))
    torch.testing.assert_close(scale.grad, (q - inside * v).sum(), rtol=1e-12, atol=1e-12)


def test_grids_minmax_and_mse():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.tensor([0.1, 1, 10, 0.01, 3, 50]).view(-1, 1, 1, 1)
    s, z = choose_qparams_minmax(w, 8, channel_axis=0, fmt="fp8")
    torch.testing.assert_close(s.flatten(), w.abs().amax((1, 2, 3)) / 448, rtol=1e-6, atol=0)
    assert not z.any()
    s2, _ = choose_qparams_mse(w, 8, channel_axis=0, fmt="fp8")
    assert (s2 <= s * (1 + 1e-6)).all()
    err = lambda sc: (fp8_fake_quantize(w, sc) - w).abs().pow(2.4).mean((1, 2, 3))  # noqa: E731
    assert (err(s2) <= err(s) + 1e-12).all()
    q = UniformQuantizer(8, channel_axis=0, shape=tuple(w.shape), fmt="fp8")
    q.init_minmax(w)
    codes = q.codes(w)
    assert q.symmetric and np.all(np.isin(codes.numpy(), e4m3fn_table()[0]))
    torch.testing.assert_close(codes * q.scale, q(w), rtol=0, atol=0)


@pytest.mark.parametrize("kw,msg", [
    ({"fmt": "fp9"}, "--format must be"),
    ({"fmt": "fp8", "wbits": 4}, "an 8-bit format"),
    ({"fmt": "fp8", "wbits": 8, "abits": 6}, "an 8-bit format"),
    ({"fmt": "fp8", "wbits": 8, "method": "tfmq"}, "learns roundings"),
    ({"fmt": "fp8", "wbits": 8, "method": "qdiffusion"}, "learns roundings"),
    ({"fmt": "fp8", "wbits": 8, "act_granularity": "token"}, "per-tensor input scales only"),
    ({"fmt": "fp8", "wbits": 8, "act_fmt": "int"}, "FP8 weights take FP8 inputs"),
    ({"act_fmt": "fp9"}, "--act-format must be"),
    ({"act_fmt": "fp8", "abits": 6}, "inputs are 8-bit"),
    ({"act_fmt": "fp8", "abits": None}, "inputs are 8-bit"),
    ({"act_fmt": "fp8", "act_granularity": "token"}, "per-tensor input scales only"),
])
def test_config_refusals(kw, msg):
    with pytest.raises(GacqError, match=msg):
        QuantConfig(**{"method": "rtn", **kw})


def test_adaround_refuses_fp8_layers():
    layer = QuantLinear(torch.nn.Linear(8, 4), 8, None, fmt="fp8")
    layer.init_weight("minmax")
    with pytest.raises(GacqError, match="integer grid"):
        layer.enable_adaround()


@pytest.fixture(scope="module")
def fp8_model():
    torch.manual_seed(0)
    fp = build_model("tiny").eval()
    loaded = LoadedModel(fp)
    cs = collect(loaded, SampleConfig(steps=5), CalibDataConfig(n_trajectories=4, n_steps=5), progress=False)
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, fmt="fp8", split_shortcuts=True)
    return loaded, cfg, quantize(loaded, cfg, cs)


def _io():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 3, 16, 16, generator=g), torch.tensor([3, 400, 950])


def test_tiny_unet_quantizes_saves_and_loads_bit_exactly(fp8_model, tmp_path):
    loaded, cfg, q = fp8_model
    layers = quant_layers(q)
    assert layers and all(m.fmt == "fp8" and m.weight_quantizer.fmt == "fp8" for _, m in layers)
    assert any(m.split for _, m in layers)  # the split layers' two halves are fp8 too
    x, t = _io()
    with torch.no_grad():
        ref, out = loaded.model(x, t).sample, q(x, t).sample
    assert 0 < (out - ref).norm() / ref.norm() < 0.25  # quantized, not broken
    save_quantized(q, tmp_path / "q", {"config": cfg.to_json()}, dict(loaded.model.config), loaded.scheduler_config)
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["format_version"] == 5 and all(e["fmt"] == "fp8" for e in meta["layers"].values())
    assert config_from_json(meta["config"]).fmt == "fp8"
    tensors = load_file(str(tmp_path / "q" / "quantized.safetensors"))
    for name, m in layers:  # one byte per weight, the codes the fake quantizer rounds to
        qw = tensors[f"{name}.qweight"]
        assert qw.dtype == torch.float8_e4m3fn and qw.numel() == m.weight.numel()
        torch.testing.assert_close(qw.float(), m.integer_weight(), rtol=0, atol=0)
    back = load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back.model(x, t).sample, out, rtol=0, atol=0)
    # an integer checkpoint's config leaves fmt out (its resume fingerprints stay what they were)
    assert "fmt" not in QuantConfig(method="rtn").to_json() and cfg.to_json()["fmt"] == "fp8"


def _layer_reference(m, x: torch.Tensor) -> torch.Tensor:
    """The fp8 layer in float64 from the fake quantizers' codes and scales (each channel group on its own)."""
    wq = m.quantized_weight().detach().double()  # codes * scale: exact for integer codes, 2^-24 relative for fp8
    groups = m.split_input(x) if m.split else (x,)
    xq = torch.cat([q.codes(g).double() * q.scale.double() for q, g in zip(m.act_quantizers(), groups)],
                   m.in_axis)
    b = None if m.bias is None else m.bias.double()
    if isinstance(m, QuantConv2d):
        return torch.nn.functional.conv2d(xq, wq, b, m.stride, m.padding, m.dilation)
    return torch.nn.functional.linear(xq, wq, b)


def test_exported_layers_match_float64_and_fake_quant(fp8_model):
    _, _, q = fp8_model
    import copy

    exported, report = convert(copy.deepcopy(q), "fp8")
    assert report.n_fallbacks == 0 and set(report.converted) == {"FP8Conv2d", "FP8Linear"}
    g = torch.Generator().manual_seed(2)
    checked = 0
    for name, m in quant_layers(q):
        e = exported.get_submodule(name)
        assert isinstance(e, FP8Conv2d if isinstance(m, QuantConv2d) else FP8Linear)
        shape = (2, m.weight.shape[1], 8, 8) if isinstance(m, QuantConv2d) else (2, 5, m.weight.shape[1])
        x = torch.randn(shape, generator=g) * m.act_quantizer.scale * 100
        with torch.no_grad():
            ref, y, fake = _layer_reference(m, x), e(x).double(), m(x).double()
        # float32 accumulation of exact products against float64: a few ulps of the largest partial sums
        bound = 2.0 ** -20 * ref.abs().amax() + 1e-30
        assert (y - ref).abs().max() <= bound, name
        assert (fake - ref).abs().max() <= bound, name
        checked += 1
    assert checked == len(quant_layers(q))
    # bf16 inputs: the codes, the GEMM and the scales as before, the output in bf16
    name, m = next((n, m) for n, m in quant_layers(q) if isinstance(m, QuantConv2d) and m.weight.shape[-1] == 3)
    x = torch.randn(2, m.weight.shape[1], 8, 8, generator=g)
    e = copy.deepcopy(exported.get_submodule(name)).to(torch.bfloat16)
    assert e.parts[0].qweight.dtype == torch.float8_e4m3fn  # the codes survive the cast
    y = e(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = _layer_reference(m, x.bfloat16())  # the codes of bf16 x / scale, as the fake quantizer rounds them in bf16
    assert (y.double() - ref).abs().max() <= 2.0 ** -8 * ref.abs().amax()  # the bf16 output's rounding


def test_export_folder_and_backend_refusals(fp8_model, tmp_path):
    loaded, cfg, q = fp8_model
    save_quantized(q, tmp_path / "q", {"config": cfg.to_json()}, dict(loaded.model.config), loaded.scheduler_config)
    info = export(tmp_path / "q", "fp8", tmp_path / "e")
    assert info["check"]["agree_fraction"] >= info["check"]["min_agree"] == 0.5
    assert info["report"]["fallbacks"] == []
    # FP8 codes take one byte per weight (plus padding to 16 and a float32 scale per output channel)
    assert info["report"]["weight_bytes_after"] < info["report"]["weight_bytes_fp16"]
    model = load_exported(tmp_path / "e")
    x, t = _io()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, convert(load_model(tmp_path / "q").model, "fp8")[0](x, t).sample,
                                   rtol=0, atol=0)
    for backend in ("int8", "w4a8", "w4a16"):
        with pytest.raises(GacqError, match="use --backend fp8"):
            export(tmp_path / "q", backend, tmp_path / f"x_{backend}")
        assert not (tmp_path / f"x_{backend}").exists()
    int_q = quantize(loaded, QuantConfig(method="rtn", wbits=8, abits=None), None)
    with pytest.raises(GacqError, match="integer grids: use --backend int8"):
        convert(int_q, "fp8")


def test_cli_quantize_and_export_fp8(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "gacq", "quantize", "--model", str(tiny_model_dir), "--method", "rtn",
                        "--wbits", "8", "--abits", "8", "--format", "fp8", "--calib-trajectories", "2",
                        "--record-steps", "3", "--steps", "3", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote W8A8 rtn (common, format fp8) checkpoint" in r.stdout
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["format_version"] == 5 and meta["config"]["fmt"] == "fp8"
    r = gacq_here("export", out, "--backend", "fp8", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    assert "FP8Conv2d" in r.stdout
    r = gacq_here("export", out, "--backend", "w4fp8", "--out", tmp_path / "e4")  # W8 FP8 weights: nothing to pack
    assert r.returncode != 0 and "use --backend fp8" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e4").exists()
    r = gacq_here("quantize", "--model", tiny_model_dir, "--method", "rtn", "--wbits", "4", "--format", "fp8",
                  "--out", tmp_path / "bad")
    assert r.returncode != 0 and "an 8-bit format" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
    r = gacq_here("quantize", "--model", tiny_model_dir, "--method", "rtn", "--wbits", "4", "--abits", "32",
                  "--act-format", "fp8", "--out", tmp_path / "bad2")
    assert r.returncode != 0 and "inputs are 8-bit" in r.stderr and not (tmp_path / "bad2").exists()


@pytest.fixture(scope="module")
def w4_fp8_inputs():
    """A tiny UNet at W4 with FP8 inputs: TFMQ-DM (AdaRound weights, per-step FP8 input scales), a few iterations."""
    from gacq.quant.recon import ReconConfig

    torch.manual_seed(0)
    fp = build_model("tiny").eval()
    loaded = LoadedModel(fp)
    cs = collect(loaded, SampleConfig(steps=5), CalibDataConfig(selection="all", n_trajectories=4, n_steps=5),
                 progress=False)
    cfg = QuantConfig(method="tfmq", wbits=4, abits=8, act_fmt="fp8", recon=ReconConfig(iters=5, batch_size=4),
                      calib=CalibDataConfig(n_trajectories=4, n_steps=5))
    return loaded, cfg, quantize(loaded, cfg, cs, progress=False)


def test_w4_weights_with_fp8_inputs(w4_fp8_inputs, tmp_path):
    """--act-format fp8: the integer W4 weights (learned rounding) stay, the inputs take FP8 grids, TFMQ-DM's per-step
    sets included; saved and loaded bit-exactly; the fp8 backend runs every layer, matching float64 on the codes."""
    import copy

    loaded, cfg, q = w4_fp8_inputs
    layers = quant_layers(q)
    assert all(m.fmt == "int" and m.afmt == "fp8" and m.weight_quantizer.bits == 4 and m.adaround is not None
               for _, m in layers)
    assert all(m.act_quantizer.fmt == "fp8" for _, m in layers if m.act_quantizer is not None)
    fsc = q.gacq_fsc  # per-step input scales on FP8's grid: zero points 0, one scale per step
    assert all(not z.any() for z in fsc.zero_point.values()) and len({float(v[0]) for v in fsc.scale.values()}) > 1
    assert cfg.to_json()["act_fmt"] == "fp8" and config_from_json(cfg.to_json()).act_fmt == "fp8"
    save_quantized(q, tmp_path / "q", {"config": cfg.to_json()}, dict(loaded.model.config), loaded.scheduler_config)
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["format_version"] == 5 and all(e["afmt"] == "fp8" and "fmt" not in e for e in meta["layers"].values())
    back = load_model(tmp_path / "q")
    x, t = _io()
    with torch.no_grad():
        torch.testing.assert_close(back.model(x, t).sample, q(x, t).sample, rtol=0, atol=0)
    exported, report = convert(copy.deepcopy(q), "fp8")
    assert report.n_fallbacks == 0
    g = torch.Generator().manual_seed(4)
    for name, m in layers:
        e = exported.get_submodule(name)
        p = e.parts[0]  # the centred 4-bit codes, exact in FP8
        assert p.codes().abs().max() <= 15 and torch.equal(p.codes(), p.codes().round())
        shape = (2, m.weight.shape[1], 8, 8) if isinstance(m, QuantConv2d) else (2, 5, m.weight.shape[1])
        xin = torch.randn(shape, generator=g) * m.act_quantizer.scale * 100
        with torch.no_grad():
            ref, y = _layer_reference(m, xin), e(xin).double()
        assert (y - ref).abs().max() <= 2.0 ** -20 * ref.abs().amax() + 1e-30, name
    with pytest.raises(GacqError, match="integer grids"):
        convert(copy.deepcopy(q), "w4a8")


def test_w4fp8_backend_packs_the_fp8_backends_codes(w4_fp8_inputs, fp8_model, tmp_path):
    """The w4fp8 backend: the same W4 / FP8-input checkpoint as the fp8 backend, its 4-bit codes packed two per byte
    and unpacked to the fp8 backend's FP8 codes at each call, so every layer and the whole model give the fp8
    backend's outputs bitwise, from about half its weight bytes; it refuses wider weights and integer inputs."""
    import copy

    from gacq.export import auto_backend

    loaded, cfg, q = w4_fp8_inputs
    assert auto_backend(q) == "w4fp8" and auto_backend(fp8_model[2]) == "fp8"
    fp8_model_, rep8 = convert(copy.deepcopy(q), "fp8")
    packed, rep4 = convert(copy.deepcopy(q), "w4fp8")
    assert rep4.n_fallbacks == 0 and rep4.converted == rep8.converted
    for (name, a), b in zip(fp8_model_.named_modules(), packed.modules()):
        if hasattr(a, "parts"):
            for pa, pb in zip(a.parts, b.parts):
                assert pb.packed and not pa.packed and "qweight" not in dict(pb.named_buffers())
                assert pb.qweight_packed.dtype == torch.uint8 and pb.qweight_packed.shape[1] == (pb.k + 1) // 2
                assert torch.equal(pb.fp8_weight().view(torch.uint8), pa.qweight.view(torch.uint8)), name
    # bytes: half a byte a weight plus a zero point per channel, against a byte a weight (padded to 16) for fp8
    assert rep4.weight_bytes_after < 0.6 * rep8.weight_bytes_after
    assert rep4.weight_bytes_after < 0.3 * rep4.weight_bytes_fp16  # a quarter of fp16's, plus scales and zeros
    x, t = _io()
    with torch.no_grad():
        torch.testing.assert_close(packed(x, t).sample, fp8_model_(x, t).sample, rtol=0, atol=0)
    # an exported folder of the backend, reloaded
    save_quantized(q, tmp_path / "q", {"config": cfg.to_json()}, dict(loaded.model.config), loaded.scheduler_config)
    info = export(tmp_path / "q", "w4fp8", tmp_path / "e")
    assert info["report"]["fallbacks"] == [] and info["check"]["agree_fraction"] >= 0.5
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "e")(x, t).sample, packed(x, t).sample, rtol=0, atol=0)
    with pytest.raises(GacqError, match="integer grids: use --backend int8"):
        convert(quantize(loaded, QuantConfig(method="rtn", wbits=4, abits=None), None), "w4fp8")
    _, _, q8 = fp8_model  # FP8 W8A8: the fp8 backend's
    with pytest.raises(GacqError, match="8-bit: use --backend fp8"):
        convert(copy.deepcopy(q8), "w4fp8")


@pytest.mark.parametrize("kw", [{"kernel_size": 3, "stride": 2, "padding": 1},
                                {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
                                {"kernel_size": 1, "stride": 1, "padding": 1}])
def test_conv_torch_path_patches_match_float64(kw):
    """The CPU (torch) path's channels-last patches (`base.conv_windows`, zero bytes padding) for strides, padding and
    dilation of their own along each axis: within float32 accumulation of the float64 reference."""
    torch.manual_seed(0)
    m = QuantConv2d(torch.nn.Conv2d(6, 5, **kw), 8, 8, fmt="fp8")
    x = torch.randn(2, 6, 7, 9) * 2
    m.init_weight("minmax")
    m.act_quantizer.init_minmax(x)
    m.w_quant, m.a_quant = True, True
    e = FP8Conv2d(m)
    e.use_kernel = False
    with torch.no_grad():
        ref, y = _layer_reference(m, x), e(x).double()
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 2.0 ** -20 * ref.abs().amax() + 1e-30
