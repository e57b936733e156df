"""Device memory traffic of one attention decode step, counted by the MSL emulator (issue 22
item 7): bytes the Metal kernels move per decoded token against the size of the K/V cache they
attend, for fp16 and FP8 E4M3 caches at a few cache lengths.

    python benchmarks/attention_traffic.py --json benchmarks/results/attention_traffic.json

The counters come from the emulator's instrumentation (emulator.profile(): every load and store
the kernel code executes, per launch; docs/METAL.md "What the counters mean"). They count what the
code asks for, not what a GPU's caches make of it, and no time is measured. ``read / cache`` (K/V
and scale bytes the kernels read, over the cache's bytes) is the figure to watch: 1.0 means every
cache byte crosses once per decoded token. The row kernel reads a K/V head once per threadgroup of
its GQA group's query heads (up to 4 heads per threadgroup), so the figure is
Hq / Hk / heads per threadgroup: 1.0 for the default 8 query over 2 K/V heads. ``moved / cache``
adds q, the split's fp32 partials (written, then read by the reduce) and the output. The argument
block (constant memory, read by every thread) is reported apart.
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
from metal_marlin_torch._files import write_atomic  # noqa: E402
from metal_marlin_torch.kv.stores import FP8Store  # noqa: E402


def measure(kind: str, b: int, hq: int, hk: int, sk: int, d: int) -> dict:
    """One decode step (Sq = 1) over a cache of sk positions: the launches' counters summed."""
    ops = emulator.load().ops
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, 1, d, generator=g).half()
    k, v = torch.randn(b, hk, sk, d, generator=g), torch.randn(b, hk, sk, d, generator=g)
    if kind == "fp16":
        args = (q, k.half(), v.half())
        cache = 2 * k.numel() * 2
        call = ops.attention
    else:
        (kc, ks), (vc, vs) = FP8Store.quantize(k), FP8Store.quantize(v)
        args = (q, kc, ks[..., 0], vc, vs[..., 0])
        cache = kc.numel() + vc.numel() + 4 * (ks.numel() + vs.numel())
        call = ops.attention_fp8
    t0 = time.perf_counter()
    with emulator.profile() as launches:
        call(*args, d ** -0.5, True, 0)
    wall = time.perf_counter() - t0
    kv_names = {"k", "v", "k_scales", "v_scales"}

    def total(key: str, names=None, exclude=()) -> int:
        return sum(b[key] for p in launches for b in p.buffers.values()
                   if (names is None or b["name"] in names) and b["name"] not in exclude)

    # The argument block (setBytes, constant address space) is read by every thread and served by
    # the constant cache on a GPU: counted apart from device traffic.
    kv_read = total("read", kv_names)
    other_read = total("read", exclude=kv_names | {"args"})
    written = total("written", exclude={"args"})
    lines = sum(p.lines64 for p in launches)
    ideal = sum(p.ideal_lines64 for p in launches)
    return {
        "cache": kind, "B": b, "Hq": hq, "Hk": hk, "Sk": sk, "D": d, "splits": launches[0].grid[1],
        "row_threadgroups": launches[0].grid[0],
        "launches": [p.kernel for p in launches], "cache_bytes": cache,
        "cache_bytes_read": kv_read, "cache_bytes_touched": total("unique_read", kv_names),
        "other_bytes_read": other_read, "bytes_written": written, "args_bytes_read": total("read", {"args"}),
        "read_per_cache_byte": kv_read / cache, "moved_per_cache_byte": (kv_read + other_read + written) / cache,
        "coalescing64": ideal / lines if lines else 1.0, "emulator_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="256,1024,2048", help="cache lengths Sk, comma-separated")
    p.add_argument("--heads", default="8,2", help="query heads, K/V heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--caches", default="fp16,fp8")
    p.add_argument("--json", default=None, help="write the result here (atomic)")
    args = p.parse_args(argv)
    hq, hk = (int(x) for x in args.heads.split(","))
    rows = [measure(kind, 1, hq, hk, int(sk), args.head_dim)
            for kind in args.caches.split(",") for sk in args.lengths.split(",")]
    result = {
        "what": "emulator traffic counters of one attention decode step (not a timing; no Apple GPU)",
        "machine": {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    print(f"{'cache':6} {'Sk':>6} {'splits':>6} {'cache KiB':>10} {'KV read KiB':>11} {'other KiB':>9} "
          f"{'written KiB':>11} {'read/cache':>10} {'moved/cache':>11} {'coal64':>6}")
    for r in rows:
        print(f"{r['cache']:6} {r['Sk']:6d} {r['splits']:6d} {r['cache_bytes'] / 1024:10.1f} "
              f"{r['cache_bytes_read'] / 1024:11.1f} {r['other_bytes_read'] / 1024:9.1f} "
              f"{r['bytes_written'] / 1024:11.1f} {r['read_per_cache_byte']:10.2f} "
              f"{r['moved_per_cache_byte']:11.2f} {r['coalescing64']:6.2f}")
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
