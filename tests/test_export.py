"""Real low-bit export (gacq.export): int4 packing, int8 and w4a16 layers against fake quantization and
against a float64 reference on the integer codes, whole tiny models quantized through the real CLI,
refusals, and the benchmark script's CPU smoke run."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gacq.errors import GacqError
from gacq.export import (
    BACKENDS,
    DenseConv2d,
    Int8Conv2d,
    Int8Linear,
    W4A16Conv2d,
    W4A16Linear,
    apply_step,
    check_failures,
    compare_outputs,
    convert,
    export,
    int_mm,
    load_exported,
    pack_int4,
    unpack_int4,
)
from gacq.export.int8 import to_int8
from gacq.export.w4a16 import to_w4a16
from gacq.quant.checkpoint import load_quantized, pack_int, save_quantized
from gacq.quant.modules import QuantConv2d, QuantLinear
from gacq.quant.wrap import quant_layers

from .conftest import gacq_here

ROOT = Path(__file__).resolve().parent.parent
U32 = 2.0**-24  # float32 unit roundoff
LAYER_RTOL = 2.0**-21  # the int8 layer's stated bound relative to sa sw |S| + |b| (gacq/export/int8.py)


# ------------------------------------------------------------------ packing ---
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 1), (4, 9), (2, 3, 16), (5, 0)])
def test_int4_pack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(unpack_int4(packed, shape[-1]), codes)


def test_int4_packing_matches_the_checkpoint_nibble_order():
    codes = torch.randint(0, 16, (11,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_int4(codes), pack_int(codes, 4))
    assert pack_int4(torch.tensor([1, 2])).item() == 1 | (2 << 4)
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([16]))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 40, 546])
def test_int_mm_with_cuda_row_padding_is_exact(m):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, 24), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (24, 16), generator=g, dtype=torch.int8)
    want = a.long() @ b.long()
    for layout in (False, True):  # True: the rows cuBLAS needs (M > 16), padded and cut off again
        assert torch.equal(int_mm(a, b, cuda_layout=layout).long(), want)


# ------------------------------------------------------------- layer set-up ---
def _init(layer, x, wbits_init="mse", seed=0):
    """Initialise weight grids and input ranges (min-max over `x`, per channel group); weights and acts on."""
    layer.init_weight(wbits_init)
    for q, xs in zip(layer.act_quantizers(), layer.split_input(x)):
        q.init_minmax(xs)
    layer.w_quant, layer.a_quant = True, True
    return layer


def make_conv(cin=5, cout=6, k=3, stride=1, padding=1, dilation=1, bias=True, wbits=8, abits=8, a_symmetric=False,
              split=0, seed=0, x_shape=(2, 5, 7, 9)):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    q = QuantConv2d(conv, wbits, abits, a_symmetric)
    if split:
        q.set_split(split)
    x = torch.randn(x_shape) * 2 + 0.3
    return _init(q, x), x


def make_linear(cin=13, cout=10, bias=True, wbits=8, abits=8, a_symmetric=False, seed=0):
    torch.manual_seed(seed)
    q = QuantLinear(nn.Linear(cin, cout, bias=bias), wbits, abits, a_symmetric)
    x = torch.randn(2, 5, cin) * 1.5 - 0.2
    return _init(q, x), x


def act_codes(q, x):
    """The fake quantizer's integers Xq - za (float32 arithmetic, as `fake_quantize`), in float64."""
    return (torch.clamp(torch.round(x / q.scale) + q.zero_point, q.qmin, q.qmax) - q.zero_point).double()


def weight_grid(layer):
    """Per channel group: (Wq - zw) in float64 with the group's (O, 1, ...) scale, and its input channels."""
    ints = layer.integer_weight().double()
    quants = [layer.weight_quantizer] + ([layer.weight_quantizer_0] if layer.split else [])
    bounds = [0, layer.split, ints.shape[1]] if layer.split else [0, ints.shape[1]]
    return [((ints[:, lo:hi] - wq.zero_point.double()), wq.scale.double(), (lo, hi))
            for wq, lo, hi in zip(quants, bounds[:-1], bounds[1:])]


def naive_conv64(u, w, stride, padding, dilation):
    """float64 conv as a sum over kernel offsets of einsums on the padded input (no unfold, no F.conv2d)."""
    n, c, h, wd = u.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    up = torch.zeros(n, c, h + 2 * ph, wd + 2 * pw, dtype=torch.float64)
    up[:, :, ph:ph + h, pw:pw + wd] = u
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            patch = up[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            out += torch.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def exact_reference(layer, x):
    """(y_exact, bound_magnitude, fake_magnitude) in float64 from the integer codes:
    y = sum over groups of sa sw[o] S[o] + b, with S = sum (Xq - za)(Wq - zw); |sa sw S| summed over groups,
    and sa sw sum |Xq - za||Wq - zw| (the scale of fake quantization's own float32 rounding)."""
    y = mag = absmag = 0
    for (wc, ws, (lo, hi)), q, xs in zip(weight_grid(layer), layer.act_quantizers(), layer.split_input(x)):
        u, sa = act_codes(q, xs), q.scale.double()
        if isinstance(layer, QuantConv2d):
            s = naive_conv64(u, wc, layer.stride, layer.padding, layer.dilation)
            sabs = naive_conv64(u.abs(), wc.abs(), layer.stride, layer.padding, layer.dilation)
            ws = ws.reshape(1, -1, 1, 1)
        else:
            s, sabs = torch.einsum("...k,ok->...o", u, wc), torch.einsum("...k,ok->...o", u.abs(), wc.abs())
            ws = ws.reshape(-1)
        y, mag, absmag = y + sa * ws * s, mag + (sa * ws * s).abs(), absmag + sa * ws * sabs
    if layer.bias is not None:
        b = layer.bias.double().reshape(-1, 1, 1) if isinstance(layer, QuantConv2d) else layer.bias.double()
        y, mag = y + b, mag + b.abs()
    return y, mag, absmag


def check_int8_layer(layer, x):
    """The int8 layer vs the float64 integer reference (its stated bound) and vs fake quantization."""
    k = layer.weight[0].numel()
    ex = to_int8(layer)
    with torch.no_grad():
        y, y_fake = ex(x), layer(x)
    y_exact, mag, absmag = exact_reference(layer, x)
    assert y.shape == y_fake.shape and y.dtype == torch.float32
    assert ((y.double() - y_exact).abs() <= LAYER_RTOL * mag + 1e-30).all()
    assert ((y.double() - y_fake.double()).abs() <= LAYER_RTOL * mag + (k + 2) * U32 * absmag + 1e-30).all()
    # the fake-quant layer meets the same reference only within its float32 accumulation bound
    assert ((y_fake.double() - y_exact).abs() <= LAYER_RTOL * mag + (k + 2) * U32 * absmag + 1e-30).all()
    for part in ex.parts:  # torch._int_mm's second operand: (K, O) row-major, padded to multiples of 8
        w = part.qweight
        assert w.dtype == torch.int8 and w.is_contiguous() and w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0
        assert w.shape[0] - part.k < 8 and w.shape[1] - layer.weight.shape[0] < 8
    return ex


# ---------------------------------------------------------------- int8 layers ---
@pytest.mark.parametrize("kw", [
    {"k": 3, "stride": 1, "padding": 1},
    {"k": 3, "stride": 2, "padding": 1},
    {"k": 1, "stride": 1, "padding": 0},
    {"k": 1, "stride": 2, "padding": 0, "bias": False},
    {"k": 3, "stride": 1, "padding": 2, "dilation": 2},
    {"k": 3, "stride": 2, "padding": 0, "wbits": 4},
    {"k": 3, "stride": 1, "padding": 1, "wbits": 4, "abits": 6},
    {"k": 3, "stride": 1, "padding": 1, "a_symmetric": True},
    {"k": 3, "stride": 1, "padding": 1, "cin": 16, "cout": 8, "x_shape": (3, 16, 6, 6)},
    # every size of its own along height and width (the channels-last patches' strides)
    {"k": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
])
def test_int8_conv_matches_fake_quant_and_the_integer_reference(kw):
    layer, x = make_conv(**kw)
    ex = check_int8_layer(layer, x)
    assert isinstance(ex, Int8Conv2d)


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"wbits": 4}, {"wbits": 5, "abits": 7},
                                {"a_symmetric": True}, {"cin": 16, "cout": 8}])
