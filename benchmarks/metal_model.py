"""A MODEL of the Metal gemm kernels on Apple GPUs: it predicts, it does not measure.

    python benchmarks/metal_model.py                       # ~5 min: every format at q_proj,
                                                           # int4 at the other shapes
    python benchmarks/metal_model.py --full                # every format at every shape
    python benchmarks/metal_model.py --quick               # int4 and fp4 at q_proj (~1 min)
    python benchmarks/metal_model.py --json out.json --markdown out.md

No Apple GPU exists anywhere here. This script runs the real kernels (shaders/gemm.h) and
their real host code (csrc/ops/gemm.cpp) in the MSL emulator on the CPU, with the emulator's
memory counters on (``emulator.profile()``), and turns the counts into:

* **bytes per weight moved** (``moved/min``): bytes the kernel's load instructions request
  from the weight-side buffers (weight, scales, biases, global scale), every lane's request
  counted, divided by the bytes those buffers hold (the format's minimum: each byte once).
  1.00 means every packed word, scale and bias is loaded exactly once. The activations are
  reported apart (``x B/w``): x is at most 8 x K values that every threadgroup re-reads,
  which real GPUs serve from cache.
* **coalescing** (``coal128``, ``coal64``): over all of a launch's simdgroup device memory
  instructions, the lines an ideal access of the same bytes would touch (ceil(bytes / line))
  divided by the distinct 128-byte (64-byte) lines actually touched. 1.00 = every
  instruction reads whole contiguous lines.
* **threads active**: the fraction of thread slots that access data (any buffer but the
  argument block, or threadgroup memory) in the barrier intervals that move device bytes (a gemv
  lane with no piece of K to read is inactive); **weight threads** (``thr weight``): the fraction
  of thread slots that load packed weights in the intervals that load them, i.e. the threads
  that take part in dequantization (each thread decodes the pieces it loads);
  **simd lanes**: the mean fraction of lanes active at simd operations.
* **roofline time** per Apple GPU: max(DRAM bytes / bandwidth, 2 M N K / fp16 FLOP/s) at
  the full shape, next to dense fp16 (2 N K weight bytes) at the same shape. ``best``: DRAM
  bytes = the format's stored bytes once plus x and the output (caches catch every re-read);
  ``no reuse``: the weight-side bytes the kernel requests (its re-reads, e.g. the gemm's per
  M tile, all from DRAM). Either ignores launch overhead, latency, occupancy, instruction
  issue and the decode arithmetic: a ratio to dense is "at best". The real number comes from
  ``benchmarks/bench_gemm.py`` on a Mac.

Shapes: Llama-3-8B projections (N x K: q/o 4096 x 4096, k/v 1024 x 4096, gate/up 14336 x 4096,
down 4096 x 14336), plus two short rows (int4, K = 512 and a per-channel K = 100, 64 rows),
where a kernel that gives a lane 32 codes leaves lanes idle (their roofline is trivia).
The emulator runs every GPU thread as a CPU fiber, so each case runs the
full K (the per-lane loop over K, which sets the access pattern, is the real one) but only
``--rows`` (default 64; gemm: ``--gemm-rows``, 32, one tile) of the N output rows: more rows
only add threadgroups that repeat the same pattern at another offset. Ratios are per weight,
so they carry over to the full N; the roofline is computed at the full shape. M: gemv 1, gemv_rows 4, gemm 64.

Apple GPU figures (published; the FP16 rate of Apple GPUs equals their FP32 rate, and
simdgroup_matrix runs on the same ALUs):
* M1 Max (32-core GPU): 400 GB/s [1]; 10.4 TFLOPS [2].
* M2 Ultra (76-core GPU): 800 GB/s [3]; 27.2 TFLOPS [4].
* M3 Max (40-core GPU): 400 GB/s [5]; 14.32 TFLOPS FP16 [6].
* M4 Max (40-core GPU): 546 GB/s [5]; 17.18 TFLOPS FP16, derived: [6] lists the 32-core
  M4 Max at 13.74 TFLOPS (4096 ALUs at 1678 MHz); 40 cores have 5120 ALUs at that clock.
[1] https://www.apple.com/gw/newsroom/2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built
[2] Apple's M1 Max GPU figure (10.4 teraflops, 4096 execution units), as reported at
    https://www.italy24news.com/News/228490.html
[3] https://propakistani.pk/2023/06/06/apple-m2-ultra-chip-unveiled-for-mac-pro-and-mac-studio/
    (Apple's M2 Ultra announcement: 800GB/s)
[4] Apple's Mac Pro page (2023): "GPU with up to 76 cores ... up to 27.2 teraflops"
    (read through a mirror of apple.com/pl/mac-pro:
    https://nakenako.serv00.net/https-www.apple.com/pl/mac-pro)
[5] https://macmegasite.com/2024/10/30/m4-max-chip-has-16-core-cpu-40-core-gpu-and-35-increase-in-memory-bandwidth
    (M4 Max 546 GB/s against M3 Max 400 GB/s, both 40-core GPUs)
[6] https://hmc-tech.com/gpu/apple-32-core-m4-max-vs-apple-40-core-m3-max (FP16 = FP32 rate)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import emulator  # noqa: E402
from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch._files import write_atomic  # noqa: E402

# name: (bandwidth GB/s, fp16 TFLOP/s, source note)
CHIPS: dict[str, tuple[float, float, str]] = {
    "M1 Max": (400.0, 10.4, "32-core GPU; [1] bandwidth, [2] FLOP/s"),
    "M2 Ultra": (800.0, 27.2, "76-core GPU; [3] bandwidth, [4] FLOP/s"),
    "M3 Max": (400.0, 14.32, "40-core GPU; [5] bandwidth, [6] FLOP/s"),
    "M4 Max": (546.0, 17.18, "40-core GPU; [5] bandwidth, FLOP/s derived from [6]"),
}

# Llama-3-8B projections: name -> (N, K)
SHAPES: dict[str, tuple[int, int]] = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}

KERNELS: dict[str, int] = {"gemv": 1, "gemv_rows": 4, "gemm": 64}  # kernel -> M that reaches it

# (format, group size): the 4-bit formats at their usual groups, and one of each other width.
FORMATS: list[tuple[str, int]] = [
    ("int4", 128), ("fp4", 32), ("mxfp4", 32), ("nvfp4", 16), ("nf4", 64),
    ("int3", 128), ("int2", 64), ("int8", 128), ("fp8_e4m3", 128),
]
WEIGHT_SIDE = {"weight", "scales", "biases", "global_scale"}



def nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def layer(fmt: str, g: int, n: int, k: int) -> F.QuantizedTensor:
    """RTN-quantized random weights (real codes, scales, biases of the format)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return F.quantize(w, fmt, g, torch.float16)


