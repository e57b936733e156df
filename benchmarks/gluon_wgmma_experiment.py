"""Experiment (round 5): a Gluon wgmma GEMM for int4 / E2M1 at M >= 128, timed against dense bf16
and the shipped kernels. Not a shipped path: faster than the shipped one only at M = 256 and on
one shape at M = 128, and without a layer bias or tests (docs/CUDA.md §3.1).

docs/CUDA.md §5 named Gluon (``triton.experimental.gluon``, shipped with Triton 3.6) as the way to
what ``tl.dot`` hides: an asynchronous wgmma whose K step overlaps the decode of the next one.
This kernel is that attempt. The weight is the MMA's A operand (``y^T = W_hat @ x^T``), decoded
from the K-major pair-order words of ``prepare_cuda_weight`` (docs/CUDA.md §1) with the pair
decode of ``gemm_pairs_kernel``; the layouts are written out (``pair_layout``) so that the
decoded pairs *are* the wgmma A fragment, which ``convert_layout(assert_trivial=True)`` checks
at compile time. One cp.async ring stages the activation tile and the packed words.

Two ways to hand the decoded tile to the tensor cores (``a_from_smem``):

- ``0``, registers: the A fragment goes to wgmma from registers and each step waits for its
  wgmma (``num_outstanding=0``). An asynchronous variant (wait for all but one) gave wrong
  results on the H100: the sm_90 SASS took the same physical registers (R88-R103) for the A operand of every step
  while one wgmma was still in flight, so the next decode overwrote the operand under it. The
  wait's ``deps`` keep the 16-bit values alive, not the packed 32-bit operand registers.
- ``1``, shared memory: each step stores the decoded tile to a double-buffered NVMMA-swizzled
  buffer and issues the wgmma asynchronously (one left in flight), so decode of step i + 1
  overlaps the MMA of step i. Correct, and no faster than the shipped path at M = 128 and 512:
  Nsight Compute at 4096 x 14336, M = 512 (256 x 128 tile, 3 stages) put the tensor pipe at 46%
  active, one CTA an SM (240 registers), 0.41 eligible warps a scheduler, stalls mostly on long
  scoreboard, and 0.93 M shared-store bank conflicts from the A tile stores.

    python benchmarks/gluon_wgmma_experiment.py --json out.json \\
        --configs "128,1,64,4,1,0;256,2,64,4,1,1" --m 128,256,512

A configuration is ``block_m,warpgroups,block_k,stages,split_k,a_from_smem``: activation rows a
tile (the wgmma N), warpgroups (64 weight rows each), inputs a K step, ring stages, K splits
(reduced in the kernel through the split-K workspace of the shipped kernels), A operand source.
Needs a Hopper GPU; the kernel requires K % block_k == 0 and N % (64 * warpgroups) == 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import LLAMA_SHAPES, copies_for, cuda_sweep_meta, max_rel_error, nbytes, time_cuda, write_atomic  # noqa: E402

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.ops.cuda import dispatch as D  # noqa: E402
from metal_marlin_torch.ops.cuda.layout import DECODE_E2M1, DECODE_INT  # noqa: E402
from metal_marlin_torch.ops.cuda.mma_gemv import store_split  # noqa: E402


@gluon.constexpr_function
def _log2(v):
    return v.bit_length() - 1


@gluon.constexpr_function
def pair_layout(WG, W):
    """[BLOCK_N, W, 4] int32 pair fields laid out so that join(lo, hi) + reshape is the wgmma
    A fragment (kWidth 2) of a [64 * WG, 8 * W] tile."""
    reg = [[8, 0, 0]] + [[0, 1 << i, 0] for i in range(_log2(W))]
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(_log2(4 * WG))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [64 * WG, W, 4])


@gluon.constexpr_function
def words_smem_layout(WG, W):
    """The same words as pair_layout's [BLOCK_N, W] slice, addressed [block, word, j] as the
    K-major weight stores them (row = 16 block + j)."""
    reg = [[0, 0, 8]] + [[0, 1 << i, 0] for i in range(_log2(W))]
    lane = [[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]]
    warp = [[1 << i, 0, 0] for i in range(_log2(4 * WG))]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [4 * WG, W, 16])


@gluon.jit
def _decode_pairs(wv, s, b, L3: gl.constexpr, DECODE: gl.constexpr, FP16: gl.constexpr):
    """Pair-order words [BLOCK_N, W] -> [BLOCK_N, W, 4, 2] weights: kernels._pairs_a_tile's
    decode (int4: bf16 128 + q in each half, one FMA with b - 128 s; E2M1: fp16 bits of
    value / 2^14, 2^14 folded into the scale)."""
    dt: gl.constexpr = gl.float16 if FP16 else gl.bfloat16
    shifts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3))) * 4
    t = (gl.expand_dims(wv, 2) >> gl.expand_dims(gl.expand_dims(shifts, 0), 0)) & 0x000F000F
    s3 = gl.expand_dims(gl.expand_dims(s, 1), 2)
    if DECODE == 1:
        h = ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
        vl = (h & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        vh = (h >> 16).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        lo = (vl * s3).to(dt)
        hi = (vh * s3).to(dt)
    else:
        t = t | 0x43004300
        ql = (t << 16).to(gl.float32, bitcast=True)
        qh = (t & 0xFFFF0000).to(gl.float32, bitcast=True)
        b3 = gl.expand_dims(gl.expand_dims(b - 128.0 * s, 1), 2)
        lo = (ql * s3 + b3).to(dt)
        hi = (qh * s3 + b3).to(dt)
    return gl.join(lo, hi)


@gluon.jit
def _issue_step(xs, wsm, x_rows, xm_ok, offs_xk, w_tile, j, K, n_steps,
                BLOCK_K: gl.constexpr, W: gl.constexpr, STAGES: gl.constexpr):
    """cp.async of step j's activation tile and packed words into ring buffer j % STAGES; the
    words of a tile are 4 WG runs of W * 64 contiguous bytes in the K-major layout."""
    jj = gl.minimum(j, n_steps - 1)  # past the end: reload the last step (never consumed)
    async_copy.async_copy_global_to_shared(xs.index(j % STAGES), x_rows + jj * BLOCK_K,
                                           xm_ok & gl.expand_dims(offs_xk + jj * BLOCK_K < K, 0))
    async_copy.async_copy_global_to_shared(wsm.index(j % STAGES), w_tile + jj * (W * 16))
    async_copy.commit_group()


@gluon.jit
def wgmma_pairs_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, KW, stride_xm, stride_ym, STEPS_PER_SPLIT,
    DECODE: gl.constexpr, SCALE_MUL: gl.constexpr, FP16: gl.constexpr, IPG: gl.constexpr,
    BLOCK_M: gl.constexpr, WG: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    SPLIT_K: gl.constexpr, A_SMEM: gl.constexpr,
):
    BLOCK_N: gl.constexpr = 64 * WG
    W: gl.constexpr = BLOCK_K // 8
    NW: gl.constexpr = 4 * WG
    dt: gl.constexpr = gl.float16 if FP16 else gl.bfloat16
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    L3: gl.constexpr = pair_layout(WG, W)
    LW: gl.constexpr = gl.SliceLayout(2, L3)
    LN: gl.constexpr = gl.SliceLayout(1, LW)
    WSL: gl.constexpr = words_smem_layout(WG, W)
    # cp.async of the words: [4 WG blocks, W, 16] int32, 16 bytes a thread
    WCL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 8, 4], [NW, 1, 1], [2, 1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // W, W], [NW, 1], [1, 0])
    x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dt)
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    n_steps = gl.cdiv(K, BLOCK_K)
    s0 = pid_k * STEPS_PER_SPLIT
    steps = gl.minimum(n_steps - s0, STEPS_PER_SPLIT)

    # word tile of step 0 of this split: blocks 4 WG pid_n + b, words s0 W + w, lane j
    cb = gl.arange(0, 4 * WG, layout=gl.SliceLayout(1, gl.SliceLayout(2, WCL)))
    cw = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, WCL)))
    cj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, WCL)))
    w_tile = (w_ptr + gl.expand_dims(gl.expand_dims((pid_n * 4 * WG + cb) * (KW * 16), 1), 2)
              + gl.expand_dims(gl.expand_dims((s0 * W + cw) * 16, 0), 2)
              + gl.expand_dims(gl.expand_dims(cj, 0), 1))
    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
    offs_xk = s0 * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    x_rows = x_ptr + gl.expand_dims(offs_xm * stride_xm, 1) + gl.expand_dims(offs_xk, 0)
    xm_ok = gl.expand_dims(offs_xm < M, 1)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=LN)

    xs = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, BLOCK_K], x_sl)
    wsm = gl.allocate_shared_memory(gl.int32, [STAGES, 4 * WG, W, 16], w_sl)
    if A_SMEM:  # decoded A tiles, double-buffered: wgmma i - 1 may still read the other one
        a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dt)
        asm_ = gl.allocate_shared_memory(dt, [2, BLOCK_N, BLOCK_K], a_sl)
    # the ring runs STAGES - 2 steps ahead: buffer (i - 2) % STAGES is refilled in step i, once
    # wgmma i - 2 has retired (one wgmma stays in flight), so STAGES >= 3
    for j in gl.static_range(STAGES - 2):
        _issue_step(xs, wsm, x_rows, xm_ok, offs_xk, w_tile, j, K, steps,
                    BLOCK_K, W, STAGES)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    s = gl.load(s_ptr + (s0 // IPG) * N + offs_n).to(gl.float32) * SCALE_MUL
    if DECODE == 0:
        b = gl.load(b_ptr + (s0 // IPG) * N + offs_n).to(gl.float32)
    else:
        b = s
    for i in range(steps):
        # this thread's copies of step i are done; fence them for the async proxy (wgmma), then a
        # barrier: everyone's copies of step i are visible, and every warpgroup has retired its
        # wgmma i - 2 (waited at the end of step i - 1), so buffer (i - 2) % STAGES is free.
        async_copy.wait_group(STAGES - 3)
        fence_async_shared()
        gl.thread_barrier()
        _issue_step(xs, wsm, x_rows, xm_ok, offs_xk, w_tile, i + STAGES - 2,
                    K, steps, BLOCK_K, W, STAGES)
        # the words come out of shared memory already in the A fragment's thread order (4 lanes
        # share a word, each takes its own pair): both conversions are checked to be free
        wv = wsm.index(i % STAGES).load(WSL).permute((0, 2, 1)).reshape([BLOCK_N, W])
        wv = gl.convert_layout(wv, LW, assert_trivial=True).to(gl.uint32, bitcast=True)
        a = gl.reshape(_decode_pairs(wv, s, b, L3, DECODE, FP16), [BLOCK_N, BLOCK_K])
        if A_SMEM:
            asm_.index(i % 2).store(a)
            fence_async_shared()
            gl.thread_barrier()
        else:
            a = gl.convert_layout(a, a_l, assert_trivial=True)
        # scale / bias of step i + 1 loaded a step ahead (used by the next decode)
        g = (s0 + gl.minimum(i + 1, steps - 1)) // IPG
        s = gl.load(s_ptr + g * N + offs_n).to(gl.float32) * SCALE_MUL
        if DECODE == 0:
            b = gl.load(b_ptr + g * N + offs_n).to(gl.float32)
        else:
            b = s
        if A_SMEM:
            acc = warpgroup_mma(asm_.index(i % 2), xs.index(i % STAGES).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        else:  # registers: ptxas reuses A's registers under an async wgmma, so wait for it
            acc = warpgroup_mma(a, xs.index(i % STAGES).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    async_copy.wait_group(0)
    offs_on = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    mask = gl.expand_dims(offs_om < M, 0) & gl.expand_dims(offs_on < N, 1)
    yp = y_ptr + gl.expand_dims(offs_om * stride_ym, 0) + gl.expand_dims(offs_on, 1)
    wo = gl.expand_dims(offs_om * N, 0) + gl.expand_dims(offs_on, 1)
    store_split(yp, acc, 0.0, mask, ws_ptr, wo, M * N, cnt_ptr,
                pid_n * gl.num_programs(0) + pid_m, pid_k, SPLIT_K)

def launch(x2: torch.Tensor, pw: D.PreparedWeight, block_m: int = 128, wg: int = 1,
           block_k: int = 64, stages: int = 4, split: int = 1, a_smem: int = 1,
           y: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 [M, K] @ W_hat.T`` on a prepared int4 / E2M1 weight (no layer bias)."""
    m, k = x2.shape
    n = pw.out_features
    if pw.kfmt.bits != 4 or pw.kfmt.decode not in (DECODE_INT, DECODE_E2M1):
        raise ValueError(f"launch: the kernel decodes affine int4 and E2M1 codes only, got a "
                         f"{pw.kfmt.bits}-bit weight with decode {pw.kfmt.decode}")
    if k % block_k or n % (64 * wg) or pw.group % block_k:
        raise ValueError(f"launch: needs K % block_k == 0, N % {64 * wg} == 0 and the group a "
                         f"multiple of block_k; got K={k}, N={n}, group={pw.group}")
    if y is None:
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    n_steps = triton.cdiv(k, block_k)
    per = triton.cdiv(n_steps, split)
    split = triton.cdiv(n_steps, per)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64 * wg), split)
    ws, cnt = D._split_args(y, split, grid[0] * grid[1])
    biases = pw.biases if pw.biases is not None else pw.scales
    wgmma_pairs_kernel[grid](
        x2, pw.weight, pw.scales, biases, y, ws, cnt, m, n, k, pw.weight.shape[1],
        x2.stride(0), y.stride(0), per, DECODE=pw.kfmt.decode, SCALE_MUL=pw.kfmt.scale_mul,
        FP16=x2.dtype == torch.float16, IPG=pw.group // block_k,
        BLOCK_M=block_m, WG=wg, BLOCK_K=block_k, STAGES=stages, SPLIT_K=split,
        A_SMEM=bool(a_smem), num_warps=4 * wg)
    return y


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="128,1,64,4,1,0;128,1,128,3,2,0;256,2,64,4,1,0;"
                   "128,2,64,5,1,1;256,2,64,4,1,1;256,2,64,5,1,1;128,1,64,5,2,1")
    p.add_argument("--m", default="128,256,512")
    p.add_argument("--formats", default="int4")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("gluon_wgmma_experiment: needs a Hopper (sm_90) GPU")
    cfgs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    torch.manual_seed(0)
    rows = []
    for fmt in args.formats.split(","):
        for k, n in LLAMA_SHAPES:
            qt = F.quantize(torch.randn(n, k, device="cuda") * 0.02, fmt, args.group)

            def prep(qt=qt, fmt=fmt, k=k):
                return D.prepare_cuda_weight(qt.weight.clone(), qt.scales.clone(),
                                             None if qt.biases is None else qt.biases.clone(),
                                             qt.global_scale, fmt, args.group, k)
            pws = [prep() for _ in range(copies_for(nbytes(prep().weight), "cuda"))]
            dense_w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                       for _ in range(max(2, len(pws) // 4))]
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = D.gemm_prepared(x, pws[0], path="dequant").float()
                dense = time_cuda([lambda w=w, x=x: x @ w.T for w in dense_w])
                shipped = time_cuda([lambda p=p, x=x: D.gemm_prepared(x, p) for p in pws])
                print(f"{fmt} {k}x{n} M={m}: dense {dense * 1e3:.1f} us, shipped "
                      f"{shipped * 1e3:.1f} us ({dense / shipped:.2f}x)", flush=True)
                for c in cfgs:
                    y = launch(x, pws[0], *c, y=torch.full((m, n), float("nan"), device="cuda",
                                                          dtype=torch.bfloat16)).float()
                    err = max_rel_error(y, ref)  # NaN if unwritten
                    t = time_cuda([lambda p=p, c=c, x=x: launch(x, p, *c) for p in pws])
                    print(f"   {c}: {t * 1e3:.1f} us ({dense / t:.2f}x), rel. error {err:.1e}",
                          flush=True)
                    rows.append(dict(format=fmt, k=k, n=n, m=m, config=list(c),
                                     dense_ms=dense, shipped_ms=shipped, ms=t,
                                     ratio_dense=dense / t, ratio_shipped=shipped / t,
                                     rel_error=err))
    meta = cuda_sweep_meta(group=args.group,
                           config_fields="block_m, warpgroups, block_k, stages, split_k, "
                                         "a_from_smem")
    write_atomic(args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