def test_int8_linear_matches_fake_quant_and_the_integer_reference(kw):
    layer, x = make_linear(**kw)
    assert isinstance(check_int8_layer(layer, x), Int8Linear)


@pytest.mark.parametrize("make,kw", [(make_linear, {}), (make_linear, {"wbits": 8, "cin": 16, "cout": 8}),
                                     (make_conv, {"k": 3, "stride": 1, "padding": 1})])
def test_int8_nt_and_nn_weight_layouts_give_the_same_integers(make, kw):
    """The default `Int8Part.int_mm_layout = "nt"` (torch._int_mm on the transposed view of a row-major (O, K)
    weight copy, made once, not saved) gives bitwise the output of the row-major (K, O) operand ("nn"). A conv
    larger than 1x1 gathers its patches channels-last, so its copy has k in (r, s, c) order (`kernel_weight`'s)."""
    import torch.nn.functional as F

    from gacq.export.base import rsc_order

    layer, x = make(**kw)
    ex = to_int8(layer)
    ex.use_kernel = False
    assert all(part.int_mm_layout == "nt" for part in ex.parts)
    kxk = ex.is_conv and ex.kernel_size != (1, 1)
    name = "_qweight_kmajor" if kxk else "_qweight_nt"
    with torch.no_grad():
        got = ex(x)
        copy = getattr(ex.parts[0], name)
        assert torch.equal(ex(x), got) and getattr(ex.parts[0], name) is copy
        for part in ex.parts:
            part.int_mm_layout = "nn"
        want = ex(x)
    assert torch.equal(got, want)
    part = ex.parts[0]
    stored = part.qweight  # (K8, O8)
    if kxk:  # the same weight with k in (r, s, c) order, padded alike
        (kp, op), (k, o) = part.qweight.shape, (part.k, part.out_channels)
        stored = F.pad(rsc_order(part.qweight[:k, :o].t(), ex.kernel_size), (0, kp - k, 0, op - o)).t()
    assert copy.is_contiguous() and torch.equal(copy.t(), stored)
    assert name not in "".join(ex.state_dict())  # not saved with the export


@pytest.mark.parametrize("make,kw", [
    (make_linear, {"cin": 24, "cout": 8}),
    # a conv's offset term from its per-pixel channel sums, padding included
    (make_conv, {"cin": 6, "cout": 8, "stride": 2, "padding": 1, "x_shape": (2, 6, 7, 9)}),
    (make_conv, {"cin": 6, "cout": 8, "k": (3, 2), "padding": (2, 1), "dilation": (2, 1), "x_shape": (2, 6, 7, 9)}),
])
def test_int8_weight_rows_that_need_the_128_shift(make, kw):
    """An 8-bit row whose codes minus zero point leave int8 is shifted by 128 and corrected exactly."""
    layer, x = make(**kw)
    with torch.no_grad():
        n = layer.weight[0].numel()
        layer.weight[0] = torch.linspace(0.1, 2.0, n).reshape(layer.weight[0].shape)  # zero point 0, codes to 255
        layer.weight[1] = -torch.linspace(0.1, 2.0, n).reshape(layer.weight[1].shape)  # zero point 255, codes to 0
    layer.init_weight("minmax")
    ex = check_int8_layer(layer, x)
    part = ex.parts[0]
    assert part.has_offset and part.w_offset[0] == 128 and part.w_offset[1] == -127
    assert part.qweight.dtype == torch.int8


def test_int8_reads_the_act_grid_at_call_time():
    """FSC-style: a new step's activation scale / zero point written into the quantizer is used at the next call."""
    layer, x = make_conv(cin=16, cout=8, x_shape=(2, 16, 6, 6))
    ex = to_int8(layer)
    with torch.no_grad():
        y0 = ex(x)
        q = layer.act_quantizer  # shared with the exported layer
        assert ex.act_quantizer is q
        q._set(q.scale * 1.7, torch.clamp(q.zero_point + 9, 0, 255))
        y1, y1_fake = ex(x), layer(x)
    assert not torch.allclose(y0, y1)
    y_exact, mag, _ = exact_reference(layer, x)
    assert ((y1.double() - y_exact).abs() <= LAYER_RTOL * mag + 1e-30).all()
    assert ((y1 - y1_fake).abs() <= 1e-5 * y1_fake.abs().max()).all()


