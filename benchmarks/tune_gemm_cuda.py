"""Sweep the CUDA ``marlin.gemm`` kernel configurations (tile sizes, warps, split-K, the
K-major GEMV chunk) over the Llama-3-8B projection shapes; the winners are the defaults in
``metal_marlin_torch/ops/cuda/dispatch.py``.

    python benchmarks/tune_gemm_cuda.py --json sweep.json [--jobs 8]

Kernels are compiled first by ``--jobs`` worker processes (they fill Triton's on-disk cache),
then timed one after another in this process with the benchmark's timer (CUDA graphs over
L2-defeating weight copies, CUDA events, median).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import sys
from functools import cache, partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import LLAMA_SHAPES, copies_for, nbytes, time_cuda, write_atomic  # noqa: E402

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.ops.cuda import dispatch as D  # noqa: E402

GEMV = [  # block_n, chunk (items per K step), num_warps, split_k
    (16, 64, 4, 1), (16, 32, 4, 1), (32, 64, 4, 1), (8, 64, 4, 1), (16, 128, 4, 1),
    (32, 32, 4, 1), (16, 64, 8, 1), (32, 64, 8, 1), (64, 32, 4, 1), (16, 64, 4, 2),
    (8, 128, 4, 1), (32, 128, 8, 1),
]
GEMM = [  # block_m, block_n, block_k, split_k, num_warps, num_stages
    (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 4), (16, 64, 128, 4, 4, 4),
    (16, 64, 256, 1, 4, 3), (16, 64, 128, 2, 4, 4), (16, 128, 64, 2, 4, 4),
    (32, 64, 128, 1, 4, 4), (32, 128, 64, 1, 4, 4), (32, 64, 128, 2, 4, 4),
    (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 4), (64, 128, 128, 1, 8, 3),
    (64, 256, 64, 1, 8, 3), (64, 64, 64, 2, 4, 4), (64, 128, 64, 2, 4, 4),
    (128, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (128, 128, 64, 1, 4, 4),
    (128, 256, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4), (256, 128, 64, 1, 8, 3),
]
GEMM_M = [8, 16, 32, 64, 128, 256, 512]
GEMV_FORMATS = "int4,fp4,nf4,int8,fp8_e4m3,int3"


@cache
def case(k: int, n: int, fmt: str):
    """Weight copies (prepared) for one shape and format, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    group = 128 if 128 in F.get_format(fmt).group_sizes else F.default_group_size(fmt)
    qt = F.quantize(w, fmt, group)
    pw = D.prepare_cuda_weight(qt.weight, qt.scales, qt.biases, qt.global_scale, fmt, group, k)
    reps = copies_for(nbytes(pw.weight, pw.scales, pw.biases), "cuda")
    copies = [pw] + [D.PreparedWeight(pw.kfmt, pw.group_size, k, n, pw.weight.clone(),
                                      pw.scales.clone(),
                                      None if pw.biases is None else pw.biases.clone(), pw.lut)
                     for _ in range(reps - 1)]
    return copies


