"""Tensor-core GEMV for 2-8 activation rows of affine int4 (Gluon, ``mma.sync`` m16n8k16).

docs/CUDA.md §3.2. ``y^T = W_hat @ x^T`` with the weight as the MMA's A operand (16 features a
tile) and the activation rows as its B operand (n = 8 columns: rows 2-8 of x cost nothing
more than row 1). Written in Gluon (``triton.experimental.gluon``, Triton >= 3.6) because the
trick below needs the register layouts written out, which ``tl.dot`` does not allow.

**Each lane's own 16 bytes are its A fragment.** The K-major weight (docs/CUDA.md §1) holds word
``w`` of 16 consecutive features as one 64-byte run. A lane ``(g, tig)`` (``g = lane // 4``,
``tig = lane % 4``) loads one 16-byte vector: word ``4 r + tig`` of round ``r`` for features
``4 (g % 4) .. + 3`` of block ``2 warp + g // 4``; a warp's 32 loads are two contiguous
256-byte runs. ``mma.sync`` wants lane ``(g, tig)`` to hold A rows ``g`` and ``g + 8`` and
inputs ``2 tig, 2 tig + 1`` (and ``+ 8``) of each 16-input tile. Rather than moving words
between lanes, the kernel renames both sides: A row ``g`` is the lane's first feature and row
``g + 8`` its second (a second row tile takes features 3 and 4), and the 32 inputs of a round
are reordered inside the MMA so that tile position ``2 tig + h`` (``+ 8``) is code ``2 j + h``
of the lane's own word (``k' = 8 j + 2 tig + h``). The sum over K does not care about the
order; the activations are loaded in the same order (lane ``(g, tig)``: 8 consecutive
activations of row ``g``, one 16-byte vector). ``convert_layout(assert_trivial=True)`` checks
at compile time that the decoded tensor *is* the MMA operand: no shuffles, no shared memory.

**Two instructions per pair of weights.** In pair order (docs/CUDA.md §1)
``(w >> 4 j) & 0x000F000F`` holds codes ``2 j`` and ``2 j + 1`` in its two 16-bit halves; OR
``0x4300`` (bf16) / ``0x6400`` (fp16) into each half and they read as ``128 + q`` /
``1024 + q``, exact. The magic number comes in as a run-time value so that ptxas fuses mask and
OR into one LOP3 (an immediate would need two). These exact codes go into the MMA; the scale and
the affine bias are applied once per scale group to the fp32 partial sums:
``y += s * P + (b - 128 s) * X`` with ``X`` the group's activation sum, which one more MMA per
16-input tile computes with an all-ones A operand. Against the CUDA-core GEMV (4.4 SASS
instructions a weight at M = 1, docs/CUDA.md §2) the loop issues ~1.8 (236 for 4096 weights of
a warp), and the activation rows come free up to 8.

The K loop prefetches the next 128-input step in registers (words and activations); K is
split across programs (reduced in the kernel through the shared split-K workspace, as the
Triton kernels do) until the grid has about three programs an SM.

**TMA feed (sm_90, ``MmaGemvConfig.stages >= 2``: ``mma_gemv_tma_kernel``).** The same MMA
round, but every operand of a 128-input step comes into a ring of shared-memory stages by the
Hopper tensor memory accelerator: the program's ``2 NW`` weight blocks x 16 words (one box of
the ``[N / 16, KW, 16]`` weight), the step's ``[8, 128]`` activations (rows >= M are zero-filled
by the TMA: no masks), and the group's scale and bias rows. The kernel is warp-specialized: one
producer warp waits for a free stage (``empty`` mbarrier) and issues the four TMA copies
(``ready`` counts their bytes); the NW compute warps wait for ``ready``, read the stage, meet at
one named barrier and release it with one arrive. So the refill and the CTA barriers Triton
puts before every TMA issue stay off the compute warps' step chain. Lane reads from shared
memory follow the global-load pattern above (same 16-byte vectors, so the fragment trick is
unchanged). The scales are read in local feature order straight into the accumulator-row
layout (``_sb_layout``: a relabelling, checked like the operands). ``accx`` is computed for
all ``32 NW`` rows (the two A row tiles of ones give the same MMA, which ptxas merges) so no
layout conversion is needed per step. It also takes fp4 (``_e2m1_pairs``). Measured on the
H100 (benchmarks/results/sweep_h100_mma_gemv_ws.json): 15-45% faster than the register-fed
kernel at 2-8 rows, and ahead of the CUDA-core GEMV at M = 1 on 4096 x 14336.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import layout
from .dispatch import MmaGemvConfig
from .launch import launch as launch_kernel


@gluon.constexpr_function
def _log2(v):
    return v.bit_length() - 1


@gluon.constexpr_function
def _words_layout(NW):
    """[32 NW A rows, 4 words, 4 pairs]: A row ``16 NW rho + 16 warp + 8 half + g`` of lane
    ``(g, tig)`` holds word ``tig``; registers: half, rho (the lane's 4 features), then pair j."""
    reg = [[8, 0, 0], [16 * NW, 0, 0], [0, 0, 1], [0, 0, 2]]
    lane = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(_log2(NW))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [32 * NW, 4, 4])