def test_int8_split_shortcut_layer():
    """A shortcut-split 1x1 conv: two channel groups, each with its own weight and input grids."""
    layer, x = make_conv(cin=12, cout=8, k=1, padding=0, split=5, x_shape=(2, 12, 5, 5))
    ex = check_int8_layer(layer, x)
    assert len(ex.parts) == 2 and ex.act_quantizer_0 is layer.act_quantizer_0


def test_int8_layer_keeps_exact_scales_under_a_dtype_cast():
    layer, x = make_conv()
    ex = to_int8(layer).to(torch.bfloat16)
    assert ex.parts[0].w_scale.dtype == torch.float32 and ex.parts[0].qweight.dtype == torch.int8
    assert ex.bias.dtype == torch.bfloat16
    with torch.no_grad():
        y = ex(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# --------------------------------------------------------------- w4a16 layers ---
@pytest.mark.parametrize("make,kw", [
    (make_conv, {"wbits": 4}), (make_conv, {"wbits": 3, "stride": 2}), (make_conv, {"wbits": 2, "k": 1, "padding": 0}),
    (make_conv, {"wbits": 4, "k": 1, "padding": 0, "cin": 12, "split": 5, "x_shape": (2, 12, 5, 5)}),
    (make_linear, {"wbits": 4}), (make_linear, {"wbits": 4, "abits": None}),
])
def test_w4a16_equals_fake_quant_and_stores_a_quarter(make, kw):
    layer, x = make(**kw)
    ex = to_w4a16(layer)
    assert isinstance(ex, (W4A16Conv2d, W4A16Linear))
    with torch.no_grad():
        assert torch.equal(ex(x), layer(x))  # same dequantized weight, same float op: bitwise
        layer.a_quant = ex.a_quant = False
        assert torch.equal(ex(x), layer(x))
    o, k = layer.weight.shape[0], layer.weight[0].numel()
    groups = 2 if layer.split else 1
    assert ex.qweight.dtype == torch.uint8 and ex.qweight.shape == (o, (k + 1) // 2)
    assert ex.weight_bytes() == o * ((k + 1) // 2) + o * groups * (4 + 1)  # codes + float32 scale + uint8 zero point
    assert ex.weight_bytes() <= 0.25 * (2 * o * k) + o * (groups * 5 + 1)


# ---------------------------------------------------------------- w4a8 layers ---
@pytest.mark.parametrize("make,kw", [
    (make_conv, {"wbits": 4}), (make_conv, {"wbits": 3, "stride": 2, "a_symmetric": True}),
    (make_conv, {"wbits": 4, "k": 1, "padding": 0, "cin": 12, "split": 5, "x_shape": (2, 12, 5, 5)}),
    (make_linear, {"wbits": 4}), (make_linear, {"wbits": 2, "abits": 6}),
])
def test_w4a8_equals_the_int8_layer_and_stores_a_quarter(make, kw):
    """The same integer sums and float32 epilogue as the int8 backend (bitwise on the CPU path), from
    packed int4 storage: codes + float32 scale + uint8 zero point + int32 row term per channel."""
    from gacq.export import W4A8Conv2d, W4A8Linear
    from gacq.export.int8 import to_w4a8, w4a8_unsupported

    layer, x = make(**kw)
    assert w4a8_unsupported(layer) is None
    ex, ref = to_w4a8(layer), to_int8(layer)
    assert isinstance(ex, (W4A8Conv2d, W4A8Linear))
    with torch.no_grad():
        assert torch.equal(ex(x), ref(x))
        y_fake = layer(x)
    assert ((ex(x) - y_fake).abs() <= 1e-5 * y_fake.abs().max()).all()
    o, k = layer.weight.shape[0], layer.weight[0].numel()
    groups = 2 if layer.split else 1
    ks = [p.k for p in ex.parts]
    assert sum(ks) == k and ex.weight_bytes() == sum(o * ((kk + 1) // 2) for kk in ks) + o * groups * (4 + 1 + 4)
    layer8, _ = make(**{**kw, "wbits": 8})
    assert "8-bit weights" in w4a8_unsupported(layer8)


# ------------------------------------------------------------ whole models ---
def _gacq(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "gacq", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"gacq {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """W4A8 and W8A8 rtn checkpoints of the tiny model, made by the real CLI (two processes at once)."""
    from gacq.models import build_model, save_model

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model_dir = save_model(build_model("tiny").eval(), root / "tiny")
    procs = {}
    for wb in (4, 8):
        out = root / f"q{wb}8"
        cmd = [sys.executable, "-m", "gacq", "quantize", "--model", model_dir, "--method", "rtn", "--wbits", wb,
               "--abits", 8, "--calib-trajectories", 4, "--record-steps", 3, "--steps", 3, "--out", out,
               "--device", "cpu"]
        procs[wb] = (out, subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for wb, (out, p) in procs.items():
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    return {"w4a8": root / "q48", "w8a8": root / "q88", "root": root}


@pytest.mark.parametrize("ckpt,backend", [("w8a8", "int8"), ("w4a8", "int8"), ("w4a8", "w4a8")])
def test_export_int8_whole_model(qdirs, tmp_path, ckpt, backend):
    out = tmp_path / backend
    info = export(qdirs[ckpt], backend, out, check_batches=2, check_batch_size=4)
    rep, chk = info["report"], info["check"]
    n_layers = len(json.loads((qdirs[ckpt] / "quant_config.json").read_text())["layers"])
    kind = "Int8" if backend == "int8" else "W4A8"
    assert rep["converted"] == {f"{kind}Conv2d": 23, f"{kind}Linear": 26} and sum(rep["converted"].values()) == n_layers
    assert rep["fallbacks"] == []  # conv_in / conv_out stay float Conv2d: not quantized layers, not fallbacks
    # against float32 bytes; the tiny model's short rows make the per-channel terms (scale, zero point, row sum) a
    # large share (0.162 for w4a8 here)
    assert rep["weight_bytes_after"] < (0.3 if backend == "int8" else 0.17) * rep["weight_bytes_before"]
    assert chk["agree_fraction"] >= BACKENDS["int8"].min_agree and chk["median_rel_error"] <= 1e-5
    assert chk["max_rel_error"] <= BACKENDS["int8"].max_rtol
    # each exported layer equals its fake-quant layer to float32 rounding, and the whole model passes the backend's
    # acceptance. Not asserted: that it agrees with the float64 fake-quant run on as many of the 8 samples as float32
    # fake quant does. Which side an ulp-level difference flips an activation rounding to is a matter of the CPU's
    # kernels: true on the first machines; on an AMD EPYC (session 45) w4a8 agreed on 4 of 8, fake quant on 7
    assert chk["layers"]["max_rel_error"] <= BACKENDS[backend].layer_rtol
    assert check_failures(chk, BACKENDS[backend]) == []
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["backend"] == backend and on_disk["torch"] == torch.__version__
    assert "tolerance_note" in on_disk["check"]
    assert {p.name for p in qdirs[ckpt].iterdir()} <= {p.name for p in out.iterdir()}
    # load_exported rebuilds the same converted model
    model = load_exported(out)
    assert sum(type(m).__name__ == f"{kind}Conv2d" for m in model.modules()) == 23
    ref, _, _ = load_quantized(qdirs[ckpt])
    again = compare_outputs(ref, model, batches=1, batch_size=4, float64=False)
    assert again["agree_fraction"] >= 0.5


def test_mixed_precision_w4a8_runs_its_8_bit_layers_on_the_int8_kernel(qdirs, tmp_path):
    """A W4A8 checkpoint with 8-bit weights in its four up-block shortcut convs (`w8_checkpoint`): the w4a8 backend
    runs those as int8 layers and the rest packed int4, with no fallback; w4a16 leaves them on the dense path."""
    from gacq.models import load_model
    from gacq.quant.api import w8_checkpoint

    mixed = w8_checkpoint(qdirs["w4a8"], tmp_path / "mixed", load_model(str(qdirs["root"] / "tiny")),
                          ("up_blocks.*.conv_shortcut",))
    assert len(mixed["w8_from"]["layers"]) == 4
    info = export(tmp_path / "mixed", "w4a8", tmp_path / "e", check_batches=2, check_batch_size=4)
    rep, chk = info["report"], info["check"]
    assert rep["converted"] == {"Int8Conv2d": 4, "W4A8Conv2d": 19, "W4A8Linear": 26} and rep["fallbacks"] == []
    assert chk["agree_fraction"] >= BACKENDS["w4a8"].min_agree and chk["max_rel_error"] <= BACKENDS["w4a8"].max_rtol
    model = load_exported(tmp_path / "e")
    assert type(model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")).__name__ == "Int8Conv2d"
    _, rep16 = convert(load_quantized(tmp_path / "mixed")[0], "w4a16")
    assert len(rep16.fallbacks) == 4 and all("8-bit weights" in f["reason"] for f in rep16.fallbacks)


def test_auto_backend_runs_each_checkpoint_as_calibrated(qdirs, tmp_path):
    """`--backend auto` (the default): int8 for W8A8, w4a8 for W4A8, w4a16 for weight-only W4; a weight-only W8
    checkpoint, which no backend runs, is refused with the fix named. Through the real CLI with no --backend: the
    export.json and the printed summary name the backend chosen."""
    from gacq.export import auto_backend
    from gacq.models import load_model
    from gacq.quant.api import QuantConfig, quantize

    assert auto_backend(load_quantized(qdirs["w8a8"])[0]) == "int8"
    assert auto_backend(load_quantized(qdirs["w4a8"])[0]) == "w4a8"
    loaded = load_model(str(qdirs["root"] / "tiny"))
    assert auto_backend(quantize(loaded, QuantConfig(method="rtn", wbits=4, abits=None), None)) == "w4a16"
    with pytest.raises(GacqError, match="no backend runs W8 weights with float inputs.*--abits 8"):
        auto_backend(quantize(loaded, QuantConfig(method="rtn", wbits=8, abits=None), None))
    r = gacq_here("export", qdirs["w4a8"], "--out", tmp_path / "e", "--device", "cpu", "--check-batches", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("w4a8: ")
    assert json.loads((tmp_path / "e" / "export.json").read_text())["backend"] == "w4a8"
    assert type(load_exported(tmp_path / "e").get_submodule("down_blocks.0.resnets.0.conv1")).__name__ == "W4A8Conv2d"


def test_export_w4a16_via_the_command(qdirs, tmp_path):
    """`export_cmd` through a typer app (the function gacq/cli.py registers); outputs equal fake quant exactly."""
    import typer
    from typer.testing import CliRunner

    from gacq.cli_export import register

    app = typer.Typer()

    @app.callback()
    def _main() -> None:  # a group, so that `export` is a subcommand as in gacq's app
        pass

    register(app)
    out = tmp_path / "w4"
    res = CliRunner().invoke(app, ["export", str(qdirs["w4a8"]), "--backend", "w4a16", "--out", str(out),
                                   "--device", "cpu", "--check-batches", "1"])
    assert res.exit_code == 0, res.output
    assert "w4a16: 49 layers" in res.output and f"wrote {out}" in res.output
    info = json.loads((out / "export.json").read_text())
    assert info["check"]["max_rel_error"] == 0.0 and info["check"]["agree_fraction"] == 1.0
    assert info["report"]["weight_bytes_after"] <= 0.3 * info["report"]["weight_bytes_fp16"]
    bad = CliRunner().invoke(app, ["export", str(qdirs["w4a8"]), "--backend", "int4", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown backend 'int4'; choose one of: int8, w4a8, w4a16" in bad.output
    assert not (tmp_path / "x").exists()


def test_gacq_export_subprocess(qdirs, tmp_path):
    out = tmp_path / "int8"
    proc = _gacq("export", qdirs["w8a8"], "--backend", "int8", "--out", out, "--device", "cpu", "--check-batches", 1)
    assert "int8: 49 layers" in proc.stdout and (out / "export.json").exists()
    bad = gacq_here("export", qdirs["w8a8"], "--backend", "w4a16", "--out", tmp_path / "x")  # refusal: in this process
    assert bad.returncode == 2 and "at most 4 bits" in bad.stderr and "Traceback" not in bad.stderr


def test_gacq_sample_runs_an_exported_folder_on_its_backend(qdirs, tmp_path):
    """`gacq sample --model EXPORTED` (and `load_model`) runs the exported layers, not the fake-quant checkpoint the
    folder also holds: until session 38 it loaded the folder as a quantized checkpoint and sampled fake quant, saying
    nothing. The images equal those of `load_exported`'s model; `--float-acts` is refused for such a folder."""
    from gacq.export.base import ExportedLayer
    from gacq.models import load_model
    from gacq.sampling import SampleConfig, generate

    out = tmp_path / "int8"
    _gacq("export", qdirs["w8a8"], "--backend", "int8", "--out", out, "--device", "cpu", "--check-batches", 1)
    _gacq("sample", "--model", out, "--num", 2, "--steps", 3, "--out", tmp_path / "s", "--device", "cpu")
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["model"].endswith("(int8)")

    def exported_layers(model):
        return sum(isinstance(m, ExportedLayer) for m in model.modules())

    loaded = load_model(out)
    assert exported_layers(loaded.model) == 49 and loaded.source.endswith("(int8)")
    assert exported_layers(load_model(qdirs["w8a8"]).model) == 0  # the checkpoint itself stays fake quant
    ref = load_model(qdirs["w8a8"])
    ref.model = load_exported(out)
    cfg = SampleConfig(steps=3, num=2)
    assert (generate(loaded, cfg, range(2)) == generate(ref, cfg, range(2))).all()
    bad = gacq_here("sample", "--model", out, "--float-acts", "--num", 2, "--steps", 3, "--out", tmp_path / "f",
                    "--device", "cpu")
    assert bad.returncode == 2 and "exported for the int8 backend" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "f").exists()
    # an export whose layers this gacq would convert otherwise (another version's rules) is refused by both loaders
    info = json.loads((out / "export.json").read_text())
    info["report"]["converted"] = {kind: n - 1 for kind, n in info["report"]["converted"].items()}
    (out / "export.json").write_text(json.dumps(info))
    for load in (load_model, load_exported):
        with pytest.raises(GacqError, match="export it again"):
            load(out)


def test_refusals(qdirs, tmp_path):
    with pytest.raises(GacqError, match="unknown backend 'fp4'; choose one of: int8, w4a8, w4a16"):
        export(qdirs["w8a8"], "fp4", tmp_path / "x")
    (tmp_path / "plain").mkdir()
    with pytest.raises(GacqError, match="is not a quantized checkpoint"):
        export(tmp_path / "plain", "int8", tmp_path / "x")
    with pytest.raises(GacqError, match="w4a16 backend stores weights of at most 4 bits; this model's are 8-bit"):
        export(qdirs["w8a8"], "w4a16", tmp_path / "x")
    with pytest.raises(GacqError, match="w4a8 backend stores weights of at most 4 bits; this model's are 8-bit"):
        export(qdirs["w8a8"], "w4a8", tmp_path / "x")
    with pytest.raises(GacqError, match="inside it"):
        export(qdirs["w8a8"], "int8", qdirs["w8a8"] / "sub")
    with pytest.raises(GacqError, match="not an exported folder"):
        load_exported(qdirs["w8a8"])
    assert not (tmp_path / "x").exists()
    model, _, _ = load_quantized(qdirs["w4a8"])
    for _, m in quant_layers(model):
        m.a_quant = False  # the weight-only model of the checkpoint
    with pytest.raises(GacqError, match="int8 backend needs quantized activations.*use --backend w4a16"):
        convert(model, "int8")
    with pytest.raises(GacqError, match="no quantized layers"):
        convert(nn.Sequential(nn.Linear(2, 2)), "int8")


def test_fallback_is_counted_warned_and_strict_refuses(qdirs, caplog):
    model, _, _ = load_quantized(qdirs["w8a8"])
    ref = copy.deepcopy(model)
    m = model.get_submodule("down_blocks.0.resnets.0.conv1")
    m.act_quantizer = None  # an input kept in float: int8 cannot run it
    ref.get_submodule("down_blocks.0.resnets.0.conv1").act_quantizer = None
    with pytest.raises(GacqError, match="cannot run 1 of 49.*down_blocks.0.resnets.0.conv1: input kept in float"):
        convert(copy.deepcopy(model), "int8", strict=True)
    procs = [type(a.processor) for a in model.modules() if hasattr(a, "processor")]
    with caplog.at_level(logging.WARNING, logger="gacq.export.convert"):
        _, rep = convert(model, "int8")
    warnings = [r for r in caplog.records if r.name == "gacq.export.convert"]
    assert len(warnings) == 1 and "1 of 49 quantized layers run on the dense fallback path" in warnings[0].getMessage()
    assert rep.converted == {"DenseConv2d": 1, "Int8Conv2d": 22, "Int8Linear": 26}
    assert rep.fallbacks == [{"layer": "down_blocks.0.resnets.0.conv1", "type": "QuantConv2d",
                              "reason": "input kept in float (no activation quantizer)"}]
    assert isinstance(model.get_submodule("down_blocks.0.resnets.0.conv1"), DenseConv2d)
    assert [type(a.processor) for a in model.modules() if hasattr(a, "processor")] == procs  # attention untouched
    chk = compare_outputs(ref, model, batches=1, batch_size=4, float64=False)
    assert chk["agree_fraction"] >= 0.5


def test_per_step_activation_sets(qdirs, tmp_path):
    """TFMQ-DM-style per-step sets saved in a checkpoint: export checks each step, the exported layers read them."""
    from gacq.quant.fsc import FSCParams

    model, meta, sched = load_quantized(qdirs["w8a8"])
    scale, zp = {}, {}
    for name, m in quant_layers(model):
        q = m.act_quantizer
        scale[name] = torch.stack([q.scale.detach() * f for f in (1.0, 1.3, 0.8)]).reshape(3)
        zp[name] = torch.stack([torch.clamp(q.zero_point + d, 0, 255) for d in (0.0, 3.0, -2.0)]).reshape(3)
    model.gacq_fsc = FSCParams(scale, zp, {"scheduler": "ddim", "steps": 3, "timestep_spacing": "leading"})
    qdir = save_quantized(model, tmp_path / "qfsc", {"config": meta["config"]}, dict(model.config), sched)
    info = export(qdir, "int8", tmp_path / "e", check_batches=1, check_batch_size=4)
    assert info["check"]["steps_checked"] == [0, 1, 2] and info["check"]["agree_fraction"] >= 0.5
    ex = load_exported(tmp_path / "e")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        apply_step(ex, 1)
        y1 = ex(x, t).sample
        apply_step(ex, 0)
        y0 = ex(x, t).sample
    assert not torch.allclose(y0, y1)


def _flip_prone_w8a8(folder: Path) -> Path:
    """An RTN W8A8 checkpoint of a small random UNet2DModel (two levels of 16 and 32 channels, two resnets a level,
    attention, 32x32; 0.25M parameters) in which, as in the bundled CIFAR-10 UNet, float32 rounding differences
    flip activation codes at rounding boundaries in most samples of the export check."""
    from diffusers import UNet2DModel

    from gacq.models import LoadedModel
    from gacq.quant.api import QuantConfig, quantize
    from gacq.quant.calib_data import CalibrationSet

    torch.manual_seed(0)
    fp = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(16, 32),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
                     attention_head_dim=None).eval()
    g = torch.Generator().manual_seed(1)
    calib = CalibrationSet(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g),
                           torch.zeros(8, dtype=torch.long), {})
    loaded = LoadedModel(fp)
    q = quantize(loaded, QuantConfig(method="rtn", wbits=8, abits=8), calib, progress=False)
    return save_quantized(q, folder, {"note": "flip-prone"}, dict(fp.config), loaded.scheduler_config)


def test_int8_export_where_rounding_flips_reach_most_samples(tmp_path):
    """Regression (session 40): `gacq export` of the bundled model's W8A8 RTN checkpoint was refused with "0% of
    samples agree to 1e-05 of max |y| (needed: 50%)", on the CPU and on an H100. No layer was wrong: each int8 layer,
    given its fake-quant layer's input, matched it within 2e-6 of max |y|, nearer the float64 result than fake quant
    itself. But a model that size puts some activation within a float32 ulp of a rounding boundary in every sample,
    the flipped code moves more codes in the next layers, and every sample ends about 1% of max |y| apart: float32
    fake quant against its own float64 run too (0 of 8 samples agree). export now checks each layer on the fake-quant
    model's own inputs, and where whole samples do not agree, that the exported model is as faithful to the float64
    run as float32 fake quant. This model shows the same: most samples flip, for fake quant against float64 too."""
    qdir = _flip_prone_w8a8(tmp_path / "q")
    info = export(qdir, "int8", tmp_path / "e", check_batches=2, check_batch_size=4)  # until session 40: refused
    from gacq.export import check_failures
    from gacq.export.folder import FLIP_SLACK

    chk, f64 = info["check"], info["check"]["float64"]
    assert chk["agree_fraction"] < BACKENDS["int8"].min_agree and f64["fake_quant_agree_fraction"] < 0.5
    assert chk["max_rel_error"] > 1e-3  # flips, not ulps: but float32 fake quant is as far from the exact outputs
    assert f64["exported_max_rel_error"] <= FLIP_SLACK * f64["fake_quant_max_rel_error"]
    assert f64["exported_agree_fraction"] >= f64["fake_quant_agree_fraction"]
    n_layers = len(json.loads((qdir / "quant_config.json").read_text())["layers"])
    assert chk["layers"]["layers"] == n_layers == sum(info["report"]["converted"].values())
    assert chk["layers"]["calls"] >= 2 * n_layers and chk["layers"]["max_rel_error"] <= 1e-5
    assert chk["layer_rtol"] == BACKENDS["int8"].layer_rtol and (tmp_path / "e" / "export.json").exists()

    # the layer check is what still catches a wrong layer there: one input grid 0.1% off, whose whole-model effect
    # hides among the flips
    ref = load_quantized(qdir)[0]
    model, _ = convert(copy.deepcopy(ref), "int8")
    name = "up_blocks.0.resnets.1.conv1"
    layer = model.get_submodule(name)
    layer.act_quantizer = copy.deepcopy(layer.act_quantizer)
    layer.act_quantizer._set(layer.act_quantizer.scale.detach() * 1.001, layer.act_quantizer.zero_point)
    bad = compare_outputs(ref, model, batches=1, batch_size=4)
    assert bad["layers"]["worst_layer"] == name and bad["layers"]["max_rel_error"] > 1e-3
    fails = check_failures(bad, BACKENDS["int8"])
    assert len(fails) == 1 and fails[0].startswith(f"layer {name} differs from its fake-quant layer")


# ------------------------------------------------------------------ GPU only ---
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._int_mm's cuBLAS path needs a CUDA GPU")
@pytest.mark.parametrize("make,kw", [(make_conv, {"cin": 16, "cout": 8, "x_shape": (1, 16, 6, 6)}),
                                     (make_conv, {"cin": 5, "cout": 6, "stride": 2}), (make_linear, {})])
def test_int8_layers_on_cuda(make, kw):
    layer, x = make(**kw)
    ex = to_int8(layer).cuda()
    layer = layer.cuda()
    with torch.no_grad():
        y, y_fake = ex(x.cuda()).cpu(), layer(x.cuda()).cpu()
        ex.use_kernel = False  # the torch path: cuBLAS in the default transposed-weight ("nt") layout
        y_nt = ex(x.cuda()).cpu()
        ex.use_kernel = True
    y_exact, mag, _ = exact_reference(layer.cpu(), x)
    assert ((y.double() - y_exact).abs() <= LAYER_RTOL * mag + 1e-30).all()
    assert ((y_nt.double() - y_exact).abs() <= LAYER_RTOL * mag + 1e-30).all()
    assert ((y - y_fake).abs() <= 1e-5 * y_fake.abs().max()).all()


# ---------------------------------------------------------------- benchmark ---
def test_bench_best_float_ratio_takes_the_fastest_float_row_per_batch():
    """The second ratio divides by the fastest float row at the same batch, CUDA-graph rows included; low-bit
    and fake-quant rows never serve as the reference, and rows without a time get no ratio."""
    from gacq.bench import add_best_float_ratio

    rows = [{"mode": "bf16 eager", "batch": 1, "ms_median": 10.0},
            {"mode": "bf16 eager + CUDA graph", "batch": 1, "ms_median": 2.0},
            {"mode": "bf16 compiled", "batch": 1, "ms_median": 8.0},
            {"mode": "bf16 compiled", "batch": 256, "ms_median": 12.0},
            {"mode": "bf16 compiled + CUDA graph", "batch": 256, "ms_median": 6.0},
            {"mode": "fake-quant W8A8", "batch": 256, "ms_median": 1.0},  # faster, but not a float baseline
            {"mode": "int8 W8A8 + CUDA graph", "batch": 1, "ms_median": 4.0},
            {"mode": "w4a8 W4A8", "batch": 256, "ms_median": 24.0},
            {"mode": "int8 W8A8", "batch": 64, "error": "boom"},
            {"mode": "fp8 FP8 compiled + CUDA graph", "batch": 256, "ms_median": 3.0},  # faster: not a baseline
            {"mode": "w4fp8 W4xFP8 compiled", "batch": 1, "ms_median": 1.0}]
    add_best_float_ratio(rows)
    got = [r.get("speedup_vs_best_float") for r in rows]
    assert got == [0.2, 1.0, 0.25, 0.5, 1.0, 6.0, 0.5, 0.25, None, 2.0, 2.0]


def test_bench_compiles_every_mode_past_dynamos_recompile_limit():
    """`gacq bench` compiles each mode with an empty Dynamo cache (`compile_fresh`): five models of different
    structure at two batch sizes each are ten graphs of one code object, past Dynamo's limit of 8, where plain
    torch.compile runs the rest eager (the control below; session 35's w4fp8 row ran so). Dynamo's own counter of
    graphs made, backend "eager" (no inductor compile on the CPU)."""
    from torch._dynamo.utils import counters

    from gacq.bench import compile_fresh

    def new_graphs(compile_):
        counters.clear()
        made = []
        for depth in range(1, 6):
            f = compile_(nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)]))
            for batch in (1, 2):
                before = counters["stats"]["unique_graphs"]
                f(torch.randn(batch, 4))
                made.append(counters["stats"]["unique_graphs"] - before)
        return made

    limit = torch._dynamo.config.recompile_limit
    assert limit < 10  # else the control proves nothing
    try:
        assert new_graphs(lambda m: compile_fresh(m, backend="eager")) == [1] * 10
        torch._dynamo.reset()
        assert new_graphs(lambda m: torch.compile(m, dynamic=False, backend="eager")) == [1] * limit + [0] * (10 - limit)
    finally:
        torch._dynamo.reset()


