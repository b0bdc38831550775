"""Quantization core: pure primitives and quantizer modules (methods build on these)."""

from .primitives import (
    choose_qparams_minmax, choose_qparams_mse, fake_quantize, qrange, round_ste,
)
from .quantizer import AdaRoundQuantizer, UniformQuantizer, beta_schedule

__all__ = [
    "AdaRoundQuantizer", "UniformQuantizer", "beta_schedule", "choose_qparams_minmax", "choose_qparams_mse",
    "fake_quantize", "qrange", "round_ste",
]
