"""The decoder-layer ``marlin`` ops against the stock torch/transformers ops they replace, per
op, on one device (issue 22 item 7): CPU rows run the CPU kernels (ops/layer_cpu.py: torch's
fused functions for the norms, activations and RoPE; attention's pure-torch kernel), CUDA rows
the pure-torch kernels, MPS rows the Metal kernels (on a Mac with the extension built). On a
shared machine run it with OMP_NUM_THREADS=1 (the JSON records the thread count).

    python benchmarks/bench_layer_ops.py --device cpu --json benchmarks/results/bench_layer_ops_cpu.json

Shapes are a Llama-3-8B decode step (M tokens, hidden 4096, intermediate 14336, 32 query / 8 KV
heads of 128, a KV length of ``--kv``). Each round times every method once, in turn (a busy
machine slows them alike); the median over ``--rounds`` rounds is reported with the ratio
stock / marlin of the same rounds (> 1: marlin faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import ops  # noqa: E402
from metal_marlin_torch._files import write_atomic  # noqa: E402
from metal_marlin_torch.ops.attention import attention_mask  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def cases(m: int, kv: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int,
          dtype: torch.dtype, device: str) -> dict[str, tuple[Callable, Callable]]:
    """op name -> (stock, marlin) zero-argument callables on the same inputs."""
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    x, res, w = r(m, hidden), r(m, hidden), r(hidden)
    g, u = r(m, inter), r(m, inter)
    q, k = r(1, heads, m, head_dim), r(1, kv_heads, m, head_dim)
    pos = torch.arange(kv - m, kv, device=device)[None]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    kc, vc = r(1, kv_heads, kv, head_dim), r(1, kv_heads, kv, head_dim)
    mask = attention_mask(m, kv, True, 0, device)

    def rms_stock():
        h = (x + res).float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    def rope_stock():
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

        def rot(t):
            return torch.cat((-t[..., head_dim // 2:], t[..., : head_dim // 2]), -1)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    return {
        "rms_norm+residual": (rms_stock, lambda: ops.rms_norm(x, w, 1e-5, residual=res)),
        "layer_norm": (lambda: F.layer_norm(x, (hidden,), w, w, 1e-5), lambda: ops.layer_norm(x, w, w, 1e-5)),
        "silu_mul": (lambda: F.silu(g) * u, lambda: ops.silu_mul(g, u)),
        "gelu_mul": (lambda: F.gelu(g, approximate="tanh") * u, lambda: ops.gelu_mul(g, u)),
        "rope": (rope_stock, lambda: ops.rope(q, k, pos, inv_freq)),
        "attention": (lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True),
                      lambda: ops.attention(q, kc, vc)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--m", default="1,16", help="tokens per step (1 = decode)")
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    heads, kv_heads, head_dim = (int(v) for v in args.heads.split(","))
    machine = f"{platform.machine()} {platform.processor() or platform.system()}, {args.device}"
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for m in (int(v) for v in args.m.split(",")):
            for name, (stock, ours) in cases(m, args.kv, args.hidden, args.inter, heads, kv_heads, head_dim, dtype,
                                             args.device).items():
                times: dict[str, list[float]] = {"stock": [], "marlin": []}
                stock(), ours()
                for _ in range(args.rounds):
                    for label, fn in (("stock", stock), ("marlin", ours)):
                        _sync(args.device)
                        t0 = time.perf_counter()
                        fn()
                        _sync(args.device)
                        times[label].append(time.perf_counter() - t0)
                s, o = statistics.median(times["stock"]), statistics.median(times["marlin"])
                rows.append({"op": name, "M": m, "stock_ms": s * 1e3, "marlin_ms": o * 1e3, "ratio": s / o,
                             "kernel": ops.active_kernels(args.device.split(":")[0]).get(name.split("+")[0],
                                                                                             "torch")})
    print(f"{'op':<18} {'M':>3} {'stock ms':>10} {'marlin ms':>10} {'stock/marlin':>13}  kernel")
    for r in rows:
        print(f"{r['op']:<18} {r['M']:>3} {r['stock_ms']:>10.4f} {r['marlin_ms']:>10.4f} {r['ratio']:>13.2f}  "
              f"{r['kernel']}")
    result = {"machine": machine, "torch": torch.__version__, "dtype": args.dtype, "kv": args.kv,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