def test_bench_modes_ending_in_dollar_match_one_label_only(tmp_path):
    """`--modes 'w4a8 W4A8$'` runs the mode of that label and not "w4a8 W4A8 unpacked", which the bare substring
    also matches."""
    args = ["--config", "tiny", "--device", "cpu", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
            "--no-compile"]
    rows = {}
    for key, modes in (("exact", "w4a8 W4A8$"), ("substring", "w4a8 W4A8")):
        r = gacq_here("bench", *args, "--modes", modes, "--out", tmp_path / key)
        assert r.returncode == 0, r.stderr
        rows[key] = {row["mode"] for row in json.loads((tmp_path / key / "bench_lowbit.json").read_text())["results"]}
    assert rows == {"exact": {"w4a8 W4A8"}, "substring": {"w4a8 W4A8", "w4a8 W4A8 unpacked"}}


def test_bench_keeps_each_finished_batch_size_when_a_mode_is_cut_short(tmp_path, monkeypatch):
    """A device call's time limit can stop `gacq bench` in the middle of a mode. What it finished, every batch size
    of the modes before and this mode's earlier batch sizes, is on disk by then (session 38 lost a mode's batch 1
    and 64 rows to the limit: the results were written once per mode). Simulated here by an interrupt at the second
    batch size of the second mode."""
    from gacq import bench

    real = bench.timed_row

    def cut(row, make_call, device, args):
        if row["mode"] == "w4a8 W4A8" and row["batch"] == 2:
            raise KeyboardInterrupt  # what the call's timeout amounts to here: the process stops
        return real(row, make_call, device, args)

    monkeypatch.setattr(bench, "timed_row", cut)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "1,2", "--warmup", "0",
                    "--repeats", "1", "--no-compile", "--modes", "int8 W8A8$,w4a8 W4A8$", "--out", str(out)])
    rows = json.loads((out / "bench_lowbit.json").read_text())["results"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("int8 W8A8", 1), ("int8 W8A8", 2), ("w4a8 W4A8", 1)]
    assert all("ms_median" in r for r in rows)
    assert "| w4a8 W4A8 | 1 |" in (out / "bench_lowbit.md").read_text()


