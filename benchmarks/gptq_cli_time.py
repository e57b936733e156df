"""End-to-end time of ``marlin quantize SRC OUT --method gptq`` (default settings: fp4, group 128,
128 x 512 calibration tokens, act-order, scale search) for one or more checkouts of the package,
and the KL of each result against the unquantized model by ``quality.py``'s protocol (held-out
stdlib files of ``pylm_eval_files.txt``, 512-token windows, the first ``--tokens`` tokens).

Each checkout runs as a child process from its own folder (so its own ``metal_marlin_torch``
is imported); wall time, the child's user and system CPU time, and the load average before and
after are recorded, because on a shared machine wall time says as much about the neighbours as
about the code (run the checkouts back to back and compare CPU time too).

    python benchmarks/gptq_cli_time.py --label after=. --label before=/path/to/old/checkout \\
        --label after-1thread=.@1 --out benchmarks/results/gptq_cli_time.json

``NAME=CHECKOUT@T`` runs that child with ``OMP_NUM_THREADS=T`` (torch's intra-op threads): on a
machine whose cores are already busy, one thread is both cheaper and faster (see gptq_time.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_quantize(code_dir: Path, src: Path, out: Path, threads: int | None = None) -> dict:
    """Run the checkout's ``marlin quantize --method gptq`` once (``threads``: its
    ``OMP_NUM_THREADS``, None = torch's default); its times and the load."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    load0 = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metal_marlin_torch.cli", "quantize", str(src), str(out),
                    "--method", "gptq"], cwd=code_dir, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"threads": threads or "default", "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime,
            "load_start": load0, "load_end": os.getloadavg()[0]}


def kl(checkpoints: list[Path], src: Path, tokens: int) -> dict[str, dict]:
    """quality.py's causal-LM metrics of each checkpoint against ``src``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: PLC0415
    from quality_common import eval_files, models_dir  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from metal_marlin_torch.io import load_quantized  # noqa: PLC0415
    from metal_marlin_torch.io.hf import load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.quant import metrics as M  # noqa: PLC0415
    from metal_marlin_torch.quant.calibration import read_text, tokenize  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(src))
    windows = M.eval_windows(tokenize(read_text(eval_files(models_dir())), tok), 512, tokens)
    ref_lp = M.causal_lm_logprobs(load_pretrained(src).float().eval(), windows, 8)
    out = {}
    for ckpt in checkpoints:
        with torch.no_grad():
            out[str(ckpt)] = M.evaluate_causal_lm(load_quantized(ckpt).float().eval(), windows, ref_lp, 8).to_dict()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", action="append", required=True, metavar="NAME=CHECKOUT[@THREADS]")
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "models" / "pylm-s"))
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens for the KL (default 8192)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for item in args.label:
            name, _, code = item.partition("=")
            code, _, threads = code.partition("@")
            outs[name] = Path(tmp) / name
            rows[name] = time_quantize(Path(code).resolve(), Path(args.src), outs[name],
                                       int(threads) if threads else None)
            print(name, rows[name], flush=True)
        metrics = kl(list(outs.values()), Path(args.src), args.tokens)
        for name, path in outs.items():
            rows[name]["kl_mean"] = metrics[str(path)]["kl_mean"]
            rows[name]["top1_agreement"] = metrics[str(path)]["top1_agreement"]
    print("| run | threads | wall s | user s | sys s | load start / end | KL mean | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['threads']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | "
              f"{r['load_start']:.1f} / {r['load_end']:.1f} | {r['kl_mean']:.6f} | {r['top1_agreement']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()} {platform.processor()}",
                                              "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
