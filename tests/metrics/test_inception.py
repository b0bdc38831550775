"""FID Inception-v3 in plain torch: architecture, taps, TF1 resize and safe weight loading.

No real weights are available offline, so everything runs on random weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from gacq.errors import GacqError
from gacq.metrics.inception import FIDInceptionV3, file_sha256, load_inception, resize_bilinear_tf1


def _random_net(seed: int = 0, resize: str = "tf1") -> FIDInceptionV3:
    """Random weights that keep activations alive through ~95 conv layers."""
    torch.manual_seed(seed)
    net = FIDInceptionV3(resize=resize)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval().requires_grad_(False)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    return _random_net()


@pytest.fixture(scope="module")
def weight_files(net, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("inception")
    sd = net.state_dict()
    pth = d / "inception.pth"
    torch.save(sd, pth)
    st = d / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return pth, st


# --- architecture -------------------------------------------------------------------------

# (cin, cout, kh, kw) of every BasicConv2d, transcribed from torch-fidelity's
# FeatureExtractorInceptionV3 / pytorch-fid's FIDInception* blocks.
def _A(c, pf):
    return [(c, 64, 1, 1), (c, 48, 1, 1), (48, 64, 5, 5), (c, 64, 1, 1), (64, 96, 3, 3), (96, 96, 3, 3),
            (c, pf, 1, 1)]


def _B(c):
    return [(c, 384, 3, 3), (c, 64, 1, 1), (64, 96, 3, 3), (96, 96, 3, 3)]


def _C(c, c7):
    return [(c, 192, 1, 1), (c, c7, 1, 1), (c7, c7, 1, 7), (c7, 192, 7, 1), (c, c7, 1, 1), (c7, c7, 7, 1),
            (c7, c7, 1, 7), (c7, c7, 7, 1), (c7, 192, 1, 7), (c, 192, 1, 1)]


def _D(c):
    return [(c, 192, 1, 1), (192, 320, 3, 3), (c, 192, 1, 1), (192, 192, 1, 7), (192, 192, 7, 1),
            (192, 192, 3, 3)]


def _E(c):
    return [(c, 320, 1, 1), (c, 384, 1, 1), (384, 384, 1, 3), (384, 384, 3, 1), (c, 448, 1, 1),
            (448, 384, 3, 3), (384, 384, 1, 3), (384, 384, 3, 1), (c, 192, 1, 1)]


CONVS = ([(3, 32, 3, 3), (32, 32, 3, 3), (32, 64, 3, 3), (64, 80, 1, 1), (80, 192, 3, 3)]
         + _A(192, 32) + _A(256, 64) + _A(288, 64) + _B(288)
         + _C(768, 128) + _C(768, 160) + _C(768, 160) + _C(768, 192)
         + _D(768) + _E(1280) + _E(2048))

# conv weights + BN (weight, bias) + fc (1008 x 2048 + 1008)
EXPECTED_PARAMS = 23_850_960
# BN running_mean + running_var
EXPECTED_BN_BUFFERS = 34_432


def test_parameter_count_matches_reference_layer_shapes(net):
    table_params = sum(ci * co * kh * kw + 2 * co for ci, co, kh, kw in CONVS) + 2048 * 1008 + 1008
    table_buffers = sum(2 * co for _, co, _, _ in CONVS)
    assert table_params == EXPECTED_PARAMS
    assert table_buffers == EXPECTED_BN_BUFFERS
    assert table_params + table_buffers == 23_885_392  # the commonly quoted figure includes BN stats
    assert sum(p.numel() for p in net.parameters()) == EXPECTED_PARAMS
    bufs = sum(b.numel() for n, b in net.named_buffers() if not n.endswith("num_batches_tracked"))
    assert bufs == EXPECTED_BN_BUFFERS
    assert len([m for m in net.modules() if isinstance(m, nn.Conv2d)]) == len(CONVS) == 94


def test_state_dict_names_match_public_weight_files(net):
    sd = net.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch1x1.conv.weight",
              "Mixed_6d.branch7x7dbl_5.bn.running_var", "Mixed_7c.branch3x3dbl_3b.conv.weight",
              "Mixed_7c.branch_pool.bn.bias", "fc.bias"):
        assert k in sd
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert all(k.split(".")[0] in {n for n, _ in net.named_children()} for k in sd)
    assert not any("Aux" in k for k in sd)
    assert FIDInceptionV3.name == "inception"


# --- taps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,h,w", [(2, 32, 32), (1, 299, 299)])
def test_tap_shapes(net, n, h, w):
    f = net.features(_images(n, h, w))
    assert set(f) == {"pool", "spatial", "logits"}
    assert f["pool"].shape == (n, 2048)
    assert f["spatial"].shape == (n, 7 * 17 * 17) == (n, 2023)
    assert f["logits"].shape == (n, 1008)
    for v in f.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert f["pool"].abs().sum() > 0 and f["spatial"].min() >= 0  # spatial is after ReLU


def test_taps_are_what_they_claim(net):
    x = _images(2, 40, 40)
    f = net.features(x)
    # logits = pool @ fc.weight.T, no bias
    torch.testing.assert_close(f["logits"], f["pool"] @ net.fc.weight.T)
    # spatial = first 7 channels of Mixed_6d.branch1x1, channel-major
    seen = {}
    h = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    try:
        net.features(x)
    finally:
        h.remove()
    assert seen["o"].shape == (2, 192, 17, 17)
    torch.testing.assert_close(f["spatial"], seen["o"][:, :7].reshape(2, -1))


def test_bad_inputs(net):
    with pytest.raises(GacqError, match="uint8"):
        net.features(torch.rand(1, 3, 32, 32))
    with pytest.raises(GacqError, match="RGB|3"):
        net.features(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(GacqError):
        net.features(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(GacqError, match="resize"):
        FIDInceptionV3(resize="bicubic")


def test_torch_and_tf1_resize_paths_differ(net):
    x = _images(2, 32, 32, seed=3)
    other = FIDInceptionV3(resize="torch")
    other.load_state_dict(net.state_dict())
    other.eval()
    a, b = net.features(x), other.features(x)
    assert a["pool"].shape == b["pool"].shape
    assert not torch.allclose(a["pool"], b["pool"])
    # and the preprocessing ranges are both ~[-1, 1]
    for m in (net, other):
        p = m.preprocess(x)
        assert p.shape == (2, 3, 299, 299) and p.min() >= -1.0 and p.max() <= 1.0


# --- TF1 resize ---------------------------------------------------------------------------

def _naive_tf1(img: np.ndarray, size: int) -> np.ndarray:
    """Per-pixel float64 TF1 resize_bilinear(align_corners=False) of a C x H x W array."""
    c, h, w = img.shape
    out = np.zeros((c, size, size))
    sy, sx = h / size, w / size
    for i in range(size):
        fy = i * sy
        y0 = math.floor(fy)
        y1 = min(y0 + 1, h - 1)
        dy = fy - y0
        for j in range(size):
            fx = j * sx
            x0 = math.floor(fx)
            x1 = min(x0 + 1, w - 1)
            dx = fx - x0
            top = img[:, y0, x0] * (1 - dx) + img[:, y0, x1] * dx
            bot = img[:, y1, x0] * (1 - dx) + img[:, y1, x1] * dx
            out[:, i, j] = top * (1 - dy) + bot * dy
    return out


@pytest.mark.parametrize("shape,size", [((2, 3, 5), 7), ((1, 8, 8), 299), ((1, 9, 6), 4)])
def test_resize_bilinear_tf1_matches_naive_loop(shape, size):
    rng = np.random.default_rng(0)
    img = rng.random(shape)
    got = resize_bilinear_tf1(torch.tensor(img, dtype=torch.float32)[None], size)[0]
    assert got.shape == (shape[0], size, size)
    np.testing.assert_allclose(got.numpy(), _naive_tf1(img, size), atol=1e-5, rtol=0)


def test_resize_bilinear_tf1_identity_and_not_half_pixel():
    x = torch.rand(2, 3, 11, 11)
    assert torch.equal(resize_bilinear_tf1(x, 11), x)
    # TF1 has no half-pixel offset: output pixel 0 is exactly input pixel 0 when upsampling,
    # unlike torch's align_corners=False which blends.
    y = resize_bilinear_tf1(x, 23)
    assert torch.equal(y[..., 0, 0], x[..., 0, 0])
    z = torch.nn.functional.interpolate(x, size=(23, 23), mode="bilinear", align_corners=False)
    assert not torch.allclose(y, z)


# --- loading ------------------------------------------------------------------------------

def test_load_pth_and_safetensors_identical(net, weight_files):
    pth, st = weight_files
    a, b = load_inception(pth), load_inception(st)
    for m in (a, b):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = _images(2, 32, 32, seed=5)
    fa, fb, fn = a.features(x), b.features(x), net.features(x)
    for k in fa:
        assert torch.equal(fa[k], fb[k]) and torch.equal(fa[k], fn[k])
    torch_path = load_inception(pth, resize="torch")
    assert torch_path.resize == "torch"


def test_load_wrapped_state_dict_and_without_bn_counters(net, tmp_path):
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / "wrapped.pth"
    torch.save({"state_dict": sd}, p)
    m = load_inception(p)
    torch.testing.assert_close(m.fc.weight, net.fc.weight)


def test_file_sha256(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 10000
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(p)) == file_sha256(p)


class _Evil:
    def __init__(self):
        self.payload = "not a tensor"


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save(_Evil(), p)
    with pytest.raises(GacqError, match="(?i)unpickle|refuse"):
        load_inception(p)
    q = tmp_path / "evil_in_dict.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Evil()}, q)
    with pytest.raises(GacqError, match="(?i)unpickle|refuse"):
        load_inception(q)


def test_missing_weights_and_file():
    with pytest.raises(GacqError, match="--inception-weights"):
        load_inception(None)
    with pytest.raises(GacqError, match="nope.pth"):
        load_inception("/definitely/not/here/nope.pth")


def test_wrong_keys_and_shapes(net, tmp_path):
    sd = dict(net.state_dict())
    dropped = dict(sd)
    del dropped["Mixed_6d.branch1x1.conv.weight"]
    p = tmp_path / "dropped.pth"
    torch.save(dropped, p)
    with pytest.raises(GacqError, match="Mixed_6d.branch1x1.conv.weight") as e:
        load_inception(p)
    assert "pt_inception-2015-12-05" in str(e.value)

    extra = dict(sd)
    extra["AuxLogits.fc.weight"] = torch.zeros(3)
    p = tmp_path / "extra.safetensors"
    save_file({k: v.contiguous() for k, v in extra.items()}, str(p))
    with pytest.raises(GacqError, match="AuxLogits"):
        load_inception(p)

    bad = dict(sd)
    bad["fc.weight"] = torch.zeros(10, 2048)
    p = tmp_path / "bad_shape.pth"
    torch.save(bad, p)
    with pytest.raises(GacqError, match=r"fc.weight.*\(10, 2048\).*\(1008, 2048\)"):
        load_inception(p)

    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"not safetensors")
    with pytest.raises(GacqError):
        load_inception(p)
