"""Fused fake quantization for sampling: one Triton kernel instead of six elementwise torch ops.

Without autograd, `gacq.quant.primitives.fake_quantize` computes

    x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s

as six torch kernels, each reading and writing the whole activation. In session 9 on the H200, 10k CIFAR
samples took about 250 s with 8-bit activations (rtn W8A8, alone on the GPU) against about 65 s with float
activations (qdiffusion W4A32); these extra passes are the likely cause (not profiled). `fake_quantize_fused` does the same
arithmetic in one pass, bitwise equal to the torch ops (Triton's interpreter checks it on the CPU:
tests/test_triton_w4.py, case fake_quant): every intermediate is rounded to x's dtype where torch rounds it (torch
computes a bf16 tensor / a 0-dim float scale in bf16), the division is IEEE (`div_rn`; Triton's `/` is an
approximate division on GPUs), and rounding is half to even, as torch.round.

Per-tensor grids (one scale and zero point, 0-dim or of x's dtype, so torch's type promotion keeps x's
dtype), float32 / bf16 / fp16 inputs, on CUDA (or in Triton's interpreter). Dynamic per-token quantizers
(`--act-granularity token`) have their own kernel, `fake_quantize_rows_fused`: each row's grid from its min and max
and its fake quantization in one pass, in float32 as their torch path (min, max, grid and the six ops), bitwise
equal to it in Triton's interpreter and, compiled, on the H200 (tests/triton_w4_checks.py, case fake_quant_token;
session 19, results/gpu_tests). In
session 18 on the H200, sampling 5,000 DiT images with per-token inputs on the torch path took 207 s against 111 s
per tensor (seven cells sharing the GPU). The per-tensor kernel, compiled, was checked
bitwise against the torch ops on an H200 (session 10, results/gpu_tests). In the Python API it is off unless
switched on (`gacq.quant.primitives.use_fused_fake_quant()` or `GACQ_FUSED_FAKE_QUANT=1`); `gacq sample` and
`gacq experiment run` switch it on by default (`--no-fused-fake-quant` turns it off).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v)
        f = v - r  # exact for |v| < 2^23
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)

    @triton.jit
    def grid_codes(x, scale_ptr, zp_ptr, qmin, qmax):
        """clamp(round(x / s) + z, qmin, qmax) as torch computes it in x's dtype (float32 values), with s and z
        (read from their one-element tensors) rounded to x's dtype as torch's type promotion does; also returns
        s and z. Shared with the int8 backend's input quantization (`gacq.export.triton_int8`)."""
        dt = x.dtype
        s = tl.load(scale_ptr).to(dt).to(tl.float32)
        z = tl.load(zp_ptr).to(dt).to(tl.float32)
        # IEEE division (Triton's `/` is the approximate div.full.f32 on GPUs), rounded to x's dtype as torch does
        v = tl.math.div_rn(x.to(tl.float32), s).to(dt).to(tl.float32)
        q = (_round_half_even(v) + z).to(dt).to(tl.float32)  # round(.) + z, rounded to x's dtype
        return tl.minimum(tl.maximum(q, qmin), qmax), s, z

    @triton.jit
    def row_grid(x_ptr, base, K, qmin, qmax, min_scale, SYMMETRIC: tl.constexpr, BLOCK_K: tl.constexpr):
        """(scale, zero point) of the K contiguous values at x_ptr + base (a token's dynamic grid), as
        `gacq.quant.primitives.qparams_from_range` computes them from the row's min and max in float32. Shared with
        the int8 backend's per-token input quantization (`gacq.export.triton_int8`)."""
        lo = tl.full((BLOCK_K,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
            hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
        lo_m = tl.min(lo, axis=0)
        hi_m = tl.max(hi, axis=0)
        if SYMMETRIC:
            scale = tl.maximum(tl.math.div_rn(tl.maximum(tl.abs(lo_m), tl.abs(hi_m)), qmax), min_scale)
            zp = scale * 0.0
        else:  # the range widened to hold 0; IEEE divisions (Triton's `/` is approximate on GPUs)
            lo_m = tl.minimum(lo_m, 0.0)
            hi_m = tl.maximum(hi_m, 0.0)
            scale = tl.maximum(tl.math.div_rn(hi_m - lo_m, qmax - qmin), min_scale)
            zp = _round_half_even(tl.math.div_rn(-lo_m, scale))
        return scale, zp

    @triton.jit
    def _fake_quant_rows_kernel(x_ptr, y_ptr, qmin, qmax, min_scale, K: tl.constexpr, SYMMETRIC: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        """Dynamic per-token fake quantization of contiguous float32 (M, K) x: row m on the grid of its own min and
        max (`row_grid`), (clamp(round(x / s) + z, qmin, qmax) - z) * s, the torch path's float32 arithmetic."""
        base = tl.program_id(0).to(tl.int64) * K
        scale, zp = row_grid(x_ptr, base, K, qmin, qmax, min_scale, SYMMETRIC, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            v = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(v, scale)) + zp, qmin), qmax)
            tl.store(y_ptr + base + offs, (q - zp) * scale, mask=mask)

    @triton.jit
    def _fake_quant_kernel(x_ptr, y_ptr, scale_ptr, zp_ptr, n, qmin, qmax, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        q, s, z = grid_codes(x, scale_ptr, zp_ptr, qmin, qmax)
        d = (q - z).to(x.dtype).to(tl.float32)
        tl.store(y_ptr + offs, (d * s).to(x.dtype), mask=mask)


def applies(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether `fake_quantize_fused` gives exactly the torch ops' result for these arguments."""
    if triton is None or not (x.is_cuda or INTERPRET) or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    for p in (scale, zero_point):
        if p.numel() != 1 or p.device != x.device or not (p.dim() == 0 or p.dtype == x.dtype):
            return False
    return True


def fake_quantize_fused(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale in one kernel (see the module)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _fake_quant_kernel[(triton.cdiv(n, 1024),)](x, y, scale.detach(), zero_point.detach(), n, float(qmin),
                                                float(qmax), BLOCK=1024)
    return y


def rows_apply(x: torch.Tensor, axis: int) -> bool:
    """Whether `fake_quantize_rows_fused` gives exactly the torch path's result: float32 x on CUDA (or in Triton's
    interpreter), grids over the last axis."""
    return (triton is not None and (x.is_cuda or INTERPRET) and x.dtype == torch.float32 and x.numel() > 0
            and axis in (-1, x.dim() - 1))


def fake_quantize_rows_fused(x: torch.Tensor, symmetric: bool, qmin: int, qmax: int, min_scale: float) -> torch.Tensor:
    """A dynamic per-token quantizer's no-grad output (one grid per row of the last axis, from the row's min and
    max) in one kernel instead of the torch path's min, max, grid and six fake-quantization passes."""
    k = x.shape[-1]
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    _fake_quant_rows_kernel[(x2.numel() // k,)](x2, y, float(qmin), float(qmax), float(min_scale), K=k,
                                                SYMMETRIC=symmetric, BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return y


__all__ = ["applies", "fake_quantize_fused", "fake_quantize_rows_fused", "grid_codes", "row_grid", "rows_apply"]