@gluon.constexpr_function
def _acts_layout(NW):
    """[8 rows, 4 words, 8 inputs]: lane ``(g, tig)`` holds the 8 activations of row ``g`` under
    word ``tig``; every warp holds the same (warp bases zero)."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4]]
    lane = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[0, 0, 0] for _ in range(_log2(NW))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [8, 4, 8])


@gluon.constexpr_function
def _mma_layout(NW):
    """The accumulators' layout: ``mma.sync`` m16n8 tiles, NW warps stacked along the rows."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])


@gluon.jit
def _row_features(pid_n, NW: gl.constexpr, ROWL: gl.constexpr):
    """Output feature of each accumulator row of program ``pid_n`` (the renaming of the module
    docstring: row ``rho 16 NW + 16 warp + 8 half + g`` is feature ``16 (2 (pid_n NW + warp) +
    g // 4) + 4 (g % 4) + 2 rho + half``)."""
    rr = gl.arange(0, 32 * NW, layout=ROWL)
    rg = rr & 7
    return ((2 * (pid_n * NW + ((rr >> 4) % NW)) + (rg >> 2)) * 16 + 4 * (rg & 3)
            + 2 * (rr // (16 * NW)) + ((rr >> 3) & 1))


@gluon.jit
def _halves(t, FP16: gl.constexpr):
    """uint32 -> its two 16-bit halves as fp16 / bf16 (register halves: no instruction)."""
    if FP16:
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [t],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [t],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                           pack=1)
    return lo, hi


@gluon.jit
def _e2m1_pairs(t, FP16: gl.constexpr):
    """Pairs of E2M1 codes (``t``: codes ``2 j``, ``2 j + 1`` in the low nibbles of the two
    16-bit halves, sign in bit 3) -> the fp16 / bf16 bits of ``e2m1 / 2^14``, as the other E2M1
    kernels decode them (``SCALE_MUL = 2^14``). fp16: exponent and mantissa bits go to bits 9-11
    and the sign to bit 15, which *is* ``e2m1 / 2^14`` (code 1 lands on the subnormal 2^-15,
    exact in the MMA). bf16 has 3 fewer mantissa bits: at bits 6-8 the same bits read
    ``e2m1 / 2^126``, whose products with the activations would fall below float32's normal
    range inside the MMA, so one packed multiply by 2^112 (exact: a power of two, normal
    result) brings them to ``e2m1 / 2^14``."""
    if FP16:
        return ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
    bits = ((t & 0x00070007) << 6) | ((t & 0x00080008) << 12)
    return gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r",
                                     [bits, gl.full_like(bits, 0x77807780)], dtype=gl.uint32,
                                     is_pure=True, pack=1)


