"""Triton kernels of ``marlin::gemm`` on CUDA: a fused dequantize-GEMV for small M, a tiled
dequantize-GEMM on the tensor cores for larger M (plus ``gemm_pairs_kernel``, its 4-bit form
that takes the weight as the MMA's A operand and decodes two codes per 32-bit operation), and a
dequantize kernel (for the very large M path: dequantize once into a temporary, then cuBLAS).

All of them read the weight in the *K-major* layout made once per weight at load time
(docs/CUDA.md, :func:`..dispatch.prepare_cuda_weight`): the canonical ``uint32 [N, KW]`` of
docs/FORMAT.md made K-major inside blocks of 16 features, ``[ceil(N / 16), KW, 16]`` (scales
and biases transposed to ``[n_groups, N]``), 4-bit words with their codes in *pair order*
(:func:`_slot`). Word ``w`` of row ``n`` moves to ``[n // 16, w, n % 16]`` (:func:`_wptr`), so
consecutive output features are adjacent in memory and a block's K walk is one contiguous
stream: a thread loads one 16-byte vector
holding the same word of 4 rows, decodes the word's codes for all 4 rows, and shares each
activation value (loaded and converted once) between them; a warp's loads are coalesced
along N.

Decoding (``DECODE``) is one of these branch-free paths, each giving the code's value *before*
its group scale; the host folds any constant factor into ``SCALE_MUL``:

* ``DECODE_INT`` (affine ``int8/6/5/4/3/2``): the exact float of ``q`` by the 2^23 magic number
  (``bits(q | 0x4B000000) - 2^23``): one logic op and one add, where ``int -> float``
  conversion instructions run at an eighth of the FMA rate on Hopper. The GEMV decodes 2- and
  4-bit codes with one logic op each instead (:func:`_unit_field`).
* ``DECODE_E2M1`` (``fp4``, ``mxfp4``, ``nvfp4``): the three magnitude bits placed into an fp16's
  exponent and top mantissa bit and the sign bit into bit 15 give ``e2m1(q) / 2^14`` exactly
  (index 1 lands on the fp16 subnormal 2^-15); ``SCALE_MUL = 2^14`` restores it.
* ``DECODE_E4M3`` / ``DECODE_E5M2`` (``fp8_e4m3`` / ``fp8_e5m2``): the byte's exponent and
  mantissa placed into an fp16 (E4M3: value / 2^8, subnormals included; E5M2 is fp16's top
  byte, exact). E4M3's two NaN codes (0x7F, 0xFF) decode as +-480 instead of NaN; the quantizer
  never writes them.
* ``DECODE_LUT`` (``nf4``, ``nf3``, the generic path for any other format): ``lut[q]`` from a
  float32 table of ``2^bits`` entries that stays in L1.

Accumulation is float32 throughout; group scales (and the affine biases, as
``b * sum(x)``) are applied once per group per row, outside the per-code loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

DECODE_INT = 0  # value = q                      (affine: scale * q + bias)
DECODE_E2M1 = 1  # value = e2m1(q) / 2^14         (SCALE_MUL = 2^14)
DECODE_LUT = 2  # value = lut[q]
DECODE_E4M3 = 3  # value = e4m3(q) / 2^8          (SCALE_MUL = 2^8)
DECODE_E5M2 = 4  # value = e5m2(q)                (fp16's top byte)
N_BLOCK = tl.constexpr(16)  # features per block of the K-major weight (layout.N_BLOCK)


@triton.jit
def _wptr(w_ptr, rows, cols, ROWS):
    """Pointers to word rows ``rows`` of features ``cols`` (broadcast together) in the
    blocked K-major weight ``int32 [ceil(N / 16), ROWS, 16]`` (layout.k_major)."""
    return w_ptr + (cols // N_BLOCK) * (ROWS * N_BLOCK) + rows * N_BLOCK + cols % N_BLOCK


@triton.jit
def _decode(q, lut_ptr, DECODE: tl.constexpr):
    """float32 value of uint32 codes ``q`` before the group scale (see the module docstring)."""
    if DECODE == 0:
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif DECODE == 1:
        h = ((q & 7) << 9) | ((q & 8) << 12)
        v = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    elif DECODE == 3:
        h = ((q & 0x7F) << 7) | ((q & 0x80) << 8)
        v = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    elif DECODE == 4:
        v = (q << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        v = tl.load(lut_ptr + q.to(tl.int32))
    return v


@triton.jit
def _ld(ptrs, mask, EVEN: tl.constexpr):
    """``ptrs`` loaded under ``mask`` (zero where false), or unmasked when ``EVEN``."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _slot(w, C: tl.constexpr, BITS: tl.constexpr):
    """Code slot ``C`` of K-major words ``w`` (bits 2, 4, 8) as an integer.

    Slot ``C`` sits at bit ``C * BITS``, except that 4-bit words hold their 8 codes in *pair
    order* (``layout.pair_order``: even slots in the low half, odd slots in the high half) so
    that ``(w >> 4j) & 0x000F000F`` is the pair (2j, 2j + 1). (A jit function, not a
    ``constexpr_function``: Triton's cache key covers jit callees, not constexpr functions.)
    """
    if BITS == 4:
        SH: tl.constexpr = (C % 2) * 16 + (C // 2) * 4
    else:
        SH: tl.constexpr = C * BITS
    return (w >> SH) & ((1 << BITS) - 1)


@triton.jit
def _e2m1_slot(w, C: tl.constexpr):
    """float32 ``e2m1(code) / 2^14`` of slot ``C`` of 4-bit pair-order words ``w``.

    Decodes the slot's pair (2j, 2j + 1) at once: ``(w >> 4j) & 0x000F000F`` holds both codes,
    one shift-and-mask per field places both magnitudes into fp16 exponent / mantissa bits and
    both signs into bit 15 of their half. Slots 2j and 2j + 1 compute the same pair (the
    compiler keeps one copy), then take their half: ~2.5 ops per code instead of ~4.
    """
    t = (w >> ((C // 2) * 4)) & 0x000F000F
    h = ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
    if C % 2 == 1:
        h = h >> 16
    return (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int_field(w, C: tl.constexpr, BITS: tl.constexpr):
    """float32 value of code slot ``C`` of words ``w`` (2/4/8-bit integer codes) in two ops.

    The field is masked in place (no shift) and OR-ed into the mantissa of 2^23, giving
    ``2^23 + q * 2^SH``; one FMA by ``2^-SH`` minus ``2^(23-SH)`` returns ``q`` exactly. Fields
    that would reach bit 23 (the exponent) are taken from ``w >> 12`` instead.
    """
    if BITS == 4:  # pair order, see _slot
        SH0: tl.constexpr = (C % 2) * 16 + (C // 2) * 4
    else:
        SH0: tl.constexpr = C * BITS
    if SH0 + BITS <= 23:
        SH: tl.constexpr = SH0
        src = w
    else:
        SH: tl.constexpr = SH0 - 12
        src = w >> 12
    f = ((src & (((1 << BITS) - 1) << SH)) | 0x4B000000).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << SH)) - (8388608.0 / (1 << SH))


@triton.jit
def _unit_word(w0, w1, w2, w3, w4, w5, T: tl.constexpr):
    """Word ``T`` (0..5) of a unit (constexpr selection: no data movement)."""
    if T == 0:
        r = w0
    elif T == 1:
        r = w1
    elif T == 2:
        r = w2
    elif T == 3:
        r = w3
    elif T == 4:
        r = w4
    else:
        r = w5
    return r


@triton.jit
def _code_of_unit(w0, w1, w2, w3, w4, w5, C: tl.constexpr, BITS: tl.constexpr):
    """Code ``C`` (0..31) of a unit of 32 codes in ``BITS`` words (3, 5 or 6 bits). A code
    whose field crosses a word boundary (3-bit codes 10 and 21; 5-bit 6, 12, 19, 25; 6-bit 5,
    10, 21, 26) takes its high bits from the next word; the last code ends on the unit's end."""
    SH: tl.constexpr = (C * BITS) % 32
    A: tl.constexpr = (C * BITS) // 32
    q = _unit_word(w0, w1, w2, w3, w4, w5, A) >> SH
    if SH > 32 - BITS:
        q = q | (_unit_word(w0, w1, w2, w3, w4, w5, A + 1) << (32 - SH))
    return q & ((1 << BITS) - 1)


@triton.jit
def _load_word_rows(w_ptr, items, offs_n, ROWS, mask, T: tl.constexpr, BITS: tl.constexpr,
                    EVEN: tl.constexpr):
    """Words ``T`` of units ``items`` (``BITS`` words per unit) for rows ``offs_n``: [CH, BN]."""
    return _ld(_wptr(w_ptr, (items * BITS + T)[:, None], offs_n[None, :], ROWS), mask,
               EVEN).to(tl.uint32, bitcast=True)


@triton.jit
def _gemv_load(w_ptr, s_ptr, b_ptr, items, offs_n, n_ok, N, ROWS, ITEMS, IPG: tl.constexpr,
               BITS: tl.constexpr, AFFINE: tl.constexpr, EVEN: tl.constexpr):
    """One GEMV K step's loads: words ``[CH, BN]`` (``BITS`` of them for 3/5/6-bit units, the
    rest of the six repeat the first; 2/4/8 bits: one word, six times), float32 scales and
    biases (zeros when not affine)."""
    mask = (items < ITEMS)[:, None] & n_ok[None, :]
    sg = (items // IPG)[:, None] * N + offs_n[None, :]
    s = _ld(s_ptr + sg, mask, EVEN).to(tl.float32)
    if AFFINE:
        b = _ld(b_ptr + sg, mask, EVEN).to(tl.float32)
    else:
        b = tl.zeros_like(s)
    if BITS == 3 or BITS == 5 or BITS == 6:
        w0 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 0, BITS, EVEN)
        w1 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 1, BITS, EVEN)
        w2 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 2, BITS, EVEN)
        if BITS >= 5:
            w3 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 3, BITS, EVEN)
            w4 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 4, BITS, EVEN)
        else:
            w3 = w0
            w4 = w0
        if BITS == 6:
            w5 = _load_word_rows(w_ptr, items, offs_n, ROWS, mask, 5, BITS, EVEN)
        else:
            w5 = w0
    else:
        w0 = _ld(_wptr(w_ptr, items[:, None], offs_n[None, :], ROWS), mask, EVEN).to(
            tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
    return w0, w1, w2, w3, w4, w5, s, b


@triton.jit
def _gemv_row(acc, xs, xl, x_row, m_ok, v, kk, K, LO: tl.constexpr, EVEN: tl.constexpr,
              ROW_OK: tl.constexpr = False):
    """One code slot of one activation row: ``acc += x[kk] * v`` (x loaded once per item and
    shared by the BLOCK_N rows), and x added to the step's activation sum of the slot's class
    (``xl`` for the low class of :func:`_unit_field`, else ``xs``). ``ROW_OK``: the row is known
    to exist (one row per program), so the load needs no predicate and no zero fill (two
    instructions per activation at M = 1)."""
    if EVEN and ROW_OK:
        xc = tl.load(x_row + kk).to(tl.float32)
    elif EVEN:
        xc = tl.load(x_row + kk, mask=m_ok, other=0.0).to(tl.float32)  # [CH]
    else:
        xc = tl.load(x_row + kk, mask=m_ok & (kk < K), other=0.0).to(tl.float32)
    if LO:
        xl += xc
    else:
        xs += xc
    return acc + xc[:, None] * v, xs, xl


@triton.jit
def _gemv_fold(acc, p, xs, xl, s, b, UNIT: tl.constexpr, AFFINE: tl.constexpr,
               BITS: tl.constexpr):
    """``acc`` plus one K step of one activation row: the per-code sums ``p`` times the scales
    ``s``, plus ``b * sum(x)`` when affine. With :func:`_unit_field` codes ``p`` also holds the
    activations themselves (``x * (2^BITS + q)``, low class ``x * (4^BITS + q)``):
    ``2^BITS * xs + 4^BITS * xl`` is subtracted first, which leaves ``sum(x * q)``."""
    if UNIT:
        p = p - (xs * (1 << BITS) + xl * (1 << (2 * BITS)))[:, None]
        xs = xs + xl
    if AFFINE:
        return acc + p * s + xs[:, None] * b
    else:
        return acc + p * s


@triton.jit
def _unit_field(w, C: tl.constexpr, BITS: tl.constexpr, ONE_HI, ONE_LO):
    """float32 of code slot ``C`` (2 or 4-bit integer codes) as ``2^BITS + q`` (high class)
    or ``4^BITS + q`` (low class, ``BITS`` lower): one shift shared by two slots and one logic
    op per code, then the caller's FMA ``p += x * f``.

    The GEMV at M = 1 is bound by instruction issue, and the plain 2^23 magic number costs two
    logic ops (mask, then OR: a LOP3 takes one immediate) and an FMA per code before the
    product. Here the field is moved to the top of the mantissa (bits ``23 - BITS``, or
    ``23 - 2 * BITS`` for the slots whose shift is then shared with their neighbour: pair order
    puts slots ``2j + 1`` and ``2j + 2`` 4 bits apart) and OR-ed into the exponent of 2^BITS
    or 4^BITS: the mantissa then counts units of 1, so the value is the code plus a power of
    two and the scale needs no extra factor (one multiply per scale less than ``1 + q / 2^BITS``).
    ``ONE_HI`` / ``ONE_LO`` come in as run-time registers so that ptxas fuses mask and OR
    into one LOP3. ``x * f`` is exact (8 + 9 significant bits); the activation part
    ``2^BITS x`` (``4^BITS x``) is subtracted once per step (:func:`_gemv_fold`), leaving
    ``q * x`` to ~2^-17 relative (fp32 accumulation of 8 terms of similar size), far below
    bf16 rounding.
    """
    if BITS == 4:  # pair order, see _slot
        SH0: tl.constexpr = (C % 2) * 16 + (C // 2) * 4
    else:
        SH0: tl.constexpr = C * BITS
    if (SH0 // BITS) % 2 == 0:
        T: tl.constexpr = 23 - BITS
        one = ONE_HI
    else:
        T: tl.constexpr = 23 - 2 * BITS
        one = ONE_LO
    if T >= SH0:
        src = w << (T - SH0)
    else:
        src = w >> (SH0 - T)
    return ((src & (((1 << BITS) - 1) << T)) | one).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_step(w0, w1, w2, w3, w4, w5, items, x0, stride_xm, ok0, ok1, ok2, ok3, lut_ptr, K, ONE_HI, ONE_LO,
               BITS: tl.constexpr, DECODE: tl.constexpr, UNIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr,
               EVEN: tl.constexpr):
    """One K step of the GEMV on the words ``w0`` (``w1`` .. ``w5``: the rest of a 3/5/6-bit unit) of
    ``items``: every code decoded once and multiplied by the activation of each of the
    BLOCK_M rows at ``x0`` (rows ``stride_xm`` apart). Returns the per-code sums ``p*`` and the
    activation sums ``xs*`` / ``xl*`` of each row (:func:`_gemv_fold` takes them)."""
    CPI: tl.constexpr = 32 if (32 % BITS) != 0 else 32 // BITS  # codes per item
    w = w0
    p0 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    p1 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    p2 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    p3 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    xs0 = tl.zeros([CH], dtype=tl.float32)
    xs1 = tl.zeros([CH], dtype=tl.float32)
    xs2 = tl.zeros([CH], dtype=tl.float32)
    xs3 = tl.zeros([CH], dtype=tl.float32)
    xl0 = tl.zeros([CH], dtype=tl.float32)
    xl1 = tl.zeros([CH], dtype=tl.float32)
    xl2 = tl.zeros([CH], dtype=tl.float32)
    xl3 = tl.zeros([CH], dtype=tl.float32)
    for c in tl.static_range(CPI):
        # the slot's class in _unit_field (pair order puts slots 2j, 2j + 1 at bits 4j, 16 + 4j)
        LO = UNIT and (c // (BITS // 2)) % 2 == 1
        if (32 % BITS) != 0:  # 3, 5, 6 bits: a unit of 32 codes in BITS words
            v = _decode(_code_of_unit(w0, w1, w2, w3, w4, w5, c, BITS), lut_ptr, DECODE)
        elif UNIT:
            v = _unit_field(w, c, BITS, ONE_HI, ONE_LO)
        elif DECODE == 0:
            v = _int_field(w, c, BITS)
        elif DECODE == 1 and BITS == 4:
            v = _e2m1_slot(w, c)
        else:
            v = _decode(_slot(w, c, BITS), lut_ptr, DECODE)  # [CH, BN]
        kk = items * CPI + c
        if not EVEN:
            ok_k = kk < K
            v = tl.where(ok_k[:, None], v, 0.0)  # padding codes of a per-channel row
        p0, xs0, xl0 = _gemv_row(p0, xs0, xl0, x0, ok0, v, kk, K, LO, EVEN, BLOCK_M == 1)
        if BLOCK_M > 1:
            p1, xs1, xl1 = _gemv_row(p1, xs1, xl1, x0 + stride_xm, ok1, v, kk, K, LO, EVEN)
        if BLOCK_M > 2:
            p2, xs2, xl2 = _gemv_row(p2, xs2, xl2, x0 + 2 * stride_xm, ok2, v, kk, K, LO,
                                     EVEN)
            p3, xs3, xl3 = _gemv_row(p3, xs3, xl3, x0 + 3 * stride_xm, ok3, v, kk, K, LO,
                                     EVEN)
    return p0, p1, p2, p3, xs0, xs1, xs2, xs3, xl0, xl1, xl2, xl3


@triton.jit(do_not_specialize=["M"])
def gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, lut_ptr, bias_ptr, y_ptr,
    ws_ptr, cnt_ptr,  # split-K: fp32 workspace [SPLIT_K, M, N], int32 tile counters (zeros)
    M, N, K,
    ITEMS,  # items per row: words (bits 2, 4, 8) or BITS-word units (bits 3, 5, 6)
    IPG: tl.constexpr,  # items per scale group (ITEMS when per-channel): a constant, so the
    #                     group of an item is a shift (16 for group 128), not an integer division
    #                     (one compile per group size; per-channel weights: one per K)
    CHUNKS_PER_SPLIT,  # chunks of CH items each split-K program reduces
    stride_xm, stride_ym,
    ONE,  # 0x3F800000, the bits of 1.0, as a run-time value (see _unit_field)
    BITS: tl.constexpr,  # code width: 2, 3, 4, 5, 6 or 8
    DECODE: tl.constexpr,  # DECODE_*
    AFFINE: tl.constexpr,  # biases present: w = s * v + b
    HAS_BIAS: tl.constexpr,  # layer bias [N]
    SCALE_MUL: tl.constexpr,  # constant folded into every scale (2^14 for E2M1, 2^8 for E4M3)
    BLOCK_M: tl.constexpr,  # activation rows per program: 1, 2 or 4 (each decoded code reused)
    BLOCK_N: tl.constexpr,  # output features per program
    CH: tl.constexpr,  # items per K step
    SPLIT_K: tl.constexpr,  # >1: K split over programs, reduced through the workspace
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and the chunks cover K exactly: no masks
):
    """``y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])`` for 1, 2 or 4 rows ``m``, K-major weight.

    A program owns BLOCK_N output features and walks K in steps of CH items (words, or
    ``BITS``-word units of 32 codes), a ``[CH, BLOCK_N]`` tile of words per step. The codes of a word are
    unrolled; each code's activation is loaded once per item and multiplies the decoded code of
    every row the thread holds. Per-code partial sums are scaled once per (item, row) at the end
    of the step; the affine bias enters as ``b * sum(x)``. The activation rows are separate
    accumulators (a 3rd tensor dimension would make Triton move every decoded code through
    shared memory).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    UNIT: tl.constexpr = DECODE == 0 and (BITS == 4 or BITS == 2)  # _unit_field decode
    ONE_HI = ONE + (BITS << 23)  # bits of 2^BITS
    ONE_LO = ONE + ((2 * BITS) << 23)  # bits of 4^BITS

    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, CH)
    n_ok = offs_n < N
    x0 = x_ptr + m0 * stride_xm
    ok0 = m0 < M
    ok1 = m0 + 1 < M
    ok2 = m0 + 2 < M
    ok3 = m0 + 3 < M

    acc0 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([CH, BLOCK_N], dtype=tl.float32)
    c_lo = pid_k * CHUNKS_PER_SPLIT
    c_last = c_lo + CHUNKS_PER_SPLIT - 1
    if (32 % BITS) != 0:
        ROWS = ITEMS * BITS  # word rows of the weight
    else:
        ROWS = ITEMS
    # software prefetch: step i+1's words and scales are loaded before step i is decoded, so
    # each warp has a load in flight while it computes (measured: loads and ALU work added up
    # without it)
    w0n, w1n, w2n, w3n, w4n, w5n, sn, bn = _gemv_load(
        w_ptr, s_ptr, b_ptr, c_lo * CH + offs_i, offs_n, n_ok, N, ROWS, ITEMS, IPG, BITS, AFFINE,
        EVEN)
    for chunk in range(c_lo, c_lo + CHUNKS_PER_SPLIT):  # past the row end all loads are masked
        items = chunk * CH + offs_i  # [CH]
        w0 = w0n
        w1 = w1n
        w2 = w2n
        w3 = w3n
        w4 = w4n
        w5 = w5n
        s = sn * SCALE_MUL
        b = bn
        nxt = tl.minimum(chunk + 1, c_last) * CH + offs_i  # the last step reloads itself
        w0n, w1n, w2n, w3n, w4n, w5n, sn, bn = _gemv_load(
            w_ptr, s_ptr, b_ptr, nxt, offs_n, n_ok, N, ROWS, ITEMS, IPG, BITS, AFFINE, EVEN)
        p0, p1, p2, p3, xs0, xs1, xs2, xs3, xl0, xl1, xl2, xl3 = _gemv_step(
            w0, w1, w2, w3, w4, w5, items, x0, stride_xm, ok0, ok1, ok2, ok3, lut_ptr, K, ONE_HI, ONE_LO,
            BITS, DECODE, UNIT, BLOCK_M, BLOCK_N, CH, EVEN)
        acc0 = _gemv_fold(acc0, p0, xs0, xl0, s, b, UNIT, AFFINE, BITS)
        if BLOCK_M > 1:
            acc1 = _gemv_fold(acc1, p1, xs1, xl1, s, b, UNIT, AFFINE, BITS)
        if BLOCK_M > 2:
            acc2 = _gemv_fold(acc2, p2, xs2, xl2, s, b, UNIT, AFFINE, BITS)
            acc3 = _gemv_fold(acc3, p3, xs3, xl3, s, b, UNIT, AFFINE, BITS)

    bias = _layer_bias(bias_ptr, offs_n, n_ok, HAS_BIAS)
    y_row = y_ptr + m0 * stride_ym + offs_n
    ok0 = n_ok & ok0
    ok1 = n_ok & ok1
    ok2 = n_ok & ok2
    ok3 = n_ok & ok3
    if SPLIT_K == 1:
        tl.store(y_row, (tl.sum(acc0, axis=0) + bias).to(y_ptr.dtype.element_ty), mask=ok0)
        if BLOCK_M > 1:
            tl.store(y_row + stride_ym, (tl.sum(acc1, axis=0) + bias).to(y_ptr.dtype.element_ty),
                     mask=ok1)
        if BLOCK_M > 2:
            tl.store(y_row + 2 * stride_ym,
                     (tl.sum(acc2, axis=0) + bias).to(y_ptr.dtype.element_ty), mask=ok2)
            tl.store(y_row + 3 * stride_ym,
                     (tl.sum(acc3, axis=0) + bias).to(y_ptr.dtype.element_ty), mask=ok3)
    else:  # partial rows to the workspace [SPLIT_K, M, N]; the last program sums (_split_arrive)
        ws_stride = M * N
        ws_row = ws_ptr + pid_k * ws_stride + m0 * N + offs_n
        tl.store(ws_row, tl.sum(acc0, axis=0), mask=ok0)
        if BLOCK_M > 1:
            tl.store(ws_row + N, tl.sum(acc1, axis=0), mask=ok1)
        if BLOCK_M > 2:
            tl.store(ws_row + 2 * N, tl.sum(acc2, axis=0), mask=ok2)
            tl.store(ws_row + 3 * N, tl.sum(acc3, axis=0), mask=ok3)
        if _split_arrive(cnt_ptr, pid_m * tl.num_programs(0) + pid_n, SPLIT_K):
            ws_row = ws_ptr + m0 * N + offs_n
            y0 = _split_sum(ws_row, ok0, ws_stride, SPLIT_K)
            tl.store(y_row, (y0 + bias).to(y_ptr.dtype.element_ty), mask=ok0)
            if BLOCK_M > 1:
                y1 = _split_sum(ws_row + N, ok1, ws_stride, SPLIT_K)
                tl.store(y_row + stride_ym, (y1 + bias).to(y_ptr.dtype.element_ty), mask=ok1)
            if BLOCK_M > 2:
                y2 = _split_sum(ws_row + 2 * N, ok2, ws_stride, SPLIT_K)
                tl.store(y_row + 2 * stride_ym, (y2 + bias).to(y_ptr.dtype.element_ty), mask=ok2)
                y3 = _split_sum(ws_row + 3 * N, ok3, ws_stride, SPLIT_K)
                tl.store(y_row + 3 * stride_ym, (y3 + bias).to(y_ptr.dtype.element_ty), mask=ok3)


@triton.jit
def _layer_bias(bias_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr):
    """float32 layer bias of features ``offs_n`` (zeros without one)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(offs_n.shape, dtype=tl.float32)
    return bias


@triton.jit
def _split_arrive(cnt_ptr, tile, SPLIT_K: tl.constexpr):
    """Count this split-K program in for its output tile; True in the one that arrives last.

    Split-K without extra launches (no zeroed fp32 output, no atomics on data, no cast kernel):
    every program of a tile writes its fp32 partial to the workspace, then bumps the tile's
    counter. The barrier orders all threads' partial stores before that one acq_rel atomic
    (release: the partials are visible GPU-wide before the count is); the last program's
    acquire makes every other partial visible to it. It resets the counter to 0 for the next
    launch on the stream, so the counters are zeroed once, when allocated.
    """
    tl.debug_barrier()
    seen = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = seen == SPLIT_K - 1
    if last:
        tl.store(cnt_ptr + tile, 0)
    return last


@triton.jit
def _split_sum(ws_ptrs, mask, ws_stride, SPLIT_K: tl.constexpr):
    """Sum of the SPLIT_K fp32 partials at ``ws_ptrs + s * ws_stride``, in split order (the
    result does not depend on which program finished first). ``.cg`` reads L2, never a line
    this SM's L1 may hold from before the other programs wrote it."""
    tot = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        tot += tl.load(ws_ptrs + s * ws_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return tot


@triton.jit
def _store_tile(y_ptrs, acc, bias, mask, ws_ptr, ws_offs, ws_stride, cnt_ptr, tile, pid_k,
                SPLIT_K: tl.constexpr):
    """Write ``acc + bias`` in the output's dtype; under split-K through the workspace
    (:func:`_split_arrive`): the last program of the tile sums the partials and stores."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, (acc + bias).to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * ws_stride + ws_offs, acc, mask=mask)
        if _split_arrive(cnt_ptr, tile, SPLIT_K):
            tot = _split_sum(ws_ptr + ws_offs, mask, ws_stride, SPLIT_K)
            tl.store(y_ptrs, (tot + bias).to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Tile indices (a, b) of program ``pid`` when GROUP consecutive a-tiles run next to each
    other over every b-tile: the b operand tile they share is read from DRAM once while it is
    resident in L2 (GEMM "grouped ordering")."""
    width = GROUP * num_b
    first = (pid // width) * GROUP
    rows = tl.minimum(num_a - first, GROUP)
    return first + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _dequant_tile(
    w_ptr, s_ptr, b_ptr, lut_ptr,
    offs_n, n_ok, k0, offs_k, N, K, G,
    ROWS,  # word rows of the weight
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, SCALE_MUL: tl.constexpr,
    SCALE_ROW: tl.constexpr,  # the tile [k0, k0 + BLOCK_K) lies inside one group
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN: tl.constexpr,  # K % BLOCK_K == 0 and N % BLOCK_N == 0: no masks
):
    """float32 ``W_hat[offs_n, k0 + offs_k]`` transposed: ``[BK, BN]``, zero outside W.

    Bits 2/4/8: the tile's ``BK * BITS / 32`` K-major word rows are loaded once (coalesced
    along N) and unpacked by shifting along a new middle axis of code slots, then reshaped to
    input order. Bits 3, 5, 6 (codes straddle words): each input row reads its word (and the
    next one for a code that crosses into it, e.g. 3-bit codes 10 and 21); inputs of one word
    read the same addresses, which L1 serves.
    """
    kk = k0 + offs_k
    k_ok = kk < K
    mask = k_ok[:, None] & n_ok[None, :]
    if (32 % BITS) != 0:
        word = (kk * BITS) // 32
        sh = (kk * BITS) % 32
        wp = _wptr(w_ptr, word[:, None], offs_n[None, :], ROWS)
        q = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh[:, None].to(tl.uint32)
        straddle = (sh > 32 - BITS) & k_ok
        hi = tl.load(wp + N_BLOCK, mask=straddle[:, None] & n_ok[None, :], other=0)  # next row
        q = q | (hi.to(tl.uint32, bitcast=True) << ((32 - sh) % 32)[:, None].to(tl.uint32))
    else:
        # the tile's distinct words [BK / CPW, BN], unpacked along a middle axis of code slots
        CPW: tl.constexpr = 32 // BITS
        offs_w = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
        wmask = (offs_w * CPW < K)[:, None] & n_ok[None, :]
        wv = _ld(_wptr(w_ptr, offs_w[:, None], offs_n[None, :], ROWS), wmask, EVEN)
        slots = tl.arange(0, CPW)
        if BITS == 4:  # pair order (docs/CUDA.md): slot c at bit 16 * (c % 2) + 4 * (c // 2)
            shifts = ((slots % 2) * 16 + (slots // 2) * 4).to(tl.uint32)
        else:
            shifts = (slots * BITS).to(tl.uint32)
        q = wv.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]
        q = tl.reshape(q, [BLOCK_K, BLOCK_N])  # row k = word * CPW + slot: input order
    q = q & ((1 << BITS) - 1)
    v = _decode(q, lut_ptr, DECODE)
    if SCALE_ROW:
        g = k0 // G
        s = _ld(s_ptr + g * N + offs_n, n_ok, EVEN).to(tl.float32)
        v = v * (s * SCALE_MUL)[None, :]
        if AFFINE:
            b = _ld(b_ptr + g * N + offs_n, n_ok, EVEN).to(tl.float32)
            v = v + b[None, :]
    else:
        sp = (kk // G)[:, None] * N + offs_n[None, :]
        s = _ld(s_ptr + sp, mask, EVEN).to(tl.float32)
        v = v * (s * SCALE_MUL)
        if AFFINE:
            v = v + _ld(b_ptr + sp, mask, EVEN).to(tl.float32)
    if not EVEN:
        v = tl.where(mask, v, 0.0)
    return v


@triton.jit(do_not_specialize=["M"])
def gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, lut_ptr, bias_ptr, y_ptr,
    ws_ptr, cnt_ptr,  # split-K: fp32 workspace [SPLIT_K, M, N], int32 tile counters (zeros)
    M, N, K,
    ROWS,  # word rows of the weight
    G,  # group length (K when per-channel)
    K_PER_SPLIT,  # inputs each split-K program reduces (a multiple of BLOCK_K)
    stride_xm, stride_ym,
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_MUL: tl.constexpr,
    SCALE_ROW: tl.constexpr,  # G % BLOCK_K == 0 (or per-channel): one scale per feature per tile
    FP32_DOT: tl.constexpr,  # float32 activations: exact (non-TF32) dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # M tiles that run next to each other on one weight tile (L2 reuse)
    SPLIT_K: tl.constexpr,  # >1: K split over programs, reduced through the workspace
    EVEN: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0, N % BLOCK_N == 0: weight loads unmasked
):
    """``y = x @ W_hat.T (+ bias)``: each K step dequantizes a ``[BLOCK_K, BLOCK_N]`` weight
    tile in registers (scale applied, rounded to the activation dtype) and feeds it with the
    ``[BLOCK_M, BLOCK_K]`` activation tile to ``tl.dot`` (tensor cores, fp32 accumulator)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

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
        w = _dequant_tile(w_ptr, s_ptr, b_ptr, lut_ptr, offs_n, n_ok, k0, offs_k, N, K, G,
                          ROWS, BITS, DECODE, AFFINE, SCALE_MUL, SCALE_ROW, BLOCK_K, BLOCK_N, EVEN)
        if FP32_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    _store_tile(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                _layer_bias(bias_ptr, offs_n, n_ok, HAS_BIAS)[None, :],
                m_ok[:, None] & n_ok[None, :], ws_ptr, offs_m[:, None] * N + offs_n[None, :],
                M * N, cnt_ptr, pid, pid_k, SPLIT_K)


@triton.jit
def dequant_kernel(
    w_ptr, s_ptr, b_ptr, lut_ptr, out_ptr,
    N, K, ROWS, G,
    LD_S,  # row stride of the scales / biases (the layer's N; larger for a slice of features)
    LD_OUT,  # row stride of out (N; larger when writing a slice of a wider W_hat^T)
    BITS: tl.constexpr, DECODE: tl.constexpr, AFFINE: tl.constexpr, SCALE_MUL: tl.constexpr,
    SCALE_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,  # K % BLOCK_K == 0 and N % BLOCK_N == 0: no masks
    OUT_NK: tl.constexpr = False,  # write W_hat [N, K] (rows LD_OUT apart) instead of W_hat^T
):
    """``out[K, N] = W_hat.T`` in ``out``'s dtype (the large-M path multiplies it with cuBLAS);
    ``OUT_NK``: ``out[N, K] = W_hat``, nn.Linear's weight layout.

    A slice of features ``[n0, n0 + N)`` (a multiple of 16 from n0) dequantizes with the weight
    pointer at block ``n0 / 16``, the scale / bias pointers at column ``n0`` (``LD_S`` the
    layer's N) and ``out`` at its own slice buffer (:func:`dispatch.dequant_slice`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k0 = pid_k * BLOCK_K
    w = _dequant_tile(w_ptr, s_ptr, b_ptr, lut_ptr, offs_n, n_ok, k0, offs_k, LD_S, K, G,
                      ROWS, BITS, DECODE, AFFINE, SCALE_MUL, SCALE_ROW, BLOCK_K, BLOCK_N, EVEN)
    kk = k0 + offs_k
    if OUT_NK:
        ptrs = out_ptr + offs_n[None, :] * LD_OUT + kk[:, None]
    else:
        ptrs = out_ptr + kk[:, None] * LD_OUT + offs_n[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=(kk < K)[:, None] & n_ok[None, :])


# ---- 4-bit GEMM (int4, E2M1): the weight as the MMA's A operand, two codes per 32-bit op ---

# Packed decode of one int4 pair word (two codes as 16-bit 128 + q / 1024 + q, gemm_pairs_kernel):
# one exact packed FMA removes the offset, one applies the group's scale and bias, both in
# bf16x2 / f16x2 (scale and bias rounded to the activation dtype first: the fast, less exact
# option ``GemmConfig.asm``).
_PAIR_BF16 = tl.constexpr("""{
.reg .b32 v, sb, bb, one, off;
mov.b32 one, 0x3F803F80;
mov.b32 off, 0xC300C300;
fma.rn.bf16x2 v, $1, one, off;
mov.b32 sb, {$2, $2};
mov.b32 bb, {$3, $3};
fma.rn.bf16x2 $0, v, sb, bb;
}""")
_PAIR_FP16 = tl.constexpr("""{
.reg .b32 v, sb, bb, off;
mov.b32 off, 0x64006400;
sub.f16x2 v, $1, off;
mov.b32 sb, {$2, $2};
mov.b32 bb, {$3, $3};
fma.rn.f16x2 $0, v, sb, bb;
}""")


@triton.jit
def _pairs_a_tile(wv, s, b, DECODE: tl.constexpr, FP16: tl.constexpr, ASM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """K-major 4-bit words ``wv [BLOCK_N, BLOCK_K / 8]`` (pair order, docs/CUDA.md) -> the A
    tile ``[BLOCK_N, BLOCK_K]`` of the dequantized weight in the activation dtype, inputs in K
    order. ``s``, ``b``: float32 ``[BLOCK_N]`` scale (SCALE_MUL folded in) and bias of the tile.

    ``(w >> 4j) & 0x000F000F`` holds codes 2j and 2j + 1 of the word in its two 16-bit halves:
    exactly the pair of consecutive inputs one 32-bit register of an MMA A fragment holds. The
    halves are decoded, joined along a new minor axis and reshaped to input order; Triton keeps
    that in registers (no shared-memory round trip: the packed words are what the pipeline
    stages). Affine int4 (``DECODE_INT``): see the branches. E2M1 (``DECODE_E2M1``): both
    halves at once, magnitude bits into an fp16's exponent / mantissa and the sign to bit 15
    (value / 2^14, as :func:`_decode`), then float32 ``v * s``.
    """
    dt: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    shifts = tl.arange(0, 4) * 4
    t = (wv[:, :, None] >> shifts[None, None, :]) & 0x000F000F  # [BN, BK / 8, 4]
    s3 = s[:, None, None]
    if DECODE == 1:  # E2M1 pairs: fp16 bits of value / 2^14 in each half
        h = ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
        vl = (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        vh = (h >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        lo = (vl * s3).to(dt)
        hi = (vh * s3).to(dt)
    elif ASM:
        si = tl.broadcast_to(s.to(dt).to(tl.int16, bitcast=True)[:, None, None],
                             [BLOCK_N, BLOCK_K // 8, 4])
        bi = tl.broadcast_to(b.to(dt).to(tl.int16, bitcast=True)[:, None, None],
                             [BLOCK_N, BLOCK_K // 8, 4])
        magic = 0x64006400 if FP16 else 0x43004300  # 1024 + q (fp16), 128 + q (bf16)
        v = tl.inline_asm_elementwise(_PAIR_FP16 if FP16 else _PAIR_BF16, "=r,r,h,h",
                                      [t | magic, si, bi], dtype=tl.int32, is_pure=True, pack=1)
        lo = v.to(tl.int16).to(dt, bitcast=True)
        hi = (v >> 16).to(tl.int16).to(dt, bitcast=True)
    else:
        if FP16:  # q by the 2^23 magic number (the subtraction is exact, 2^23 * s would not be)
            ql = ((t & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            qh = ((t >> 16) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            b3 = b[:, None, None]
        else:  # bf16 128 + q in each half; a half's bits in a float32's top half: one op each
            t = t | 0x43004300
            ql = (t << 16).to(tl.float32, bitcast=True)
            qh = (t & 0xFFFF0000).to(tl.float32, bitcast=True)
            b3 = (b - 128.0 * s)[:, None, None]
        lo = (ql * s3 + b3).to(dt)
        hi = (qh * s3 + b3).to(dt)
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])


@triton.jit(do_not_specialize=["M"])
def gemm_pairs_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    ws_ptr, cnt_ptr,  # split-K: fp32 workspace [SPLIT_K, M, N], int32 tile counters (zeros)
    M, N, K,
    KW,  # word rows of the weight
    G,  # group length (K when per-channel); a multiple of BLOCK_K, or K
    K_PER_SPLIT,  # inputs each split-K program reduces (a multiple of BLOCK_K)
    stride_xm, stride_ym,
    DECODE: tl.constexpr,  # DECODE_INT (affine int4) or DECODE_E2M1 (fp4, mxfp4, nvfp4)
    AFFINE: tl.constexpr,  # biases present (int4)
    SCALE_MUL: tl.constexpr,  # constant folded into every scale (2^14 for E2M1)
    HAS_BIAS: tl.constexpr,
    FP16: tl.constexpr,  # activations fp16 (else bf16)
    ASM: tl.constexpr,  # int4: packed bf16x2 / f16x2 decode (else float32 FMA per code)
    BLOCK_M: tl.constexpr,  # activation rows per tile (the MMA's N)
    BLOCK_N: tl.constexpr,  # output features per tile (the MMA's M: 64 per warpgroup on Hopper)
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,  # weight tiles whose M tiles run next to each other (L2 reuse)
    SPLIT_K: tl.constexpr,
    EVEN: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0, N % BLOCK_N == 0: weight loads unmasked
):
    """``y = x @ W_hat.T (+ bias)`` for 4-bit codes (affine int4, E2M1), bf16/fp16 activations,
    computed as ``y^T = W_hat @ x^T``: the weight is the MMA's A operand.

    Why A: Hopper's wgmma (and mma.sync) take A from registers, so the tile decoded in
    registers goes straight into the MMA; as the B operand it would be written to shared memory
    and read back for every tile. The pipeline stages only the packed words (4 bits per weight)
    and the activation tile in shared memory. Each K step loads ``[BLOCK_N, BLOCK_K / 8]``
    K-major words, decodes two codes per 32-bit operation (:func:`_pairs_a_tile`: a tile lies in
    one scale group, so the scale and bias are one value per feature) and multiplies with the
    ``[BLOCK_K, BLOCK_M]`` activation tile, fp32 accumulation.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # GROUP_N consecutive weight tiles run together over every M tile
    pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_cols = x_ptr + offs_m[None, :] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):  # past K all loads are masked
        wr = k0 // 8 + offs_w
        wv = _ld(_wptr(w_ptr, wr[None, :], offs_n[:, None], KW),
                 (wr < KW)[None, :] & n_ok[:, None], EVEN).to(tl.uint32, bitcast=True)
        kk = k0 + offs_k
        xa = tl.load(x_cols + kk[:, None], mask=m_ok[None, :] & (kk < K)[:, None], other=0.0)
        sg = (k0 // G) * N + offs_n
        s = _ld(s_ptr + sg, n_ok & (k0 < K), EVEN).to(tl.float32) * SCALE_MUL
        if AFFINE:
            b = _ld(b_ptr + sg, n_ok & (k0 < K), EVEN).to(tl.float32)
        else:
            b = tl.zeros_like(s)
        acc = tl.dot(_pairs_a_tile(wv, s, b, DECODE, FP16, ASM, BLOCK_N, BLOCK_K), xa, acc)
    _store_tile(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc,
                _layer_bias(bias_ptr, offs_n, n_ok, HAS_BIAS)[:, None],
                m_ok[None, :] & n_ok[:, None], ws_ptr, offs_m[None, :] * N + offs_n[:, None],
                M * N, cnt_ptr, pid, pid_k, SPLIT_K)
