"""Checks of the Triton kernels (w4a16 GEMM, int8 implicit-GEMM conv), run by test_triton_w4.py in a subprocess: with
TRITON_INTERPRET=1 (Triton's interpreter runs the kernel on CPU tensors; it must be set before
triton is imported), or with GACQ_TRITON_DEVICE=cuda on a GPU (inputs are built on the CPU as in
the interpreter run and moved to the GPU; results come back to the CPU for the float64 checks).
Usage: python tests/triton_w4_checks.py CASE [CASE ...]"""

from __future__ import annotations

import os
import sys

DEVICE = os.environ.get("GACQ_TRITON_DEVICE", "cpu")
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", \
    "run with TRITON_INTERPRET=1 (or GACQ_TRITON_DEVICE=cuda on a GPU)"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gacq.export import triton_int8, triton_w4  # noqa: E402
from gacq.export.base import pack_int4  # noqa: E402


def _same_epilogue(y: torch.Tensor, want: torch.Tensor, what) -> None:
    """The fused kernels against their torch path: bitwise in Triton's interpreter. Compiled for a GPU,
    Triton contracts the epilogue's multiply-add into one FMA (one rounding where torch rounds twice),
    which the H200 run of session 8 showed as 1 float32 ulp (2.4e-7 on outputs of size ~2); so on CUDA
    the codes and int32 sums must still agree and only the float epilogue may differ, by at most 2
    units of the output dtype's epsilon at the output's scale."""
    assert y.shape == want.shape and y.dtype == want.dtype, what
    if DEVICE == "cpu":
        assert torch.equal(y, want), (what, (y - want).abs().max())
        return
    tol = 2 * torch.finfo(want.dtype).eps * max(1.0, float(want.abs().max()))
    err = float((y.float() - want.float()).abs().max())
    assert err <= tol, (what, err, tol)


def _kernel_vs_torch_path(ex, x: torch.Tensor, what) -> None:
    """An exported layer's fused kernel against its own torch path (`use_kernel` off) on x, by `_same_epilogue`."""
    assert ex.kernel_applies(x), what
    with torch.no_grad():
        y = ex(x)
        ex.use_kernel = False
        want = ex(x)
    ex.use_kernel = True
    _same_epilogue(y, want, what)


def _on_device(f):
    """f with its tensor arguments moved to DEVICE and its result moved back to the CPU."""
    def call(*args, **kw):
        move = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return f(*map(move, args), **{k: move(v) for k, v in kw.items()}).cpu()
    return call


w4a16_matmul, w4a16_conv2d = _on_device(triton_w4.w4a16_matmul), _on_device(triton_w4.w4a16_conv2d)


def weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zero = torch.randint(0, 16, (n,), generator=g)
    scale = torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 0.01
    w64 = (codes.double() - zero.double()[:, None]) * scale[:, None]
    return pack_int4(codes), scale.float(), zero.to(torch.uint8), w64


def matmul_fp32():
    """Odd K and sizes that are not multiples of the tiles, with and without a bias, against float64."""
    for (m, k, n, bias) in [(37, 45, 19, True), (5, 64, 70, False), (1, 7, 3, True), (64, 33, 32, False)]:
        qw, scale, zero, w64 = weight(n, k, seed=m)
        x = torch.randn(m, k, dtype=torch.float64)
        b = torch.randn(n, dtype=torch.float64) if bias else None
        y = w4a16_matmul(x.float(), qw, scale, zero, k, b.float() if bias else None)
        ref = x @ w64.T + (b if bias else 0)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        # float32 inputs, weights and accumulation over K <= 64 terms of size ~1: ~1e-6 relative
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 45)  # leading dimensions are kept
    qw, scale, zero, w64 = weight(19, 45)
    torch.testing.assert_close(w4a16_matmul(x3, qw, scale, zero, 45).double(), x3.double() @ w64.T, rtol=1e-5, atol=1e-5)
    # other tiles than `tiles` picks (on the GPU the large ones: 64 x 128 x 64), partly filled
    qw, scale, zero, w64 = weight(70, 90)
    x = torch.randn(37, 90, dtype=torch.float64)
    y = w4a16_matmul(x.float(), qw, scale, zero, 90, block=(64, 128, 64))
    torch.testing.assert_close(y.double(), x @ w64.T, rtol=1e-5, atol=1e-5)


def matmul_fp16():
    """fp16 inputs: the kernel casts each dequantized tile to fp16 (as the dense path casts the
    weight) and accumulates in float32; against the dense fp16-weight product in float64."""
    m, k, n = 33, 40, 24
    qw, scale, zero, w64 = weight(n, k)
    x = torch.randn(m, k).half()
    y = w4a16_matmul(x, qw, scale, zero, k)
    ref = x.double() @ w64.float().half().double().T
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)  # fp16 output rounding (2^-11)