def test_bench_lowbit_cpu_smoke(tmp_path):
    """`gacq bench` end to end on the CPU; `--modes` keeps only the asked modes (the benchmarks/ script is the same
    code: `gacq.bench.main`)."""
    out = tmp_path / "bench"
    args = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "1", "--repeats", "2",
            "--warmup", "1", "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gacq", "bench", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "bench_lowbit.json").read_text())
    modes = {r["mode"] for r in res["results"]}
    assert {"fp32 eager", "fake-quant W8A8", "int8 W8A8", "fake-quant W4A16", "w4a16 W4A16"} <= modes
    assert all("ms_median" in r for r in res["results"]) and res["layer_time_share"]["conv2d"] > 0
    assert not any("CUDA graph" in m for m in modes)  # graphs are CUDA-only
    # the only float row is the fastest float row: its own ratio is 1; the backends' are float ms / their ms
    fp = next(r for r in res["results"] if r["mode"] == "fp32 eager")
    assert fp["speedup_vs_best_float"] == 1.0
    i8 = next(r for r in res["results"] if r["mode"] == "int8 W8A8")
    assert i8["speedup_vs_best_float"] == pytest.approx(fp["ms_median"] / i8["ms_median"], abs=1e-3)
    assert "| vs best float |" in (out / "bench_lowbit.md").read_text()
    assert (out / "bench_lowbit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the same ratios as bars
    # the first call (compilation, capture, kernel builds) is timed apart from the steady state, in JSON and table
    assert all(r["first_call_s"] > 0 for r in res["results"])
    assert "| first call s |" in (out / "bench_lowbit.md").read_text()
    assert res["command"].startswith("gacq bench --config tiny")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lowbit.py"), *args, "--modes", "int8",
                           "--sample-steps", "3", "--out", str(tmp_path / "b2")], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    res2 = json.loads((tmp_path / "b2" / "bench_lowbit.json").read_text())
    assert {r["mode"] for r in res2["results"]} == {"int8 W8A8", "int8 W8A8 im2col", "int8 W8A8 triton-linears",
                                                   "int8 W8A8 nn-linears", "int8 W8A8 token", "int8 W8A8 token triton"}
    # a 3-step sampling loop costs about 3 steps, so more than the fastest single step (a 3x margin: the CPU may be
    # shared; session 15 saw 1.5x fail under load)
    for r in res2["results"]:
        assert r["sample_steps"] == 3 and r["sample_seconds"] * 1e3 > r["ms_min"], r
    # each layer alone: every conv/linear of the model, in float and in each backend; conv_in/conv_out stay float
    proc = subprocess.run([sys.executable, "-m", "gacq", "bench", *args, "--modes", "none", "--kernels",
                           "--out", str(tmp_path / "b3")], capture_output=True, text=True, timeout=300, check=False,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    kern = json.loads((tmp_path / "b3" / "bench_lowbit.json").read_text())["kernels"]
    from gacq.models import build_model

    model = build_model("tiny")
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(r["layer"] for r in kern["layers"]) == sorted(layers)
    by = {r["layer"]: r for r in kern["layers"]}
    assert by["conv_in"]["int8_float"] and "int8_float" not in by["down_blocks.0.resnets.0.conv1"]
    conv1 = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert by["down_blocks.0.resnets.0.conv1"]["K"] == conv1.in_channels * 9
    assert by["down_blocks.0.resnets.0.conv1"]["M"] == 1 * model.config.sample_size ** 2  # batch 1, stride 1
    assert kern["variants"] == dict.fromkeys(("fp32", "int8", "w4a8", "w4a16", "fp8", "w4fp8"), "ok")
    assert kern["peaks"] == "not measured on the CPU"
    c1 = by["down_blocks.0.resnets.0.conv1"]
    assert c1["fp8_tops"] > 0 and "fp8_float" not in c1
    # throughput is 2 M N K over the time, to four significant digits even where it is a few GOPS (a tiny layer on
    # the CPU; rounded to three decimals of TOPS it read 0.0 under load)
    for v in ("fp32", "int8", "fp8"):  # tolerance: the four significant digits and the ms rounded to 1e-4
        ms = c1[f"{v}_ms"]
        assert c1[f"{v}_tops"] == pytest.approx(2 * c1["M"] * c1["N"] * c1["K"] / (ms * 1e-3) / 1e12,
                                                rel=1e-3 + 0.5e-4 / ms), v
    proc = gacq_here("bench", *args, "--modes", "none", "--out", tmp_path / "b4")  # a refusal: in this process
    assert proc.returncode == 2 and "matches no mode" in proc.stderr  # nothing to run is an error
    assert res["command"] and res["machine"]["torch"] == torch.__version__ and (out / "bench_lowbit.md").exists()


def test_kernel_classes_and_the_gemm_bound():
    """Kernel names from an H100 profile of the compiled bf16 and fp8 `ddpm-cifar10` (session 35's
    results/bench_lowbit JSON) and CPU op names, each in its class; the bound against hand arithmetic."""
    from gacq.bench import gemm_bound, kernel_class

    h100 = {"sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "gemm",
            "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNN": "gemm",
            "nvjet_sm90_qqsss_128x128_128x6_1x2_h_bz_coopA_algo2_TNT": "gemm",  # torch._scaled_mm
            "_fp8_conv_kernel": "gemm", "_int8_conv_kernel": "gemm", "_w4a16_conv_kernel": "gemm",
            "triton_tem_fused_convolution_3": "gemm",
            # inductor's fused pointwise kernels name the ops they fused, convolution and attention among them
            "triton_poi_fused_convolution_native_group_norm_silu_83": "other",
            "triton_red_fused_add_convolution_native_group_norm_silu_unsqueeze_8": "other",
            "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_mul_transpose_view_26": "other",
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x256": "attention",
            "_fp8_quantize_halo_kernel": "other",
            "aten::mkldnn_convolution": "gemm", "aten::addmm": "gemm", "aten::_int_mm": "gemm",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::add": "other",
            "aten::native_group_norm": "other"}
    assert {n: kernel_class(n) for n in h100} == h100
    # session 35's bf16 step: GEMMs 4.65 of 11.61 ms -> 11.61 / (11.61 - 4.65 / 2) = 1.25x at best
    assert gemm_bound({"gemm": 4.65, "attention": 0.3, "other": 6.66}) == pytest.approx(11.61 / (11.61 - 2.325))
    assert gemm_bound({"gemm": 1.0, "other": 0.0}, factor=4) == pytest.approx(4.0)
    assert gemm_bound({"gemm": 0.0, "other": 0.0}) is None


def test_bench_tile_rules_and_profile(tmp_path):
    """`gacq bench --tile-rules small-m,no-small-m --profile`: each Triton low-bit mode runs once per tile rule (the
    rule named in its label), a float or fake-quant mode once; every timed row carries its profile (time per call
    summed over the recorded ops, their number, the costliest), and the markdown gets the profile table. An unknown
    rule is refused before anything runs."""
    out = tmp_path / "bench"
    args = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "1", "--repeats", "2",
            "--warmup", "1", "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gacq", "bench", *args, "--modes", "w4a8 W4A8,fake-quant W4A8",
                           "--tile-rules", "small-m,no-small-m", "--profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "bench_lowbit.json").read_text())
    modes = [r["mode"] for r in res["results"]]
    assert sorted(modes) == sorted(["fake-quant W4A8", "w4a8 W4A8", "w4a8 W4A8 tiles=no-small-m", "w4a8 W4A8 unpacked",
                                    "w4a8 W4A8 unpacked tiles=no-small-m"])
    for r in res["results"]:
        p = r["profile"]
        assert p["what"] == "CPU ops" and p["calls"] == 3 and p["launches_per_call"] >= 1
        assert 0 < p["top"][0]["ms_per_call"] <= p["ms_per_call"] and len(p["top"]) <= 8
        assert [t["ms_per_call"] for t in p["top"]] == sorted((t["ms_per_call"] for t in p["top"]), reverse=True)
        # every op's time in exactly one class; the tiny model's convolutions are GEMM time
        assert sum(p["by_class"].values()) == pytest.approx(p["ms_per_call"], abs=1e-3)
        assert p["by_class"]["gemm"] > 0 and 1 < p["bound_2x_gemm"] < 2
    md = (out / "bench_lowbit.md").read_text()
    assert "## Where the time goes" in md and "| w4a8 W4A8 tiles=no-small-m | 1 |" in md and "2x-GEMM bound" in md
    proc = gacq_here("bench", *args, "--tile-rules", "small-m,huge", "--out", tmp_path / "b2")
    assert proc.returncode == 2 and "unknown rule(s) huge" in proc.stderr and "small-m, no-small-m" in proc.stderr
    assert not (tmp_path / "b2").exists()