def threads_active(launches) -> float:  # noqa: ANN001 (list of emulator.LaunchProfile)
    """Fraction of thread slots that touch data, over the barrier intervals that move device
    bytes: idle gemv lanes (no piece of K) count as inactive, every thread of a full gemm tile
    as active (the emulator counts a thread once per interval, at its first access to anything
    but the argument block)."""
    active = slots = 0
    for p in launches[:1]:
        for ph in p.phases:
            if ph["device_bytes"] > 0:
                active += ph["threads_active"]
                slots += ph["thread_slots"]
    return active / slots if slots else 0.0


def threads_weight(launches) -> float:  # noqa: ANN001 (list of emulator.LaunchProfile)
    """Fraction of thread slots that load packed weights, over the barrier intervals that load
    them: the threads that decode (a thread dequantizes the pieces it loads)."""
    active = slots = 0
    for p in launches[:1]:
        for ph in p.phases:
            if ph.get("weight_bytes", 0) > 0:
                active += ph["threads_weight"]
                slots += ph["thread_slots"]
    return active / slots if slots else 0.0


def measure(ops, fmt: str, g: int, m: int, n: int, k: int) -> dict:  # noqa: ANN001
    """Run one marlin_emu.gemm under the profiler; per-weight counters of its launches."""
    qt = layer(fmt, g, n, k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) / k**0.5).to(torch.float16)
    t0 = time.perf_counter()
    with emulator.profile() as launches:
        ops.gemm(x, qt.weight, qt.scales, qt.biases, qt.global_scale, None, fmt, g)
    wall = time.perf_counter() - t0
    main = launches[0]
    minimum = nbytes(qt.weight, qt.scales, qt.biases, qt.global_scale)
    read = {name: 0 for name in WEIGHT_SIDE | {"x"}}
    unique = written = 0
    ideal128 = lines128 = ideal64 = lines64 = 0
    for p in launches:
        for b in p.buffers.values():
            if b["name"] in read:
                read[b["name"]] += b["read"]
            unique += b["unique_read"]
            written += b["written"]
        ideal128 += p.ideal_lines128
        lines128 += p.lines128
        ideal64 += p.ideal_lines64
        lines64 += p.lines64
    moved = sum(read[name] for name in WEIGHT_SIDE)
    weights = n * k
    return {
        "kernel": main.kernel, "launches": [p.kernel for p in launches],
        "grid": list(main.grid), "threadgroup": list(main.threadgroup),
        "min_bytes_per_weight": minimum / weights, "moved_bytes_per_weight": moved / weights,
        "moved_over_min": moved / minimum, "x_bytes_per_weight": read["x"] / weights,
        "unique_bytes_per_weight": unique / weights, "written_bytes": written,
        "coalescing128": ideal128 / lines128 if lines128 else 1.0,
        "coalescing64": ideal64 / lines64 if lines64 else 1.0,
        "device_instructions": sum(p.device_instructions for p in launches),
        "bank_conflicts": sum(p.bank_conflicts for p in launches),
        "tg_instructions": sum(p.tg_instructions for p in launches),
        "tg_wavefronts": sum(p.tg_wavefronts for p in launches),
        "simd_ops": main.simd_ops,
        "simd_active_lanes": main.simd_active_lanes if main.simd_ops else None,
        "threads_active": threads_active(launches),
        "threads_weight": threads_weight(launches),
        "emulator_seconds": wall,
    }