@gluon.jit
def _round(wv, xb, acc, accx, ones, shifts, magic, a_l: gl.constexpr, b_l: gl.constexpr,
           LW: gl.constexpr, NW: gl.constexpr, FP16: gl.constexpr, E2M1: gl.constexpr = False):
    """One round: 4 words (32 inputs) of 32 NW features into ``acc``; for affine int4 also the
    activation sums of the round into ``accx`` (A = ones; E2M1 has no bias, ``accx`` is
    returned as it came)."""
    R: gl.constexpr = 32 * NW
    # [warp, lane = (g, tig), (rho, half)] -> [A row, tig]: relabelling only (checked)
    wv = wv.reshape([NW, 8, 4, 2, 2]).permute((3, 0, 4, 1, 2)).reshape([R, 4])
    wv = gl.convert_layout(wv, LW, assert_trivial=True).to(gl.uint32, bitcast=True)
    t = gl.expand_dims(wv, 2) >> gl.expand_dims(gl.expand_dims(shifts, 0), 0)
    if E2M1:
        t = _e2m1_pairs(t, FP16)
    else:
        t = (t & 0x000F000F) | magic
    lo, hi = _halves(t, FP16)
    a = gl.join(lo, hi).permute((0, 2, 1, 3)).reshape([R, 32])  # k' = 8 j + 2 tig + h
    a = gl.convert_layout(a, a_l, assert_trivial=True)
    xk = xb.reshape([8, 4, 4, 2]).permute((2, 1, 3, 0)).reshape([32, 8])  # same k' order
    xk = gl.convert_layout(xk, b_l, assert_trivial=True)
    if E2M1:
        return mma_v2(a, xk, acc), accx
    return mma_v2(a, xk, acc), mma_v2(ones, xk, accx)


@gluon.jit
def store_split(yp, acc, add, mask, ws_ptr, wo, ws_stride, cnt_ptr, tile, pid_k,
                SPLIT_K: gl.constexpr):
    """Store ``acc + add`` to ``yp``; with split K (as kernels._store_tile) the partial goes to
    workspace slice ``pid_k`` (offsets ``wo``), and the program that bumps ``tile``'s counter
    last sums the slices in split order, adds ``add``, stores, and resets the counter."""
    if SPLIT_K == 1:
        gl.store(yp, (acc + add).to(yp.dtype.element_ty), mask=mask)
    else:
        gl.store(ws_ptr + pid_k * ws_stride + wo, acc, mask=mask)
        gl.thread_barrier()
        seen = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if seen == SPLIT_K - 1:
            gl.store(cnt_ptr + tile, 0)
            tot = gl.load(ws_ptr + wo, mask=mask, other=0.0, cache_modifier=".cg")
            for sk in gl.static_range(1, SPLIT_K):
                tot += gl.load(ws_ptr + sk * ws_stride + wo, mask=mask, other=0.0,
                               cache_modifier=".cg")
            gl.store(yp, (tot + add).to(yp.dtype.element_ty), mask=mask)


