"""One mixture-of-experts block: tokens/s of the quantized block against the dense bf16 block and
the pure-torch oracle, plus the emulator's traffic counters of the decode kernel (issue 21 item 5).

    python benchmarks/bench_moe.py --device cpu --json benchmarks/results/bench_moe_cpu.json

Shapes default to one Qwen3-30B-A3B MoE block: 128 experts, top-8, hidden 2048, expert
intermediate 768 (transformers' own ``Qwen3MoeSparseMoeBlock``, random weights). Rows:

- ``dense bf16``: the transformers block in bf16 (its router, its per-expert loop);
- ``marlin``: the same block after ``quantize_model`` (``MarlinRouter`` -> ``marlin.moe_route``,
  ``MarlinExperts`` -> ``marlin.moe_gemm`` + ``marlin.silu_mul``): Metal kernels on MPS, the
  pure-torch kernels on CPU/CUDA;
- ``oracle``: the same quantized tensors through the pure-torch kernels called directly (the
  Python functions in ``ops/moe.py`` / ``ops/moe_route.py``, whatever the device). On CPU it
  runs the same code as ``marlin`` (the CPU kernel *is* the oracle): there the pair measures
  the module's overhead, not a kernel.

Decode = ``--decode-tokens`` tokens (default 1), prefill = ``--prefill-tokens`` (512). Each
round times every method once in turn; medians over rounds, ratios from the same rounds.
``--counters`` runs one decode step's ``moe_gemm`` launches (gate_up and down) on the MSL
emulator under ``emulator.profile()`` and reports the weight bytes (packed codes, scales,
biases) the kernel reads against the minimum (the selected experts' bytes, each once), the
distinct bytes it touches against the minimum (those plus activations, ids and output once),
and all device reads (which also count every thread's re-reads of the activation row and the
argument structs, served by caches on a GPU). The counters count what the kernel code reads, not what a GPU cache
would make of it; no Apple timing is claimed anywhere here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch._files import write_atomic  # noqa: E402
from metal_marlin_torch.ops.moe import moe_gemm as oracle_moe_gemm  # noqa: E402
from metal_marlin_torch.ops.moe_route import moe_route as oracle_moe_route  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def build_block(experts: int, top_k: int, hidden: int, inter: int, device: str) -> torch.nn.Module:
    """transformers' Qwen3-MoE block in bf16 with random weights (router N(0, 1/H): logits of unit
    scale for unit inputs; experts N(0, 0.02^2))."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                      num_experts_per_tok=top_k, norm_topk_prob=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the experts on the way
    try:
        block = Qwen3MoeSparseMoeBlock(cfg)
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * hidden**-0.5)
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            for e in range(p.shape[0]):  # expert by expert: no fp32 tensor of the whole stack
                p[e].copy_(torch.randn(p[e].shape, generator=g) * 0.02)
    return block.to(device).eval()


