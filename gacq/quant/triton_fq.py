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

Per-tensor grids only (one scale and zero point, 0-dim or of x's dtype, so torch's type promotion keeps x's
dtype), float32 / bf16 / fp16 inputs, on CUDA (or in Triton's interpreter). The compiled kernel was checked
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


__all__ = ["applies", "fake_quantize_fused", "grid_codes"]
