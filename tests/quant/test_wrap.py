import torch

from gacq.errors import GacqError
from gacq.models import build_model
from gacq.quant.modules import QuantConv2d, QuantLinear
from gacq.quant.quantizer import sqnr_db
from gacq.quant.wrap import init_act_quantizers_minmax, observe_input_ranges, quant_layers, set_quant_state, wrap_layers

import pytest


def _unet_forward(model, x, t):
    return model(x, t).sample


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4,), generator=g)) for _ in range(n)]


def test_wrapper_equals_float_layer_when_quantization_off():
    torch.manual_seed(0)
    conv, lin = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.nn.Linear(5, 7)
    qc, ql = QuantConv2d(conv, 4, 8), QuantLinear(lin, 4, 8)
    qc.w_quant = ql.w_quant = False
    x, y = torch.randn(2, 4, 9, 9), torch.randn(3, 5)
    torch.testing.assert_close(qc(x), conv(x), rtol=0, atol=0)
    torch.testing.assert_close(ql(y), lin(y), rtol=0, atol=0)


def test_wrap_by_type_counts_and_skip():
    model = build_model("ddpm-cifar10")
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    names = wrap_layers(model, 4, 8)
    assert len(names) == n_layers == len(quant_layers(model))
    model2 = build_model("tiny")
    names2 = wrap_layers(model2, 4, 8, skip=lambda n, m: n in ("conv_in", "conv_out"))
    assert "conv_in" not in names2 and isinstance(model2.conv_in, torch.nn.Conv2d)
    with pytest.raises(GacqError, match="no Conv2d or Linear"):
        wrap_layers(torch.nn.Sequential(torch.nn.ReLU()), 4, 8)


def test_rtn_w8a8_close_to_fp_and_w4_worse():
    torch.manual_seed(0)
    fp = build_model("tiny").eval()
    x, t = _batches(1, seed=9)[0]
    with torch.no_grad():
        ref = fp(x, t).sample
    results = {}
    for wbits, abits in ((8, 8), (4, 8)):
        torch.manual_seed(0)
        q = build_model("tiny").eval()
        wrap_layers(q, wbits, abits)
        for _, m in quant_layers(q):
            m.init_weight("mse")
        set_quant_state(q, weights=True, acts=False)
        init_act_quantizers_minmax(q, observe_input_ranges(q, _batches(), _unet_forward))
        set_quant_state(q, weights=True, acts=True)
        with torch.no_grad():
            results[(wbits, abits)] = sqnr_db(ref, q(x, t).sample)
    # W8A8 round-to-nearest on a tiny random UNet: ~30 dB measured; 25 dB floor.
    assert results[(8, 8)] > 25
    assert results[(4, 8)] < results[(8, 8)] - 6


def test_uncovered_layer_is_named():
    q = build_model("tiny").eval()
    wrap_layers(q, 8, 8)
    with pytest.raises(GacqError, match="no calibration input reached layer conv_in"):
        init_act_quantizers_minmax(q, {})