def oracle_forward(q: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized block through the pure-torch kernels, called directly (any device)."""
    h = x.reshape(-1, x.shape[-1])
    r = q.gate
    s = r.spec
    w, ids = oracle_moe_route(torch.nn.functional.linear(h, r.weight), None, s.top_k, s.mode, s.renormalize,
                              s.n_group, s.topk_group, s.scaling)
    ex = q.experts
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    rows = h.repeat_interleave(k, dim=0)

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        plan = ex.plans[name]
        return oracle_moe_gemm(inp, flat, getattr(ex, name), getattr(ex, f"{name}_scales"),
                               getattr(ex, f"{name}_biases"), getattr(ex, f"{name}_global_scale"), None,
                               plan.format, plan.group_size)

    gate, up = proj("gate_up_proj", rows).chunk(2, dim=-1)
    out = proj("down_proj", torch.nn.functional.silu(gate) * up)
    out = (out.float() * w.reshape(-1, 1)).view(-1, k, h.shape[-1]).sum(1)
    return out.to(x.dtype).reshape(x.shape)


def time_rounds(fns: dict[str, Any], x: torch.Tensor, rounds: int, device: str) -> dict[str, list[float]]:
    """Per method, the seconds of each round (the caller's accuracy pass was the warm-up)."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def counters(q: torch.nn.Module, hidden: int, top_k: int) -> dict[str, Any]:
    """Emulated decode launches of moe_gemm for one token: bytes read against the minimum."""
    from metal_marlin_torch import emulator

    ex = q.experts
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        _, w, ids = q.gate(x)
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    chosen = sorted(set(flat.tolist()))
    rows = x.repeat_interleave(k, dim=0)
    out: dict[str, Any] = {"selected_experts": len(chosen), "launches": []}
    inp = rows
    for name in ("gate_up_proj", "down_proj"):
        plan = ex.plans[name]
        tensors = [getattr(ex, name), getattr(ex, f"{name}_scales"), getattr(ex, f"{name}_biases"),
                   getattr(ex, f"{name}_global_scale")]
        with emulator.profile() as launches:
            y = torch.ops.marlin_emu.moe_gemm(inp, flat, *tensors, None, plan.format, plan.group_size)
        ref = torch.ops.marlin.moe_gemm(inp, flat, *tensors, None, plan.format, plan.group_size)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        # the minimum: each selected expert's packed weights / scales / biases once, the
        # activations, the ids and the output, each once
        expert_bytes = sum(t[0].numel() * t.element_size() for t in tensors if t is not None)
        minimum = len(chosen) * expert_bytes + inp.numel() * inp.element_size() \
            + flat.numel() * flat.element_size() + y.numel() * y.element_size()
        per_buffer: dict[str, dict[str, int]] = {}
        for p in launches:
            for b in p.buffers.values():
                acc = per_buffer.setdefault(b["name"], {"read": 0, "unique_read": 0, "written": 0})
                for key in acc:
                    acc[key] += b[key]
        weight_names = ("weight", "scales", "biases", "global_scale")
        weights_read = sum(v["read"] for n, v in per_buffer.items() if n in weight_names)
        unique = sum(v["unique_read"] + v["written"] for v in per_buffer.values())
        read = sum(p.device_bytes_read for p in launches)
        written = sum(p.device_bytes_written for p in launches)
        out["launches"].append({
            "projection": name, "kernels": [p.kernel for p in launches], "rows": inp.shape[0],
            "N": int(tensors[0].shape[1]), "K": int(inp.shape[1]),
            "weight_bytes_read": weights_read, "selected_expert_bytes": len(chosen) * expert_bytes,
            "weight_ratio_to_min": weights_read / (len(chosen) * expert_bytes),
            "unique_bytes": unique, "min_bytes": minimum, "unique_ratio_to_min": unique / minimum,
            "device_bytes_read": read, "device_bytes_written": written, "buffers": per_buffer,
            "coalescing64": statistics.fmean(p.coalescing64 for p in launches),
            "rel_err_vs_torch": err,
        })
        if name == "gate_up_proj":
            g, u = y.float().chunk(2, dim=-1)
            inp = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    out["weight_bytes_per_token"] = sum(r["weight_bytes_read"] for r in out["launches"])
    out["min_weight_bytes_per_token"] = sum(r["selected_expert_bytes"] for r in out["launches"])
    out["unique_bytes_per_token"] = sum(r["unique_bytes"] for r in out["launches"])
    out["min_bytes_per_token"] = sum(r["min_bytes"] for r in out["launches"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-rounds", type=int, default=5)
    ap.add_argument("--prefill-rounds", type=int, default=2)
    ap.add_argument("--counters", action="store_true", help="emulated decode moe_gemm traffic counters")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dense = build_block(args.experts, args.top_k, args.hidden, args.inter, args.device)
    q = copy.deepcopy(dense)
    summary = quantize_model(q, QuantConfig(format=args.format, group_size=args.group_size))
    fns = {"dense bf16": dense, "marlin": q, "oracle": lambda x: oracle_forward(q, x)}
    rows = []
    for phase, tokens, rounds in (("decode", args.decode_tokens, args.decode_rounds),
                                  ("prefill", args.prefill_tokens, args.prefill_rounds)):
        x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(tokens))
        x = x.to(device=args.device, dtype=torch.bfloat16)
        with torch.no_grad():  # also the warm-up of every method (first-call allocations, compiles)
            want = dense(x).float()
            agree = {n: ((fn(x).float() - want).norm() / want.norm()).item() for n, fn in fns.items()}
            _sync(args.device)
        times = time_rounds(fns, x, rounds, args.device)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"[{phase}: {tokens} tokens, {rounds} rounds done]", flush=True)
        for name in fns:
            rows.append({
                "phase": phase, "method": name, "tokens": tokens, "rounds": rounds,
                "ms": med[name] * 1e3, "tok_s": tokens / med[name],
                "speedup_vs_dense": med["dense bf16"] / med[name],
                "speedup_vs_oracle": med["oracle"] / med[name],
                "rel_err_vs_dense": agree[name],
            })
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.experts.parameters())
    q_bytes = sum(t.numel() * t.element_size() for t in q.experts.buffers() if t is not None)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    # a shared machine's load at the end of the run (timings are only as good as this)
                    "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "shape": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "inter": args.inter,
                  "format": args.format, "group_size": args.group_size},
        "experts_MiB": {"dense_bf16": dense_bytes / 2**20, "quantized": q_bytes / 2**20},
        "routers": summary.routers,
        "rows": rows,
        "note": ("CPU: 'marlin' and 'oracle' run the same pure-torch kernels (the CPU kernel is the oracle). "
                 "No Apple GPU timing is claimed." if args.device != "mps" else "MPS: Metal kernels"),
    }
    if args.counters:
        result["decode_counters"] = counters(q, args.hidden, args.top_k)

    print(f"MoE block E={args.experts} top-{args.top_k} H={args.hidden} I={args.inter} {args.format}/g"
          f"{args.group_size} on {args.device} ({result['machine']['processor']}, {torch.get_num_threads()} threads)")
    print(f"{'phase':8} {'method':11} {'tokens':>6} {'ms':>10} {'tok/s':>10} {'x dense':>8} {'x oracle':>8} "
          f"{'rel err':>8}")
    for r in rows:
        print(f"{r['phase']:8} {r['method']:11} {r['tokens']:6d} {r['ms']:10.2f} {r['tok_s']:10.1f} "
              f"{r['speedup_vs_dense']:8.2f} {r['speedup_vs_oracle']:8.2f} {r['rel_err_vs_dense']:8.4f}")
    if args.counters:
        c = result["decode_counters"]
        print(f"decode counters (emulator, one token, {c['selected_experts']} experts selected):")
        for r in c["launches"]:
            print(f"  {r['projection']:12} {','.join(r['kernels'])}: weights read {r['weight_bytes_read']:,} B vs "
                  f"{r['selected_expert_bytes']:,} B of the selected experts ({r['weight_ratio_to_min']:.3f}x); "
                  f"distinct bytes {r['unique_bytes']:,} vs minimum {r['min_bytes']:,} "
                  f"({r['unique_ratio_to_min']:.3f}x); all reads incl. re-reads of x/args "
                  f"{r['device_bytes_read']:,} B; rel err vs torch {r['rel_err_vs_torch']:.1e}")
        print(f"  per token: weights {c['weight_bytes_per_token']:,} B read vs {c['min_weight_bytes_per_token']:,} B "
              f"minimum; distinct {c['unique_bytes_per_token']:,} B vs {c['min_bytes_per_token']:,} B")
    if args.json:
        write_atomic(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
