"""Triton FP8 E4M3 convolution: the input quantized once to FP8 codes, then an implicit GEMM on the codes with float32
accumulation and the scales and bias in its epilogue (the `fp8` backend's convs on CUDA, `gacq.export.fp8`).

Two kernels, as the int8 backend's (`triton_int8`, whose halo path this follows):

1. `_fp8_quantize_halo_kernel` writes fp8(clamp(x / sa, -448, 448)) channels-last into a buffer padded by the conv's
   padding, (N, H + 2*PH, W + 2*PW, C), whose border holds the code of 0.0 (0). The quotient is computed as the fake
   quantizer's torch ops compute it on x's device (`_fp8_codes`) and rounded to the E4M3 grid to nearest, ties to
   even, as torch's cast does.
2. `_fp8_conv_kernel`, for a tile of output positions (n, ho, wo) and channels o, walks k = (r, s, c), channels
   fastest, loads the input tile straight from the padded buffer (no bounds masks inside the image) and the weight
   tile from the K-major (r, s, c)-ordered codes (`FP8Part.qweight` of a conv), accumulates fp8 x fp8 products in
   float32 on the tensor cores (`tl.dot`), and ends with y = S * (sa * sw[o]) + b[o].

Why FP8 and not another int8 kernel: Triton 3.6's Hopper pipeliner leaves a wgmma running while the next K block is
prepared only when the accumulator is float32 (session 29, `tests/test_triton_w4.py::
test_triton_waits_for_every_int32_accumulating_wgmma_on_sm90`): every int8 GEMM waits for each wgmma in its own
iteration, an FP8 GEMM does not (`tests/test_triton_fp8.py` reads it off this kernel's TTGIR for sm_90). FP8 tensor
cores run at int8's rate. NOT yet timed on a GPU.

The codes are those of the torch path bit for bit; the sum is float32 in another order than `torch._scaled_mm`'s, so
outputs agree to float32 rounding (checked against float64 in Triton's interpreter). Compiled for Hopper, `tl.dot` on
FP8 keeps Triton's default `maxNumImpreciseAcc` (2^30, in the TTGIR): the tensor cores' own reduced-precision
accumulation, as cuBLAS's fast-accumulation mode, where `torch._scaled_mm` (the torch path) promotes to float32; the
GPU check allows 2^-10 of max |y| for that (not yet run on a GPU). One weight group and groups=1
only: split layers and grouped convs keep the torch path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.primitives import fp8_cast
from .base import conv_output_size
from .triton_w4 import INTERPRET, available, tiles, triton

if triton is not None:
    import triton.language as tl

    from ..quant.triton_fq import _round_half_even
    from .triton_w4 import conv_rows, conv_taps, tile_offsets

    @triton.jit
    def _round_to_format(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
        """float32 v rounded to the nearest value with MBITS mantissa bits and binades down to EMIN (below: the
        subnormal step 2^(EMIN - MBITS)), ties to even, in float32 (exact: v / step is v times the power of two
        1 / step, both read off v's exponent bits; a multiplication, where Triton's `/` is div.full.f32 on GPUs).
        Triton 3.6's interpreter truncates its float32 -> bf16 casts and rounds its float32 -> fp8 casts wrongly
        where rounding up carries into the next binade (fp8(-126.9) gave -64, not -128), so the codes are rounded
        here and the casts that follow only convert representable values."""
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # the binade of |v| (-127 for 0 and subnormals)
        E = tl.maximum(e, EMIN) - MBITS  # in [EMIN - MBITS, 128 - MBITS]: both 2^E and 2^-E are normal float32
        step = ((E + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - E) << 23).to(tl.float32, bitcast=True)
        return _round_half_even(v * inv_step) * step

    @triton.jit
    def _fp8_codes(x, scale_ptr, ROUND_SCALE: tl.constexpr):
        """fp8(clamp(x / s, -448, 448)) with s read from its one-element tensor; the quotient as torch computes it in
        x's dtype: IEEE division of float32 values, rounded to x's dtype, s first rounded to x's dtype where
        ROUND_SCALE. torch does that on CUDA, where the one-element scale is an operand cast to the common dtype
        (`triton_fq.grid_codes`' convention), but not on the CPU, where a 0-dim tensor is read as a float32 scalar
        (x.bfloat16() / s equals (x.float() / s).bfloat16() there: torch 2.13). Float32 x: the same either way.
        bf16 below 2^-100 (its own binades go to 2^-126) is rounded on a coarser step: every such value's fp8 code
        is 0 either way."""
        dt = x.dtype
        MB: tl.constexpr = 7 if dt == tl.bfloat16 else 10  # fp16: 10 mantissa bits, binades down to 2^-14
        EM: tl.constexpr = -100 if dt == tl.bfloat16 else -14
        s = tl.load(scale_ptr).to(tl.float32)
        v = x.to(tl.float32)
        if dt != tl.float32:
            if ROUND_SCALE:
                s = _round_to_format(s, MB, EM)
            v = _round_to_format(tl.math.div_rn(v, s), MB, EM)
        else:
            v = tl.math.div_rn(v, s)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        return _round_to_format(v, 3, -6).to(tl.float8e4nv)  # E4M3: 3 mantissa bits, binades down to 2^-6

    @triton.jit
    def _fp8_quantize_halo_kernel(x_ptr, q_ptr, ascale_ptr, C, H, W, PH, PW, ROUND_SCALE: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """A (BLOCK_C channels, BLOCK_P padded pixels) tile of image n: the codes of x inside the image, 0 on the
        border (x loads as 0.0 there, whose code is 0); one launch writes every byte of the buffer."""
        n = tl.program_id(0)
        HP, WP = H + 2 * PH, W + 2 * PW
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        hi, wi = offs_p // WP - PH, offs_p % WP - PW
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        mask = (offs_c[:, None] < C) & (offs_p[None, :] < HP * WP)
        x = tl.load(x_ptr + n.to(tl.int64) * C * H * W + offs_c[:, None] * (H * W) + (hi * W + wi)[None, :],
                    mask=mask & inside[None, :], other=0.0)
        tl.store(q_ptr + n.to(tl.int64) * C * HP * WP + offs_p[None, :] * C + offs_c[:, None],
                 _fp8_codes(x, ascale_ptr, ROUND_SCALE), mask=mask)

    @triton.jit
    def _fp8_conv_kernel(q_ptr, w_ptr, wscale_ptr, bias_ptr, y_ptr, ascale_ptr,
                         M, O, C, HP, WP, HO, WO, sxn, sxh, sxw, swk, syn, syc, syh, syw, SH, SW, DH, DW,
                         K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, PRECISE_ACC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # q: the halo buffer (N, HP, WP, C) of codes, so the taps are those of an unpadded conv over the padded image
        # and every tap of a valid output row is in bounds; w: (O16, K16) codes row-major, k in (r, s, c) order (row
        # stride swk). EVEN_K: K % BLOCK_K == 0, no k mask. PRECISE_ACC: each K block's products are added to the
        # float32 accumulator in full precision (`max_num_imprecise_acc` = BLOCK_K; Triton's default on sm_90 never
        # promotes, and Hopper's FP8 MMAs keep fewer accumulator bits than float32). Every argument without a default (torch.compile's
        # wrapper of user Triton kernels drops omitted defaulted constexprs: triton_int8's note).
        offs_m, offs_n, mask_m, mask_n = tile_offsets(M, O, BLOCK_M, BLOCK_N)
        n_idx, ho, wo = conv_rows(offs_m, HO, WO)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            offs, _, _ = conv_taps(n_idx, ho, wo, kb, sxn, 1, sxh, sxw, C, HP, WP, SH, SW, 0, 0, DH, DW, KH, KW,
                                   BLOCK_K, ALIGNED)
            if EVEN_K:
                a = tl.load(q_ptr + offs, mask=mask_m[:, None], other=0.0)
                w = tl.load(w_ptr + offs_n[None, :] * swk + kk[:, None], mask=mask_n[None, :], other=0.0)
            else:
                mask_k = kk < K
                a = tl.load(q_ptr + offs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptr + offs_n[None, :] * swk + kk[:, None], mask=mask_k[:, None] & mask_n[None, :],
                            other=0.0)
            if PRECISE_ACC:
                acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, w, acc, out_dtype=tl.float32)
        sw = tl.load(wscale_ptr + offs_n, mask=mask_n, other=0.0)
        y = acc * (tl.load(ascale_ptr).to(tl.float32) * sw)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        ptr = y_ptr + n_idx[:, None] * syn + offs_n[None, :] * syc + ho[:, None] * syh + wo[:, None] * syw
        tl.store(ptr, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_conv2d(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
               bias: torch.Tensor | None, act_scale: torch.Tensor, kernel_size: tuple[int, int],
               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
               block: tuple[int, int, int] | None = None, num_warps: int | None = None,
               num_stages: int | None = None, precise_acc: bool = False) -> torch.Tensor:
    """The FP8 conv of one weight group, (N, C, H, W) float -> (N, O, HO, WO) in x's dtype.

    qweight: (O16, K16) float8_e4m3fn, the codes of W / sw with k = (r, s, c), channels fastest, zero-padded
    (`FP8Part.qweight` of a conv); k = C*kh*kw; w_scale: (O,) float32; bias: (O,) or None; act_scale: the input
    quantizer's scale as a one-element tensor on x's device, read by the kernels (no host sync: per-step scales
    written into it work under CUDA graphs). `block` = (BLOCK_M, BLOCK_N, BLOCK_K), `num_warps` and `num_stages`
    override `triton_w4.tiles`' FP8 choice and Triton's default pipelining
    (benchmarks/tune_conv_tiles.py). `precise_acc`: `fp8_conv2d_codes`'."""
    if triton is None:
        raise RuntimeError("the FP8 Triton kernel needs the triton package")
    n, c, h, w = x.shape
    kh, kw = kernel_size
    if c * kh * kw != k:
        raise ValueError(f"fp8_conv2d: input has {c} channels, the weight expects {k // (kh * kw)}")
    ph, pw = padding
    x = x.contiguous()
    hp, wp = h + 2 * ph, w + 2 * pw
    q = torch.empty((n, hp, wp, c), dtype=torch.float8_e4m3fn, device=x.device)
    bp = min(64, triton.next_power_of_2(hp * wp))
    bc = min(max(32, 4096 // bp), triton.next_power_of_2(c))
    _fp8_quantize_halo_kernel[(n, triton.cdiv(hp * wp, bp), triton.cdiv(c, bc))](
        x, q, act_scale, c, h, w, ph, pw, ROUND_SCALE=x.is_cuda, BLOCK_C=bc, BLOCK_P=bp)
    return fp8_conv2d_codes(q, qweight, k, out_channels, w_scale, bias, act_scale, kernel_size, stride, padding,
                            dilation, x.dtype, block, num_warps, num_stages, precise_acc=precise_acc)


def fp8_halo_codes(x: torch.Tensor, act_scale: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The halo buffer `_fp8_quantize_halo_kernel` writes, (N, H + 2*PH, W + 2*PW, C) float8 codes with 0 on the
    border, in torch ops: what the layers run under torch.compile, where inductor fuses it into the kernel that
    produces x (a group norm and SiLU, an upsampling), which then writes one byte per element instead of x's two and
    no quantize kernel runs (session 34 on the H100: the Triton quantize took 35% of the fp8 model's time at batch
    256). Eager, these are the fake quantizer's codes bit for bit (`fp8.fp8_codes` on the padded input: 0 / s is
    code 0); compiled, inductor computes x / s in float32 where eager rounds it to x's dtype first, so a code may
    differ by one FP8 step where the quotient lies within half a bf16 step of a rounding boundary."""
    ph, pw = padding
    return fp8_cast(F.pad(x, (pw, pw, ph, ph)) / act_scale.reshape(())).permute(0, 2, 3, 1).contiguous()


def fp8_conv2d_codes(q: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, act_scale: torch.Tensor, kernel_size: tuple[int, int],
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                     out_dtype: torch.dtype, block: tuple[int, int, int] | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, channels_last_out: bool = False,
                     precise_acc: bool = False) -> torch.Tensor:
    """`fp8_conv2d`'s implicit GEMM alone, on the halo buffer q (N, HP, WP, C) of the input's codes
    (`fp8_halo_codes`), -> (N, O, HO, WO) in out_dtype. `channels_last_out`: the output in channels-last memory
    (N, HO, WO, O) strides, so that a tile's stores run along O, the tile's provably contiguous axis (NCHW stores
    run along the output rows, whose contiguity Triton cannot see through the (n, ho, wo) decomposition).
    `precise_acc`: each K block's FP8 products are promoted into the float32 accumulator (Triton's
    `max_num_imprecise_acc` = BLOCK_K) instead of accumulating in the MMA's own, narrower accumulator over the whole
    K loop, Triton's default on sm_90 (session 35 on the H100: one of the `small` UNet's convs 2.5e-3 of max |y| off
    its fake-quant twin so). Ignored off sm_90 and in the interpreter."""
    if triton is None:
        raise RuntimeError("the FP8 Triton kernel needs the triton package")
    q = q.contiguous()
    n, hp, wp, c = q.shape
    kh, kw = kernel_size
    if c * kh * kw != k:
        raise ValueError(f"fp8_conv2d: input has {c} channels, the weight expects {k // (kh * kw)}")
    (sh, sw), (dh, dw) = stride, dilation  # padding: already in q's border
    ho, wo = conv_output_size(hp, kh, sh, 0, dh), conv_output_size(wp, kw, sw, 0, dw)
    if channels_last_out:
        y = torch.empty((n, ho, wo, out_channels), dtype=out_dtype, device=q.device).permute(0, 3, 1, 2)
    else:
        y = torch.empty((n, out_channels, ho, wo), dtype=out_dtype, device=q.device)
    m = n * ho * wo
    bm, bn, bk, warps = tiles(m, out_channels, "fp8", c)
    if block is not None:
        (bm, bn, bk), warps = block, 4
    b = bias if bias is not None else w_scale  # any pointer when unused
    grid = (triton.cdiv(m, bm), triton.cdiv(out_channels, bn))
    _fp8_conv_kernel[grid](q, qweight, w_scale, b, y, act_scale, m, out_channels, c, hp, wp, ho, wo,
                           hp * wp * c, wp * c, c, qweight.stride(0), *y.stride(), sh, sw, dh, dw,
                           K=k, KH=kh, KW=kw, HAS_BIAS=bias is not None, ALIGNED=c % bk == 0, EVEN_K=k % bk == 0,
                           PRECISE_ACC=precise_acc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps or warps,
                           **({"num_stages": num_stages} if num_stages else {}))
    return y


# Under torch.compile the layers launch the kernels through this custom op (as the int8 ones: `triton_int8`).
@torch.library.custom_op("gacq::fp8_conv2d", mutates_args=())
def fp8_conv2d_op(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], act_scale: torch.Tensor, kernel_size: list[int], stride: list[int],
                  padding: list[int], dilation: list[int], precise_acc: bool = False) -> torch.Tensor:
    """`fp8_conv2d` as the custom op `gacq::fp8_conv2d`."""
    return fp8_conv2d(x, qweight, k, out_channels, w_scale, bias, act_scale, tuple(kernel_size), tuple(stride),
                      tuple(padding), tuple(dilation), precise_acc=precise_acc)


@fp8_conv2d_op.register_fake
def _fp8_conv2d_shape(x, qweight, k, out_channels, w_scale, bias, act_scale, kernel_size, stride, padding, dilation,
                      precise_acc=False):
    n, _, h, w = x.shape
    ho, wo = (conv_output_size(size, *geom) for size, *geom in zip((h, w), kernel_size, stride, padding, dilation))
    return x.new_empty((n, out_channels, ho, wo))


# The GEMM alone, on codes that inductor computes (`fp8_halo_codes`, fused into the op producing the conv's input).
@torch.library.custom_op("gacq::fp8_conv2d_codes", mutates_args=())
def fp8_conv2d_codes_op(q: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor], act_scale: torch.Tensor, kernel_size: list[int],
                        stride: list[int], padding: list[int], dilation: list[int],
                        out_dtype: torch.dtype, channels_last_out: bool = False,
                        precise_acc: bool = False) -> torch.Tensor:
    """`fp8_conv2d_codes` as the custom op `gacq::fp8_conv2d_codes`."""
    return fp8_conv2d_codes(q, qweight, k, out_channels, w_scale, bias, act_scale, tuple(kernel_size), tuple(stride),
                            tuple(padding), tuple(dilation), out_dtype, channels_last_out=channels_last_out,
                            precise_acc=precise_acc)


@fp8_conv2d_codes_op.register_fake
def _fp8_conv2d_codes_shape(q, qweight, k, out_channels, w_scale, bias, act_scale, kernel_size, stride, padding,
                            dilation, out_dtype, channels_last_out=False, precise_acc=False):
    n, hp, wp, _ = q.shape
    ho, wo = (conv_output_size(size, kk, s, 0, d) for size, kk, s, d in zip((hp, wp), kernel_size, stride, dilation))
    if channels_last_out:
        return q.new_empty((n, ho, wo, out_channels), dtype=out_dtype).permute(0, 3, 1, 2)
    return q.new_empty((n, out_channels, ho, wo), dtype=out_dtype)


__all__ = ["INTERPRET", "available", "fp8_conv2d", "fp8_conv2d_codes", "fp8_conv2d_codes_op", "fp8_conv2d_op",
           "fp8_halo_codes"]
