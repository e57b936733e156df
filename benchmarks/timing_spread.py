"""How much the timer's figure for one kernel moves with what else is equal (H100 check).

For int4 at 4096 x 4096 and 4096 x 14336, M = 1 and 4, in one process and with the same
timer (``bench_gemm.time_cuda``): (a) ``marlin.gemm`` on the benchmark's canonical weight
copies, (b) ``gemm_prepared`` on the very prepared weights (a) used (same kernel, same
buffers), (c) ``gemm_prepared`` on a second set of prepared copies of the same shape. Prints
a table and writes JSON. docs/CUDA.md §4 ("the spread") quotes it.

    python benchmarks/timing_spread.py --json spread.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemm import copies_for, nbytes, time_cuda, write_atomic  # noqa: E402

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch import ops  # noqa: E402
from metal_marlin_torch.ops import cuda as C  # noqa: E402
from metal_marlin_torch.ops.cuda import dispatch as D  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    args = p.parse_args()
    C.register()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in [(4096, 4096), (4096, 14336)]:
        w = torch.randn(n, k, generator=gen) * 0.02
        qt = F.quantize(w, "int4", 128)
        canon = [t.cuda() if t is not None else None
                 for t in (qt.weight, qt.scales, qt.biases, qt.global_scale)]
        copies = [canon] + [[t.clone() if t is not None else None for t in canon]
                            for _ in range(copies_for(nbytes(*canon), "cuda") - 1)]
        pws = [D.cached_prepare(*c, "int4", 128, k) for c in copies]
        other = [D.prepare_cuda_weight(*[t.clone() if t is not None else None for t in c],
                                       "int4", 128, k) for c in copies]
        for m in (1, 4):
            x = (torch.randn(m, k, generator=gen) / math.sqrt(k)).to("cuda", torch.bfloat16)
            row = dict(K=k, N=n, M=m, path=D.choose_path(m, n, 132, pws[0].kfmt, True, k,
                                                          True, True))
            row["op_us"] = 1e3 * time_cuda([lambda c=c, x=x: ops.gemm(x, *c, None, "int4", 128)
                                            for c in copies])
            row["prepared_same_us"] = 1e3 * time_cuda([lambda p=p, x=x: D.gemm_prepared(x, p)
                                                       for p in pws])
            row["prepared_other_us"] = 1e3 * time_cuda([lambda p=p, x=x: D.gemm_prepared(x, p)
                                                        for p in other])
            rows.append(row)
            print(f"{k} x {n} M={m} ({row['path']}): marlin.gemm {row['op_us']:.1f} us, "
                  f"gemm_prepared same weights {row['prepared_same_us']:.1f} us, other copies "
                  f"{row['prepared_other_us']:.1f} us", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                timing="bench_gemm.time_cuda: CUDA graph replays over weight copies > 2x L2, "
                       "CUDA events, median")
    write_atomic(args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
