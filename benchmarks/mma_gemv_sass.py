"""Count the SASS instructions of the tensor-core GEMV's step loop on Hopper (sm_90).

The warp-specialized TMA-fed kernel (``mma_gemv_tma_kernel``, docs/CUDA.md §3.2) is compiled
ahead of time for sm_90 with Triton's bundled ptxas and disassembled with its cuobjdump, as
``gemv_sass.py`` does for the CUDA-core GEMV: no GPU is needed. One step is 128 inputs of the
program's 128 features, 4096 weights for each of the 4 compute warps. The longest loop is the
compute warps' step loop.

    python benchmarks/mma_gemv_sass.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import write_atomic  # noqa: E402
from gemv_sass import loop_instructions  # noqa: E402

from metal_marlin_torch.ops.cuda import mma_gemv  # noqa: E402

WARPS, STAGES = 4, 4  # the default configuration


def descriptor(dtype: str, block: list[int], bits: int) -> str:
    """Triton's signature string of an unswizzled TMA descriptor (what the launcher passes)."""
    return (f"tensordesc<{dtype}[{', '.join(map(str, block))}],NVMMASharedLayout("
            f"swizzle_byte_width=0, element_bitwidth={bits}, rank={len(block)}, "
            f"transposed=False, fp4_padded=False, cga_layout=[])>")


def compile_tma_gemv(e2m1: bool, fp16: bool) -> bytes:
    act = "fp16" if fp16 else "bf16"
    sig = dict(w_desc=descriptor("i32", [2 * WARPS, 16, 16], 32),
               x_desc=descriptor(act, [8, 128], 16),
               s_desc=descriptor(act, [1, 32 * WARPS], 16),
               b_desc=descriptor(act, [1, 32 * WARPS], 16),
               bias_ptr="*" + act, y_ptr="*" + act, ws_ptr="*fp32", cnt_ptr="*i32", M="i32",
               N="i32", K="i32", stride_ym="i32", STEPS_PER_SPLIT="i32", SPG="i32", MAGIC="i32",
               FP16="constexpr", NW="constexpr", SPLIT_K="constexpr", HAS_BIAS="constexpr",
               STAGES="constexpr", E2M1="constexpr", SCALE_MUL="constexpr")
    consts = dict(FP16=fp16, NW=WARPS, SPLIT_K=1, HAS_BIAS=False, STAGES=STAGES, E2M1=e2m1,
                  SCALE_MUL=2.0**14 if e2m1 else 1.0)
    src = GluonASTSource(fn=mma_gemv.mma_gemv_tma_kernel, signature=sig, constexprs=consts,
                         attrs={})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=WARPS))
    return compiled.asm["cubin"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    rows = []
    for name, e2m1 in (("int4", False), ("fp4", True)):
        for act, fp16 in (("bf16", False), ("fp16", True)):
            total, loop, registers, spills = loop_instructions(compile_tma_gemv(e2m1, fp16))
            rows.append({"format": name, "activations": act, "sass_total": total,
                         "step_loop": loop, "weights_per_warp_per_step": 4096,
                         "registers": registers, "spill_stores": spills})
            print(f"{name:4s} {act}: SASS {total:4d}, step loop {loop:4d} (4096 weights a warp), "
                  f"{registers} registers, {spills} spill stores")
    result = {"kernel": "mma_gemv_tma_kernel", "target": "sm_90", "triton": triton.__version__,
              "warps": WARPS, "stages": STAGES, "rows": rows}
    write_atomic(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
