"""Sweep the Gluon tensor-core GEMV (``mma_gemv`` path, 2-8 rows of affine int4 or fp4) against dense
bf16/fp16 and the Triton paths it replaced, on the Llama-3-8B projection shapes.

    python benchmarks/sweep_mma_gemv.py --json sweep.json [--m 1,2,4,8] [--dtype bfloat16]
        [--configs "4,4,1;2,8,1,4"]   # warps, split_k, prefetch[, stages] (MmaGemvConfig)

Per shape and M, in one run with bench_gemm's timer (CUDA graphs over L2-defeating weight
copies, CUDA events, median): dense, the CUDA-core GEMV (``path="gemv"``, its default
configuration), the pairs GEMM (``path="gemm"``) where M >= 3, the default ``mma_gemv``
configuration (``default``: the TMA-fed kernel where it runs, sm_90) and each ``--configs``
entry (stages 0: the register-fed kernel; 2-8: the TMA-fed one). Every ``mma_gemv`` output is
compared with the dequantize path (``dequant_kernel`` + cuBLAS).
Needs a CUDA GPU (sm_80+) with Triton's Gluon.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import LLAMA_SHAPES, copies_for, cuda_sweep_meta, max_rel_error, nbytes, time_cuda, write_atomic  # noqa: E402

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.ops.cuda import dispatch as D  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--m", default="1,2,4,8")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--format", default="int4", choices=["int4", "fp4"])
    p.add_argument("--configs", default="4,4,1;4,16,1;2,8,1;4,4,2;8,8,2")
    args = p.parse_args(argv)
    reason = ("no CUDA device" if not torch.cuda.is_available()
              else D.mma_gemv_unavailable_reason(torch.device("cuda")))
    if reason:
        raise SystemExit(f"sweep_mma_gemv: {reason}")
    dt = getattr(torch, args.dtype)
    cfgs = [D.MmaGemvConfig(*(int(v) for v in c.split(","))) for c in args.configs.split(";")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tma = not D.mma_gemv_tma_unavailable_reason(torch.device("cuda"))
    torch.manual_seed(0)
    rows = []
    for k, n in LLAMA_SHAPES:
        qt = F.quantize(torch.randn(n, k, device="cuda") * 0.02, args.format, args.group)

        def prep(qt=qt, k=k):
            return D.prepare_cuda_weight(
                qt.weight.clone(), qt.scales.clone(),
                None if qt.biases is None else qt.biases.clone(), None, args.format,
                args.group, k)
        pws = [prep() for _ in range(copies_for(nbytes(prep().weight), "cuda"))]
        dense_w = [torch.randn(n, k, device="cuda", dtype=dt) for _ in range(max(2, len(pws) // 4))]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            ref = D.gemm_prepared(x, pws[0], path="dequant")
            row = dict(K=k, N=n, M=m, dense_ms=time_cuda([lambda w=w, x=x: x @ w.T
                                                          for w in dense_w]))
            for path in ("gemv",) + (("gemm",) if m >= 3 else ()):
                row[f"{path}_ms"] = time_cuda([lambda p=p, x=x, path=path: D.gemm_prepared(
                    x, p, path=path) for p in pws])
            line = (f"{k}x{n} M={m}: dense {row['dense_ms'] * 1e3:.1f} us, gemv "
                    f"{row['gemv_ms'] * 1e3:.1f} us"
                    + (f", gemm {row['gemm_ms'] * 1e3:.1f} us" if m >= 3 else ""))
            print(line, flush=True)
            default = D.default_mma_gemv_config(n, k, args.group, sms, tma)
            for name, cfg in [("default", default)] + [(None, c) for c in cfgs]:
                err = max_rel_error(D.gemm_prepared(x, pws[0], path="mma_gemv", config=cfg), ref)
                t = time_cuda([lambda p=p, x=x, cfg=cfg: D.gemm_prepared(
                    x, p, path="mma_gemv", config=cfg) for p in pws])
                print(f"   mma_gemv {name or ''} {cfg}: {t * 1e3:.1f} us "
                      f"({row['dense_ms'] / t:.2f}x dense), rel. error {err:.1e}", flush=True)
                rows.append(dict(row, config=[cfg.warps, cfg.split_k, cfg.prefetch, cfg.stages],
                                 default=name == "default", ms=t,
                                 ratio_dense=row["dense_ms"] / t, rel_error=err))
    meta = cuda_sweep_meta(dtype=args.dtype, group=args.group, format=args.format,
                           config_fields="warps, split_k, prefetch, stages (MmaGemvConfig)")
    write_atomic(args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
