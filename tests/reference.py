"""Naive, loop-based references for the quantization primitives (float64, Python scalars)."""

from __future__ import annotations

import math

import numpy as np


def fake_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    s, z = np.broadcast_to(scale, x.shape), np.broadcast_to(zp, x.shape)
    for idx in np.ndindex(x.shape):
        q = x[idx] / s[idx]
        # torch.round rounds half to even, like Python's round
        v = round(q) + z[idx]
        v = min(max(v, qmin), qmax)
        out[idx] = (v - z[idx]) * s[idx]
    return out


def minmax_qparams(values: np.ndarray, bits: int, symmetric: bool) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    if symmetric:
        return max(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 1e-8), 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (2**bits - 1), 1e-8)
    return scale, float(round(-lo / scale))


def mse_qparams(values: np.ndarray, bits: int, symmetric: bool, p: float = 2.4, n: int = 80):
    lo0, hi0 = float(values.min()), float(values.max())
    if symmetric:
        hi0 = max(abs(lo0), abs(hi0))
        lo0 = -hi0
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    best = (math.inf, None, None)
    for i in range(n):
        k = 1.0 - 0.01 * i
        s, z = minmax_qparams(np.array([lo0 * k, hi0 * k]), bits, symmetric)
        err = float(np.mean(np.abs(values - fake_quantize(values, np.array(s), np.array(z), qmin, qmax)) ** p))
        if err < best[0]:
            best = (err, s, z)
    return best[1], best[2]
