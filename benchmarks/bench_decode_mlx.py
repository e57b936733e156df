"""End-to-end decode: tokens/s and memory of a Hugging Face model, dense against quantized.

    python benchmarks/bench_decode.py --model PATH                  # device: mps > cuda > cpu
    python benchmarks/bench_decode.py --model PATH --methods dense,fp4,int4,mlx --json out.json

Rows, all in one process on the same prompt:
  * ``dense``: the model as loaded, in the activation dtype (fp16 on MPS, bf16 on CUDA, fp32 on CPU);
  * ``marlin:<fmt>``: the same model after ``quantize_model`` (round to nearest, the format's
    default group), whose linears run ``marlin.gemm`` (Metal on MPS, Triton on CUDA, torch on CPU);
  * ``mlx``: ``mlx_lm`` (4-bit, its own quantization) on MLX's default device, when ``mlx_lm`` is
    importable; otherwise the row says why it is missing.

Timing (wall clock, ``generate`` with greedy decoding and a fixed number of new tokens): the
median of ``--repeats`` runs of ``generate(max_new_tokens=1)`` is the prefill time; the median of
runs of ``generate(max_new_tokens=N)`` minus it, over N - 1 tokens, is the decode rate. Memory:
the model's own bytes (parameters and buffers), device memory (CUDA peak allocated, MPS
allocated) and the process's peak RSS (which only grows across rows). ``agree`` is the fraction
of new tokens equal to the dense model's (a quality signal, not a benchmark).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gemm import write_atomic  # noqa: E402
from metal_marlin_torch.cli.generate import cast_dense, model_bytes, pick_device, pick_dtype, rss_bytes  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**20
    return None


def timed_generate(model, ids: torch.Tensor, new: int, repeats: int, device: torch.device) -> tuple[float, list[int]]:
    """Median seconds of ``generate`` producing exactly ``new`` tokens, and the tokens."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out[0, ids.shape[1]:].tolist()


def run_torch(name: str, model, ids, args, device) -> dict:
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        timed_generate(model, ids, 2, 1, device)  # warm-up: kernels, caches, the Metal extension
        prefill, _ = timed_generate(model, ids, 1, args.repeats, device)
        full, tokens = timed_generate(model, ids, args.new_tokens, args.repeats, device)
    # t(N) <= t(1) happens only on a machine too noisy to time: say so rather than print a rate
    rate = (args.new_tokens - 1) / (full - prefill) if full > prefill else None
    return {"method": name, "prefill_ms": prefill * 1e3, "decode_tok_s": rate,
            "model_MiB": model_bytes(model) / 2**20, "device_MiB": device_memory_mib(device),
            "peak_rss_MiB": rss_bytes()[1] / 2**20, "tokens": tokens}


def run_mlx(args) -> dict:
    """mlx_lm's 4-bit decode of the same model, or a row saying why there is none."""
    try:
        import mlx.core as mx  # noqa: PLC0415
        import mlx_lm  # noqa: PLC0415
    except ImportError as exc:
        return {"method": "mlx", "skipped": f"{exc.name} not importable"}
    from mlx_lm.utils import quantize_model  # noqa: PLC0415

    model, tokenizer = mlx_lm.load(args.model)
    model, _ = quantize_model(model, {}, q_group_size=64, q_bits=4)
    ids = mx.array(list(range(3, 3 + args.prompt_len)))[None]

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        cache, y = None, ids
        from mlx_lm.models.cache import make_prompt_cache  # noqa: PLC0415

        cache = make_prompt_cache(model)
        for _ in range(n):
            logits = model(y, cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
            mx.eval(y)
        return time.perf_counter() - t0

    gen(2)
    prefill = statistics.median(gen(1) for _ in range(args.repeats))
    full = statistics.median(gen(args.new_tokens) for _ in range(args.repeats))
    return {"method": "mlx", "prefill_ms": prefill * 1e3, "decode_tok_s": (args.new_tokens - 1) / (full - prefill),
            "model_MiB": None, "device_MiB": mx.get_peak_memory() / 2**20 if hasattr(mx, "get_peak_memory") else None,
            "peak_rss_MiB": rss_bytes()[1] / 2**20, "note": f"mlx_lm 4-bit group 64 on {mx.default_device()}"}


def bench(args) -> dict:
    from metal_marlin_torch import backend_info  # noqa: PLC0415
    from metal_marlin_torch.io.hf import load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.nn import QuantConfig, quantize_model  # noqa: PLC0415

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    ids = torch.arange(3, 3 + args.prompt_len, device=device)[None]
    rows = []
    for method in args.methods.split(","):
        if method == "mlx":
            rows.append(run_mlx(args))
        else:
            model = load_pretrained(Path(args.model), dtype=torch.float32)
            if method != "dense":
                quantize_model(model, QuantConfig(format=method))
            cast_dense(model, dtype)
            model.to(device)
            rows.append(run_torch("dense" if method == "dense" else f"marlin:{method}", model, ids, args, device))
            del model
        r = rows[-1]
        print(f"{r['method']:14s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
              f"prefill {r['prefill_ms']:8.2f} ms  decode {r['decode_tok_s'] or float('nan'):8.2f} tok/s  "
              f"model {r['model_MiB'] or 0:8.2f} MiB"), flush=True)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        if dense is not None and "tokens" in r:
            r["agree"] = sum(a == b for a, b in zip(r["tokens"], dense["tokens"], strict=True)) / len(r["tokens"])
        if dense is not None and r.get("decode_tok_s") and dense.get("decode_tok_s"):
            r["decode_x_dense"] = r["decode_tok_s"] / dense["decode_tok_s"]
    info = backend_info()
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(),
                        # other processes share the cores: the load says how much to trust the times
                        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "model": str(args.model), "dtype": str(dtype), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "timing": "wall clock around generate(), median; decode = (N - 1) / (t(N) - t(1))",
            "backend": {"metal_extension": info["metal_extension"], "kernels": info["kernels"][device.type]},
            "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    head = [f"# End-to-end decode ({m['device']})", "",
            f"Machine: {m['processor']}, {m['platform']}, {m['threads']} threads, load average "
            f"{m['load_average']}; torch {m['torch']}. "
            f"Model {Path(result['model']).name}, {result['dtype']}, prompt {result['prompt_len']} tokens, "
            f"{result['new_tokens']} new tokens, median of {result['repeats']}. Timing: {result['timing']}.", "",
            "| method | prefill ms | decode tok/s | x dense | model MiB | device MiB | agree |",
            "|---|---|---|---|---|---|---|"]
    body = []
    for r in result["rows"]:
        if "skipped" in r:
            body.append(f"| {r['method']} | skipped: {r['skipped']} | | | | | |")
            continue
        dev = "" if r.get("device_MiB") is None else f"{r['device_MiB']:.1f}"
        model = "" if r.get("model_MiB") is None else f"{r['model_MiB']:.2f}"
        rate = "noise" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        body.append(f"| {r['method']} | {r['prefill_ms']:.2f} | {rate} | "
                    f"{r.get('decode_x_dense', float('nan')):.2f} | {model} | {dev} | {r.get('agree', '')} |")
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (causal LM)")
    p.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--methods", default="dense,fp4,int4,mlx", help="dense, weight formats, mlx (comma-separated)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--markdown", help="write the table as markdown here")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (decode is measured past the first token), got {args.new_tokens}")
    result = bench(args)
    table = markdown(result)
    print(table)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1))
    if args.markdown:
        write_atomic(args.markdown, table)
    return result


if __name__ == "__main__":
    main()
