"""Quantization core: pure primitives and quantizer modules (methods build on these).

The names below load on first use, so that `gacq.quant.methods` (the method table a spec is checked against) imports
without torch."""

from importlib import import_module

_LAZY = {
    **{name: ".primitives" for name in ("choose_qparams_minmax", "choose_qparams_mse", "fake_quantize", "qrange",
                                        "round_ste")},
    **{name: ".quantizer" for name in ("AdaRoundQuantizer", "UniformQuantizer", "beta_schedule")},
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gacq.quant' has no attribute {name!r}")


__all__ = sorted(_LAZY)
