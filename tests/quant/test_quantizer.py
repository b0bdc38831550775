import pytest
import torch

from gacq.errors import GacqError
from gacq.quant import AdaRoundQuantizer, UniformQuantizer, beta_schedule
from gacq.quant.quantizer import GAMMA, ZETA, rectified_sigmoid, sqnr_db


def _weight(seed=0, dtype=torch.float32):
    return torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_uniform_quantizer_explicit_init_and_state():
    w = _weight()
    q = UniformQuantizer(4, channel_axis=0, shape=tuple(w.shape))
    with pytest.raises(GacqError, match="before initialisation"):
        q(w)
    q.init_mse(w)
    out = q(w)
    assert q.scale.shape == (6, 1, 1, 1)
    assert sqnr_db(w, out) > 15  # 4-bit per-channel on Gaussian weights: ~19-20 dB
    q2 = UniformQuantizer(4, channel_axis=0, shape=tuple(w.shape))
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(w), out, rtol=0, atol=0)
    q.enabled = False
    assert q(w) is w


def test_learned_scale_is_parameter():
    q = UniformQuantizer(8, symmetric=True, learn_scale=True)
    q.init_minmax(torch.randn(100))
    assert [n for n, _ in q.named_parameters()] == ["scale"]


def test_sqnr_grows_with_bits():
    w = _weight(1)
    sq = []
    for b in range(2, 9):
        q = UniformQuantizer(b, channel_axis=0, shape=tuple(w.shape))
        q.init_minmax(w)
        sq.append(sqnr_db(w, q(w)))
    assert all(b > a + 4 for a, b in zip(sq, sq[1:]))  # about 6 dB per bit


def test_adaround_init_reproduces_weight_and_hardens():
    w = _weight(2, torch.float64)
    base = UniformQuantizer(4, channel_axis=0, shape=tuple(w.shape))
    base.init_minmax(w)  # min-max: every weight is inside the range
    ada = AdaRoundQuantizer(base, w)
    # The soft weight equals W wherever W lies on the grid's range; the rounded zero point leaves
    # up to half a step at the ends of [min, max] outside it, where the weight is clamped.
    pos = w / base.scale + base.zero_point
    inside = (pos >= 0) & (pos <= 15)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(ada()[inside], w[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(ada()[~inside], base(w)[~inside], rtol=0, atol=1e-12)
    ada.harden()
    hard = ada()
    expected = (torch.clamp(torch.floor(w / base.scale) + (ada.alpha >= 0) + base.zero_point, 0, 15)
                - base.zero_point) * base.scale
    torch.testing.assert_close(hard, expected, rtol=0, atol=0)
    # hard rounding from the initial V is round-to-nearest (h(V) = frac > 0.5 <=> V >= 0, up to ties)
    torch.testing.assert_close(hard, base(w), rtol=0, atol=1e-12)
    ints = ada.integer_weight()
    assert ints.min() >= 0 and ints.max() <= 15 and torch.equal(ints, ints.round())


def test_rectified_sigmoid_and_regularizer_against_reference():
    v = torch.linspace(-6, 6, 25, dtype=torch.float64)
    h_ref = torch.tensor([min(1.0, max(0.0, (1 / (1 + torch.exp(-x).item())) * (ZETA - GAMMA) + GAMMA)) for x in v],
                         dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(v), h_ref, rtol=0, atol=1e-15)
    w = _weight(3, torch.float64)
    base = UniformQuantizer(4, channel_axis=0, shape=tuple(w.shape))
    base.init_minmax(w)
    ada = AdaRoundQuantizer(base, w)
    for beta in (20.0, 7.5, 2.0):
        naive = sum(1 - abs(2 * h - 1) ** beta for h in ada.h().flatten().tolist())
        assert ada.regularizer(beta).item() == pytest.approx(naive, rel=1e-12)


def test_adaround_gradient_finite_difference():
    w = _weight(4, torch.float64)[:2]
    base = UniformQuantizer(4, channel_axis=0, shape=tuple(w.shape))
    base.init_minmax(w)
    ada = AdaRoundQuantizer(base, w)
    target = torch.randn_like(w)

    def loss():
        return ((ada() - target) ** 2).sum() + 0.01 * ada.regularizer(5.0)

    loss().backward()
    grad = ada.alpha.grad.clone()
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 0, 0, 0), (1, 3, 2, 1), (0, 2, 1, 2), (1, 1, 0, 0)]:
            ada.alpha[idx] += eps
            up = loss().item()
            ada.alpha[idx] -= 2 * eps
            down = loss().item()
            ada.alpha[idx] += eps
            assert grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_beta_schedule_is_linear_after_warmup():
    iters = 1000
    assert beta_schedule(0, iters) == 20 and beta_schedule(199, iters) == 20
    assert beta_schedule(200, iters) == pytest.approx(20)
    assert beta_schedule(600, iters) == pytest.approx(11)
    assert beta_schedule(1000, iters) == pytest.approx(2)