def roofline(m: int, n: int, k: int, best: float, no_reuse: float) -> dict[str, dict[str, float]]:
    """Predicted microseconds per chip, max(DRAM bytes / bandwidth, 2MNK / fp16 rate), for the
    quantized layer at `best` and `no_reuse` weight-side bytes per weight, and for dense fp16."""
    act = 2 * m * k + 2 * m * n  # fp16 x in, y out
    flops = 2 * m * n * k

    def us(weight_bytes: float, bw: float, tflops: float) -> float:
        return max((weight_bytes + act) / (bw * 1e9), flops / (tflops * 1e12)) * 1e6

    out = {}
    for chip, (bw, tflops, _) in CHIPS.items():
        dense = us(2.0 * n * k, bw, tflops)
        q = us(best * n * k, bw, tflops)
        out[chip] = {"dense_us": dense, "quant_us": q, "speedup": dense / q,
                     "quant_no_reuse_us": us(no_reuse * n * k, bw, tflops)}
    return out


def run(args: argparse.Namespace) -> dict:
    ops = emulator.load().ops
    formats = [f for f in FORMATS if args.formats is None or f[0] in args.formats]
    shapes = {s: v for s, v in SHAPES.items() if args.shapes is None or s in args.shapes}
    kernels = {kk: mm for kk, mm in KERNELS.items() if args.kernels is None or kk in args.kernels}
    rows = []
    for shape, (n_full, k) in shapes.items():
        for kname, m in kernels.items():
            for fmt, g in formats:
                if not (args.full or args.formats or shape == "q_proj/o_proj" or fmt == "int4"):
                    continue  # default: every format at one shape, int4 at every shape
                n = min(args.gemm_rows if kname == "gemm" else args.rows, n_full)
                r = measure(ops, fmt, g, m, n, k)
                if not r["kernel"].startswith(f"marlin_{kname}_"):
                    raise RuntimeError(f"{shape} M={m} reached {r['kernel']}, not {kname}")
                r.update(shape=shape, variant=kname, format=fmt, group_size=g, m=m, n_full=n_full,
                         k=k, n_run=n, roofline=roofline(m, n_full, k, r["min_bytes_per_weight"],
                                                         r["moved_bytes_per_weight"]))
                rows.append(r)
                print(f"  {shape:14s} {kname:9s} {fmt:9s} moved/min {r['moved_over_min']:.3f} "
                      f"coal128 {r['coalescing128']:.3f} thr weight {r['threads_weight']:.2f} "
                      f"({r['emulator_seconds']:.1f} s)", flush=True)
    # The short rows of issue 17 (lanes idle in a lane-per-32-codes gemv): thread use, not time.
    for shape, g, k in (("short K=512", 128, 512), ("short K=100 per-channel", -1, 100)):
        for kname in ("gemv", "gemv_rows"):
            if args.kernels is not None and kname not in args.kernels:
                continue
            m = KERNELS[kname]
            r = measure(ops, "int4", g, m, args.rows, k)
            r.update(shape=shape, variant=kname, format="int4", group_size=g, m=m, n_full=args.rows, k=k,
                     n_run=args.rows, roofline=roofline(m, args.rows, k, r["min_bytes_per_weight"],
                                                        r["moved_bytes_per_weight"]))
            rows.append(r)
            print(f"  {shape:14s} {kname:9s} int4 threads active {r['threads_active']:.3f} "
                  f"weight {r['threads_weight']:.3f}", flush=True)
    return {
        "label": "MODEL: predicted from emulator counters and published chip figures; nothing "
                 "here was timed on Apple hardware",
        "machine": {"host": platform.node(), "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "ran": "MSL emulator (clang-19, CPU fibers), counters from emulator.profile()"},
        "chips": {c: {"bandwidth_gbs": bw, "fp16_tflops": tf, "source": s}
                  for c, (bw, tf, s) in CHIPS.items()},
        "activation_dtype": "float16",
        "rows_run": args.rows,
        "gemm_rows_run": args.gemm_rows,
        "results": rows,
    }


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def table(result: dict) -> str:
    """Markdown table: one line per (shape, kernel, format)."""
    chips = list(result["chips"])
    head = ("| shape | kernel | M | format | B/w min | moved/min | x B/w | coal128 | coal64 | simd lanes "
            "| thr active | thr weight | " + " | ".join(f"{c} us: best / no reuse (dense, dense/best)" for c in chips)
            + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["results"]:
        cells = [r["shape"], r["variant"], str(r["m"]), f"{r['format']} g{r['group_size']}",
                 _f(r["min_bytes_per_weight"], ".3f"), _f(r["moved_over_min"], ".3f"),
                 _f(r["x_bytes_per_weight"], ".3f"), _f(r["coalescing128"]), _f(r["coalescing64"]),
                 _f(r["simd_active_lanes"]), _f(r["threads_active"]), _f(r.get("threads_weight"))]
        for c in chips:
            t = r["roofline"][c]
            cells.append(f"{t['quant_us']:.1f} / {t['quant_no_reuse_us']:.1f} ({t['dense_us']:.1f}, "
                         f"{t['speedup']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    chips = "\n".join(f"- {c}: {v['bandwidth_gbs']:.0f} GB/s, {v['fp16_tflops']} TFLOP/s fp16 ({v['source']})"
                      for c, v in result["chips"].items())
    return (f"# Metal kernel model (a prediction, not a measurement)\n\n{result['label']}.\n\n"
            f"Ran on: {result['machine']['platform']} ({result['machine']['ran']}), "
            f"{result['rows_run']} output rows per case (gemm {result['gemm_rows_run']}) at the full K; "
            "roofline at the full shape.\n\n"
            f"Chips (sources in benchmarks/metal_model.py):\n{chips}\n\n"
            "Columns: `B/w min` the format's stored bytes per weight; `moved/min` weight-side bytes "
            "requested by the kernel over that minimum; `x B/w` activation bytes requested per weight "
            "(cache-served); `coal128`/`coal64` ideal/actual lines per simdgroup instruction; `simd lanes` "
            "mean active lanes at simd operations; `thr active` fraction of thread slots that access "
            "data (not counting argument reads) in the barrier intervals that move device bytes; `thr weight` "
            "fraction of thread slots that load (and so decode) packed weights in the intervals that load "
            "them; per chip: predicted us for the "
            "quantized layer with every re-read cached (best) and none (no reuse), dense fp16 us, "
            "dense/best.\n\n" + table(result) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="benchmarks/results/metal_model.json")
    p.add_argument("--markdown", default="benchmarks/results/metal_model.md")
    p.add_argument("--rows", type=int, default=64, help="output rows (of N) run in the emulator")
    p.add_argument("--gemm-rows", type=int, default=32, help="the same for gemm (one 32-wide tile)")
    p.add_argument("--formats", type=lambda s: s.split(","), default=None)
    p.add_argument("--shapes", type=lambda s: s.split(","), default=None)
    p.add_argument("--kernels", type=lambda s: s.split(","), default=None)
    p.add_argument("--quick", action="store_true", help="int4 and fp4 at q_proj/o_proj only")
    p.add_argument("--full", action="store_true", help="every format at every shape (~15 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.formats = args.formats or ["int4", "fp4"]
        args.shapes = args.shapes or ["q_proj/o_proj"]
    for name, sel, known in (("--formats", args.formats, [f for f, _ in FORMATS]),
                             ("--shapes", args.shapes, list(SHAPES)), ("--kernels", args.kernels, list(KERNELS))):
        bad = [s for s in sel or [] if s not in known]
        if bad:
            p.error(f"{name}: unknown {bad}; expected some of {known}")
    if not emulator.available():
        sys.exit("metal_model.py needs clang-19 for the MSL emulator (apt-get install clang-19)")
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t0
    md = markdown(result)
    print("\n" + md)
    write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    write_atomic(args.markdown, md)
    print(f"wrote {args.json} and {args.markdown} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
