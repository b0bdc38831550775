import numpy as np
import pytest
import torch

from gacq.errors import GacqError
from gacq.quant import choose_qparams_minmax, choose_qparams_mse, fake_quantize, qrange, round_ste

from .. import reference as ref


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_minmax_fake_quant_matches_naive(bits, symmetric, per_channel):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    w = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 5, dtype=torch.float64).view(5, 1, 1, 1)
    axis = 0 if per_channel else None
    scale, zp = choose_qparams_minmax(w, bits, symmetric, axis)
    qmin, qmax = qrange(bits, symmetric)
    wn = w.numpy()
    if per_channel:
        exp = [ref.minmax_qparams(wn[c], bits, symmetric) for c in range(5)]
        np.testing.assert_array_equal(scale.flatten().numpy(), [e[0] for e in exp])
        np.testing.assert_array_equal(zp.flatten().numpy(), [e[1] for e in exp])
        assert scale.shape == (5, 1, 1, 1)
    else:
        s, z = ref.minmax_qparams(wn, bits, symmetric)
        assert scale.item() == s and zp.item() == z
    got = fake_quantize(w, scale, zp, qmin, qmax).numpy()
    np.testing.assert_array_equal(got, ref.fake_quantize(wn, scale.numpy(), zp.numpy(), qmin, qmax))
    # every dequantized value lies on the grid and within half a step of an in-range input
    assert len(np.unique(got)) <= 2**bits * (5 if per_channel else 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_matches_naive(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 50, generator=g, dtype=torch.float64)
    w[1, 0] = 8.0  # an outlier: the search should clip it
    scale, zp = choose_qparams_mse(w, bits, symmetric, channel_axis=0)
    for c in range(4):
        s, z = ref.mse_qparams(w[c].numpy(), bits, symmetric)
        assert scale[c, 0].item() == pytest.approx(s, rel=1e-12) and zp[c, 0].item() == z
    # candidate 0 is the min-max range, so the search can only lower the error
    qmin, qmax = qrange(bits, symmetric)
    smm, zmm = choose_qparams_minmax(w, bits, symmetric, 0)
    err = (w - fake_quantize(w, scale, zp, qmin, qmax)).abs().pow(2.4).mean(1)
    err_mm = (w - fake_quantize(w, smm, zmm, qmin, qmax)).abs().pow(2.4).mean(1)
    assert torch.all(err <= err_mm)


def test_ste_and_clip_gradients():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.74, 1.2, 5.0], requires_grad=True)
    scale, zp = torch.tensor(0.5), torch.tensor(2.0)  # range [(0-2)*0.5, (7-2)*0.5] = [-1, 2.5] at 3 bits
    y = fake_quantize(x, scale, zp, *qrange(3, False))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # values that round onto the grid's first or last code pass the gradient (the closed range; torch 2.14's clamp
    # backward alone would give 0 there), values that round one code beyond it do not
    x = torch.tensor([-1.0, -1.2, -1.3, 2.5, 2.7, 2.8], requires_grad=True)
    fake_quantize(x, scale, zp, *qrange(3, False)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    xs = torch.linspace(-2, 2, 9, requires_grad=True)
    round_ste(xs).sum().backward()
    assert torch.equal(xs.grad, torch.ones(9))


def test_scale_gradient_is_plain_ste():
    """d x_hat / d scale = round(x/s) - x/s inside the range, (qmin-z) or (qmax-z) outside."""
    x = torch.tensor([-3.0, -0.3, 0.4, 0.9, 4.0], dtype=torch.float64)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(2.0, dtype=torch.float64)
    qmin, qmax = qrange(3, False)
    fake_quantize(x, s, z, qmin, qmax).sum().backward()
    expected = 0.0
    for v in x.tolist():
        q = round(v / 0.5) + 2
        expected += (qmin - 2) if q < qmin else (qmax - 2) if q > qmax else (round(v / 0.5) - v / 0.5)
    assert s.grad.item() == pytest.approx(expected, abs=1e-12)


def test_constant_channel_and_bad_bits():
    w = torch.zeros(2, 3)
    w[1] = 1.0
    scale, zp = choose_qparams_minmax(w, 4, False, 0)
    assert torch.all(scale > 0)
    out = fake_quantize(w, scale, zp, *qrange(4, False))
    torch.testing.assert_close(out, w, rtol=0, atol=0)
    for bad in (1, 9, 16):
        with pytest.raises(GacqError, match="2 to 8 bits"):
            qrange(bad, False)