@gluon.jit
def _store_rows(y, feat, cols, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_ym, pid_n, pid_k,
                HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
    """The GEMVs' epilogue: accumulator row ``r`` is output feature ``feat[r]``, column ``c``
    activation row ``cols[c]``; add the layer bias, store (or split-K through the workspace)."""
    if HAS_BIAS:
        lb = gl.expand_dims(gl.load(bias_ptr + feat).to(gl.float32), 1)
    else:
        lb = gl.expand_dims(gl.zeros_like(feat).to(gl.float32), 1)
    mask = gl.expand_dims(cols < M, 0) & gl.expand_dims(feat < N, 1)
    yp = y_ptr + gl.expand_dims(cols * stride_ym, 0) + gl.expand_dims(feat, 1)
    wo = gl.expand_dims(cols * N, 0) + gl.expand_dims(feat, 1)
    store_split(yp, y, lb, mask, ws_ptr, wo, M * N, cnt_ptr, pid_n, pid_k, SPLIT_K)


@gluon.jit
def mma_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    ws_ptr, cnt_ptr,  # split-K: fp32 workspace [SPLIT_K, M, N], int32 counters (zeros)
    M, N, K, KW, stride_xm, stride_ym,
    GROUPS_PER_SPLIT,  # scale groups each split reduces
    SPG,  # 128-input steps a scale group
    MAGIC,  # 0x43004300 (bf16) / 0x64006400 (fp16), at run time: one LOP3 a pair
    FP16: gl.constexpr, NW: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
    PF: gl.constexpr,
):
    """``y[m, n] = sum_k x[m, k] * (s * q + b)[n, k] (+ bias[n])`` for ``M <= 8`` rows; one
    program: 32 NW features, the scale groups of its K split. See the module docstring."""
    OFF: gl.constexpr = 1024.0 if FP16 else 128.0
    R: gl.constexpr = 32 * NW
    mma: gl.constexpr = _mma_layout(NW)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    WLD: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [NW, 1, 1], [2, 1, 0])
    L3: gl.constexpr = _words_layout(NW)
    LW: gl.constexpr = gl.SliceLayout(2, L3)
    XL: gl.constexpr = _acts_layout(NW)
    ROWL: gl.constexpr = gl.SliceLayout(1, mma)
    COLL: gl.constexpr = gl.SliceLayout(0, mma)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    g0 = pid_k * GROUPS_PER_SPLIT
    groups = gl.minimum(K // (128 * SPG) - g0, GROUPS_PER_SPLIT)
    last = groups * SPG - 1  # the split's last 128-input step

    # the lane's 16 bytes of step 0, round 0: [warp, lane, 4 features]
    cw = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, WLD)))
    cl = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, WLD)))
    cr = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, WLD)))
    blk = 2 * (pid_n * NW + cw)
    lane_off = ((cl >> 4) * KW + (g0 * SPG * 16 + (cl & 3))) * 16 + 4 * ((cl >> 2) & 3)
    w_r0 = (w_ptr + gl.expand_dims(gl.expand_dims(blk * (KW * 16), 1), 2)
            + gl.expand_dims(gl.expand_dims(lane_off, 0), 2)
            + gl.expand_dims(gl.expand_dims(cr, 0), 1))
    # the lane's 8 activations of step 0, round 0: [row, word, input]; rows >= M not loaded
    # (their MMA columns are never stored)
    xn = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    xw = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    xe = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    x_r0 = (x_ptr + gl.expand_dims(gl.expand_dims(xn * stride_xm, 1), 2)
            + gl.expand_dims(gl.expand_dims((g0 * SPG * 16 + xw) * 8, 0), 2)
            + gl.expand_dims(gl.expand_dims(xe, 0), 1))
    x_ok = gl.expand_dims(gl.expand_dims(xn < M, 1), 2)

    feat = _row_features(pid_n, NW, ROWL)
    cols = gl.arange(0, 8, layout=COLL)

    ones = gl.full([16 * NW, 32], 1.0, x_ptr.dtype.element_ty, layout=a_l)
    shifts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))) * 4
    y = gl.zeros([R, 8], gl.float32, layout=mma)
    # register prefetch: words PF steps ahead, activations (L1 hits) one step ahead
    w0 = gl.load(w_r0)
    w1 = gl.load(w_r0 + 64)
    w2 = gl.load(w_r0 + 128)
    w3 = gl.load(w_r0 + 192)
    if PF == 2:
        w_r1 = w_r0 + gl.minimum(1, last) * 256
        w4 = gl.load(w_r1)
        w5 = gl.load(w_r1 + 64)
        w6 = gl.load(w_r1 + 128)
        w7 = gl.load(w_r1 + 192)
    x0 = gl.load(x_r0, mask=x_ok)
    x1 = gl.load(x_r0 + 32, mask=x_ok)
    x2 = gl.load(x_r0 + 64, mask=x_ok)
    x3 = gl.load(x_r0 + 96, mask=x_ok)
    st = 0
    for grp in range(groups):
        s = gl.load(s_ptr + (g0 + grp) * N + feat).to(gl.float32)
        b = gl.load(b_ptr + (g0 + grp) * N + feat).to(gl.float32)
        acc = gl.zeros([R, 8], gl.float32, layout=mma)
        accx = gl.zeros([16 * NW, 8], gl.float32, layout=mma)
        for _ in range(SPG):
            nxt = gl.minimum(st + 1, last)  # the last step reloads itself (never used)
            v0 = w0
            v1 = w1
            v2 = w2
            v3 = w3
            u0 = x0
            u1 = x1
            u2 = x2
            u3 = x3
            if PF == 2:
                w0 = w4
                w1 = w5
                w2 = w6
                w3 = w7
                wp = w_r0 + gl.minimum(st + 2, last) * 256
                w4 = gl.load(wp)
                w5 = gl.load(wp + 64)
                w6 = gl.load(wp + 128)
                w7 = gl.load(wp + 192)
            else:
                wp = w_r0 + nxt * 256
                w0 = gl.load(wp)
                w1 = gl.load(wp + 64)
                w2 = gl.load(wp + 128)
                w3 = gl.load(wp + 192)
            xp = x_r0 + nxt * 128
            x0 = gl.load(xp, mask=x_ok)
            x1 = gl.load(xp + 32, mask=x_ok)
            x2 = gl.load(xp + 64, mask=x_ok)
            x3 = gl.load(xp + 96, mask=x_ok)
            acc, accx = _round(v0, u0, acc, accx, ones, shifts, MAGIC, a_l, b_l, LW, NW, FP16)
            acc, accx = _round(v1, u1, acc, accx, ones, shifts, MAGIC, a_l, b_l, LW, NW, FP16)
            acc, accx = _round(v2, u2, acc, accx, ones, shifts, MAGIC, a_l, b_l, LW, NW, FP16)
            acc, accx = _round(v3, u3, acc, accx, ones, shifts, MAGIC, a_l, b_l, LW, NW, FP16)
            st += 1
        # X of the group for both A row tiles: [16 NW, 8] -> [32 NW, 8]
        xs = gl.convert_layout(gl.join(accx, accx).permute((2, 0, 1)).reshape([R, 8]), mma)
        y = y + acc * gl.expand_dims(s, 1) + xs * gl.expand_dims(b - OFF * s, 1)

    _store_rows(y, feat, cols, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_ym, pid_n, pid_k,
                HAS_BIAS, SPLIT_K)


