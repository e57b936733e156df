import cProfile
import pstats
import sys
import time

import torch
from torch import nn

sys.path.insert(0, ".")
from metal_marlin_torch import MarlinLinear
from metal_marlin_torch.ops import cuda as C

C.register()
for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = MarlinLinear.from_linear(lin, "int4", 128).cuda()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(20): layer(x)
        torch.cuda.synchronize()
        print(k, n, "recorded:", type(layer._plan.launches.get((1, torch.bfloat16, True))).__name__)
        t0 = time.perf_counter()
        for _ in range(1000): layer(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"issue {1e3*(t1-t0):.2f} us/call, wall {1e3*(t2-t0):.2f} us/call")
        t0 = time.perf_counter()
        for _ in range(1000): lin(x)
        t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        print(f"nn.Linear issue {1e3*(t1-t0):.2f} us/call, wall {1e3*(t2-t0):.2f} us/call")
pr = cProfile.Profile()
with torch.no_grad():
    pr.enable()
    for _ in range(2000): layer(x)
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
