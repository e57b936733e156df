"""CPU ``marlin.gemm`` (the C++ kernel of ``ops/cpu``) against dense ``nn.Linear`` in fp32 and bf16
on the Llama-3-8B projection shapes (issue 24 item 4).

    python benchmarks/bench_cpu_gemm.py --json benchmarks/results/bench_cpu_gemm.json

Each round times every method once, in turn (interleaved, so a busy machine slows them alike;
each round starts one method later, so no method always follows the same one);
the median over ``--rounds`` rounds is reported, with the ratio dense fp32 / method (and dense
bf16 / method) of the same rounds, and the fastest round of each (on a shared machine the
least interrupted one; the machine's load average before and after is in the output).
Activations fp32 (the op's bf16 path converts to fp32 in the kernel's wrapper).
``torch.get_num_threads()`` threads for everything. The JSON's ``kernel`` says which thread pool
the GEMV and the prefill ran on (``METAL_MARLIN_CPU_GEMV_THREADS``) and the prefill's vector
width; ``--panels`` adds prefill rows at other panel sizes (fixed rows, no shrinking).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import ops  # noqa: E402
from metal_marlin_torch.ops import cpu  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # K x N


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _with_panels(rows: int, codes: int, acts: int, fn):
    """fn() with the prefill's panel sizes set to rows x codes x acts (for --panels)."""
    saved = cpu.PANEL_ROWS, cpu.PANEL_MIN_ROWS, cpu.PANEL_CODES, cpu.PANEL_ACTS
    cpu.PANEL_ROWS = cpu.PANEL_MIN_ROWS = rows
    cpu.PANEL_CODES, cpu.PANEL_ACTS = codes, acts
    try:
        return fn()
    finally:
        cpu.PANEL_ROWS, cpu.PANEL_MIN_ROWS, cpu.PANEL_CODES, cpu.PANEL_ACTS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--m", default="1,64")
    ap.add_argument("--formats", default="int4,fp4,nf4,int8")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--panels", default="",
                    help="prefill panel sizes to time beside the defaults, for the first format: "
                         "ROWSxCODES[xACTS],... (ops/cpu PANEL_ROWS, PANEL_CODES, PANEL_ACTS); "
                         "rows named e.g. 'int4 panels 24x512x256'")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu.load() is None:
        raise SystemExit(f"the C++ CPU kernel is unavailable: {cpu.info()['error']}")
    torch.manual_seed(0)
    load_before = os.getloadavg()  # the machine may be shared: its load goes with the numbers
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k) / k**0.5
        dense = nn.Linear(k, n, bias=False)
        dense.weight.data.copy_(w)
        dense_bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        dense_bf16.weight.data.copy_(w)
        quant = {f: ops.quantize(w, f, args.group) for f in args.formats.split(",")}
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            fns = {"dense fp32": partial(dense, x), "dense bf16": partial(dense_bf16, xb)}
            for f, (qw, qs, qb, qg) in quant.items():
                fns[f] = (lambda f=f, qw=qw, qs=qs, qb=qb, qg=qg, x=x:
                          torch.ops.marlin.gemm(x, qw, qs, qb, qg, None, f, args.group))
            if m > cpu.GEMV_MAX_M and args.panels:
                f0 = next(iter(quant))
                for spec in args.panels.split(","):
                    rows_, codes, *acts = (int(v) for v in spec.split("x"))
                    fns[f"{f0} panels {rows_}x{codes}x{acts[0] if acts else cpu.PANEL_ACTS}"] = partial(
                        _with_panels, rows_, codes, acts[0] if acts else cpu.PANEL_ACTS,
                        partial(fns[f0]))
            times = {name: [] for name in fns}
            with torch.no_grad():
                for fn in fns.values():
                    fn()
                names = list(fns)
                for r in range(args.rounds):
                    # each round starts one method later, so every method follows every other
                    # equally often: right after a torch op, torch's OpenMP threads spin for a
                    # while and slow whatever runs next on a busy machine (a fixed order always
                    # gave dense fp32 the quiet slot after int8)
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        t0 = time.perf_counter()
                        fns[name]()
                        times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            low = {name: min(ts) * 1e3 for name, ts in times.items()}
            for name, ms in med.items():
                row = {"K": k, "N": n, "M": m, "method": name, "ms": round(ms, 3),
                       "x_dense_fp32": round(med["dense fp32"] / ms, 2),
                       "x_dense_bf16": round(med["dense bf16"] / ms, 2),
                       # the fastest round: on a shared machine, the one least interrupted
                       "ms_min": round(low[name], 3),
                       "x_dense_fp32_min": round(low["dense fp32"] / low[name], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                          "cores": os.cpu_count(), "torch": torch.__version__,
                          "platform": platform.platform(),
                          "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
                          "loadavg_1_5_15_after": [round(v, 2) for v in os.getloadavg()]},
              "kernel": cpu.info(), "command": " ".join(sys.argv), "rows": rows}
    print(f"\nload average (1/5/15 min) before {result['machine']['loadavg_1_5_15_before']}, "
          f"after {result['machine']['loadavg_1_5_15_after']}, {os.cpu_count()} cores")
    print("\n| K x N | M | method | ms (median) | vs dense fp32 | vs dense bf16 | ms (min) | min vs "
          "dense fp32 min |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} x {r['N']} | {r['M']} | {r['method']} | {r['ms']} | {r['x_dense_fp32']}x | "
              f"{r['x_dense_bf16']}x | {r['ms_min']} | {r['x_dense_fp32_min']}x |")
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
