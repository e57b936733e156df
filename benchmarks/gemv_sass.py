"""Count the SASS instructions of the M = 1 GEMV's K loop on Hopper (sm_90), per weight.

The M = 1 GEMV is bound by instruction issue as much as by memory, so its loop length is the
number that decode changes move. The kernel is compiled ahead of time for sm_90 with Triton's
bundled ptxas and disassembled with its cuobjdump: no GPU is needed.

    python benchmarks/gemv_sass.py --json out.json                        # the current kernels
    python benchmarks/gemv_sass.py --json old.json --kernels old/kernels.py --label round2

``--kernels`` takes another version of ``metal_marlin_torch/ops/cuda/kernels.py`` (e.g. from
``git show REV:metal_marlin_torch/ops/cuda/kernels.py``); the signature is built from the
kernel's own parameter list, so older versions compile too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import write_atomic  # noqa: E402

POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "b_ptr": "*bf16",
            "lut_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}
RUNTIME_NOT_ALIGNED = {"M", "CHUNKS_PER_SPLIT", "IPG"}  # values that need not be multiples of 16
# (format, DECODE, AFFINE, SCALE_MUL): the 4-bit formats of the M = 1 targets and a table format
FORMATS = [("int4", 0, True, 1.0), ("fp4", 1, False, 2.0**14), ("nf4", 2, False, 1.0)]
BLOCK_N, CH, WARPS = 16, 128, 8  # the M = 1 default tile of the int / E2M1 formats


def load_kernels(path: str | None):
    if path is None:
        from metal_marlin_torch.ops.cuda import kernels
        return kernels
    spec = importlib.util.spec_from_file_location("kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_gemv(kernels, decode: int, affine: bool, scale_mul: float,
                 maxnreg: int | None = None) -> bytes:
    fn = kernels.gemv_kernel
    consts = dict(BITS=4, DECODE=decode, AFFINE=affine, HAS_BIAS=False, SCALE_MUL=scale_mul,
                  BLOCK_M=1, BLOCK_N=BLOCK_N, CH=CH, SPLIT_K=1, EVEN=True, IPG=16)
    params = fn.params
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        consts.pop(p.name, None)  # IPG is a run-time argument in older kernels
        sig[p.name] = POINTERS.get(p.name, "i32")
        if p.name not in RUNTIME_NOT_ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {k: v for k, v in consts.items() if k in sig}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=WARPS, num_stages=3,
                                           **({} if maxnreg is None else {"maxnreg": maxnreg})))
    return compiled.asm["cubin"]


def loop_instructions(cubin: bytes) -> tuple[int, int, int, int]:
    """(all instructions, instructions of the largest loop, registers a thread, register spill
    stores) of a cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    addrs = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4,})\*/\s+[@A-Z]", sass)]
    loops = [(int(t, 16), int(a, 16)) for a, t in
             re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?(0x[0-9a-f]+)", sass)
             if int(t, 16) < int(a, 16)]
    longest = max(((end - start) // 16 + 1 for start, end in loops), default=0)
    return len(addrs), longest, registers, len(re.findall(r"\bSTL\b", sass))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--kernels", help="another kernels.py to compile (default: the package's)")
    p.add_argument("--label", default="current")
    p.add_argument("--maxnreg", type=int, help="register cap a thread (GemvConfig.maxnreg)")
    args = p.parse_args()
    kernels = load_kernels(args.kernels)
    threads = WARPS * 32
    weights_per_thread = CH * BLOCK_N * 8 // threads  # 8 codes per 4-bit word
    rows = []
    for name, decode, affine, scale_mul in FORMATS:
        total, loop, registers, spills = loop_instructions(
            compile_gemv(kernels, decode, affine, scale_mul, args.maxnreg))
        rows.append({"format": name, "sass_total": total, "loop": loop, "registers": registers,
                     "spill_stores": spills,
                     "weights_per_thread_per_iteration": weights_per_thread,
                     "loop_per_weight": round(loop / weights_per_thread, 2)})
        print(f"{args.label:10s} {name:5s} SASS {total:4d}, K loop {loop:4d} for "
              f"{weights_per_thread} weights a thread = {loop / weights_per_thread:.2f} per weight, "
              f"{registers} registers, {spills} spill stores")
    result = {"label": args.label, "target": "sm_90", "triton": triton.__version__,
              "tile": {"block_n": BLOCK_N, "chunk": CH, "num_warps": WARPS},
              "maxnreg": args.maxnreg, "rows": rows}
    write_atomic(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
