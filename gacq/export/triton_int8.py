"""Triton W8A8 convolution: the input quantized once to int8 codes, then an implicit GEMM on the codes
with the dequantization, correction terms and bias in its epilogue.

The `int8` backend's torch path (`gacq.export.int8`) quantizes the input, unfolds it (im2col: a
copy kh*kw times the input), runs `torch._int_mm` and dequantizes in separate passes. Here two
kernels do the same arithmetic:

1. `_quantize_kernel`, one pass over the input, writes its centred int8 codes channels-last,
   (N, H, W, C),

       X8 = clamp(round(x / sa) + za, qmin, qmax) - ca

   in the input dtype's rounding (the quotient is rounded to x's dtype before the integer rounding,
   as torch computes `x / scale` for fp16/bf16 inputs, with sa and za cast to x's dtype as torch's
   type promotion casts them; rounding is half to even, as torch.round); with padding, by default into a
   padded "halo" buffer (below);
2. `_int8_conv_kernel`, for a tile of output positions (n, ho, wo) and channels o, walks the
   reduction index k = (r, s, c), channels fastest (`triton_w4.conv_taps`; where C is a multiple of
   BLOCK_K each K block is one kernel tap over BLOCK_K consecutive channels, so each row of the input
   tile is BLOCK_K consecutive bytes and the tap's bounds are computed once per row), gathers the codes
   each k needs (out-of-image positions take the code of 0.0, za - ca: the padding of the
   dequantized input, as in the fake-quant conv), accumulates X8 @ W8 in int32 on the tensor cores
   (`tl.dot`), and ends with the int8 backend's exact correction terms and scales,

       y = float(S + dw[o] * sum_k X8 + da * row[o]) * (sa * sw[o]) + b[o],    da = ca - za,

   the same float32 operations in the same order as `Int8Layer`'s torch path, so its output is
   bitwise equal to that path's in Triton's interpreter (compiled, the multiply-add may contract to
   one FMA: a float32 ulp).

Quantizing once (an earlier version quantized inside the GEMM's K loop) does the division once per
input element instead of once per kernel tap and output tile, and the GEMM then reads 1 byte per
element. Scales, zero points and the bias are read by the kernels from the layer's own buffers, so a
call launches two kernels and nothing else, and per-step activation grids written into those
buffers in place are seen by CUDA-graph replays. One weight group and groups=1 only; other layers
keep the torch path.

Split-K (`int8_conv2d(split_k=S)`, or the "small-m-splitk" tile rule's choice, `triton_w4.split_k`): where a
small output has too few tiles to fill the GPU (batch 1: 8-128 tiles on 132 SMs, each looping over all of K),
S programs share a tile's K loop and write int32 partial sums; `_int8_splitk_epilogue` adds them and runs the
same epilogue. Integer sums do not depend on their order, so the output is the unsplit kernel's bit for bit
(checked in the interpreter); the price is a third launch and S x M x O int32 of scratch.

The halo path (`int8_conv2d(halo=True)`, the default for every conv; `halo=False`, or the tile rule "small-m-masked"
for the default, the masked path above):
`_quantize_halo_kernel` writes the codes into (N, H + 2*PH, W + 2*PW, C), one launch over the padded pixels, those
inside the image their codes of x, the border the code of 0.0, clamp(za, qmin, qmax) - ca, from the zero point on the
device (no host sync, no fill launch: CUDA-graph safe). The GEMM then runs as an unpadded conv over the padded image
(hi = ho*SH + r*DH, wi = wo*SW + s*DW), where every tap of a valid output row is in bounds: the input tile is loaded
under the row mask only (and the k < K mask unless K is a multiple of BLOCK_K and no split runs past K: EVEN_K) and
goes to `tl.dot` as loaded, without the per-tap `inside` mask and the two `tl.where`s (pad code, k past K) of the
masked path. The codes, pads included, are the masked path's, so are the integer sums and row sums: the output is the
masked path's bit for bit (interpreter; the `halo` check). The buffer is (H + 2*PH)(W + 2*PW) / (H*W) of the plain
one (1.13x at 32x32, 1.27x at 16x16, 1.56x at 8x8 for 3x3 convs); without padding it is the plain buffer, written
by `_quantize_kernel`. Split-K works the same over either buffer; the per-token linears (`int8_linear_dynamic`: 1x1
images, no padding) keep the masked path.

Why (~55-60 int8 TOPS per conv at batch 256 on the H200, peak ~1,900), read off the kernel compiled for sm_90 with
Triton 3.6 on a CPU (`tests/test_triton_w4.py::test_halo_tile_streams_into_shared_memory_on_sm90`), not timed: the
input tile was not software-pipelined at all in either path until `conv_taps` said that k0 % C is a multiple of
BLOCK_K (`tl.multiple_of`; the axis analysis does not derive it). With that, both paths copy the tile into shared
memory asynchronously (cp.async) over the K loop; the halo path's wgmma reads it there, the masked path loads it back
to registers, applies its two selects and stores it to shared memory again first. The weight tile of the stored
weight, (K8, O8) with O contiguous and rows in (c, r, s) order (so a K block's rows are KH*KW apart), is not pipelined
in either path: int8 wgmma wants its B operand K-major in shared memory, so each iteration loads it to registers and
stores it transposed. The layers can therefore give the kernel a K-major copy with k in the K loop's own (r, s, c)
order (opt-in: `Int8Layer.kernel_kmajor = True`, or the tile rule "small-m-kmajor", so that `gacq bench --tile-rules`
times it first; `W_KMAJOR`, `int8_conv2d(w_kmajor=True)`, `Int8Part.kernel_weight`: (O8, K8), made once per device and
cached; it costs as much GPU memory again as the int8 weight, which is kept for the torch path and the state dict),
whose K block is BLOCK_K consecutive bytes of each output channel's row: in the TTGIR
(`test_kmajor_weight_tile_streams_into_shared_memory_on_sm90`) it is then cp.async'd into its own multi-buffered
shared memory as the input tile is, and on the halo path the wgmma reads both operands there with no register round
trip of either tile. Each wgmma is still waited for in its own iteration (pendings = 0) either way, and no tiling or
layout of these kernels can change that: Triton 3.6's Hopper pipeliner makes a wgmma "properly async" (left running
while the next K block's addresses and copies are issued, `pendings = 1`) only when its accumulator is float32
(WGMMAPipeline.cpp, `dotCanBeProperlyAsync`, rule 2.1), and int8 products accumulate in int32; the textbook int8
GEMM gets pendings = 0 too, the same GEMM in fp16, bf16 or fp8 pendings = 1
(`test_triton_waits_for_every_int32_accumulating_wgmma_on_sm90`). Within one program the tensor cores therefore idle
while each iteration's address arithmetic, copies and waits run; only other programs on the same SM fill that gap
(so more, smaller programs per SM and fewer, longer K blocks are the levers left in Triton; a hand-pipelined kernel,
in CUDA or Triton's Gluon, is not written). W4A8's packed
codes get the same (r, s, c) packing (`W4A8Part.kernel_weight`, a second packed copy), but their tile is unpacked in
registers and stored to shared memory every iteration regardless (only its byte loads become contiguous along k). The
same integers with either weight layout (interpreter; the `kmajor` check). Whether the halo path or the K-major weight
is faster is NOT yet measured on a GPU (`benchmarks/tune_conv_tiles.py`, by default `--halo both`, times the halo and
masked paths side by side, on the stored weight layout: it calls `int8_conv2d` with `qweight`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import conv_output_size
from .triton_w4 import INTERPRET, available, tiles, triton
from .triton_w4 import halo as halo_rule
from .triton_w4 import split_k as split_k_rule

if triton is not None:
    import triton.language as tl

    from ..quant.triton_fq import _round_half_even, grid_codes, row_grid
    from .triton_w4 import conv_rows, conv_taps, int4_codes, tile_offsets

    @triton.jit
    def _quantize_kernel(x_ptr, x8_ptr, ascale_ptr, azp_ptr, C, HW, qmin, qmax, center,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Codes of a (BLOCK_C channels, BLOCK_P pixels) tile of image n: read from contiguous NCHW x
        (pixels fastest), written channels-last, (N, H, W, C) contiguous (channels fastest)."""
        n = tl.program_id(0)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & (offs_p[None, :] < HW)
        base = n.to(tl.int64) * C * HW
        x = tl.load(x_ptr + base + offs_c[:, None] * HW + offs_p[None, :], mask=mask, other=0.0)
        q, _, _ = grid_codes(x, ascale_ptr, azp_ptr, qmin, qmax)  # the fake quantizer's integers, torch's rounding
        tl.store(x8_ptr + base + offs_p[None, :] * C + offs_c[:, None], (q - center).to(tl.int8), mask=mask)

    @triton.jit
    def _quantize_halo_kernel(x_ptr, x8_ptr, ascale_ptr, azp_ptr, C, H, W, PH, PW, qmin, qmax, center,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """`_quantize_kernel` into the halo buffer (N, H + 2*PH, W + 2*PW, C), channels-last: a (BLOCK_C channels,
        BLOCK_P padded pixels) tile of image n, pixels inside the image their codes of x, the border of PH rows and PW
        columns the code of 0.0, clamp(za, qmin, qmax) - ca, computed as `_int8_conv_kernel` computes its `pad` (the
        same integer) from the zero point on the device. One launch writes every byte of the buffer (no fill)."""
        n = tl.program_id(0)
        HP, WP = H + 2 * PH, W + 2 * PW
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        hi, wi = offs_p // WP - PH, offs_p % WP - PW  # the padded pixel's place in x
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        mask = (offs_c[:, None] < C) & (offs_p[None, :] < HP * WP)
        x = tl.load(x_ptr + n.to(tl.int64) * C * H * W + offs_c[:, None] * (H * W) + (hi * W + wi)[None, :],
                    mask=mask & inside[None, :], other=0.0)
        q, _, _ = grid_codes(x, ascale_ptr, azp_ptr, qmin, qmax)
        pad = tl.minimum(tl.maximum(tl.load(azp_ptr).to(tl.float32), qmin), qmax)  # the code of 0.0, as the conv's
        code = tl.where(inside[None, :], q, pad) - center
        tl.store(x8_ptr + n.to(tl.int64) * C * HP * WP + offs_p[None, :] * C + offs_c[:, None], code.to(tl.int8),
                 mask=mask)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, x8_ptr, s_ptr, z_ptr, qmin, qmax, center, min_scale, K: tl.constexpr,
                              SYMMETRIC: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dynamic per-token grids: row m of contiguous (M, K) x gets the grid of its own min and max, computed as
        `qparams_from_range` computes it in float32 (written to s[m], z[m]), then its centred codes (M, K) int8,
        with the torch path's float32 arithmetic (`UniformQuantizer.qparams`, `Int8Layer.forward`)."""
        m = tl.program_id(0)
        base = m.to(tl.int64) * K
        scale, zp = row_grid(x_ptr, base, K, qmin, qmax, min_scale, SYMMETRIC, BLOCK_K)
        tl.store(s_ptr + m, scale)
        tl.store(z_ptr + m, zp)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(v, scale)) + zp, qmin), qmax)
            tl.store(x8_ptr + base + offs, (q - center).to(tl.int8), mask=mask)

    @triton.jit
    def _int8_conv_kernel(x8_ptr, w_ptr, wzero_ptr, wscale_ptr, woff_ptr, row_ptr, bias_ptr, y_ptr,
                          ascale_ptr, azp_ptr, qmin, qmax, center,
                          M, O, C, H, W, HO, WO,
                          sxn, sxc, sxh, sxw, swk, syn, syc, syh, syw,
                          SH, SW, PH, PW, DH, DW,
                          K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, W4: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PER_ROW: tl.constexpr, part_ptr, rpart_ptr, KB_PER: tl.constexpr, SPLIT: tl.constexpr,
                          HALO: tl.constexpr, EVEN_K: tl.constexpr, W_KMAJOR: tl.constexpr):
        # SPLIT > 1 (split-K): program (i, j, s) sums K blocks [s * KB_PER, (s + 1) * KB_PER) only and writes its
        # int32 partial sums to part (SPLIT, M, O) and rpart (SPLIT, M); `_int8_splitk_epilogue` adds them (exact:
        # integers) and runs the epilogue. SPLIT == 1: the whole K loop and the epilogue here.
        # HALO: x8 is `_quantize_halo_kernel`'s padded buffer (N, H + 2*PH, W + 2*PW, C) (strides sx* its own), so the
        # taps are those of an unpadded conv over the padded image, every one of a valid output row in bounds: the A
        # tile is loaded under mask_m only (plus mask_k unless EVEN_K) and goes to tl.dot as loaded, with no
        # tl.where in between, so that on sm_90 the wgmma reads it from the shared memory the pipeliner copies it to
        # (module docstring). EVEN_K (HALO only: K % BLOCK_K == 0 and no split runs past K) drops mask_k from the A
        # and W tiles. Not HALO: the masked path (and the linears'), each tap masked by whether it lies inside the
        # image and given the pad code if not.
        # W_KMAJOR: the weight is K-major with k in the K loop's own (r, s, c) order (`Int8Part.kernel_weight`:
        # int8 (O8, K8), row stride swk; W4: packed codes (O, ceil(K'/2)), `W4A8Part.kernel_weight`), so a K block's
        # weight is BLOCK_K consecutive elements of each of BLOCK_N rows, the operand layout int8 wgmma wants in shared
        # memory (module docstring). Else the weight's own (c, r, s) order (`conv_taps`' wrow): int8 (K8, O8) with O
        # contiguous (`Int8Part.qweight`), W4 `pack_int4`'s (O, ceil(K/2)); a K block's rows are then KH*KW apart.
        # every argument without a default: torch.compile's wrapper of user Triton kernels (torch 2.11) drops an
        # omitted defaulted constexpr from the launch, and the compiled launcher then fails ("launcher() missing 1
        # required positional argument: '_grid_2'"; `gacq bench` mode int8 W8A8 compiled, session 18)
        offs_m, offs_n, mask_m, mask_n = tile_offsets(M, O, BLOCK_M, BLOCK_N)
        n_idx, ho, wo = conv_rows(offs_m, HO, WO)
        a_zp = tl.load(azp_ptr).to(tl.float32)  # an integer on the grid (int8_unsupported checks)
        pad = (tl.minimum(tl.maximum(a_zp, qmin), qmax) - center).to(tl.int8)  # the code of 0.0
        if W4:
            wz = tl.load(wzero_ptr + offs_n, mask=mask_n, other=0).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        # unsplit: every K block, a compile-time count; split: KB_PER blocks from this split's first (the last split
        # may run past K: those blocks are masked out, so they add zeros)
        kb0 = 0 if SPLIT == 1 else tl.program_id(2) * KB_PER
        for i in range(0, tl.cdiv(K, BLOCK_K) if SPLIT == 1 else KB_PER):
            kb = kb0 + i
            kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # k itself, (r, s, c): the K-major weight's column
            mask_k = kk < K
            # k = (r, s, c), channels fastest; wrow: each k's row in the weight's (c, r, s) order
            if HALO:  # padding 0 over the padded image: `inside` is all true on valid rows (and unused)
                offs, _, wrow = conv_taps(n_idx, ho, wo, kb, sxn, sxc, sxh, sxw, C, H + 2 * PH, W + 2 * PW, SH, SW,
                                          0, 0, DH, DW, KH, KW, BLOCK_K, ALIGNED)
                if EVEN_K:
                    x8 = tl.load(x8_ptr + offs, mask=mask_m[:, None], other=0)
                    mask_w = mask_n[None, :]
                else:  # k past K: 0 (as before), from the load
                    x8 = tl.load(x8_ptr + offs, mask=mask_m[:, None] & mask_k[None, :], other=0)
                    mask_w = mask_k[:, None] & mask_n[None, :]
            else:
                offs, inside, wrow = conv_taps(n_idx, ho, wo, kb, sxn, sxc, sxh, sxw, C, H, W, SH, SW, PH, PW, DH,
                                               DW, KH, KW, BLOCK_K, ALIGNED)
                x8 = tl.load(x8_ptr + offs, mask=mask_m[:, None] & mask_k[None, :] & inside, other=0)
                x8 = tl.where(inside, x8, pad)
                x8 = tl.where(mask_k[None, :], x8, 0).to(tl.int8)
                mask_w = mask_k[:, None] & mask_n[None, :]
            if W4:  # packed int4 codes (O, ceil(K/2)): W8 = code - zw, in [-15, 15]
                code = tl.trans(int4_codes(w_ptr, offs_n, kk if W_KMAJOR else wrow, tl.trans(mask_w), swk))
                if HALO and EVEN_K:  # every k < K; a column past O loads code 0 and zw 0 (other=0): 0
                    w8 = (code.to(tl.int32) - wz[None, :]).to(tl.int8)
                else:
                    w8 = tl.where(mask_w, code.to(tl.int32) - wz[None, :], 0).to(tl.int8)
            elif W_KMAJOR:  # int8 (O8, K8) row-major, (r, s, c)
                w8 = tl.load(w_ptr + offs_n[None, :] * swk + kk[:, None], mask=mask_w, other=0)
            else:  # int8 (K8, O8) row-major, (c, r, s)
                w8 = tl.load(w_ptr + wrow[:, None] * swk + offs_n[None, :], mask=mask_w, other=0)
            acc += tl.dot(x8, w8, out_dtype=tl.int32)
            if HAS_OFFSET:
                rsum += tl.sum(x8.to(tl.int32), axis=1)
        if SPLIT > 1:
            pid_k = tl.program_id(2)
            mask = mask_m[:, None] & mask_n[None, :]
            base = pid_k.to(tl.int64) * M
            tl.store(part_ptr + (base + offs_m[:, None]) * O + offs_n[None, :], acc, mask=mask)
            if HAS_OFFSET:
                tl.store(rpart_ptr + pid_k.to(tl.int64) * M + offs_m, rsum, mask=mask_m & (tl.program_id(1) == 0))
        else:
            _int8_epilogue(acc, rsum, offs_m, offs_n, mask_m, mask_n, n_idx, ho, wo, wscale_ptr, woff_ptr, row_ptr,
                           bias_ptr, y_ptr, ascale_ptr, azp_ptr, center, syn, syc, syh, syw, HAS_OFFSET, HAS_BIAS,
                           PER_ROW)

    @triton.jit
    def _int8_epilogue(acc, rsum, offs_m, offs_n, mask_m, mask_n, n_idx, ho, wo, wscale_ptr, woff_ptr, row_ptr,
                       bias_ptr, y_ptr, ascale_ptr, azp_ptr, center, syn, syc, syh, syw,
                       HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr):
        """The correction terms, scales and bias of an (BLOCK_M, BLOCK_N) int32 tile, stored to y."""
        row = tl.load(row_ptr + offs_n, mask=mask_n, other=0)
        sw = tl.load(wscale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if PER_ROW:  # dynamic per-token grids (linears, no padding): one scale and zero point per output row
            da_m = (center - tl.load(azp_ptr + offs_m, mask=mask_m, other=0.0)).to(tl.int32)
            total = acc + da_m[:, None] * row[None, :]
            scale = tl.load(ascale_ptr + offs_m, mask=mask_m, other=0.0)[:, None] * sw[None, :]
        else:
            da = (center - tl.load(azp_ptr).to(tl.float32)).to(tl.int32)  # ca - za, exact
            total = acc + da * row[None, :]
            # sa * sw[o] in float32, as the torch path multiplies `scale.float() * w_scale`
            scale = tl.load(ascale_ptr).to(tl.float32) * sw[None, :]
        if HAS_OFFSET:
            total += rsum[:, None] * tl.load(woff_ptr + offs_n, mask=mask_n, other=0)[None, :]
        y = total.to(tl.float32) * scale
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        ptr = y_ptr + n_idx[:, None] * syn + offs_n[None, :] * syc + ho[:, None] * syh + wo[:, None] * syw
        tl.store(ptr, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _int8_splitk_epilogue(part_ptr, rpart_ptr, wscale_ptr, woff_ptr, row_ptr, bias_ptr, y_ptr, ascale_ptr, azp_ptr,
                              center, M, O, HO, WO, syn, syc, syh, syw,
                              HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
        """Split-K's second kernel: the SPLIT int32 partial sums of a tile added (exact, in any order), then
        `_int8_epilogue`, so the output equals the unsplit kernel's bit for bit."""
        offs_m, offs_n, mask_m, mask_n = tile_offsets(M, O, BLOCK_M, BLOCK_N)
        mask = mask_m[:, None] & mask_n[None, :]
        n_idx, ho, wo = conv_rows(offs_m, HO, WO)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for sk in range(0, SPLIT):
            base = (sk * M).to(tl.int64)
            acc += tl.load(part_ptr + (base + offs_m[:, None]) * O + offs_n[None, :], mask=mask, other=0)
            if HAS_OFFSET:
                rsum += tl.load(rpart_ptr + base + offs_m, mask=mask_m, other=0)
        _int8_epilogue(acc, rsum, offs_m, offs_n, mask_m, mask_n, n_idx, ho, wo, wscale_ptr, woff_ptr, row_ptr,
                       bias_ptr, y_ptr, ascale_ptr, azp_ptr, center, syn, syc, syh, syw, HAS_OFFSET, HAS_BIAS,
                       PER_ROW)


def int8_conv2d(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                w_offset: torch.Tensor | None, row_term: torch.Tensor, bias: torch.Tensor | None,
                act_scale: torch.Tensor, act_zero: torch.Tensor, qmin: int, qmax: int, center: int,
                kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], w_zero: torch.Tensor | None = None,
                block: tuple[int, int, int] | None = None, num_warps: int | None = None,
                num_stages: int | None = None, aligned: bool | None = None,
                split_k: int | None = None, halo: bool | None = None, w_kmajor: bool = False) -> torch.Tensor:
    """The int8 conv of one weight group, (N, C, H, W) float -> (N, O, HO, WO) in x's dtype.

    qweight: (K8, O8) int8, `Int8Part`'s padded transposed weight (row stride O8); or, with
    `w_zero` (O,) given, (O, ceil(K/2)) uint8 packed int4 codes (`pack_int4`), the W4A8 layout,
    unpacked and centred (code - zw) inside the K loop; k = C*kh*kw; w_scale: (O,) float32 weight
    scales; w_offset: (O,) int32 dw or None when every dw is 0; row_term: (O,) int32; bias: (O,) in any
    float dtype or None; act_scale, act_zero: the input quantizer's scale and (integer) zero point as
    one-element tensors on x's device, read by the kernels (no host sync, so per-step grids written
    into them work under CUDA graphs); qmin, qmax: the grid; center: ca. `block` = (BLOCK_M, BLOCK_N,
    BLOCK_K), `num_warps` and `num_stages` override `tiles` and Triton's default pipelining
    (benchmarks/tune_conv_tiles.py); `aligned=False` forces the per-element tap arithmetic where one tap per
    K block would apply (the same integers; for measuring what the aligned path gains). `split_k` (default:
    `triton_w4.split_k`'s rule, 1 unless the tile rule is "small-m-splitk") splits the K loop over that many
    programs per output tile, whose int32 partial sums a second kernel adds before the epilogue: the same
    integers, so the same output bit for bit. `halo` (default: `triton_w4.halo`'s rule, on unless the tile rule is
    "small-m-masked") quantizes into a padded buffer whose border
    holds the code of 0.0, so the GEMM loads its input tiles without the per-tap bounds masks (the module
    docstring); `halo=False` keeps the masked path over the unpadded codes. The same integers either way.
    `w_kmajor`: qweight is instead K-major with k in (r, s, c) order, channels fastest (the order of the kernel's K
    loop): int8 (O, K') with K' >= k, row stride qweight.stride(0) (`Int8Part.kernel_weight`, (O8, K8)), or with
    `w_zero` packed int4 codes (O, ceil(K'/2)) of that order (`W4A8Part.kernel_weight`); each K block's weight tile
    is then contiguous along k (module docstring). The same integers as the stored layout.
    """
    if triton is None:
        raise RuntimeError("the int8 Triton kernel needs the triton package")
    n, c, h, w = x.shape
    kh, kw = kernel_size
    if c * kh * kw != k:
        raise ValueError(f"int8_conv2d: input has {c} channels, the weight expects {k // (kh * kw)}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    x = x.contiguous()
    halo = halo_rule() if halo is None else halo
    hp, wp = (h + 2 * ph, w + 2 * pw) if halo else (h, w)  # the halo buffer's image; without padding x's own
    x8 = torch.empty((n, hp, wp, c), dtype=torch.int8, device=x.device)  # channels-last codes
    # tiles of up to 64 pixels x 4096 / 64 channels; linears (1x1 images) take one pixel x all channels per program
    bp = min(64, triton.next_power_of_2(hp * wp))
    bc = min(max(32, 4096 // bp), triton.next_power_of_2(c))
    qgrid = (n, triton.cdiv(hp * wp, bp), triton.cdiv(c, bc))
    if (hp, wp) != (h, w):  # the border written by the same launch
        _quantize_halo_kernel[qgrid](x, x8, act_scale, act_zero, c, h, w, ph, pw, float(qmin), float(qmax),
                                     float(center), BLOCK_C=bc, BLOCK_P=bp)
    else:  # no padding (or halo=False): the plain buffer, which is then also the halo buffer
        _quantize_kernel[qgrid](x, x8, act_scale, act_zero, c, h * w, float(qmin), float(qmax), float(center),
                                BLOCK_C=bc, BLOCK_P=bp)
    y = torch.empty((n, out_channels, ho, wo), dtype=x.dtype, device=x.device)
    m = n * ho * wo
    bm, bn, bk, warps = tiles(m, out_channels, "w4" if w_zero is not None else "int8", c)
    if block is not None:
        (bm, bn, bk), warps = block, 4
    warps = num_warps or warps
    extra = {"num_stages": num_stages} if num_stages else {}
    kblocks = triton.cdiv(k, bk)
    split = split_k_rule(m, out_channels, k, bm, bn, bk) if split_k is None else max(1, min(int(split_k), kblocks))
    kb_per = triton.cdiv(kblocks, split)
    split = triton.cdiv(kblocks, kb_per)  # no empty split
    even_k = k % bk == 0 and split * kb_per == kblocks  # no k past K in any block (the last split's may run past)
    grid = (triton.cdiv(m, bm), triton.cdiv(out_channels, bn), split)
    off = w_offset if w_offset is not None else row_term  # any int32 pointer when unused
    b = bias if bias is not None else w_scale  # any pointer when unused
    wz = w_zero if w_zero is not None else row_term  # any pointer when unused
    part = torch.empty((split, m, out_channels), dtype=torch.int32, device=x.device) if split > 1 else row_term
    rpart = torch.empty((split, m), dtype=torch.int32, device=x.device) if split > 1 else row_term
    _int8_conv_kernel[grid](x8, qweight, wz, w_scale, off, row_term, b, y, act_scale, act_zero,
                            float(qmin), float(qmax), float(center),
                            m, out_channels, c, h, w, ho, wo, hp * wp * c, 1, wp * c, c, qweight.stride(0),
                            *y.stride(), sh, sw, ph, pw, dh, dw, K=k, KH=kh, KW=kw, HAS_OFFSET=w_offset is not None,
                            HAS_BIAS=bias is not None, W4=w_zero is not None,
                            ALIGNED=c % bk == 0 and aligned is not False,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PER_ROW=False, part_ptr=part, rpart_ptr=rpart,
                            KB_PER=kb_per, SPLIT=split, HALO=halo, EVEN_K=halo and even_k, W_KMAJOR=w_kmajor,
                            num_warps=warps, **extra)
    if split > 1:
        _int8_splitk_epilogue[grid[:2]](part, rpart, w_scale, off, row_term, b, y, act_scale, act_zero, float(center),
                                        m, out_channels, ho, wo, *y.stride(), HAS_OFFSET=w_offset is not None,
                                        HAS_BIAS=bias is not None, PER_ROW=False, BLOCK_M=bm, BLOCK_N=bn,
                                        SPLIT=split, num_warps=warps)
    return y


def int8_linear_dynamic(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                        w_offset: torch.Tensor | None, row_term: torch.Tensor, bias: torch.Tensor | None,
                        qmin: int, qmax: int, center: int, symmetric: bool, min_scale: float,
                        w_zero: torch.Tensor | None = None) -> torch.Tensor:
    """An int8 (or, with `w_zero`, W4A8) linear with dynamic per-token inputs: (..., K) float -> (..., O) in x's
    dtype. One kernel computes each row's grid and codes (`_quantize_rows_kernel`), the conv kernel runs the GEMM as
    a 1x1 conv over 1x1 images with one scale and zero point per row in its epilogue. The weight arguments are
    `int8_conv2d`'s."""
    if triton is None:
        raise RuntimeError("the int8 Triton kernel needs the triton package")
    if x.shape[-1] != k:
        raise ValueError(f"int8_linear_dynamic: input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    x8 = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    a_zero = torch.empty((m,), dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](x2, x8, a_scale, a_zero, float(qmin), float(qmax), float(center),
                                float(min_scale), K=k, SYMMETRIC=symmetric,
                                BLOCK_K=min(1024, triton.next_power_of_2(k)))
    y = torch.empty((m, out_channels), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = tiles(m, out_channels, "w4" if w_zero is not None else "int8", k)
    grid = (triton.cdiv(m, bm), triton.cdiv(out_channels, bn))
    off = w_offset if w_offset is not None else row_term
    b = bias if bias is not None else w_scale
    wz = w_zero if w_zero is not None else row_term
    # (m, k) codes as channels-last (m, 1, 1, k) images; y as (m, O, 1, 1) with strides (O, 1, 1, 1)
    _int8_conv_kernel[grid](x8, qweight, wz, w_scale, off, row_term, b, y, a_scale, a_zero,
                            float(qmin), float(qmax), float(center),
                            m, out_channels, k, 1, 1, 1, 1, k, 1, k, k, qweight.stride(0), out_channels, 1, 1, 1,
                            1, 1, 0, 0, 1, 1, K=k, KH=1, KW=1, HAS_OFFSET=w_offset is not None,
                            HAS_BIAS=bias is not None, W4=w_zero is not None, ALIGNED=k % bk == 0,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, PER_ROW=True,
                            part_ptr=row_term, rpart_ptr=row_term, KB_PER=1, SPLIT=1,  # linears: no split-K
                            HALO=False, EVEN_K=False,  # the masked path (1x1 images: every tap inside anyway)
                            W_KMAJOR=False)  # `Int8Part.qweight` as stored (1x1: (c, r, s) is (r, s, c) anyway)
    return y.reshape(*x.shape[:-1], out_channels)


# Under torch.compile the layers launch the kernels through these custom ops (`Int8Layer._fused`): Dynamo then sees
# one opaque op per layer, with a shape function, instead of tracing into the Triton launches. Its wrapper of user
# Triton kernels analyses every launch site (session 18 on the H200: it failed on a defaulted kernel argument; session
# 19: `int8 W8A8 compiled` on `small` was still compiling after 75 s). Eager calls keep the plain functions above (no
# dispatcher step per layer). Only the tile defaults are reachable through the ops.
@torch.library.custom_op("gacq::int8_conv2d", mutates_args=())
def int8_conv2d_op(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int, w_scale: torch.Tensor,
                   w_offset: Optional[torch.Tensor], row_term: torch.Tensor, bias: Optional[torch.Tensor],
                   act_scale: torch.Tensor, act_zero: torch.Tensor, qmin: int, qmax: int, center: int,
                   kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                   w_zero: Optional[torch.Tensor] = None, w_kmajor: bool = False) -> torch.Tensor:
    """`int8_conv2d` as the custom op `gacq::int8_conv2d`."""
    return int8_conv2d(x, qweight, k, out_channels, w_scale, w_offset, row_term, bias, act_scale, act_zero, qmin,
                       qmax, center, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
                       w_zero=w_zero, w_kmajor=w_kmajor)


@int8_conv2d_op.register_fake
def _int8_conv2d_shape(x, qweight, k, out_channels, w_scale, w_offset, row_term, bias, act_scale, act_zero, qmin,
                       qmax, center, kernel_size, stride, padding, dilation, w_zero=None, w_kmajor=False):
    n, _, h, w = x.shape
    ho, wo = (conv_output_size(size, *geom) for size, *geom in zip((h, w), kernel_size, stride, padding, dilation))
    return x.new_empty((n, out_channels, ho, wo))


@torch.library.custom_op("gacq::int8_linear_dynamic", mutates_args=())
def int8_linear_dynamic_op(x: torch.Tensor, qweight: torch.Tensor, k: int, out_channels: int,
                           w_scale: torch.Tensor, w_offset: Optional[torch.Tensor], row_term: torch.Tensor,
                           bias: Optional[torch.Tensor], qmin: int, qmax: int, center: int, symmetric: bool,
                           min_scale: float, w_zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`int8_linear_dynamic` as the custom op `gacq::int8_linear_dynamic`."""
    return int8_linear_dynamic(x, qweight, k, out_channels, w_scale, w_offset, row_term, bias, qmin, qmax, center,
                               symmetric, min_scale, w_zero=w_zero)


@int8_linear_dynamic_op.register_fake
def _int8_linear_dynamic_shape(x, qweight, k, out_channels, w_scale, w_offset, row_term, bias, qmin, qmax, center,
                               symmetric, min_scale, w_zero=None):
    return x.new_empty((*x.shape[:-1], out_channels))


__all__ = ["INTERPRET", "available", "int8_conv2d", "int8_conv2d_op", "int8_linear_dynamic", "int8_linear_dynamic_op",
           "tiles"]