@gluon.constexpr_function
def _wsmem_layout(NW):
    """[2 NW blocks, 4 words, 16 features] of a stage in shared memory, read as the global
    loads of ``mma_gemv_kernel`` do: lane ``(g, tig)`` of warp ``w`` gets word ``tig``, features
    ``4 ((lane >> 2) & 3) .. + 3`` of block ``2 w + lane // 16`` (one 16-byte vector)."""
    reg = [[0, 0, 1], [0, 0, 2]]
    lane = [[0, 1, 0], [0, 2, 0], [0, 0, 4], [0, 0, 8], [1, 0, 0]]
    warp = [[2 << i, 0, 0] for i in range(_log2(NW))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [2 * NW, 4, 16])


@gluon.constexpr_function
def _xsmem_layout(NW):
    """[8 rows, 32 inputs] of a stage's activations: lane ``(g, tig)`` gets the 8 inputs of
    row ``g`` under word ``tig`` (``_acts_layout`` flattened)."""
    reg = [[0, 1], [0, 2], [0, 4]]
    lane = [[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]]
    warp = [[0, 0] for _ in range(_log2(NW))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [8, 32])


@gluon.constexpr_function
def _sb_layout(NW):
    """[1, 32 NW] scales in local feature order ``f = 32 warp + 16 g2 + 8 g1 + 4 g0 + 2 rho +
    half`` (the renaming in the module docstring), held where ``SliceLayout(1, mma)`` holds the
    accumulator row ``rho 16 NW + 16 warp + 8 half + g`` of that feature."""
    reg = [[0, 1], [0, 2]]
    lane = [[0, 0], [0, 0], [0, 4], [0, 8], [0, 16]]
    warp = [[0, 32 << i] for i in range(_log2(NW))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [1, 32 * NW])


