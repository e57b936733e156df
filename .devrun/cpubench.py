import statistics
import time

import torch

from metal_marlin_torch import ops

torch.manual_seed(0)
def t(fn, r=7):
    fn(); ts=[]
    for _ in range(r):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)*1e3
for K, N in [(4096, 4096), (4096, 14336)]:
    w = torch.randn(N, K)
    lin = torch.nn.Linear(K, N, bias=False); lin.weight.data = w
    linb = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
    for M in (1, 64):
        x = torch.randn(M, K)
        with torch.no_grad():
            d = t(lambda: lin(x)); db = t(lambda: linb(x.bfloat16()))
            row = f"{K}x{N} M={M}: dense fp32 {d:.2f} ms, bf16 {db:.2f} ms"
            for fmt in ("int4", "fp4", "nf4", "int8"):
                q = ops.quantize(w, fmt, 128)
                o = t(lambda: torch.ops.marlin.gemm(x, q[0], q[1], q[2], q[3], None, fmt, 128))
                row += f" | {fmt} {o:.2f} ({d/o:.2f}x)"
            print(row, flush=True)