def conv():
    """The implicit-GEMM conv kernel against F.conv2d in float64 with the dequantized weight: 3x3 stride 1 and 2,
    1x1, dilation 2, padding 'same'."""
    for kw in [dict(k=3, stride=1, padding=1, dilation=1), dict(k=3, stride=2, padding=1, dilation=1),
               dict(k=1, stride=1, padding=0, dilation=1), dict(k=3, stride=1, padding=2, dilation=2),
               dict(k=3, stride=1, padding="same", dilation=1),
               dict(k=3, stride=2, padding=1, dilation=1, c=64)]:  # channels a multiple of BLOCK_K: aligned blocks
        o, c, k = 6, kw.pop("c", 5), kw["k"]
        qw, scale, zero, w64 = weight(o, c * k * k, seed=k)
        w4 = w64.reshape(o, c, k, k)
        x = torch.randn(2, c, 9, 7, dtype=torch.float64)
        b = torch.randn(o, dtype=torch.float64)
        st, dl = (kw["stride"],) * 2, (kw["dilation"],) * 2
        pad = kw["padding"] if isinstance(kw["padding"], str) else (kw["padding"],) * 2
        y = w4a16_conv2d(x.float(), qw, scale, zero, (o, c, k, k), b.float(), st, pad, dl)
        ref = F.conv2d(x, w4, b, st, pad, dl)
        assert y.shape == ref.shape, (kw, y.shape, ref.shape)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def layers():
    """W4A16 layers of test_export's fake-quant conv and linear take the kernel path and match the
    fake-quant layer (which multiplies the same dequantized weight densely) to float32 rounding."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.w4a16 import to_w4a16
    from tests.test_export import make_conv, make_linear

    for make, kw in [(make_conv, {"wbits": 4}), (make_conv, {"wbits": 3, "stride": 2}),
                     (make_linear, {"wbits": 4}), (make_linear, {"wbits": 4, "abits": None})]:
        layer, x = make(**kw)
        ex = to_w4a16(layer)
        ex, layer, x = ex.to(DEVICE), layer.to(DEVICE), x.to(DEVICE)
        assert not ex.kernel_applies(x)  # the default: dequantize per call + the float op
        ex.use_kernel = True
        assert ex.kernel_applies(x)
        with torch.no_grad():
            torch.testing.assert_close(ex(x), layer(x), rtol=1e-5, atol=1e-5)
            ex.use_kernel = False
            if DEVICE == "cpu":
                assert torch.equal(ex(x), layer(x))
            else:  # cuDNN may pick another algorithm per call; the same dense weights either way
                torch.testing.assert_close(ex(x), layer(x), rtol=1e-6, atol=1e-6)
    layer, x = make_conv(wbits=4, k=1, padding=0, cin=12, split=5, x_shape=(2, 12, 5, 5))
    ex = to_w4a16(layer)
    ex.use_kernel = True
    assert not ex.kernel_applies(x)  # two weight groups: the dense path


def int8_conv():
    """The fused int8 conv against the int8 backend's torch path (im2col + torch._int_mm + separate
    dequantization), bitwise in the interpreter (compiled: see _same_epilogue): 3x3 with padding, stride 2, dilation 2, 1x1, no bias, asymmetric
    (zero point != 0) and symmetric activation grids, weights whose rows need the 128 offset (dw != 0),
    4-bit weights, an odd batch and a K that is not a multiple of the tile."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.int8 import to_int8
    from tests.test_export import make_conv

    cases = [{}, {"stride": 2}, {"dilation": 2, "padding": 2}, {"k": 1, "padding": 0}, {"bias": False},
             {"a_symmetric": True}, {"wbits": 4, "abits": 6}, {"cin": 19, "cout": 37, "x_shape": (3, 19, 6, 5)},
             {"cin": 8, "cout": 70, "x_shape": (3, 8, 13, 14)},  # compiled: larger tiles (`tiles`), partly filled
             # channels a multiple of BLOCK_K (32 in the interpreter, 64 compiled): one kernel tap per K block
             {"cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)},
             {"cin": 64, "cout": 16, "stride": 2, "x_shape": (1, 64, 9, 8), "wbits": 4}]
    offsets = 0
    for kw in cases:
        layer, x = make_conv(**kw)
        ex = to_int8(layer).to(DEVICE)
        offsets += ex.parts[0].has_offset
        _kernel_vs_torch_path(ex, x.to(DEVICE), kw)
    # tiles other than `tiles`' choice (in the interpreter: always 32x32x32) give the same output
    layer, x = make_conv(cin=8, cout=70, x_shape=(3, 8, 13, 14))
    ex = to_int8(layer).to(DEVICE)
    chosen = triton_int8.tiles
    try:
        triton_int8.tiles = lambda m, o, *_: (64, 128, 64, 8)
        with torch.no_grad():
            y = ex(x.to(DEVICE))
    finally:
        triton_int8.tiles = chosen
    with torch.no_grad():
        ex.use_kernel = False
        _same_epilogue(y, ex(x.to(DEVICE)), "64x128x64 tiles")
    # the kernels read the quantizer's scale and zero point at each call: a per-step grid written in place
    # (as TFMQ-DM's per-step activation sets are) is used by the next call, with no cached copy in between
    layer, x = make_conv()
    ex = to_int8(layer).to(DEVICE)
    (q,) = list(ex.act_quantizers())
    x = x.to(DEVICE)
    with torch.no_grad():
        ex(x)
        q.scale.mul_(1.5)
        q.zero_point.add_(3.0)
        y = ex(x)
        ex.use_kernel = False
        want = ex(x)
    _same_epilogue(y, want, "grid changed in place")
    # a weight row spanning more than 255 codes cannot be centred on its zero point: dw = 128 - zw
    layer, x = make_conv(wbits=8)
    with torch.no_grad():
        wq = layer.weight_quantizer
        wq.zero_point.fill_(0.0)  # rows of codes 0..255 around a zero point at 0
    ex = to_int8(layer).to(DEVICE)
    assert ex.parts[0].has_offset
    _kernel_vs_torch_path(ex, x.to(DEVICE), "offset rows / ties")
    # exact ties x / sa = j + 0.5 round half to even, as torch.round does
    layer, x = make_conv()
    with torch.no_grad():
        layer.act_quantizer.scale.fill_(0.0625)
        layer.act_quantizer.zero_point.fill_(100.0)
    x = (torch.randint(-60, 60, x.shape, generator=torch.Generator().manual_seed(3)) + 0.5) * 0.0625
    _kernel_vs_torch_path(to_int8(layer).to(DEVICE), x.to(DEVICE), "offset rows / ties")
    if DEVICE == "cuda":  # bf16 (Triton's interpreter truncates float32 -> bf16 casts; the GPU rounds to nearest)
        for kw in cases:
            layer, x = make_conv(**kw)
            ex = to_int8(layer).to(DEVICE, torch.bfloat16)
            x = x.to(DEVICE, torch.bfloat16)
            with torch.no_grad():
                y = ex(x)
                ex.use_kernel = False
                want = ex(x)
                try:
                    _same_epilogue(y, want, ("bf16", kw))
                except AssertionError as e:  # session 9 (H200): 0.078 against a 0.065 tolerance; say where from
                    raise AssertionError(f"{e}; {_bf16_diagnosis(ex, x, y, want)}") from None
    layer, x = make_conv(split=2, cin=5)
    assert not to_int8(layer).kernel_applies(x)  # two weight groups: the torch path


def _converted_conv(convert, offset_rows: bool = False, **kw):
    """`make_conv(**kw)` converted (`to_int8` / `to_w4a8`) and moved to DEVICE, with its input; `offset_rows`: rows of
    codes 0..255 around a zero point at 0, so dw = 128 - zw != 0 (HAS_OFFSET)."""
    from tests.test_export import make_conv

    layer, x = make_conv(**kw)
    if offset_rows:
        with torch.no_grad():
            layer.weight_quantizer.zero_point.fill_(0.0)
    return convert(layer).to(DEVICE), x.to(DEVICE)


def split_k():
    """Split-K in the int8 / W4A8 conv kernel (`int8_conv2d(split_k=S)`, the "small-m-splitk" tile rule's path):
    S programs per output tile each sum part of the K loop, a second kernel adds their int32 partial sums and runs
    the epilogue. The integers are the same, so the output equals the unsplit kernel's bit for bit (interpreter;
    compiled the two epilogues are different kernels, so `_same_epilogue`) and the torch path's, for int8 and
    packed int4 weights, offset rows (the row-sum term), no bias, stride 2, K blocks not dividing evenly among the
    splits, and a split larger than the K blocks (clamped)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.int8 import to_int8, to_w4a8

    rule = triton_int8.split_k_rule
    seen = set()
    for convert, kw in [(to_int8, {"cin": 19, "cout": 37, "x_shape": (3, 19, 6, 5)}),
                        (to_int8, {"stride": 2, "bias": False, "cin": 16, "x_shape": (2, 16, 9, 8)}),
                        (to_int8, {"wbits": 8, "offset_rows": True, "cin": 12, "x_shape": (1, 12, 7, 7)}),
                        (to_w4a8, {"wbits": 4, "cin": 19, "cout": 37, "x_shape": (3, 19, 6, 5)}),
                        (to_w4a8, {"wbits": 4, "cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)})]:
        ex, x = _converted_conv(convert, **kw)
        seen.add((convert.__name__, ex.parts[0].has_offset))
        with torch.no_grad():
            y1 = ex(x)
            ex.use_kernel = False
            want = ex(x)
            ex.use_kernel = True
            for split in (2, 3, 4, 1000):
                triton_int8.split_k_rule = lambda *_, s=split: s
                try:
                    y = ex(x)
                finally:
                    triton_int8.split_k_rule = rule
                if DEVICE == "cpu":
                    assert torch.equal(y, y1), (kw, split, (y - y1).abs().max())
                _same_epilogue(y, want, (convert.__name__, kw, split))
    assert ("to_int8", True) in seen and ("to_w4a8", False) in seen, seen
    # the rule: no split unless "small-m-splitk", and never in the interpreter
    assert triton_w4.split_k(64, 256, 4608, 16, 64, 64) == 1


def halo():
    """The halo path of the int8 / W4A8 conv kernel (`int8_conv2d(halo=True)`, the default: the input quantized into
    a buffer padded with the code of 0.0, the GEMM's input tiles loaded without bounds masks, and without K masks
    where K is a multiple of BLOCK_K) against the masked path (`halo=False`) over the same layer: the same integer
    sums, so bitwise equal in the interpreter (compiled the two are different kernels: `_same_epilogue`), and both
    against the torch path. int8 and packed int4 weights; 3x3 padding 1 at stride 1 and 2, 1x1 without padding,
    padding 2 with dilation 2, unequal padding (2, 1), a 2x2 kernel over 8 channels (K = 32: whole K blocks in the
    interpreter without whole-channel blocks), C = 3 (conv_in), C = 64 (one tap per K block, also with
    `aligned=False`); with and without a bias, offset rows (the row-sum term, which must count the border's codes);
    batches of 1-3, non-square images; split-K 3, and 2 and 4 with C = 64 (in the interpreter 18 K blocks, so 4
    splits leave the last one running past K). Zero points whose pad code clamp(za) - ca is far from 0 (za = 0, 255 and
    the calibrated ones) and 0 (symmetric), so a wrong border code changes the output."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.int8 import act_center, to_int8, to_w4a8
    from tests.test_export import make_conv

    conv2d = _on_device(triton_int8.int8_conv2d)

    def run(ex, x, **kw):  # what `Int8Layer._fused` passes, and kw
        (part,), (q,) = ex.parts, list(ex.act_quantizers())
        return conv2d(x, part.qweight, part.k, part.out_channels, part.w_scale,
                      part.w_offset if part.has_offset else None, part.row_term, ex.bias, q.scale.detach(),
                      q.zero_point.detach(), q.qmin, q.qmax, act_center(q.qmin, q.qmax), ex.kernel_size, ex.stride,
                      tuple(ex.padding), ex.dilation, w_zero=part.kernel_zero, **kw)

    cases = [{}, {"stride": 2, "bias": False}, {"k": 1, "padding": 0, "x_shape": (3, 5, 6, 4)},
             {"dilation": 2, "padding": 2}, {"padding": (2, 1), "x_shape": (1, 5, 5, 8)},
             {"k": 2, "cin": 8, "x_shape": (2, 8, 6, 7)},
             {"cin": 3, "cout": 37, "x_shape": (3, 3, 6, 5)}, {"cin": 3, "stride": 2, "x_shape": (2, 3, 9, 6)},
             {"cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)},
             {"cin": 64, "cout": 16, "stride": 2, "bias": False, "x_shape": (1, 64, 9, 8)},
             {"a_symmetric": True}, {"za": 0.0}, {"za": 255.0, "stride": 2},
             {"wbits": 4, "abits": 6, "cin": 64, "x_shape": (2, 64, 6, 7)},
             {"offset_rows": True}, {"offset_rows": True, "cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)}]
    seen = set()
    for convert in (to_int8, to_w4a8):
        for n, kw in enumerate(cases):
            kw = dict(kw)
            za, offset_rows = kw.pop("za", None), kw.pop("offset_rows", False)
            if convert is to_w4a8:
                if offset_rows:
                    continue  # 4-bit rows never need the offset
                kw["wbits"] = 4
            layer, x = make_conv(**kw)
            with torch.no_grad():
                if za is not None:
                    layer.act_quantizer.zero_point.fill_(za)
                if offset_rows:  # rows of codes 0..255 around a zero point at 0: dw = 128 - zw != 0
                    layer.weight_quantizer.zero_point.fill_(0.0)
            ex = convert(layer).to(DEVICE)
            x = x.to(DEVICE)
            (q,) = list(ex.act_quantizers())
            pad_code = min(max(int(q.zero_point), q.qmin), q.qmax) - act_center(q.qmin, q.qmax)
            seen.add((convert.__name__, ex.parts[0].has_offset, pad_code != 0, max(ex.padding) > 0))
            what = (convert.__name__, kw, za, offset_rows, pad_code)
            with torch.no_grad():
                ex.use_kernel = False
                want = ex(x).cpu()
            plain = run(ex, x, halo=False)
            _same_epilogue(plain, want, ("masked", what))
            # split-K 3 everywhere; 2 and 4 and the per-element taps where C = 64 (whole-channel K blocks; 18 of
            # them, so 4 splits leave the last running past K). All three splits on every case took 126 s of the
            # interpreter's CPU, 104 s so (session 48)
            variants = [{}, {"split_k": 3}]
            if x.shape[1] == 64:
                variants += [{"split_k": 2}, {"split_k": 4}, {"aligned": False}]
            for v in variants:
                # None: the default (the halo path); once per weight type, as it gives halo=True's integers
                for h in ([True, None] if not v and (n == 0 or DEVICE == "cuda") else [True]):
                    y = run(ex, x, halo=h, **v)
                    if DEVICE == "cpu":
                        assert torch.equal(y, plain), (what, v, (y - plain).abs().max())
                    _same_epilogue(y, want, ("halo", what, v))
                if v:  # the masked path with the same split / taps: still the same integers
                    _same_epilogue(run(ex, x, halo=False, **v), want, ("masked", what, v))
    # (weights, offset rows, pad code != 0, padded) covered: offset rows with a nonzero pad code (the row sums count
    # the border), int8 weights without offsets, W4A8, pad codes 0 and nonzero, padded or not
    for key in [("to_int8", True, True, True), ("to_int8", False, True, True), ("to_int8", True, False, True),
                ("to_w4a8", False, True, True), ("to_w4a8", False, False, True), ("to_w4a8", False, True, False)]:
        assert key in seen, (key, seen)


def kmajor():
    """The K-major weight of the int8 / W4A8 conv kernel (`int8_conv2d(w_kmajor=True)` on `kernel_weight`, the layers'
    choice with `Int8Layer.kernel_kmajor` True or under the tile rule "small-m-kmajor"): k in (r, s, c) order, the
    kernel's own, against the stored (c, r, s) layout (`qweight`, `w_kmajor=False`) over the same layer. Every (k,
    weight) pair is the same, so are the integer sums: bitwise equal in the interpreter (compiled:
    `_same_epilogue`), and both against the torch path. int8 and packed int4 weights; 3x3 padding 1 at stride 1 and
    2, 1x1, 2x3 (kh != kw, so a transposed (s, r) order would differ), C = 3 (K blocks across taps: not ALIGNED), C
    = 64 (ALIGNED in the interpreter, also with `aligned=False`); with and without a bias, offset rows (HAS_OFFSET),
    batches of 1-3; split-K 3 (halo path) and 2 (masked path), halo on and off. `kernel_weight`'s content against
    the permutation written out index by index; and a layer compiled (fullgraph) before any eager call, which builds
    the cached copy inside the traced call.
    """
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.base import unpack_int4
    from gacq.export.int8 import act_center, to_int8, to_w4a8
    from tests.test_export import make_conv

    conv2d = _on_device(triton_int8.int8_conv2d)

    def run(ex, x, kmajor, **kw):  # what `Int8Layer._fused` passes, with the weight of either layout
        (part,), (q,) = ex.parts, list(ex.act_quantizers())
        w = part.kernel_weight(ex.kernel_size) if kmajor else part.qweight
        return conv2d(x, w, part.k, part.out_channels, part.w_scale, part.w_offset if part.has_offset else None,
                      part.row_term, ex.bias, q.scale.detach(), q.zero_point.detach(), q.qmin, q.qmax,
                      act_center(q.qmin, q.qmax), ex.kernel_size, ex.stride, tuple(ex.padding), ex.dilation,
                      w_zero=part.kernel_zero, w_kmajor=kmajor, **kw)

    cases = [{}, {"stride": 2, "bias": False}, {"k": 1, "padding": 0, "x_shape": (3, 5, 6, 4)},
             {"k": (2, 3), "padding": (1, 0), "cin": 7, "x_shape": (2, 7, 6, 8)},
             {"cin": 3, "cout": 37, "x_shape": (3, 3, 6, 5)}, {"cin": 3, "stride": 2, "x_shape": (1, 3, 9, 6)},
             {"cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)},
             {"cin": 64, "cout": 16, "stride": 2, "bias": False, "x_shape": (1, 64, 9, 8)},
             {"wbits": 6, "abits": 6, "bias": False},  # int8: 6-bit rows fit int8 around their zero point: no offset
             {"offset_rows": True}, {"offset_rows": True, "cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)}]
    seen = set()
    for convert in (to_int8, to_w4a8):
        for kw in cases:
            if convert is to_w4a8:
                if kw.get("offset_rows"):
                    continue  # 4-bit rows never need the offset
                kw = dict(kw, wbits=4)
            ex, x = _converted_conv(convert, **kw)
            (part,) = ex.parts
            kh, kw_ = ex.kernel_size
            c, o, k = x.shape[1], part.out_channels, part.k
            seen.add((convert.__name__, part.has_offset, kh * kw_ > 1, c % 32 == 0))
            what = (convert.__name__, kw)
            # the permutation written out: column (r * KW + s) * C + c of the K-major weight is column
            # c * KH * KW + r * KW + s of the stored one
            idx = torch.tensor([ci * kh * kw_ + r * kw_ + s for r in range(kh) for s in range(kw_) for ci in range(c)])
            kweight_dev = part.kernel_weight(ex.kernel_size)
            kweight = kweight_dev.cpu()
            if convert is to_int8:
                stored = part.qweight[:k, :o].t().cpu()
                assert kweight.dtype == torch.int8 and kweight.shape == part.qweight.shape[::-1], what
                assert torch.equal(kweight[:o, :k], stored[:, idx]) and not kweight[o:].any(), what
                assert not kweight[:, k:].any(), what
            else:
                stored = unpack_int4(part.qweight.cpu(), k)
                assert kweight.dtype == torch.uint8 and kweight.shape == part.qweight.shape, what
                assert torch.equal(unpack_int4(kweight, k), stored[:, idx]), what
                if kh * kw_ == 1:
                    assert kweight_dev.data_ptr() == part.qweight.data_ptr(), what  # 1x1: the stored codes themselves
            with torch.no_grad():
                ex.kernel_kmajor = True  # (by default only under the tile rule "small-m-kmajor")
                y_layer = ex(x).cpu()
                ex.kernel_kmajor = False
                y_stored = ex(x).cpu()
                ex.kernel_kmajor = None
                ex.use_kernel = False
                want = ex(x).cpu()
                ex.use_kernel = True
            _same_epilogue(y_layer, want, ("layer", what))
            _same_epilogue(y_stored, want, ("layer, stored weight", what))
            if DEVICE == "cpu":
                assert torch.equal(y_layer, y_stored), (what, (y_layer - y_stored).abs().max())
            # every path of the K-major weight gives the layer's integers, so the stored weight's; the stored
            # weight's own paths are halo()'s (running them here too took a third of this case's interpreter time)
            variants = [{"halo": True}, {"halo": False}, {"split_k": 3}, {"split_k": 2, "halo": False}]
            if c % 32 == 0:  # whole-channel K blocks in the interpreter: also the per-element taps
                variants.append({"aligned": False})
            for v in variants:
                y = run(ex, x, True, **v)
                if DEVICE == "cpu":
                    assert torch.equal(y, y_layer), (what, v, (y - y_layer).abs().max())
                _same_epilogue(y, want, ("kmajor", what, v))
    for key in [("to_int8", True, True, False), ("to_int8", False, True, False), ("to_int8", True, True, True),
                ("to_int8", True, False, False), ("to_w4a8", False, True, False), ("to_w4a8", False, True, True),
                ("to_w4a8", False, False, False)]:
        assert key in seen, (key, seen)
    # compiled before any eager call: `kernel_weight` runs inside the traced call (fullgraph: no graph break); its
    # copy is then cached on the part, and the output is the eager kernel's
    from torch._dynamo.backends.registry import lookup_backend

    backend = lookup_backend("inductor" if DEVICE == "cuda" else "aot_eager")
    for convert in (to_int8, to_w4a8):
        layer, x = make_conv(stride=2, wbits=4 if convert is to_w4a8 else 8, x_shape=(2, 5, 7, 9))
        ex, x = convert(layer).to(DEVICE), x.to(DEVICE)
        ex.kernel_kmajor = True
        assert getattr(ex.parts[0], "_qweight_kmajor", None) is None
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(ex, backend=backend, fullgraph=True, dynamic=False)(x)
            assert ex.parts[0]._qweight_kmajor is not None, convert.__name__
            _same_epilogue(got, ex(x), ("compiled first", convert.__name__))


def _bf16_diagnosis(ex, x, y, want) -> str:
    """Where a bf16 mismatch of the fused int8 conv comes from: the input codes as torch computes them in bf16
    on the device, against the kernel's recipe (float32 IEEE division rounded to bf16) and against exact codes
    (float64 division); and each output's distance from a float64 evaluation on the exact codes."""
    (q,) = list(ex.act_quantizers())
    s, zp = q.scale.double(), q.zero_point.double()
    codes = lambda v: torch.clamp(torch.round(v) + zp, q.qmin, q.qmax) - zp  # noqa: E731
    torch_codes = (torch.clamp(torch.round(x / q.scale) + q.zero_point, q.qmin, q.qmax) - q.zero_point).double()
    kernel_codes = codes((x.float() / q.scale.float()).to(torch.bfloat16).double())
    exact_codes = codes(x.double() / s)
    (part,) = ex.parts
    w = (part.qweight[:part.k, :part.out_channels].double() + part.w_offset.double()[None, :]).t()
    w = w.reshape(part.out_channels, -1, *ex.kernel_size)
    ref = F.conv2d(exact_codes, w, None, ex.stride, ex.padding, ex.dilation)
    ref = ref * (s * part.w_scale.double())[None, :, None, None]
    if ex.bias is not None:
        ref = ref + ex.bias.double()[None, :, None, None]
    i = int((y.double() - want.double()).abs().argmax())
    return (f"codes differing torch-bf16 vs kernel recipe: {int((torch_codes != kernel_codes).sum())}, torch vs exact: "
            f"{int((torch_codes != exact_codes).sum())} of {x.numel()}; max |out - float64| kernel "
            f"{float((y.double() - ref).abs().max()):.4g}, torch path {float((want.double() - ref).abs().max()):.4g}; "
            f"worst element {i}: kernel {float(y.flatten()[i])}, torch {float(want.flatten()[i])}, "
            f"float64 {float(ref.flatten()[i])}")


def w4a8():
    """The W4A8 layers' fused kernel (packed int4 codes unpacked in the K loop; linears as 1x1 convs)
    against their torch path (codes unpacked per call + torch._int_mm), bitwise in the interpreter
    (compiled: see _same_epilogue), float32 inputs."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gacq.export.int8 import to_w4a8
    from tests.test_export import make_conv, make_linear

    for make, kw in [(make_conv, {"wbits": 4}), (make_conv, {"wbits": 3, "stride": 2, "a_symmetric": True}),
                     (make_conv, {"wbits": 4, "cin": 19, "cout": 37, "x_shape": (3, 19, 6, 5)}),
                     (make_conv, {"wbits": 4, "k": 1, "padding": 0, "bias": False}),
                     (make_conv, {"wbits": 4, "cin": 64, "cout": 24, "x_shape": (2, 64, 7, 6)}),  # aligned K blocks
                     (make_linear, {"wbits": 4}), (make_linear, {"wbits": 2, "abits": 6})]:
        layer, x = make(**kw)
        ex = to_w4a8(layer).to(DEVICE)
        x = x.to(DEVICE)
        assert ex.kernel_applies(x), kw
        with torch.no_grad():
            y = ex(x)
            ex.unpack_for_kernel = True  # the int8 kernel on codes unpacked per call: the same integers
            y_unpacked = ex(x)
            ex.use_kernel = False
            want = ex(x)
        _same_epilogue(y, want, kw)
        _same_epilogue(y_unpacked, want, ("unpack-int8", kw))
    layer, x = make_conv(wbits=4, k=1, padding=0, cin=12, split=5, x_shape=(2, 12, 5, 5))
    assert not to_w4a8(layer).kernel_applies(x)  # two weight groups: the torch path


def int8_token():
    """Linears with dynamic per-token inputs through `triton_int8.int8_linear_dynamic` (each row's grid and codes in
    one kernel, per-row scales in the GEMM's epilogue) against the int8 / W4A8 torch path, bitwise in the
    interpreter (compiled: see _same_epilogue): asymmetric and symmetric grids, 8- and 6-bit inputs, 3-d inputs,
    a K over one block of the row kernel, a constant row (the MIN_SCALE floor), a row of exact ties, rows of one sign
    (the range widened to 0), weights that need the 128 offset."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.nn as nn

    from gacq.export.int8 import to_int8, to_w4a8
    from gacq.quant.modules import QuantLinear

    def layer(cin, cout, wbits, abits, sym, bias=True, seed=0):
        torch.manual_seed(seed)
        q = QuantLinear(nn.Linear(cin, cout, bias=bias), wbits, abits, sym, a_dynamic=True)
        q.init_weight("mse")
        q.w_quant, q.a_quant = True, True
        return q

    g = torch.Generator().manual_seed(1)
    cases = [(13, 10, 8, 8, False, (2, 5, 13)), (13, 10, 8, 8, True, (7, 13)), (40, 33, 8, 6, False, (3, 4, 40)),
             (1100, 9, 8, 8, False, (3, 1100)), (24, 16, 4, 8, False, (2, 3, 24)), (24, 16, 4, 8, True, (5, 24))]
    for (cin, cout, wbits, abits, sym, shape) in cases:
        q = layer(cin, cout, wbits, abits, sym, bias=cin != 40)
        x = torch.randn(shape, generator=g) * 1.5 - 0.2
        rows = x.reshape(-1, cin)
        rows[0] = 0.75  # a constant row: lo = min(0.75, 0) = 0, hi = 0.75
        if rows.shape[0] > 2:
            rows[1] = rows[1].abs() + 0.1  # one sign: the range widened to include 0
            # exact ties x / s = j + 0.5: a row whose range makes its step exactly 1/16
            qmin, qmax = (-(2 ** (abits - 1)) + 1, 2 ** (abits - 1) - 1) if sym else (0, 2 ** abits - 1)
            lo = -qmax if sym else 0
            rows[2] = (torch.randint(lo, qmax - (qmax - qmin) // 2 * sym, (cin,), generator=g) + 0.5) / 16
            rows[2, 0], rows[2, 1] = (-qmax / 16, qmax / 16) if sym else (0.0, (qmax - qmin) / 16)
        for make in ((to_int8, to_w4a8) if wbits <= 4 else (to_int8,)):
            _kernel_vs_torch_path(make(q).to(DEVICE), x.to(DEVICE),
                                  (make.__name__, cin, cout, wbits, abits, sym, shape))
    # many rows of the DiT's width: on the H200 (session 17) every such shape differed from the torch path by one
    # code somewhere, because CUDA torch divided the grids' ranges by a Python number as a multiplication by its
    # reciprocal (1 ulp off; now divided by a tensor in `qparams_from_range`); the small cases above did not show it
    for sym in (False, True):
        q = layer(384, 16, 8, 8, sym, seed=3)
        _kernel_vs_torch_path(to_int8(q).to(DEVICE), (torch.randn(256, 384, generator=g) * 1.3 + 0.1).to(DEVICE),
                              ("wide", sym))
    # weights whose rows span more than 255 codes: the offset term (dw = 128 - zw) with per-row input grids
    q = layer(13, 10, 8, 8, False)
    with torch.no_grad():
        q.weight_quantizer.zero_point.fill_(0.0)
    ex = to_int8(q).to(DEVICE)
    assert ex.parts[0].has_offset
    _kernel_vs_torch_path(ex, (torch.randn(4, 13, generator=g) * 2).to(DEVICE), "offset rows")
    # on by default (since session 18), off when asked, and never for a conv or a split linear
    q = layer(13, 10, 8, 8, False)
    ex = to_int8(q).to(DEVICE)
    assert ex.kernel_applies(torch.randn(2, 13).to(DEVICE))
    ex.kernel_dynamic = False
    assert not ex.kernel_applies(torch.randn(2, 13).to(DEVICE))
    q.set_split(5)
    ex = to_int8(q)
    ex.kernel_dynamic = True
    assert not ex.kernel_applies(torch.randn(2, 13).to(DEVICE))


def fake_quant():
    """gacq.quant.triton_fq's fused fake quantization against the six torch ops it replaces, bitwise: random
    inputs with values far outside the grid, exact ties x / s = k + 0.5, asymmetric 8-bit and symmetric 4-bit
    grids, a length that is not a multiple of the block; float32 (and bf16 / fp16 compiled: Triton's
    interpreter truncates float32 -> bf16 casts); then a quantized conv's output with it on and off."""
    from gacq.quant.primitives import _fake_quantize_nograd, use_fused_fake_quant
    from gacq.quant.quantizer import UniformQuantizer
    from gacq.quant.triton_fq import applies, fake_quantize_fused

    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for (qmin, qmax, scale, zp) in [(0, 255, 0.0371, 113.0), (-8, 7, 0.25, 0.0), (0, 63, 0.1, 0.0)]:
            x = torch.randn(3, 5, 11, 13, generator=g) * 3  # 2145 elements: three blocks, the last partial
            ties = (torch.randint(-40, 40, (257,), generator=g) + 0.5) * scale
            for v in (x, ties):
                v = v.to(DEVICE, dt)
                s, z = torch.tensor(scale, device=DEVICE), torch.tensor(zp, device=DEVICE)
                assert applies(v, s, z), dt
                got = fake_quantize_fused(v, s, z, qmin, qmax)
                want = _fake_quantize_nograd(v, s, z, qmin, qmax)
                assert got.dtype == want.dtype and torch.equal(got, want), \
                    (dt, qmin, qmax, (got.float() - want.float()).abs().max(), int((got != want).sum()))
    v = torch.randn(4, 6).to(DEVICE)
    assert not applies(v, torch.full((6,), 0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE))  # per-channel
    assert not applies(v.bfloat16(), torch.full((1,), 0.1, device=DEVICE), torch.zeros((1,), device=DEVICE)) \
        # a 1-dim float32 scale promotes a bf16 input to float32 in torch: not the kernel's arithmetic
    assert not applies(v.double(), torch.tensor(0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE))
    q = UniformQuantizer(8)
    q.init_minmax(torch.randn(100) * 2)
    q.to(DEVICE)
    x = (torch.randn(2, 3, 9, 9, generator=g) * 2.5).to(DEVICE)
    assert applies(x, q.scale, q.zero_point)  # the quantizer's own grid takes the fused path
    with torch.no_grad():
        plain = q(x)
        with use_fused_fake_quant():
            fused = q(x)
    assert torch.equal(plain, fused)


def fake_quant_token():
    """A dynamic per-token quantizer's fused path (`triton_fq.fake_quantize_rows_fused`: each row's grid and fake
    quantization in one kernel) against its torch path, bitwise: rows wider than one block (K = 1536), a partial
    block (K = 13), constant rows (the step size floored), all-negative and all-positive rows, 8-bit asymmetric
    and symmetric, 4-bit; 3-d inputs as the DiT's (batch, tokens, features); bf16 inputs (float32 arithmetic)."""
    from gacq.quant.primitives import fused_rows_apply, use_fused_fake_quant
    from gacq.quant.quantizer import UniformQuantizer

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(2, 7, 13, generator=g) * 3, torch.randn(3, 1536, generator=g),
             torch.randn(5, 384, generator=g) * 0.01 + 4.0, -torch.rand(4, 40, generator=g) * 2,
             torch.full((2, 64), 0.75), torch.zeros(1, 8)]
    cases[1][0, 5] = 60.0  # an outlier token
    for bits, symmetric in [(8, False), (8, True), (4, False)]:
        q = UniformQuantizer(bits, symmetric, dynamic_axis=-1).to(DEVICE)
        for x in cases:
            for v in (x.to(DEVICE), x.to(DEVICE, torch.bfloat16)):
                with torch.no_grad():
                    plain = q(v)
                    with use_fused_fake_quant():
                        assert fused_rows_apply(v.float(), -1), (bits, tuple(v.shape))
                        fused = q(v)
                assert fused.dtype == plain.dtype and torch.equal(fused, plain), \
                    (bits, symmetric, tuple(v.shape), v.dtype, (fused.float() - plain.float()).abs().max())
    x = torch.randn(4, 6).to(DEVICE)
    with use_fused_fake_quant():
        assert not fused_rows_apply(x.double(), -1)  # float32 only
        assert not fused_rows_apply(x, 0)  # grids over the last axis only
        assert not fused_rows_apply(x.requires_grad_(), -1)  # reconstruction keeps the differentiable torch path
    assert not fused_rows_apply(x.detach(), -1)  # off unless switched on


def _compiled_once(ex, x):
    """ex(x) eager and through torch.compile(fullgraph=True, dynamic=False) (in the interpreter through the aot_eager
    backend, on CUDA through inductor), from a reset Dynamo: (eager output, compiled output, Dynamo's one graph, its
    calls of gacq's custom ops, its traced Triton launches)."""
    from torch._dynamo.backends.registry import lookup_backend

    backend = lookup_backend("inductor" if DEVICE == "cuda" else "aot_eager")
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return backend(gm, inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        want = ex(x)
        got = torch.compile(ex, backend=record, fullgraph=True, dynamic=False)(x)
    (gm,) = graphs
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "gacq" in str(n.target)]
    launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return want, got, gm, ops, launches


def compiled_ops():
    """The exported layers under torch.compile with fullgraph=True (a graph break fails): their kernels are reached
    through the custom ops `gacq::int8_conv2d` / `gacq::int8_linear_dynamic` (one per layer in Dynamo's graph, no
    traced Triton launch) and give the eager kernel's output: exactly in the interpreter (the same kernel on the same
    inputs); on CUDA within `_same_epilogue`'s 2 epsilons (inductor contracts the code around the ops into FMAs), the
    conv -> SiLU -> conv chain within a few quantization steps. In the interpreter through the aot_eager backend (the ops' shape functions on fake
    tensors), on CUDA through inductor.
    Conv, linear and W4A8 layers, per-token linears, a conv -> SiLU -> conv chain; `torch.library.opcheck` on both
    ops (inference only: neither has an autograd formula, so their tensor arguments are detached)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.nn as nn

    from gacq.export import triton_int8
    from gacq.export.int8 import act_center, to_int8, to_w4a8
    from gacq.quant.modules import QuantLinear
    from gacq.quant.primitives import MIN_SCALE
    from tests.test_export import make_conv, make_linear

    def token_linear(wbits, sym):
        torch.manual_seed(0)
        q = QuantLinear(nn.Linear(24, 16), wbits, 8, sym, a_dynamic=True)
        q.init_weight("mse")
        q.w_quant, q.a_quant = True, True
        return q

    conv, xc = make_conv(stride=2, x_shape=(3, 5, 7, 9))
    lin, xl = make_linear()
    xt = torch.randn(2, 5, 24)
    kernel_lin = to_int8(lin)
    kernel_lin.kernel_linears = True
    # (layer, input, ops in the graph): static int8 linears default to torch._int_mm, which Dynamo traces (no op)
    cases = [(to_int8(conv), xc, 1), (to_w4a8(make_conv(wbits=4)[0]), xc, 1), (to_int8(lin), xl, 0),
             (kernel_lin, xl, 1), (to_w4a8(make_linear(wbits=4)[0]), xl, 1), (to_int8(token_linear(8, False)), xt, 1),
             (to_w4a8(token_linear(4, True)), xt, 1),
             (nn.Sequential(to_int8(make_conv(cout=6)[0]), nn.SiLU(), to_int8(make_conv(cin=6, cout=4, seed=1)[0])),
              xc, 2)]
    for i, (ex, x, n_ops) in enumerate(cases):
        ex, x = ex.to(DEVICE), x.to(DEVICE)
        want, got, gm, ops, launches = _compiled_once(ex, x)
        assert len(ops) == n_ops and not launches, (i, [str(n.target) for n in gm.graph.nodes])
        assert got.shape == want.shape, (i, got.shape, want.shape)
        if DEVICE == "cuda" and isinstance(ex, nn.Sequential):
            # inductor's own SiLU may round differently from eager's, and one ulp can move an input code of the next
            # layer: within a few of its steps, not bitwise
            assert (got - want).abs().max() <= 0.05 * want.abs().max(), (i, (got - want).abs().max())
        else:
            # bitwise in the interpreter; on CUDA inductor compiles what is around the ops (the static linear's
            # torch._int_mm and its dequantizing epilogue), contracting multiply-adds into FMAs: the H200 run of
            # session 20 was 1 float32 ulp off in case 2 (1.2e-7), so `_same_epilogue`'s tolerance there
            _same_epilogue(got, want, i)
    ex = to_int8(conv).to(DEVICE)
    (part,), (q,) = ex.parts, list(ex.act_quantizers())
    torch.library.opcheck(triton_int8.int8_conv2d_op,
                          (xc.to(DEVICE), part.qweight, part.k, part.out_channels, part.w_scale, None, part.row_term,
                           ex.bias.detach(), q.scale.detach(), q.zero_point.detach(), q.qmin, q.qmax,
                           act_center(q.qmin, q.qmax), [3, 3], [2, 2], [1, 1], [1, 1]))
    ex = to_int8(token_linear(8, False)).to(DEVICE)
    (part,), (q,) = ex.parts, list(ex.act_quantizers())
    torch.library.opcheck(triton_int8.int8_linear_dynamic_op,
                          (xt.to(DEVICE), part.qweight, part.k, part.out_channels, part.w_scale, None, part.row_term,
                           ex.bias.detach(), q.qmin, q.qmax, act_center(q.qmin, q.qmax), q.symmetric, MIN_SCALE))


F32_TOL = 2.0 ** -20 if DEVICE == "cpu" else 2.0 ** -10  # fp8_conv's float32 outputs, of max |y|
# fp8_linear's UNet layers on the inputs a real model gives them (sums of many same-signed products, where random
# inputs cancel): on the H100 of session 34 `down_blocks.0.resnets.0.conv1` of `small` was 1.16e-3 of max |y| off
# the float32 reference (TF32 off), above F32_TOL: Hopper's FP8 MMAs keep fewer accumulator bits than float32
# (Triton's default maxNumImpreciseAcc never promotes; DeepSeek-V3's report measured about 14 bits). A wrong code
# would be off by a whole FP8 step of an input, 6-12% of it. Session 35 (H100): `up_blocks.3.resnets.0.conv1` 2.5e-3,
# over the 2^-9 set after session 34, so 2^-8 for the default; with `FP8Layer.precise_acc` (each K block promoted into
# the float32 accumulator) the layers are held to F32_TOL, the random inputs' bound.
UNET_TOL = F32_TOL if DEVICE == "cpu" else 2.0 ** -8


def _halo_kernel_codes(x: torch.Tensor, scale: torch.Tensor, pad: int, block_c: int = 64,
                       block_p: int = 32) -> torch.Tensor:
    """`triton_fp8._fp8_quantize_halo_kernel` on x (N, C, H, W) padded by `pad` on each side: its (N, HP, WP, C)
    buffer of codes, every tile of it written."""
    from gacq.export import triton_fp8

    n, c, h, w = x.shape
    buf = torch.empty((n, h + 2 * pad, w + 2 * pad, c), dtype=torch.float8_e4m3fn, device=x.device)
    grid = (n, triton_fp8.triton.cdiv(buf.shape[1] * buf.shape[2], block_p), triton_fp8.triton.cdiv(c, block_c))
    triton_fp8._fp8_quantize_halo_kernel[grid](x, buf, scale, c, h, w, pad, pad, ROUND_SCALE=x.is_cuda,
                                               BLOCK_C=block_c, BLOCK_P=block_p)
    return buf


def _fp8_on_device(q, dtype: torch.dtype | None = None):
    """The fp8 layer of q on DEVICE (in dtype): exported from a copy, since an exported layer shares q's quantizers
    and moving it would move them (q itself stays on the CPU for the float64 reference and the fake-quant output)."""
    import copy

    from gacq.export.fp8 import to_fp8

    ex = to_fp8(copy.deepcopy(q)).to(DEVICE)
    return ex if dtype is None else ex.to(dtype)


def _fp8_reference(q, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant fp8 layer q on x in float64 from its quantizers' codes and scales (test_fp8's reference)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.quant.test_fp8 import _layer_reference

    with torch.no_grad():
        return _layer_reference(q, x)


def fp8_conv():
    """The fp8 backend's Triton conv (`triton_fp8`: the input's codes into a padded channels-last buffer, then an
    implicit GEMM with float32 accumulation) against the layer's torch path (im2col + torch._scaled_mm) and float64:
    the codes bitwise (float32, bf16 and fp16 inputs; the border's codes 0), the outputs to float rounding (the sums
    run in another order), over 3x3 stride 1 and 2, 1x1, channel counts off the tiles, W4 integer weights, and the
    custom op's opcheck."""
    from torch import nn

    from gacq.export import triton_fp8
    from gacq.export.fp8 import fp8_codes
    from gacq.quant.modules import QuantConv2d
    from gacq.quant.primitives import fp8_cast
    from gacq.quant.wrap import set_quant_state

    g = torch.Generator().manual_seed(3)
    # the last: W4 integer weights with FP8 inputs (`--act-format fp8`), their centred codes as FP8 values
    for cin, cout, k, stride, pad, wbits in [(8, 12, 3, 1, 1, 8), (32, 40, 3, 2, 1, 8), (64, 16, 1, 1, 0, 8),
                                              (5, 7, 3, 1, 1, 8), (16, 24, 3, 1, 1, 4)]:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
        q = QuantConv2d(conv, wbits, 8, fmt="fp8" if wbits == 8 else "int", afmt="fp8")
        q.init_weight("mse")
        x = torch.randn(3, cin, 9, 9, generator=g) * 3
        x[0, 0, 0, :4] = torch.tensor([126.9, -30.9, 1e-4, 0.0]) * 0.01  # codes that carry into the next binade
        q.act_quantizer.init_minmax(x)
        set_quant_state(q, True, True)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            ex = _fp8_on_device(q, dt)
            xd = x.to(DEVICE, dt)
            scale = ex.act_quantizer.scale.detach().reshape(1)
            # the codes: the kernel's halo buffer against the torch path's cast, the border 0
            buf = _halo_kernel_codes(xd, scale, pad)
            want = F.pad(fp8_codes(xd, scale.reshape(())).float(), (pad,) * 4).permute(0, 2, 3, 1)
            assert torch.equal(buf.float(), want), (cin, dt, (buf.float() != want).sum())
            assert ex.kernel_applies(xd), (cin, dt)
            with torch.no_grad():
                y = ex(xd)
                ex.use_kernel = False
                ref = ex(xd)
                ex.use_kernel = True
            assert y.dtype == dt and y.shape == ref.shape
            # float32: the sums in another order; compiled for Hopper, FP8 wgmma accumulates with fewer bits
            # (Triton's default maxNumImpreciseAcc, as cuBLAS's fast accumulation), hence the looser CUDA bound
            eps = torch.finfo(dt).eps
            err = float((y.float() - ref.float()).abs().max())
            tol = (2 * eps if dt != torch.float32 else F32_TOL) * float(ref.float().abs().max())
            assert err <= tol, (cin, cout, k, stride, dt, err, tol)
            if k == 1:  # cublas_pointwise: the torch path (torch._scaled_mm on channels-last codes) instead
                ex.cublas_pointwise = True
                assert not ex.kernel_applies(xd)
                with torch.no_grad():
                    yc = ex(xd)
                ex.cublas_pointwise = False
                err = float((yc.float() - y.float()).abs().max())
                assert err <= tol, ("cublas_pointwise", dt, err, tol)
            if wbits == 4:  # the w4fp8 backend: the same FP8 codes unpacked from packed int4 per call, same output
                import copy

                from gacq.export.fp8 import to_w4fp8

                with torch.no_grad():
                    y4 = to_w4fp8(copy.deepcopy(q)).to(DEVICE).to(dt)(xd)
                assert torch.equal(y4, y), (dt, (y4.float() - y.float()).abs().max())
        # float32 against float64 on the fake quantizers' codes
        ex = _fp8_on_device(q)
        with torch.no_grad():
            y = ex(x.to(DEVICE)).cpu().double()
        ref64 = _fp8_reference(q, x)
        assert float((y - ref64).abs().max()) <= F32_TOL * float(ref64.abs().max()), (cin, cout)
    # under torch.compile(fullgraph): by default the input's codes are torch ops in the graph (inductor fuses them
    # into the producer of x) and the GEMM the custom op `gacq::fp8_conv2d_codes`; with compile_fuses_quantize off
    # both kernels sit in the one op `gacq::fp8_conv2d`. No traced launch either way. Bitwise equal to eager in the
    # interpreter (aot_eager runs the torch ops eagerly); on CUDA inductor divides in float32 where eager rounds x / s
    # to x's dtype first, which float32 inputs do not see (their quotient is float32 either way): within F32_TOL
    ex = _fp8_on_device(q)
    xd = x.to(DEVICE)
    for fuse, op in ((True, "gacq.fp8_conv2d_codes.default"), (False, "gacq.fp8_conv2d.default")):
        ex.compile_fuses_quantize = fuse
        want, got, _, ops, launches = _compiled_once(ex, xd)
        assert [str(n.target) for n in ops] == [op] and not launches, (fuse, ops)
        if DEVICE == "cpu" or not fuse:
            _same_epilogue(got, want, ("fp8 compiled", fuse))
        else:
            err = float((got - want).abs().max())
            assert err <= F32_TOL * float(want.abs().max()), ("fp8 compiled, fused quantize", err)
    # channels_last_out: the same values, written in channels-last memory
    ex.compile_fuses_quantize, ex.channels_last_out = True, True
    want, got, _, ops, _ = _compiled_once(ex, xd)
    ex.channels_last_out = False
    assert got.is_contiguous(memory_format=torch.channels_last) and not want.is_contiguous(
        memory_format=torch.channels_last), got.stride()
    _same_epilogue(got.contiguous(), want, "fp8 compiled, channels-last output")
    (part,), bias = ex.parts, ex.bias.detach()
    scale = ex.act_quantizer.scale.detach().reshape(1)
    # torch.compile with a bf16 input: eager rounds x / s to bf16 and then to FP8 (two roundings: a code can differ
    # by one step where the bf16 quotient lands on an FP8 midpoint); inductor keeps the float32 quotient. The codes
    # the compiled graph computes are checked against that single rounding exactly, and its output against the eager
    # GEMM kernel on those codes (in the interpreter the graph's ops run eagerly: eager's codes)
    ex = _fp8_on_device(q, torch.bfloat16)
    xb = x.to(DEVICE, torch.bfloat16)
    want, got, _, _, _ = _compiled_once(ex, xb)
    torch._dynamo.reset()
    with torch.no_grad():
        codes_c = torch.compile(triton_fp8.fp8_halo_codes, fullgraph=True, dynamic=False,
                                backend="inductor" if DEVICE == "cuda" else "aot_eager")(xb, scale, (1, 1))
        codes_e = triton_fp8.fp8_halo_codes(xb, scale, (1, 1))
        single = fp8_cast(F.pad(xb.float(), (1,) * 4) / scale.reshape(())).permute(0, 2, 3, 1)
        single_rs = fp8_cast(F.pad(xb.float(), (1,) * 4) / scale.bfloat16().float().reshape(())).permute(0, 2, 3, 1)
        want_c = triton_fp8.fp8_conv2d_codes(codes_c, part.qweight, part.k, part.out_channels, part.w_scale,
                                             ex.bias.detach(), scale, (3, 3), (1, 1), (1, 1), (1, 1), torch.bfloat16)
        # precise_acc (each K block promoted into the float32 accumulator): in the interpreter, which has no
        # narrower accumulator, the same output; on sm_90 within the float32 bound of the default's
        precise = triton_fp8.fp8_conv2d_codes(codes_c, part.qweight, part.k, part.out_channels, part.w_scale,
                                              ex.bias.detach(), scale, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32,
                                              precise_acc=True)
        plain = triton_fp8.fp8_conv2d_codes(codes_c, part.qweight, part.k, part.out_channels, part.w_scale,
                                            ex.bias.detach(), scale, (3, 3), (1, 1), (1, 1), (1, 1), torch.float32)
    if DEVICE == "cpu":
        assert torch.equal(precise, plain)
    else:
        assert float((precise - plain).abs().max()) <= 2 * UNET_TOL * float(plain.abs().max())
    flips = int((codes_c.float() != codes_e.float()).sum())
    print(f"fp8_conv: compiled bf16 codes differ from eager's in {flips} of {codes_e.numel()}", flush=True)
    if DEVICE == "cpu":
        assert flips == 0 and torch.equal(got, want)
    else:
        assert torch.equal(codes_c.float(), single.float()) or torch.equal(codes_c.float(), single_rs.float())
        _same_epilogue(got, want_c, "fp8 compiled bf16, eager GEMM on the compiled codes")
    # the codes alone, in torch ops, against the Triton quantize kernel's: bitwise where both round x / s to x's dtype
    codes = triton_fp8.fp8_halo_codes(xd, scale, (1, 1))
    assert torch.equal(codes.float(), _halo_kernel_codes(xd, scale, 1).float())
    # not "test_schema": it compares the inputs before and after with torch.allclose, which has no float8 kernel on
    # the CPU (torch 2.13: "mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn')
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    geom = ([3, 3], [1, 1], [1, 1], [1, 1])
    weight = (part.qweight, part.k, part.out_channels, part.w_scale, bias, scale)
    torch.library.opcheck(triton_fp8.fp8_conv2d_op, (xd, *weight, *geom), test_utils=utils)
    torch.library.opcheck(triton_fp8.fp8_conv2d_codes_op, (codes, *weight, *geom, torch.float32), test_utils=utils)
    torch.library.opcheck(triton_fp8.fp8_conv2d_codes_op, (codes, *weight, *geom, torch.float32, True),
                          test_utils=utils)


def fp8_codes_sweep():
    """`triton_fp8`'s quantize kernel against torch's cast (`fp8.fp8_codes`), the same values (-0 and +0 alike),
    over every finite bf16 value
    and 2^18 float32 values spread over every binade (subnormals included), each at a power-of-two scale and at two
    others: the rounding of x / s to x's dtype and then to E4M3 (ties to even, saturating at 448), carries into the
    next binade included."""
    from gacq.export.fp8 import fp8_codes

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    xb = bits.view(torch.bfloat16)
    xb = xb[torch.isfinite(xb)]
    g = torch.Generator().manual_seed(5)
    mant = 1 + torch.rand(2 ** 18, generator=g)
    exps = torch.randint(-149, 128, (2 ** 18,), generator=g).float()
    sign = torch.randint(0, 2, (2 ** 18,), generator=g).float() * 2 - 1
    xf = (sign * mant * torch.exp2(exps)).float()
    xf = xf[torch.isfinite(xf)]
    for x0 in (xb, xf, xf.half()):
        x0 = x0[torch.isfinite(x0)]
        n = x0.numel() // 256 * 256
        x = x0[:n].reshape(1, 256, n // 256, 1).to(DEVICE)
        for s in (1.0, 0.0371, 3.3e3):
            scale = torch.tensor([s], device=DEVICE)
            buf = _halo_kernel_codes(x, scale, 0, block_p=64)
            want = fp8_codes(x, scale.reshape(())).permute(0, 2, 3, 1)
            same = buf.float() == want.float()  # values: the kernel gives +0 where torch keeps the sign of -0
            assert bool(same.all()), (x.dtype, s, int((~same).sum()), x.permute(0, 2, 3, 1)[~same][:5])


def fp8_linear():
    """The fp8 backend's linears (`torch._scaled_mm`, cuBLAS FP8 on CUDA) against the fake-quant layer and float64 on
    the codes: row counts off 16, K and O off 16 (the stored weight padded, the input's K padded per call), 3-d
    inputs, bf16 inputs, FP8 and W4 integer weights; then a whole UNet (`small` on CUDA, `tiny` in the interpreter)
    exported against its fake-quant model, layer by layer on the same inputs and as a whole. On CUDA the per-layer
    bounds are F32_TOL (random inputs) and UNET_TOL (the UNet's): Hopper's FP8 tensor cores accumulate with fewer
    than float32's bits."""
    import copy

    from torch import nn

    from gacq.bench import build_model, fake_quant, fp8_variant
    from gacq.export.convert import convert
    from gacq.quant.modules import QuantLinear
    from gacq.quant.wrap import set_quant_state

    g = torch.Generator().manual_seed(4)
    for k, o, wbits in [(40, 24, 8), (64, 64, 8), (33, 7, 4)]:
        lin = nn.Linear(k, o)
        q = QuantLinear(lin, wbits, 8, fmt="fp8" if wbits == 8 else "int", afmt="fp8")
        q.init_weight("mse")
        q.act_quantizer.init_minmax(torch.randn(64, k, generator=g) * 2)
        set_quant_state(q, True, True)
        ex = _fp8_on_device(q)
        for shape in [(1, k), (5, k), (16, k), (33, k), (2, 7, k)]:
            x = torch.randn(*shape, generator=g) * 2
            with torch.no_grad():
                y = ex(x.to(DEVICE)).cpu()
                fake = q(x)
            ref64 = _fp8_reference(q, x)
            bound = float(ref64.abs().max())
            assert float((y.double() - ref64).abs().max()) <= F32_TOL * bound, (k, o, shape)
            assert float((y - fake).abs().max()) <= F32_TOL * bound, (k, o, shape)
            with torch.no_grad():
                yb = _fp8_on_device(q, torch.bfloat16)(x.to(DEVICE, torch.bfloat16)).cpu()
            assert yb.dtype == torch.bfloat16 and yb.shape == y.shape
            # bf16 input codes may differ where x rounds to bf16 across a code boundary: bound the typical error
            rel = float((yb.double() - ref64).pow(2).mean().sqrt()) / float(ref64.pow(2).mean().sqrt())
            assert rel <= 0.05, (k, o, shape, rel)
    torch.manual_seed(0)
    config = "small" if DEVICE == "cuda" else "tiny"  # the interpreter runs `small`'s convs for minutes
    fp = build_model(config).eval()
    fq = fake_quant(fp, 8, 8, torch.device(DEVICE), 0, fmt="fp8")
    ex, _ = convert(copy.deepcopy(fq), "fp8")
    size = fp.config.sample_size
    x = torch.randn(4, 3, size, size, generator=g).to(DEVICE)
    t = torch.tensor([999, 500, 100, 1], device=DEVICE)
    # every layer of the exported UNet on the input its fake-quant twin saw (forward hooks), against that twin's
    # output: the kernels alone, without the cascade through the network (a float difference moves an input code of
    # the next layer by one FP8 step, 6-12% of that value, and such moves add up over ~60 layers: session 34's H100
    # run gave 7.5% relative RMS at the output). The reference in float32 without TF32 (cuDNN's default for float32
    # convs), whose 10-bit products would exceed the bound themselves.
    from gacq.quant.modules import QuantLayer

    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in fq.named_modules() if isinstance(m, QuantLayer)]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = fq(x, t).sample
            for h in hooks:
                h.remove()
            over = {}
            # in the interpreter both accumulate in float32, so the precise kernels run on one layer of each type there
            first = {}
            for name in seen:
                first.setdefault(type(ex.get_submodule(name)), name)
            for precise, tol in ((False, UNET_TOL), (True, F32_TOL)):
                fp8_variant(ex, precise_acc=precise)
                names = seen if DEVICE == "cuda" or not precise else first.values()
                errs = {name: float((ex.get_submodule(name)(seen[name][0]) - seen[name][1]).abs().max())
                        / float(seen[name][1].abs().max()) for name in names}
                worst = max((e, name) for name, e in errs.items())
                over[precise] = {name: e for name, e in errs.items() if e > tol}
                print(f"fp8_linear: {config} UNet, precise_acc={precise}: layers off their fake-quant twins by at most "
                      f"{worst[0]:.2e} of max |y| ({worst[1]}); over {tol:.2e}: {over[precise] or 'none'}", flush=True)
            fp8_variant(ex, precise_acc=False)
            assert not over[False] and not over[True]
            got = ex(x, t).sample
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            want_tf32 = fq(x, t).sample
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    floor = float((want_tf32 - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())
    print(f"fp8_linear: {config} UNet, {len(seen)} layers; the whole model vs fake quant: relative RMS {rel:.2e} "
          f"(fake quant with TF32 vs without: {floor:.2e})", flush=True)
    # the whole model: bitwise codes and float32 sums in the interpreter; on CUDA the cascade above, bounded loosely
    assert rel <= (1e-2 if DEVICE == "cpu" else 0.25), rel


if __name__ == "__main__":
    # one or more cases; several share one interpreter (importing torch and triton once), each from the default
    # generator's state of a new process, a failure reported and the next case run
    import time
    import traceback

    failed = []
    for case in sys.argv[1:]:
        torch.manual_seed(torch.initial_seed())
        start = time.process_time()
        try:
            globals()[case]()
        except Exception:  # noqa: BLE001
            print(f"FAILED {case}\n{traceback.format_exc()}", flush=True)
            failed.append(case)
        else:
            print("ok", case, flush=True)
        finally:  # CPU seconds per case, for balancing the test file's two interpreter processes
            print(f"{case}: {time.process_time() - start:.1f} s of CPU", file=sys.stderr, flush=True)
    sys.exit(1 if failed else 0)