@gluon.jit
def _tma_step(w_desc, x_desc, s_desc, b_desc, w_s, x_s, sc_s, bi_s, bars, slot, step, SPG,
              pid_n, pred, NW: gl.constexpr, NBYTES: gl.constexpr, E2M1: gl.constexpr):
    """Start the TMA of 128-input ``step`` into stage ``slot``; its mbarrier completes when all
    ``NBYTES`` (zero-filled rows included) have landed."""
    bar = bars.index(slot)
    mbarrier.expect(bar, NBYTES, pred=pred)
    tma.async_copy_global_to_shared(w_desc, [2 * NW * pid_n, step * 16, 0], bar,
                                    w_s.index(slot), pred)
    tma.async_copy_global_to_shared(x_desc, [0, step * 128], bar, x_s.index(slot), pred)
    grp = step // SPG
    tma.async_copy_global_to_shared(s_desc, [grp, 32 * NW * pid_n], bar, sc_s.index(slot), pred)
    if not E2M1:
        tma.async_copy_global_to_shared(b_desc, [grp, 32 * NW * pid_n], bar, bi_s.index(slot),
                                        pred)


@gluon.jit
def _tma_producer(w_desc, x_desc, s_desc, b_desc, w_s, x_s, sc_s, bi_s, ready, empty, s0, nsteps,
                  SPG, pid_n, NW: gl.constexpr, NBYTES: gl.constexpr, E2M1: gl.constexpr,
                  STAGES: gl.constexpr):
    """The producer warp: waits for a stage to be released (``empty``; the first pass through
    the ring waits on the parity before a fresh barrier's, which returns at once), then starts
    its TMA (``ready`` counts the bytes)."""
    for c in range(nsteps):
        slot = c % STAGES
        mbarrier.wait(empty.index(slot), ((c // STAGES) & 1) ^ 1)
        _tma_step(w_desc, x_desc, s_desc, b_desc, w_s, x_s, sc_s, bi_s, ready, slot, s0 + c, SPG,
                  pid_n, True, NW, NBYTES, E2M1)


@gluon.jit
def _tma_consumer(w_s, x_s, sc_s, bi_s, ready, empty, nsteps, MAGIC, NW: gl.constexpr,
                  FP16: gl.constexpr, E2M1: gl.constexpr, SCALE_MUL: gl.constexpr,
                  STAGES: gl.constexpr):
    """The NW compute warps: per step, wait for its stage, run the four MMA rounds from shared
    memory, release the stage (one barrier of these warps, then one arrive), and apply the
    step's scale (and bias). Returns the fp32 partial sums ``[32 NW, 8]``."""
    OFF: gl.constexpr = 1024.0 if FP16 else 128.0
    R: gl.constexpr = 32 * NW
    dt: gl.constexpr = x_s.dtype
    mma: gl.constexpr = _mma_layout(NW)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    L3: gl.constexpr = _words_layout(NW)
    LW: gl.constexpr = gl.SliceLayout(2, L3)
    WS: gl.constexpr = _wsmem_layout(NW)
    XS: gl.constexpr = _xsmem_layout(NW)
    SB: gl.constexpr = _sb_layout(NW)
    ROWL: gl.constexpr = gl.SliceLayout(1, mma)
    ones = gl.full([R, 32], 1.0, dt, layout=a_l)
    shifts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))) * 4
    y = gl.zeros([R, 8], gl.float32, layout=mma)
    for c in range(nsteps):
        slot = c % STAGES
        mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
        wst = w_s.index(slot)
        xst = x_s.index(slot)
        acc = gl.zeros([R, 8], gl.float32, layout=mma)
        accx = gl.zeros([R, 8], gl.float32, layout=mma)
        for r in gl.static_range(4):
            # [2 NW, 4, 16] -> [warp, lane, 4 features] as the global loads of mma_gemv_kernel
            wv = wst.slice(4 * r, 4, dim=1).load(WS)
            wv = wv.reshape([NW, 2, 4, 4, 4]).permute((0, 1, 3, 2, 4)).reshape([NW, 32, 4])
            xb = xst.slice(32 * r, 32, dim=1).load(XS).reshape([8, 4, 8])
            acc, accx = _round(wv, xb, acc, accx, ones, shifts, MAGIC, a_l, b_l, LW, NW, FP16,
                               E2M1)
        s = sc_s.index(slot).load(SB).reshape([NW, 2, 2, 2, 2, 2]).permute((4, 0, 5, 1, 2, 3))
        s = gl.convert_layout(s.reshape([R]), ROWL, assert_trivial=True).to(gl.float32)
        if not E2M1:
            b = bi_s.index(slot).load(SB).reshape([NW, 2, 2, 2, 2, 2])
            b = b.permute((4, 0, 5, 1, 2, 3)).reshape([R])
            b = gl.convert_layout(b, ROWL, assert_trivial=True).to(gl.float32)
        gl.thread_barrier()  # these warps only (a named barrier): all have read the stage
        mbarrier.arrive(empty.index(slot), count=1)
        if E2M1:
            y = y + acc * gl.expand_dims(s * SCALE_MUL, 1)
        else:
            y = y + acc * gl.expand_dims(s, 1) + accx * gl.expand_dims(b - OFF * s, 1)
    return (y,)


