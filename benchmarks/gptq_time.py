"""GPTQ time for one layer: ours (``metal_marlin_torch.quant.gptq``) vs the paper's algorithm
written plainly (``gptq_reference.py``), same settings, same run, same inputs.

Layers (out x in): 4096 x 4096 and 14336 x 4096 (a Llama-3-8B ``q_proj`` and ``up_proj``).
Calibration: 128 x 2048 = 262144 token activations of width 4096 (synthetic: Gaussian channels
of unequal scale plus a shared rank-16 component, fixed seed; the timing does not depend on the
values).
Settings: int4, group 128, damp 0.01, lazy block 128, act-order with static groups.
Phases timed separately: Hessian accumulation (``X^T X`` in chunks of 2048 tokens) and the
column-by-column solve. Ours is also timed with its MSE scale search (its default), and on
CUDA without its graph-captured block loop (``solve s ours eager``; on CPU the same path).

GPTQModel (the public GPTQ implementation) is not the comparison: version 7.7.0 on PyPI is a
source distribution whose requirements (torch >= 2.14.1, transformers >= 5.20.2, accelerate,
datasets, pyarrow, torchao, ...) are newer than or absent from these machines' torch 2.13 / 2.11
and transformers 5.17, its CUDA extensions must be compiled, and the GPU machine has no network.

    PYTHONPATH=. python3 benchmarks/gptq_time.py --device cuda --out benchmarks/results/gptq_time_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_reference import add_batch, gptq_reference  # noqa: E402

from metal_marlin_torch.quant import gptq as G  # noqa: E402
from metal_marlin_torch.quant.gptq import HessianAccumulator, gptq_quantize  # noqa: E402

LAYERS = ((4096, 4096), (14336, 4096))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def render(paths: list[str]) -> str:
    """A markdown table of result JSON files written by this script."""
    lines = ["| machine | layer | Hessian s (ours / ref) | solve s ours | solve s ours eager | "
             "solve s ours + scale search | solve s reference | ours vs ref (solve) | "
             "rel. output error ours / +search / ref |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        r = json.loads(Path(p).read_text())
        name = f"{r['device_name']} ({r['device']}, {r['cpu_threads']} threads)"
        for row in r["layers"]:
            lines.append(
                f"| {name} | {row['layer']} | {r['hessian_s_ours']:.3f} / {r['hessian_s_reference']:.3f} | "
                f"{row['solve_s_ours']:.3f} | {row.get('solve_s_ours_eager', float('nan')):.3f} | "
                f"{row['solve_s_ours_scale_search']:.3f} | "
                f"{row['solve_s_reference']:.3f} | "
                f"{row['speedup_vs_reference']:.2f}x | {row['rel_output_error_ours']:.5f} / "
                f"{row['rel_output_error_ours_scale_search']:.5f} / {row['rel_output_error_reference']:.5f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", nargs="*", default=None, metavar="JSON",
                    help="print a markdown table of earlier result files and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hessian-repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.render is not None:
        print(render(args.render), end="")
        return
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere, both implementations
    k = LAYERS[0][1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    # channels of unequal scale plus a shared rank-16 component (correlation), cheap to draw
    col_scale = torch.linspace(0.2, 4.0, k)[torch.randperm(k, generator=gen)].to(device)
    basis = (torch.randn(16, k, generator=gen) * 0.5).to(device)
    chunks = []
    dgen = torch.Generator(device=device).manual_seed(1)
    for _ in range(args.samples):  # activations, generated before timing
        x = torch.randn(args.seq_len, k, generator=dgen, device=device) * col_scale
        x += torch.randn(args.seq_len, 16, generator=dgen, device=device) @ basis
        chunks.append(x)

    def hessian_ours():
        acc = HessianAccumulator(k, device)
        for c in chunks:
            acc.add(c)
        return acc.hessian()

    def hessian_ref():
        h = torch.zeros(k, k, device=device)
        n = 0
        for c in chunks:
            n = add_batch(h, n, c)
        return h

    t_h_ours, h = timed(hessian_ours, device, args.hessian_repeats)
    t_h_ref, h_ref = timed(hessian_ref, device, args.hessian_repeats)
    h_diff = float((h - h_ref).abs().max() / h.abs().max())
    chunks.clear()  # free the activations before the solves
    rows = []
    for n_out, k_in in LAYERS:
        w = (torch.randn(n_out, k_in, generator=torch.Generator(device=device).manual_seed(2), device=device)
             * 0.02)
        t_ours, res = timed(lambda w=w: gptq_quantize(w, h, "int4", 128, scale_search=False), device, args.repeats)
        G.USE_CUDA_GRAPHS = False  # the same solve op by op (on CPU the two are the same path)
        t_eager, res_e = timed(lambda w=w: gptq_quantize(w, h, "int4", 128, scale_search=False), device,
                               args.repeats)
        G.USE_CUDA_GRAPHS = True
        t_search, res_s = timed(lambda w=w: gptq_quantize(w, h, "int4", 128), device, args.repeats)
        t_ref, w_ref = timed(lambda w=w: gptq_reference(w, h, 4, 128), device, args.repeats)

        def proxy(w_hat, w=w):  # output error tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T)
            d = w - w_hat
            return float(((d @ h) * d).sum() / ((w @ h) * w).sum())

        row = {"layer": f"{n_out}x{k_in}", "out_features": n_out, "in_features": k_in,
               "solve_s_ours": t_ours, "solve_s_ours_eager": t_eager,
               "graph_vs_eager_max_abs_diff": float((res.w_hat - res_e.w_hat).abs().max()),
               "graph_vs_eager_codes_differ": float((res.qt.weight != res_e.qt.weight).float().mean()),
               "solve_s_ours_scale_search": t_search, "solve_s_reference": t_ref,
               "speedup_vs_reference": t_ref / t_ours,
               "total_s_ours": t_h_ours + t_ours, "total_s_reference": t_h_ref + t_ref,
               "rel_output_error_ours": proxy(res.w_hat), "rel_output_error_ours_scale_search": proxy(res_s.w_hat),
               "rel_output_error_reference": proxy(w_ref)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or platform.machine()
    result = {
        "device": str(device), "device_name": dev_name, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "calibration_tokens": args.samples * args.seq_len, "calibration": f"{args.samples} x {args.seq_len}",
        "settings": {"format": "int4", "group_size": 128, "damp": 0.01, "block": 128, "act_order": True,
                     "static_groups": True, "tf32": False},
        "hessian_s_ours": t_h_ours, "hessian_s_reference": t_h_ref, "hessian_rel_diff": h_diff,
        "repeats": args.repeats, "statistic": "median", "layers": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
