"""Triton W4A16 GEMM: int4 weights packed two per byte, unpacked and dequantized inside the
kernel's K loop, so the float weight never exists in memory.

    y[m, n] = sum_k x[m, k] * ((code[n, k] - zero[n]) * scale[n]) + bias[n]

`x` is fp16, bf16 or fp32 (fp32 products in full precision, not TF32; the dequantized tile is cast to x's dtype before `tl.dot`, as the
dense path casts the dequantized weight: the products see the same weight values), accumulation
is float32, the output has x's dtype. Codes are `pack_int4`'s layout: row n of the weight is
ceil(K / 2) bytes, low nibble first. One scale and zero point per output channel (checkpoints
whose weight is split into column groups fall back to the dense path).

Convolutions run as an implicit GEMM (`_w4a16_conv_kernel`): each tile of output positions
gathers the input pixels of its reduction indices k = (kernel row, kernel column, channel), channels
fastest, straight from the input (zero outside the image), so no im2col copy (kh*kw times the input)
is made; each k reads its weight column at its place in `weight.reshape(O, -1)` (`conv_taps`). Where
the channels are a multiple of BLOCK_K the input is made channels-last and each K block is one
kernel tap over BLOCK_K consecutive channels.

Runs on CUDA. With TRITON_INTERPRET=1 set before gacq is imported, the same kernel runs on CPU
tensors in Triton's interpreter, which is how the tests check it without a GPU. Speed is only
measured by `gacq bench` (gacq/bench.py) on the GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .base import conv_output_size

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on x's device."""
    return triton is not None and (x.is_cuda or INTERPRET)


TILE_RULES = ("small-m", "no-small-m", "small-m-splitk", "small-m-masked", "small-m-kmajor")
_tile_rule = "small-m"
SMALL_M = 1024


def set_tile_rule(name: str) -> str:
    """Choose `tiles`' rule for the kernels launched from now on (returns the previous one). "small-m" (the default)
    gives outputs of at most SMALL_M rows (batch 1 at 32x32 and below) the small tiles that won
    benchmarks/tune_conv_tiles.py's batch-1 sweep on the H200 (results/conv_tiles, session 26, M = 64-1,024): int8
    (16, 64, 64), int4 weights and the generic GEMM (32, 32, 64), 4 warps; in the compiled, CUDA-graphed ddpm-cifar10
    model at batch 1 they made a W4A8 step 1.61x and a W8A8 step 1.41x faster than the batch-256 rule
    (results/bench_lowbit/s27-ddpm-cifar10-batch1-tiles). "no-small-m" keeps that batch-256 rule everywhere (as
    before session 27), for comparison (`gacq bench --tile-rules`). "small-m-splitk" is small-m plus split-K in
    the int8 / W4A8 conv kernel where an output has too few tiles to fill the GPU (`split_k`; not yet measured on a
    GPU, so not the default). "small-m-masked" is small-m with the int8 / W4A8 convs on their masked path instead of
    the halo path (`halo`; `triton_int8`'s docstring), so that `gacq bench --tile-rules small-m,small-m-masked` times
    the two end to end in one run. "small-m-kmajor" is small-m with the int8 / W4A8 conv layers reading a K-major
    (r, s, c) copy of their weight (`kmajor`; `Int8Part.kernel_weight`), opt-in until timed. The integer kernels'
    results do not depend on the tiles, the split, the path or the weight layout.
    Kernels already captured in a CUDA graph keep theirs."""
    global _tile_rule
    if name not in TILE_RULES:
        raise ValueError(f"unknown tile rule {name!r}; choose one of {', '.join(TILE_RULES)}")
    previous, _tile_rule = _tile_rule, name
    return previous