@gluon.jit
def mma_gemv_tma_kernel(
    w_desc, x_desc, s_desc, b_desc,  # TMA: weight [N/16, KW, 16], x [M, K], scales, biases
    #                                  (E2M1: no biases; b_desc is s_desc, unused)
    bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_ym,
    STEPS_PER_SPLIT,  # 128-input steps each split reduces
    SPG,  # 128-input steps a scale group
    MAGIC,
    FP16: gl.constexpr, NW: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
    STAGES: gl.constexpr, E2M1: gl.constexpr, SCALE_MUL: gl.constexpr,
):
    """``mma_gemv_kernel`` fed by TMA through ``STAGES`` shared-memory stages, warp-specialized
    (module docstring): NW compute warps and one producer warp. Affine int4 or (``E2M1``) fp4
    codes times ``SCALE_MUL`` and the scale. The scale and bias are applied every step, so
    splits need not align to groups."""
    R: gl.constexpr = 32 * NW
    dt: gl.constexpr = x_desc.dtype
    mma: gl.constexpr = _mma_layout(NW)
    ROWL: gl.constexpr = gl.SliceLayout(1, mma)
    COLL: gl.constexpr = gl.SliceLayout(0, mma)
    NBYTES: gl.constexpr = (w_desc.block_type.nbytes + x_desc.block_type.nbytes
                            + s_desc.block_type.nbytes
                            + (0 if E2M1 else b_desc.block_type.nbytes))

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    s0 = pid_k * STEPS_PER_SPLIT
    nsteps = gl.minimum(K // 128 - s0, STEPS_PER_SPLIT)

    w_s = gl.allocate_shared_memory(gl.int32, [STAGES, 2 * NW, 16, 16], w_desc.layout)
    x_s = gl.allocate_shared_memory(dt, [STAGES, 8, 128], x_desc.layout)
    sc_s = gl.allocate_shared_memory(s_desc.dtype, [STAGES, 1, R], s_desc.layout)
    if E2M1:
        bi_s = sc_s  # no biases
    else:
        bi_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES, 1, R], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    # Warp specialization: the TMA issue (and its wait for a free stage) runs in its own warp,
    # off the compute warps' step chain; without it each step ended in a CTA barrier, the
    # refill and the barriers Triton adds before every TMA issue (5 a step), and one program
    # could not stream faster than ~10 GB/s (docs/CUDA.md §3.2).
    y = gl.warp_specialize([
        (_tma_consumer, (w_s, x_s, sc_s, bi_s, ready, empty, nsteps, MAGIC, NW, FP16, E2M1,
                         SCALE_MUL, STAGES)),
        (_tma_producer, (w_desc, x_desc, s_desc, b_desc, w_s, x_s, sc_s, bi_s, ready, empty, s0,
                         nsteps, SPG, pid_n, NW, NBYTES, E2M1, STAGES)),
    ], [1], [24])[0]

    feat = _row_features(pid_n, NW, ROWL)
    cols = gl.arange(0, 8, layout=COLL)
    _store_rows(y, feat, cols, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, stride_ym, pid_n, pid_k,
                HAS_BIAS, SPLIT_K)


