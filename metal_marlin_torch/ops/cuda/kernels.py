"""Triton kernels of ``marlin::gemm`` on CUDA: a fused dequantize-GEMV for small M, a tiled
dequantize-GEMM on the tensor cores for larger M, and a dequantize kernel (for the very large M
path: dequantize once into a temporary, then cuBLAS).

All three read the packed weight in the canonical layout of docs/FORMAT.md (``uint32 [N, KW]``,
row ``n`` one little-endian bit stream along K), or in the load-time *interleaved* layout of
docs/CUDA.md (``INTERLEAVED``: inside each aligned block of ``WT`` words of a row, code slot
``c`` of word ``j`` holds input ``c * WT + j`` of the block, so one code slot of all the block's
words covers ``WT`` consecutive inputs and the activations load as contiguous vectors).

Decoding (``DECODE``) is one of three branch-free paths, each giving the code's value *before*
its group scale; the host folds any constant factor into ``SCALE_MUL``:

* ``DECODE_INT`` (affine ``int8/4/3/2``): the exact float of ``q`` by the 2^23 magic number
  (``bits(q | 0x4B000000) - 2^23``): one logic op and one add, where ``int -> float``
  conversion instructions run at an eighth of the FMA rate on Hopper.
* ``DECODE_E2M1`` (``fp4``, ``mxfp4``, ``nvfp4``): the three magnitude bits placed into an fp16's
  exponent and top mantissa bit and the sign bit into bit 15 give ``e2m1(q) / 2^14`` exactly
  (index 1 lands on the fp16 subnormal 2^-15); ``SCALE_MUL = 2^14`` restores it.
* ``DECODE_LUT`` (``nf4``, ``nf3``, ``fp8_*``, the generic path): ``lut[q]`` from a float32
  table of ``2^bits`` entries (64 bytes to 1 KiB) that stays in L1.

Accumulation is float32 throughout; group scales (and the affine biases, as
``b * sum(x)``) are applied once per group per row, outside the per-code loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

DECODE_INT = 0  # value = q                      (affine: scale * q + bias)
DECODE_E2M1 = 1  # value = e2m1(q) / 2^14         (SCALE_MUL = 2^14)
DECODE_LUT = 2  # value = lut[q]


@triton.jit
def _decode(q, lut_ptr, DECODE: tl.constexpr):
    """float32 value of uint32 codes ``q`` before the group scale (see the module docstring)."""
    if DECODE == 0:
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif DECODE == 1:
        h = ((q & 7) << 9) | ((q & 8) << 12)
        v = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        v = tl.load(lut_ptr + q.to(tl.int32))
    return v


@triton.jit
def _code_of_3bit(w0, w1, w2, C: tl.constexpr):
    """Code ``C`` (0..31) of a 3-bit unit (32 codes in 3 words); codes 10 and 21 straddle."""
    SH: tl.constexpr = (C * 3) % 32
    if (C * 3) // 32 == 0:
        lo = w0
        hi = w1
    elif (C * 3) // 32 == 1:
        lo = w1
        hi = w2
    else:
        lo = w2
        hi = w2
    q = lo >> SH
    if SH > 29:
        q = q | (hi << (32 - SH))
    return q & 7


@triton.jit(do_not_specialize=["M"])
def gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, lut_ptr, bias_ptr, y_ptr,
    M, N, K,
    KW,  # words per weight row
    ITEMS,  # items per row: words (bits 2, 4, 8) or 3-word units (bits 3)
    IPG,  # items per scale group (ITEMS when per-channel)
    NG,  # scale groups per row
    CHUNKS_PER_SPLIT,  # chunks of GPB * WT items each split-K program reduces
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr,  # code width: 2, 3, 4 or 8
    DECODE: tl.constexpr,  # DECODE_INT / DECODE_E2M1 / DECODE_LUT
    AFFINE: tl.constexpr,  # biases present: w = s * v + b
    HAS_BIAS: tl.constexpr,  # layer bias [N]
    SCALE_MUL: tl.constexpr,  # constant folded into every scale (2^14 for E2M1)
    INTERLEAVED: tl.constexpr,  # weight in the interleaved layout with blocks of WT words
    BLOCK_M: tl.constexpr,  # activation rows per program (each decoded weight used BLOCK_M times)
    BLOCK_N: tl.constexpr,  # output features per program
    GPB: tl.constexpr,  # scale groups per chunk (1 when a group spans several chunks)
    WT: tl.constexpr,  # items per group per chunk
    SPLIT_K: tl.constexpr,  # >1: fp32 partial sums are atomically added into y (fp32)
):
    """``y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])`` for a few rows ``m``.

    Each program owns BLOCK_N weight rows and walks K in chunks of ``GPB * WT`` items, loading
    the chunk's words once (contiguous along K: 16-byte loads) and unrolling over the codes of a
    word, so the decoded values never leave registers. Per-code partial sums are scaled once per
    (row, group, item) when the chunk ends.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    CPI: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per item
    MASK: tl.constexpr = (1 << BITS) - 1
    CHUNK: tl.constexpr = GPB * WT

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GPB)
    offs_j = tl.arange(0, WT)
    m_ok = offs_m < M
    n_ok = offs_n < N
    tile = offs_g[:, None] * WT + offs_j[None, :]  # [GPB, WT] item index inside a chunk
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm  # [BM, 1, 1]
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn  # [BN, 1, 1]
    s_rows = s_ptr + offs_n[:, None] * stride_sn  # [BN, 1]
    b_rows = b_ptr + offs_n[:, None] * stride_sn

    acc = tl.zeros([BLOCK_M, BLOCK_N, GPB, WT], dtype=tl.float32)
    accb = tl.zeros([BLOCK_M, BLOCK_N, GPB], dtype=tl.float32)
    c_lo = pid_k * CHUNKS_PER_SPLIT
    for chunk in range(c_lo, c_lo + CHUNKS_PER_SPLIT):  # past the row end all loads are masked
        i0 = chunk * CHUNK
        items = i0 + tile  # [GPB, WT]
        item_ok = items < ITEMS
        gidx = (i0 + offs_g * WT) // IPG  # [GPB]: a chunk never straddles a group (host plan)
        sb_mask = n_ok[:, None] & (gidx < NG)[None, :]
        s = tl.load(s_rows + gidx[None, :], mask=sb_mask, other=0.0).to(tl.float32) * SCALE_MUL
        wmask = n_ok[:, None, None] & item_ok[None, :, :]
        if BITS == 3:
            wp = w_rows + items[None, :, :] * 3
            w0 = tl.load(wp, mask=wmask & (items * 3 < KW)[None, :, :], other=0)
            w1 = tl.load(wp + 1, mask=wmask & (items * 3 + 1 < KW)[None, :, :], other=0)
            w2 = tl.load(wp + 2, mask=wmask & (items * 3 + 2 < KW)[None, :, :], other=0)
            w0 = w0.to(tl.uint32, bitcast=True)
            w1 = w1.to(tl.uint32, bitcast=True)
            w2 = w2.to(tl.uint32, bitcast=True)
        else:
            w = tl.load(w_rows + items[None, :, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)
        part = tl.zeros([BLOCK_M, BLOCK_N, GPB, WT], dtype=tl.float32)
        xs = tl.zeros([BLOCK_M, GPB, WT], dtype=tl.float32)
        for c in tl.static_range(CPI):
            if BITS == 3:
                q = _code_of_3bit(w0, w1, w2, c)
            else:
                q = (w >> (c * BITS)) & MASK
            v = _decode(q, lut_ptr, DECODE)  # [BN, GPB, WT]
            if INTERLEAVED:
                kk = (i0 + offs_g[:, None] * WT) * CPI + c * WT + offs_j[None, :]
            else:
                kk = items * CPI + c
            xmask = m_ok[:, None, None] & (kk < K)[None, :, :]
            xc = tl.load(x_rows + kk[None, :, :], mask=xmask, other=0.0).to(tl.float32)
            part += xc[:, None, :, :] * v[None, :, :, :]
            if AFFINE:
                xs += xc
        acc += part * s[None, :, :, None]
        if AFFINE:
            b = tl.load(b_rows + gidx[None, :], mask=sb_mask, other=0.0).to(tl.float32)
            accb += tl.sum(xs, axis=2)[:, None, :] * b[None, :, :]

    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BM, BN]
    if AFFINE:
        y += tl.sum(accb, axis=2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (pid_k == 0).to(tl.float32)
        y += bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, y, mask=out_mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_tile(
    w_ptr, s_ptr, b_ptr, lut_ptr,
    offs_n, n_ok, k0, offs_k, K, G, stride_wn, stride_sn,
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, SCALE_MUL: tl.constexpr,
    INTERLEAVED: tl.constexpr, WT: tl.constexpr,
    SCALE_ROW: tl.constexpr,  # the tile [k0, k0 + BLOCK_K) lies inside one group
):
    """float32 ``W_hat[offs_n, k0 + offs_k]`` (``[BN, BK]``), zero outside the matrix."""
    kk = k0 + offs_k
    k_ok = kk < K
    if INTERLEAVED:
        CPW: tl.constexpr = 32 // BITS
        r = kk % (WT * CPW)
        word = (kk // (WT * CPW)) * WT + r % WT
        sh = (r // WT) * BITS
    else:
        word = (kk * BITS) // 32
        sh = (kk * BITS) % 32
    mask = n_ok[:, None] & k_ok[None, :]
    wp = w_ptr + offs_n[:, None] * stride_wn + word[None, :]
    q = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh[None, :].to(tl.uint32)
    if BITS == 3:
        straddle = (sh > 29) & k_ok
        hi = tl.load(wp + 1, mask=n_ok[:, None] & straddle[None, :], other=0)
        q = q | (hi.to(tl.uint32, bitcast=True) << ((32 - sh) % 32)[None, :].to(tl.uint32))
    q = q & ((1 << BITS) - 1)
    v = _decode(q, lut_ptr, DECODE)
    if SCALE_ROW:
        g = k0 // G
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        v = v * (s * SCALE_MUL)[:, None]
        if AFFINE:
            b = tl.load(b_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            v = v + b[:, None]
    else:
        sp = offs_n[:, None] * stride_sn + (kk // G)[None, :]
        s = tl.load(s_ptr + sp, mask=mask, other=0.0).to(tl.float32)
        v = v * (s * SCALE_MUL)
        if AFFINE:
            v = v + tl.load(b_ptr + sp, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, v, 0.0)


@triton.jit(do_not_specialize=["M"])
def gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, lut_ptr, bias_ptr, y_ptr,
    M, N, K,
    G,  # group length (K when per-channel)
    K_PER_SPLIT,  # inputs each split-K program reduces (a multiple of BLOCK_K)
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_MUL: tl.constexpr, INTERLEAVED: tl.constexpr, WT: tl.constexpr,
    SCALE_ROW: tl.constexpr,  # G % BLOCK_K == 0 (or per-channel): one scale per row per tile
    FP32_DOT: tl.constexpr,  # float32 activations: exact (non-TF32) dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # M tiles that run next to each other on one weight tile (L2 reuse)
    SPLIT_K: tl.constexpr,  # >1: fp32 partial tiles are atomically added into y (fp32)
):
    """``y = x @ W_hat.T (+ bias)``: each K step dequantizes a ``[BLOCK_N, BLOCK_K]`` weight
    tile in registers (scale applied, rounded to the activation dtype) and feeds it with the
    ``[BLOCK_M, BLOCK_K]`` activation tile to ``tl.dot`` (tensor cores, fp32 accumulator)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):  # past K all loads are masked
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, b_ptr, lut_ptr, offs_n, n_ok, k0, offs_k, K, G,
                          stride_wn, stride_sn, BITS, DECODE, AFFINE, SCALE_MUL, INTERLEAVED, WT,
                          SCALE_ROW)
        if FP32_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (pid_k == 0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dequant_kernel(
    w_ptr, s_ptr, b_ptr, lut_ptr, out_ptr,
    N, K, G, stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, SCALE_MUL: tl.constexpr,
    INTERLEAVED: tl.constexpr, WT: tl.constexpr, SCALE_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[N, K] = W_hat`` in ``out``'s dtype (the large-M path feeds it to cuBLAS)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k0 = pid_k * BLOCK_K
    w = _dequant_tile(w_ptr, s_ptr, b_ptr, lut_ptr, offs_n, n_ok, k0, offs_k, K, G,
                      stride_wn, stride_sn, BITS, DECODE, AFFINE, SCALE_MUL, INTERLEAVED, WT,
                      SCALE_ROW)
    kk = k0 + offs_k
    tl.store(out_ptr + offs_n[:, None] * stride_on + kk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (kk < K)[None, :])