def tiles(m: int, n: int, kind: str = "gemm", channels: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the GEMM kernels for an M x N output: large tiles where the
    output is large (the tensor cores' shape, and each dequantized or gathered weight tile serves more rows),
    small ones where a large tile would be mostly padding, and always 32 in Triton's interpreter (where a
    tile's cost is its size). The integer kernels' results do not depend on the tiles.

    `kind` "int8" (the int8 implicit-GEMM conv) and "w4" (the convs on packed int4 weights, W4A8 and W4A16) take
    the tiles that won benchmarks/tune_conv_tiles.py's sweeps at batch 256 (results/conv_tiles): int8 (256, 128,
    64) with 8 warps from M = 8,192 rows (the halo path on the H100, session 34: 1.2-1.5x the (128, 128, 128) that
    won session 11's sweep on the H200 before the halo path, on the four shapes measured; only where `channels` %
    64 == 0, so that a K block stays within one kernel tap), w4 (256, 128, 64) with 8 warps from M = 65,536
    (1.1-1.5x). "fp8" (the FP8 implicit-GEMM conv's GEMM, `triton_fp8`) takes the winners of the H100
    sweep of session 34 (results/conv_tiles/s34-fp8-gemm, batch 256): (128, 128, 128) with 4 warps from M = 8,192
    (1.05-1.26x the int8 rule's 8 warps on all six shapes), (128, 256, 128) with 8 warps where O >= 256 and C >= 512
    (905 against 837 T/s). Outputs of at most SMALL_M rows take smaller tiles under the default "small-m" rule
    (`set_tile_rule`: session 27's batch-1 measurements); FP8 the winners of session 35's batch-1 sweep on the H100
    (results/conv_tiles/s35-batch1, three of its four 3x3 shapes): (64, 64, 128) x 4 warps from 512 rows (5.4
    against the int8 rule's 1.3 T/s at 32x32, C = 128), (16, 64, 128) x 4 where C >= 512 (11.1 against 8.8), else
    (32, 64, 64) x 4 (5.2 against 3.3); BLOCK_K 64 where the channels do not split into 128-blocks."""
    if INTERPRET:
        return 32, 32, 32, 4
    if _tile_rule != "no-small-m" and m <= SMALL_M:  # few output rows: enough blocks for the SMs (see set_tile_rule)
        if kind == "fp8":  # the H100's batch-1 sweep of session 35 (results/conv_tiles/s35-batch1)
            bk = 128 if channels is not None and channels % 128 == 0 else 64
            if m >= 512:
                return 64, 64, bk, 4
            return (16, 64, 128, 4) if bk == 128 and channels >= 512 else (32, 64, 64, 4)
        return (16, 64, 64, 4) if kind == "int8" else (32, 32, 64, 4)
    if kind == "fp8" and m >= 8192 and (channels is None or channels % 128 == 0):
        return (128, 256, 128, 8) if n >= 256 and channels is not None and channels >= 512 else (128, 128, 128, 4)
    if kind == "fp8":
        kind = "int8"  # the int8 kernel's tiles otherwise (FP8 tiles are as many bytes)
    if n >= 128 and kind == "int8" and m >= 8192 and (channels is None or channels % 64 == 0):
        return 256, 128, 64, 8
    if n >= 128 and kind == "w4" and m >= 65536:
        return 256, 128, 64, 8
    bm = 128 if m >= 8192 else 64 if m >= 512 else 32
    bn = 128 if n >= 128 and m >= 512 else 64 if n >= 64 else 32
    return bm, bn, 64, 8 if bm * bn >= 128 * 128 else 4


def halo() -> bool:
    """Whether the int8 / W4A8 convs take the halo path by default (`triton_int8.int8_conv2d(halo=None)`): yes, unless
    the tile rule is "small-m-masked"."""
    return _tile_rule != "small-m-masked"


def kmajor() -> bool:
    """Whether the int8 / W4A8 conv layers read their K-major weight copy by default (`Int8Layer.kernel_kmajor` None):
    only under the tile rule "small-m-kmajor" (a second copy of the weight in GPU memory; not yet timed on a GPU)."""
    return _tile_rule == "small-m-kmajor"


SPLIT_K_PROGRAMS = 264  # two programs per SM of an H100 / H200 (132 SMs)
SPLIT_K_MIN_BLOCKS = 4  # K blocks each split keeps at least


def split_k(m: int, n: int, k: int, bm: int, bn: int, bk: int) -> int:
    """How many programs share one output tile's K loop in the int8 / W4A8 conv kernel: 1 (no split) unless the tile
    rule is "small-m-splitk"; then enough to give about SPLIT_K_PROGRAMS programs in all, with at least
    SPLIT_K_MIN_BLOCKS K blocks each. Always 1 in Triton's interpreter (the tests pass `split_k` themselves)."""
    if _tile_rule != "small-m-splitk" or INTERPRET:
        return 1
    programs = -(-m // bm) * -(-n // bn)
    kblocks = -(-k // bk)
    return max(1, min(-(-SPLIT_K_PROGRAMS // programs), kblocks // SPLIT_K_MIN_BLOCKS))


if triton is not None:

    # ------------------------------------------------ pieces shared by the kernels (here and triton_int8) ---
    @triton.jit
    def int4_codes(qw_ptr, offs_n, offs_k, mask, stride_qn):
        """Codes (BLOCK_N, BLOCK_K) of `pack_int4`'s layout: row n is ceil(K/2) bytes, low nibble first."""
        byte = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] // 2), mask=mask, other=0)
        return (byte >> ((offs_k[None, :] % 2) * 4).to(tl.uint8)) & 0xF

    @triton.jit
    def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's output tile (program ids 0 and 1 over rows and output channels): the row and channel
        offsets and their masks."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def conv_rows(offs_m, HO, WO):
        """Output rows m of an implicit-GEMM conv -> (image, output row, output column)."""
        rem = offs_m % (HO * WO)
        return offs_m // (HO * WO), rem // WO, rem % WO

    @triton.jit
    def conv_taps(n_idx, ho, wo, kb, sxn, sxc, sxh, sxw, C, H, W, SH, SW, PH, PW, DH, DW,
                  KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
        """The input tile of K block `kb` of an implicit-GEMM conv, reduction index k = (kernel row r, kernel
        column s, channel c) with channels fastest: element offsets (BLOCK_M, BLOCK_K), whether each tap lies
        inside the image ((BLOCK_M, 1) when ALIGNED, else (BLOCK_M, BLOCK_K)), and the weight row of each k
        in the order of `weight.reshape(O, -1)`, c * KH * KW + r * KW + s.

        ALIGNED (C % BLOCK_K == 0): every K block lies within one kernel tap, so the tap's position and bounds
        are computed once per output row and the channel offsets are one arange: with channels-last input
        (sxc = 1) each row of the tile is BLOCK_K consecutive elements. Otherwise each element computes its own
        tap. The integer kernels' sums do not depend on the order of k."""
        if ALIGNED:
            k0 = kb * BLOCK_K
            tap = k0 // C
            # k0 % C is a multiple of BLOCK_K here; said explicitly because Triton's axis analysis does not derive it
            # from `%`, and without it the load of the tile is not pipelined (cp.async) on sm_90 (TTGIR, triton 3.6)
            c = tl.multiple_of(k0 % C, BLOCK_K) + tl.arange(0, BLOCK_K)
            r, s = tap // KW, tap % KW
            hi = ho * SH - PH + r * DH
            wi = wo * SW - PW + s * DW
            inside = ((hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None]
            offs = (n_idx * sxn + hi * sxh + wi * sxw)[:, None] + c[None, :] * sxc
        else:
            k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            tap = k // C
            c = k % C
            r, s = tap // KW, tap % KW
            hi = ho[:, None] * SH - PH + r[None, :] * DH
            wi = wo[:, None] * SW - PW + s[None, :] * DW
            inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            offs = n_idx[:, None] * sxn + c[None, :] * sxc + hi * sxh + wi * sxw
        return offs, inside, c * (KH * KW) + tap

    @triton.jit
    def _dequant_dot(acc, x, code, zero, scale, mask_k, IEEE: tl.constexpr):
        """acc + x @ ((code - zero) * scale)^T: the tile dequantized in float32 (as fake quant), cast
        to x's dtype (as the dense path casts the weight), products accumulated in float32."""
        w = (code.to(tl.float32) - zero[:, None]) * scale[:, None]
        w = tl.where(mask_k[None, :], w, 0.0).to(x.dtype)
        if IEEE:  # float32 inputs: full-precision products (tl.dot would take TF32 on the GPU)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee", out_dtype=tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32)
        return acc

    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N,
                      stride_xm, stride_xk, stride_qn, stride_ym, stride_yn,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        zero = tl.load(zero_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # K is a compile-time constant (one specialisation per layer width, a few per model): the
        # interpreter of triton 3.6 cannot take a run-time bound here under numpy >= 2.4
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            code = int4_codes(qw_ptr, offs_n, offs_k, mask_n[:, None] & mask_k[None, :], stride_qn)
            acc = _dequant_dot(acc, x, code, zero, scale, mask_k, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


if triton is not None:

    @triton.jit
    def _w4a16_conv_kernel(x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, O, C, H, W, HO, WO,
                           sxn, sxc, sxh, sxw, stride_qn, syn, syc, syh, syw, SH, SW, PH, PW, DH, DW,
                           K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                           IEEE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        offs_m, offs_n, mask_m, mask_n = tile_offsets(M, O, BLOCK_M, BLOCK_N)
        n_idx, ho, wo = conv_rows(offs_m, HO, WO)
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        zero = tl.load(zero_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = kb * BLOCK_K + tl.arange(0, BLOCK_K) < K
            offs, inside, wrow = conv_taps(n_idx, ho, wo, kb, sxn, sxc, sxh, sxw, C, H, W, SH, SW, PH, PW, DH, DW,
                                           KH, KW, BLOCK_K, ALIGNED)
            x = tl.load(x_ptr + offs, mask=mask_m[:, None] & mask_k[None, :] & inside, other=0.0)  # 0 outside
            code = int4_codes(qw_ptr, offs_n, wrow, mask_n[:, None] & mask_k[None, :], stride_qn)
            acc = _dequant_dot(acc, x, code, zero, scale, mask_k, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        ptr = y_ptr + n_idx[:, None] * syn + offs_n[None, :] * syc + ho[:, None] * syh + wo[:, None] * syw
        tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int,
                 bias: torch.Tensor | None = None, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (..., K) times the packed weight (N, ceil(K/2)) transposed -> (..., N), in x's dtype.

    scale: (N,) float32; zero: (N,) integer codes; bias: (N,) or None; `block` = (BLOCK_M, BLOCK_N, BLOCK_K)
    overrides `tiles`.
    """
    if triton is None:
        raise RuntimeError("the w4a16 Triton kernel needs the triton package")
    if x.shape[-1] != k or qweight.shape[-1] != (k + 1) // 2:
        raise ValueError(f"w4a16_matmul: input has {x.shape[-1]} features, packed weight is for {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = tiles(m, n) if block is None else (*block, 4)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    b = bias.to(x.dtype).contiguous() if bias is not None else y  # y: any pointer, unused without a bias
    _w4a16_kernel[grid](x2, qweight.contiguous(), scale.float().contiguous(), zero.contiguous(), b, y, m, n,
                        x2.stride(0), x2.stride(1), qweight.stride(0), y.stride(0), y.stride(1),
                        K=k, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=warps)
    return y.reshape(*lead, n)


def w4a16_conv2d(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 weight_shape: tuple[int, ...], bias: torch.Tensor | None, stride, padding, dilation,
                 block: tuple[int, int, int] | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """conv2d (groups 1) as an implicit GEMM; padding may be an int, a pair or 'same'/'valid'. `block` =
    (BLOCK_M, BLOCK_N, BLOCK_K), `num_warps` and `num_stages` override `tiles` and Triton's default pipelining."""
    if triton is None:
        raise RuntimeError("the w4a16 Triton kernel needs the triton package")
    o, c, kh, kw = weight_shape
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same' (stride 1): pad so that the output keeps the input size
            ph, pw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            padding = (0, 0)
    if isinstance(padding, int):
        padding = (padding, padding)
    n, cx, h, w = x.shape
    if cx != c:
        raise ValueError(f"w4a16_conv2d: input has {cx} channels, the weight expects {c}")
    ho = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((n, o, ho, wo), dtype=x.dtype, device=x.device)
    m = n * ho * wo
    bm, bn, bk, warps = tiles(m, o, "w4", c) if block is None else (*block, 4)
    warps = num_warps or warps
    extra = {"num_stages": num_stages} if num_stages else {}
    grid = (triton.cdiv(m, bm), triton.cdiv(o, bn))
    b = bias.to(x.dtype).contiguous() if bias is not None else y
    aligned = c % bk == 0
    if aligned:  # channels-last: each input-tile row is BLOCK_K consecutive channels (`conv_taps`)
        x = x.contiguous(memory_format=torch.channels_last)
    _w4a16_conv_kernel[grid](x, qweight.contiguous(), scale.float().contiguous(), zero.contiguous(), b, y, m, o, c,
                             h, w, ho, wo, *x.stride(), qweight.stride(0), *y.stride(), stride[0], stride[1],
                             padding[0], padding[1], dilation[0], dilation[1], K=c * kh * kw, KH=kh, KW=kw,
                             HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, ALIGNED=aligned,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **extra)
    return y