def _tma_launch(x2, pw, bias, ws_cnt, cfg):
    """Host side of ``mma_gemv_tma_kernel``: the TMA descriptors (built per call: a cached
    descriptor would keep its tensor alive) and the grid."""
    m, k = x2.shape
    n = pw.out_features
    if x2.data_ptr() % 16 or x2.stride(0) % 8:  # TMA: 16-byte aligned base and rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    steps = k // 128
    per = -(-steps // max(1, min(cfg.split_k, steps)))
    split = -(-steps // per)
    nw = cfg.warps

    def plain(t, rank):  # unswizzled shared layout of t's element width
        return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * t.element_size(),
                                    rank=rank)

    w_desc = TensorDescriptor.from_tensor(pw.weight, [2 * nw, 16, 16], plain(pw.weight, 3))
    x_desc = TensorDescriptor.from_tensor(x2, [8, 128], plain(x2, 2))
    # scales and biases in their stored dtype (float32, bf16 or fp16)
    s_desc = TensorDescriptor.from_tensor(pw.scales, [1, 32 * nw], plain(pw.scales, 2))
    e2m1 = pw.kfmt.decode == layout.DECODE_E2M1  # else affine int4 (dispatch: eligible)
    b_desc = s_desc if e2m1 else TensorDescriptor.from_tensor(pw.biases, [1, 32 * nw],
                                                              plain(pw.biases, 2))
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (n // (32 * nw), split)
    ws, cnt = ws_cnt(y, split, grid[0])
    fp16 = x2.dtype == torch.float16
    launch_kernel(
        mma_gemv_tma_kernel, grid, w_desc, x_desc, s_desc, b_desc, bias if bias is not None else pw.scales, y, ws, cnt,
        m, n, k, y.stride(0), per, pw.group // 128, 0x64006400 if fp16 else 0x43004300,
        FP16=fp16, NW=nw, SPLIT_K=split, HAS_BIAS=bias is not None, STAGES=cfg.stages,
        E2M1=e2m1, SCALE_MUL=pw.kfmt.scale_mul, num_warps=nw)
    return y


def launch(x2: torch.Tensor, pw, bias: torch.Tensor | None, ws_cnt,
           cfg: MmaGemvConfig) -> torch.Tensor:
    """``x2 [M, K] @ W_hat.T (+ bias)`` on a prepared affine int4 weight (``eligible``);
    ``ws_cnt(y, split, tiles)`` gives the split-K workspace and counters."""
    m, k = x2.shape
    n = pw.out_features
    group = pw.group
    if (cfg.warps not in (1, 2, 4, 8) or n % (32 * cfg.warps) or cfg.prefetch not in (1, 2)
            or cfg.stages not in (0, 2, 3, 4, 5, 6, 7, 8)
            or (cfg.stages and cfg.warps not in (4, 8))):
        raise ValueError(f"MmaGemvConfig: warps must be 1, 2, 4 or 8 with N % (32 warps) == 0, "
                         f"prefetch 1 or 2 and stages 0 or 2-8 (with stages, 4 or 8 warps: "
                         f"warp specialization wants whole warpgroups); got {cfg} for N={n}")
    if cfg.stages:
        return _tma_launch(x2, pw, bias, ws_cnt, cfg)
    n_groups = k // group
    per = -(-n_groups // max(1, min(cfg.split_k, n_groups)))
    split = -(-n_groups // per)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (n // (32 * cfg.warps), split)
    ws, cnt = ws_cnt(y, split, grid[0])
    fp16 = x2.dtype == torch.float16
    launch_kernel(
        mma_gemv_kernel, grid, x2, pw.weight, pw.scales, pw.biases, bias if bias is not None else pw.scales, y,
        ws, cnt, m, n, k, pw.weight.shape[1], x2.stride(0), y.stride(0), per, group // 128,
        0x64006400 if fp16 else 0x43004300,
        FP16=fp16, NW=cfg.warps, SPLIT_K=split, HAS_BIAS=bias is not None, PF=cfg.prefetch,
        num_warps=cfg.warps)
    return y