@cache
def w_hat(k: int, n: int, fmt: str) -> torch.Tensor:
    """float32 dequantized weight of :func:`case` (the reference for each configuration)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    group = 128 if 128 in F.get_format(fmt).group_sizes else F.default_group_size(fmt)
    return F.dequantize(F.quantize(w, fmt, group), torch.float32)


def tasks(formats: list[str], m1_only: bool = False, gemv: list[tuple] = GEMV,
          gemm: list[tuple] = GEMM, gemm_m: list[int] = GEMM_M, gemm_only: bool = False,
          gemm_formats: tuple[str, ...] = ("int4",)) -> list[tuple]:
    out = []
    for k, n in LLAMA_SHAPES:
        if not gemm_only:
            for fmt in formats:
                for c in gemv:
                    out.append((k, n, fmt, 1, "gemv", ("gemv", 1, *c)))
        if m1_only:
            continue
        if not gemm_only:
            for m, bm in ((2, 2), (4, 4), (8, 4)):
                for c in GEMV[:8]:
                    out.append((k, n, "int4", m, "gemv", ("gemv", bm, *c)))
        for fmt in gemm_formats:
            for m in gemm_m:
                for c in gemm:
                    if min(64, m) <= c[0] <= max(16, 1 << (m - 1).bit_length()):
                        out.append((k, n, fmt, m, "gemm", ("gemm", *c)))
                out.append((k, n, fmt, m, "dequant", None))
    return out


def config_of(spec):
    if spec is None:
        return None
    if spec[0] == "gemv":
        _, bm, bn, chunk, warps, split, *reg = spec
        return D.GemvConfig(bm, bn, chunk, split, warps, reg[0] if reg else None)
    _, bm, bn, bk, split, warps, stages, *rest = spec
    pairs, asm = (bool(rest[0]), bool(rest[1])) if rest else (True, True)
    return D.GemmConfig(bm, bn, bk, split, warps, stages, pairs=pairs, asm=asm)


def run_once(task) -> str:
    k, n, fmt, m, path, spec = task
    try:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        D.gemm_prepared(x, case(k, n, fmt)[0], None, path=path, config=config_of(spec))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - reported in the sweep output
        return f"{type(exc).__name__}: {exc}"[:300]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--formats", default=GEMV_FORMATS, help="formats swept at M = 1")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--m1-only", action="store_true", help="only the GEMV configurations at M = 1")
    p.add_argument("--gemv", help="GEMV configurations 'block_n,chunk,warps,split[,maxnreg];...' "
                   "(M = 1)")
    p.add_argument("--gemm", help="GEMM configurations 'bm,bn,bk,split,warps,stages[,pairs,asm];...'")
    p.add_argument("--gemm-m", default=",".join(map(str, GEMM_M)), help="M values of the GEMM sweep")
    p.add_argument("--gemm-formats", default="int4", help="formats of the GEMM sweep")
    p.add_argument("--gemm-only", action="store_true", help="only the GEMM / dequantize sweep")
    args = p.parse_args()
    gemv = GEMV
    if args.gemv:
        gemv = [tuple(int(v) for v in c.split(",")) for c in args.gemv.split(";")]
    gemm = GEMM
    if args.gemm:
        gemm = [tuple(int(v) for v in c.split(",")) for c in args.gemm.split(";")]
    todo = tasks(args.formats.split(","), args.m1_only, gemv, gemm,
                 [int(v) for v in args.gemm_m.split(",")], args.gemm_only,
                 tuple(args.gemm_formats.split(",")))
    print(f"{len(todo)} configurations", flush=True)
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            errors = list(pool.map(run_once, todo, chunksize=4))
        print(f"compiled; {sum(bool(e) for e in errors)} failed", flush=True)
    results = []
    dense = {}
    for task in todo:
        k, n, fmt, m, path, spec = task
        err = run_once(task)
        row = {"K": k, "N": n, "format": fmt, "M": m, "path": path, "config": spec, "error": err}
        if not err:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = config_of(spec)
            y = D.gemm_prepared(x, case(k, n, fmt)[0], None, path=path, config=cfg).float()
            ref = x.float() @ w_hat(k, n, fmt).T
            row["rel_err"] = ((y - ref).norm() / ref.norm()).item()
            row["ms"] = time_cuda([partial(D.gemm_prepared, x, pw, None, path=path, config=cfg)
                                   for pw in case(k, n, fmt)], repeats=10, loops=3)
            if (k, n, m) not in dense:
                wd = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                reps = copies_for(nbytes(wd), "cuda")
                ws = [wd] + [wd.clone() for _ in range(reps - 1)]
                dense[(k, n, m)] = time_cuda([partial(torch.nn.functional.linear, x, w)
                                              for w in ws], repeats=10, loops=3)
            row["dense_ms"] = dense[(k, n, m)]
            row["ratio_to_dense"] = row["dense_ms"] / row["ms"]
        else:
            print("ERROR", task, err, flush=True)
        results.append(row)
    write_atomic(args.json, json.dumps(results, indent=1))
    best = {}
    for r in results:
        if "ms" not in r:
            continue
        key = (r["K"], r["N"], r["format"], r["M"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    for key in sorted(best):
        r = best[key]
        print(f"K={key[0]:5d} N={key[1]:5d} {key[2]:8s} M={key[3]:3d} best {r['path']:7s} "
              f"{r['config']} {r['ms'] * 1e3:7.1f} us x{r['ratio_to_dense']:.2f} dense "
              f"(rel err {r['rel_err']:.1e})", flush=True)
    worst = max((r.get("rel_err", 0.0) for r in results), default=0.0)
    print(f"largest relative error of any configuration: {worst:.2e}", flush=True)
    # per-M view of each GEMM config's mean ratio (robust defaults across shapes)
    by_cfg: dict = {}
    for r in results:
        if "ms" in r and r["format"] == "int4" and r["M"] > 1:
            by_cfg.setdefault((r["M"], r["path"], str(r["config"])), []).append(r["ratio_to_dense"])
    for m in sorted({key[0] for key in by_cfg}):
        ranked = sorted(((math.prod(v) ** (1 / len(v)), key) for key, v in by_cfg.items()
                         if key[0] == m and len(v) == len(LLAMA_SHAPES)), reverse=True)[:3]
        for score, key in ranked:
            print(f"M={m:3d} geo-mean x{score:.2f} dense: {key[1]} {key[2]}")


if __name__ == "__main__":
    main()
