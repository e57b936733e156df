"""Peak memory of in-memory ``marlin quantize`` (not ``--stream``) against the bound of issue 23:
at most 2x the largest shard plus the model's quantized size.

Each run is a fresh child process that imports torch, transformers, the model class and this
package first (the *baseline*: about 450 MiB of code and libraries that any command pays), then
runs ``marlin quantize SRC OUT --no-stream`` while a thread samples the resident set every
millisecond (``/proc/self/statm``; ``ru_maxrss`` gives the same peak). The number compared to
the bound is the peak above the baseline. ``before`` re-creates the code before the fix in the
same child (whole-matrix quantization and no ``malloc_trim``), so both rows come from one
machine and one run of this script; medians over ``--repeat`` runs.

    PYTHONPATH=. python benchmarks/quantize_memory.py [--models-dir DIR] [--format int4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import RESULTS, machine, md_table, models_dir, write_json, write_text  # noqa: E402

CHILD = r"""
import json, sys, threading, time
import torch, transformers  # noqa: F401
from transformers import AutoConfig
import metal_marlin_torch
from metal_marlin_torch.cli import main
import metal_marlin_torch.formats.base as B
import metal_marlin_torch.nn.quantize as Q

src, out, fmt, mode = sys.argv[1:5]
getattr(transformers, AutoConfig.from_pretrained(src).architectures[0])  # import the model class
if mode == "before":
    B.QUANTIZE_BLOCK_ELEMENTS = 1 << 62
    Q.release_freed_memory = lambda: False

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base = rss()
peak = [base]
def sample():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
main(["quantize", src, out, "--format", fmt, "--no-stream"])
time.sleep(0.05)
print(json.dumps({"baseline": base, "peak_over_baseline": peak[0] - base}))
"""


def run_child(src: Path, fmt: str, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), fmt, mode],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["quantized_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--model", default="pylm-s")
    ap.add_argument("--format", default="int4")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    src = models_dir(args.models_dir) / args.model
    shard = max(p.stat().st_size for p in src.glob("*.safetensors"))
    rows, data = [], {"machine": machine(), "model": args.model, "format": args.format,
                      "largest_shard_bytes": shard, "runs": {}}
    mib = 2 ** 20
    for mode in ("before", "after"):
        runs = [run_child(src, args.format, mode) for _ in range(args.repeat)]
        data["runs"][mode] = runs
        peak = statistics.median(r["peak_over_baseline"] for r in runs)
        quantized = runs[0]["quantized_bytes"]
        bound = 2 * shard + quantized
        rows.append([mode, f"{statistics.median(r['baseline'] for r in runs) / mib:.0f}", f"{shard / mib:.1f}",
                     f"{quantized / mib:.1f}", f"{peak / mib:.1f}", f"{bound / mib:.1f}", f"{peak / bound:.2f}"])
        data[mode] = {"median_peak_over_baseline": peak, "bound": bound, "ratio_to_bound": peak / bound}
        print(rows[-1], flush=True)
    md = md_table(["code", "baseline MiB", "largest shard MiB", "quantized MiB", "peak above baseline MiB (median)",
                   "bound MiB (2 x shard + quantized)", "peak / bound"], rows)
    print(md)
    write_json(RESULTS / "quantize_memory.json", data)
    write_text(RESULTS / "quantize_memory.md", f"# In-memory `marlin quantize` peak memory ({args.model}, "
               f"{args.format})\n\n{md}")


if __name__ == "__main__":
    main()
