"""Where a decode step's GPU time goes (issue 24): per-kernel time of bench_decode's model, and
each projection shape's kernel alone against its bandwidth floor. CUDA only.

    python benchmarks/profile_decode.py --json out.json --markdown out.md

Sections (``--sections``, comma separated):
  * ``step``: the decode step of ``bench_decode.py``'s model (Llama-3-8B shapes, ``--layers``
    layers, random bf16 weights, static cache) compiled with mode "reduce-overhead" (one CUDA
    graph), for each of ``--methods``: wall ms a step (median), then ``torch.profiler`` over
    ``--profile-steps`` steps: per-kernel device time summed and divided by the steps, launches
    a step, a category per kernel (ours / cuBLAS / attention / inductor-fused / copy / other),
    and the gap = wall step - kernel time (launch gaps inside the graph and the host's share);
  * ``generate``: one compiled ``generate()`` (HF's automatic compile) of ``--generate-methods``
    with every per-token gap recorded (median, mean, max, time after the last token) and the
    host ops that take the most CPU time in a profiled call;
  * ``shapes``: each projection shape's kernel alone at M = 1 (``--shape-list``), 20 launches
    captured in one CUDA graph, median of replays, us a launch: dense bf16 ``F.linear``, ours
    int4 / fp4 / nf4 on the default path, GEMV configurations and the tensor-core GEMV where
    they apply; the floor is the bytes the kernel must read divided by the device-to-device copy
    bandwidth measured in the same run;
  * ``prefill``: M = 2048 on the same shapes: dense ``F.linear`` (weight [N, K]) and
    ``x @ W^T`` with ``W^T`` stored [K, N], ours on the dequantize path with W_hat^T [K, N]
    (or W_hat [N, K]: ``_nk``) whole and in slices of several widths, and the dequantize
    kernel alone.
Each section's result is written as soon as it is done.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as Fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import _Stamps, build_method  # noqa: E402
from benchmarks.bench_gemm import machine_info, write_atomic  # noqa: E402


def category(name: str) -> str:
    """A kernel's kind, from its name."""
    n = name.lower()
    if any(s in n for s in ("gemv_kernel", "mma_gemv", "gemm_pairs_kernel", "gemm_kernel",
                            "dequant_kernel")):
        return "ours"
    if "int4pack" in n or "tinygemm" in n:
        return "tinygemm"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if n.startswith("triton_"):
        return "inductor"
    if any(s in n for s in ("gemv", "gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")):
        return "cublas"
    if any(s in n for s in ("copy", "index", "scatter", "cat", "fill", "memcpy", "memset")):
        return "copy"
    return "other"


def kernel_table(prof, steps: int) -> tuple[list[dict], float]:
    """Per-kernel rows (us a step, launches a step, category), sorted by time; total us a step."""
    rows: dict[str, dict] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        d = e.time_range.elapsed_us()
        r = rows.setdefault(e.name, {"kernel": e.name[:120], "us": 0.0, "launches": 0,
                                     "category": category(e.name)})
        r["us"] += d
        r["launches"] += 1
    out = sorted(rows.values(), key=lambda r: -r["us"])
    for r in out:
        r["us"] = round(r["us"] / steps, 2)
        r["launches"] = round(r["launches"] / steps, 2)
    return out, sum(r["us"] for r in out)


def idle_gaps(prof, steps: int, small_us: float = 20.0) -> dict:
    """The device's idle time between consecutive kernels, a step: gaps under ``small_us``
    (launch gaps inside a graph) and longer ones (the host between replays), us."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    small = large = 0.0
    n_small = 0
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        gap = start - end
        if gap <= 0:
            continue
        if gap < small_us:
            small += gap
            n_small += 1
        else:
            large += gap
    return {"inner_gap_us_per_step": round(small / steps, 1),
            "inner_gaps_per_step": round(n_small / steps, 1),
            "host_gap_us_per_step": round(large / steps, 1)}


def by_category(rows: list[dict]) -> dict:
    cats: dict[str, dict] = {}
    for r in rows:
        c = cats.setdefault(r["category"], {"us": 0.0, "launches": 0.0})
        c["us"] = round(c["us"] + r["us"], 2)
        c["launches"] = round(c["launches"] + r["launches"], 2)
    return cats


def _build(args, method: str):
    """bench_decode's model of ``method``; a ``/nofuse`` suffix keeps q/k/v and gate/up apart."""
    base, _, opt = method.partition("/")
    return build_method(argparse.Namespace(**{**vars(args), "fuse": "none" if opt == "nofuse" else "all"}),
                        base, "cuda", torch.bfloat16)


def profile_step(args, method: str) -> dict:
    from transformers import StaticCache

    torch._dynamo.reset()
    model = _build(args, method)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).cuda()
    cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.steps + args.profile_steps + 8)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    out: dict = {"method": method}

    def run(pos: int, tok: torch.Tensor) -> torch.Tensor:
        # as bench_decode's step_graph_tok_s: one replay, synchronized
        o = step(tok, past_key_values=cache, cache_position=torch.tensor([pos], device="cuda"),
                 use_cache=True)
        tok = o.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return tok

    with torch.no_grad():
        o = model(ids, past_key_values=cache, cache_position=torch.arange(args.prompt, device="cuda"),
                  use_cache=True)
        tok = o.logits[:, -1:].argmax(-1)
        pos = args.prompt
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            tok = run(pos, tok)
            times.append(time.perf_counter() - t0)
            pos += 1
        out["step_ms"] = round(statistics.median(times[args.steps // 2:]) * 1e3, 3)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                tok = run(pos, tok)
                pos += 1
    rows, total_us = kernel_table(prof, args.profile_steps)
    out.update(idle_gaps(prof, args.profile_steps))
    out["kernel_us_per_step"] = round(total_us, 1)
    out["gap_us_per_step"] = round(out["step_ms"] * 1e3 - total_us, 1)
    out["launches_per_step"] = round(sum(r["launches"] for r in rows), 1)
    out["categories"] = by_category(rows)
    out["kernels"] = rows[:40]
    return out


def profile_generate(args, method: str) -> dict:
    from transformers import LogitsProcessorList

    torch._dynamo.reset()
    model = _build(args, method)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).cuda()
    stamps = _Stamps()
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              cache_implementation="static", pad_token_id=0, disable_compile=False,
              logits_processor=LogitsProcessorList([stamps]))
    out: dict = {"method": method}
    with torch.no_grad():
        model.generate(ids, **kw)
        model.generate(ids, **kw)
        stamps.t.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        gaps = [(b - a) * 1e3 for a, b in zip(stamps.t, stamps.t[1:], strict=False)]
        out.update(total_ms=round((t1 - t0) * 1e3, 2), first_ms=round((stamps.t[0] - t0) * 1e3, 2),
                   after_last_ms=round((t1 - stamps.t[-1]) * 1e3, 2),
                   gap_median_ms=round(statistics.median(gaps), 3), gap_mean_ms=round(statistics.mean(gaps), 3),
                   gap_max_ms=round(max(gaps), 3), gaps_ms=[round(v, 3) for v in gaps])
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(ids, **kw)
            torch.cuda.synchronize()
    rows, total_us = kernel_table(prof, args.new)
    out["kernel_us_per_token"] = round(total_us, 1)
    out["categories_per_token"] = by_category(rows)
    cpu = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                 key=lambda e: -e.self_cpu_time_total)[:25]
    out["host_ops"] = [{"op": e.key[:100], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                        "calls": e.count} for e in cpu]
    del model
    torch.cuda.empty_cache()
    return out


def graph_us(fn, calls: int = 20, reps: int = 15) -> float:
    """us a call: ``calls`` calls captured in one CUDA graph, median of ``reps`` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write bytes), 1 GiB buffers."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a), calls=5, reps=10)
    return 2 * a.numel() / (us * 1e-6) / 1e9


def prepared(fmt: str, n: int, k: int):
    from metal_marlin_torch import ops
    from metal_marlin_torch.ops.cuda import dispatch as D

    w = torch.randn(n, k, device="cuda") * 0.02
    weight, scales, biases, gs = ops.quantize(w, fmt, 128)
    return D.prepare_cuda_weight(weight, scales, biases, gs, fmt, 128, k)


def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in t.split("x")) for t in s.split(",") if t]


def bench_shapes(args, bw: float) -> list[dict]:
    from metal_marlin_torch.ops.cuda import dispatch as D

    rows = []
    for k, n in parse_shapes(args.shape_list):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        row: dict = {"K": k, "N": n, "dense_us": round(graph_us(partial(Fn.linear, x, w)), 2),
                     "dense_floor_us": round(n * k * 2 / bw / 1e3, 2)}
        del w
        for fmt in args.formats.split(","):
            pw = prepared(fmt, n, k)
            nbytes = pw.weight.numel() * 4 + pw.scales.numel() * pw.scales.element_size() + (
                0 if pw.biases is None else pw.biases.numel() * pw.biases.element_size())
            row[f"{fmt}_floor_us"] = round(nbytes / bw / 1e3, 2)
            row[f"{fmt}_default_us"] = round(graph_us(partial(D.gemm_prepared, x, pw)), 2)
            sms = D._sm_count(x.device)
            dflt = D.default_gemv_config(1, n, k, pw.kfmt.bits, sms, pw.kfmt.decode)
            row[f"{fmt}_gemv_default_cfg"] = str(dflt)
            variants = {}
            for bn, ch, sp, wa, mr in (() if fmt not in args.variant_formats.split(",") else (
                    (16, 128, 1, 8, 80), (16, 128, 2, 8, 80), (16, 64, 4, 4, None), (8, 128, 1, 4, None),
                    (8, 128, 2, 4, None), (8, 64, 4, 4, None), (16, 128, 1, 4, None))):
                cfg = D.GemvConfig(1, bn, ch, sp, wa, mr)
                try:
                    variants[f"gemv {bn}x{ch} s{sp} w{wa} r{mr}"] = round(graph_us(
                        partial(D.gemm_prepared, x, pw, path="gemv", config=cfg)), 2)
                except Exception as exc:  # noqa: BLE001 - recorded
                    variants[f"gemv {bn}x{ch} s{sp} w{wa} r{mr}"] = f"{type(exc).__name__}: {str(exc)[:80]}"
            if fmt in ("int4", "fp4") and fmt in args.variant_formats.split(",") and n % 128 == 0:
                for cfg in (None, D.MmaGemvConfig(4, 1, stages=4), D.MmaGemvConfig(4, 4, stages=4)):
                    key = f"mma_gemv {cfg}"
                    try:
                        variants[key] = round(graph_us(
                            partial(D.gemm_prepared, x, pw, path="mma_gemv", config=cfg)), 2)
                    except Exception as exc:  # noqa: BLE001
                        variants[key] = f"{type(exc).__name__}: {str(exc)[:80]}"
            row[f"{fmt}_variants"] = variants
            del pw
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_prefill(args) -> list[dict]:
    from metal_marlin_torch.ops.cuda import dispatch as D

    rows = []
    m = args.prefill_m
    for k, n in parse_shapes(args.prefill_shapes):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wt = w.t().contiguous()
        row: dict = {"K": k, "N": n, "M": m,
                     "dense_linear_us": round(graph_us(partial(Fn.linear, x, w), calls=5, reps=7), 1),
                     "dense_nn_us": round(graph_us(partial(torch.mm, x, wt), calls=5, reps=7), 1)}
        del w, wt
        for fmt in args.prefill_formats.split(","):
            pw = prepared(fmt, n, k)
            buf = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)
            row[f"{fmt}_dequant_only_us"] = round(graph_us(partial(D.dequant_slice, pw, 0, n, buf),
                                                           calls=5, reps=7), 1)
            del buf
            for nk in (False, True):
                tag = "_nk" if nk else ""
                for cols in [n] + [c for c in (4096, 2048, 1024, 512) if c < n]:
                    try:
                        row[f"{fmt}{tag}_slice{cols}_us"] = round(graph_us(
                            partial(D.gemm_prepared, x, pw, path="dequant", slice_cols=cols,
                                    dequant_nk=nk), calls=5, reps=7), 1)
                    except Exception as exc:  # noqa: BLE001
                        row[f"{fmt}{tag}_slice{cols}_us"] = f"{type(exc).__name__}: {str(exc)[:80]}"
            del pw
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render(res: dict) -> str:
    lines = [f"# profile_decode: {res['model']}", "", f"Machine: {res['machine'].get('gpu')}; torch "
             f"{res['machine'].get('torch')}; command: `{res['command']}`", ""]
    if res.get("copy_gb_s"):
        lines += [f"Device-to-device copy: {res['copy_gb_s']:.0f} GB/s (read + write).", ""]
    for s in res.get("step", []):
        if "error" in s:
            lines += [f"step {s['method']}: error `{s['error']}`", ""]
            continue
        lines += [f"## Decode step as one graph: {s['method']}", "",
                  f"wall {s['step_ms']} ms a step (synchronized, median); "
                  f"kernels {s['kernel_us_per_step']} us, gap {s['gap_us_per_step']} us, "
                  f"{s['launches_per_step']} launches a step; device idle between kernels "
                  f"{s.get('inner_gap_us_per_step')} us a step in gaps under 20 us, "
                  f"{s.get('host_gap_us_per_step')} us in longer ones", "",
                  "| category | us a step | launches |", "|---|---|---|"]
        lines += [f"| {c} | {v['us']} | {v['launches']} |" for c, v in sorted(
            s["categories"].items(), key=lambda kv: -kv[1]["us"])]
        lines += ["", "| kernel | category | us a step | launches |", "|---|---|---|---|"]
        lines += [f"| `{r['kernel'][:80]}` | {r['category']} | {r['us']} | {r['launches']} |"
                  for r in s["kernels"][:25]]
        lines.append("")
    for gen in res.get("generate", []):
        if "error" in gen:
            lines += [f"generate {gen['method']}: error `{gen['error']}`", ""]
            continue
        lines += [f"## Compiled generate(): {gen['method']}", "",
                  f"total {gen['total_ms']} ms; first token {gen['first_ms']} ms; gaps median "
                  f"{gen['gap_median_ms']} / mean {gen['gap_mean_ms']} / max {gen['gap_max_ms']} ms; "
                  f"after the last token {gen['after_last_ms']} ms; kernels {gen['kernel_us_per_token']} us a token",
                  "", "| host op | self CPU ms (one call) | calls |", "|---|---|---|"]
        lines += [f"| `{h['op']}` | {h['self_cpu_ms']} | {h['calls']} |" for h in gen["host_ops"][:15]]
        lines.append("")
    if res.get("shapes"):
        fmts = res["args"]["formats"].split(",")
        bw = res["copy_gb_s"]
        lines += ["## Kernels alone, M = 1 (us a launch, 20 launches in one CUDA graph, median of replays)", "",
                  "In parentheses: bytes the kernel must read / time, TB/s (H200 HBM3e: 4.8 TB/s). "
                  "best: the fastest GEMV / tensor-core GEMV configuration timed.", "",
                  "| K x N | dense bf16 | " + " | ".join(f"{f} | {f} best" for f in fmts) + " |",
                  "|---|---|" + "---|---|" * len(fmts)]

        def cell(us, floor_us) -> str:
            # floor_us was computed at the run's copy bandwidth: bytes = floor_us * bw
            return f"{us} ({floor_us * bw / us / 1e3:.2f})" if isinstance(us, float) else "-"

        for r in res["shapes"]:
            cells = [cell(r["dense_us"], r["dense_floor_us"])]
            for f in fmts:
                best = min((v for v in r.get(f + "_variants", {}).values() if isinstance(v, float)),
                           default=None)
                cells += [cell(r.get(f + "_default_us"), r.get(f + "_floor_us", 0.0)),
                          "-" if best is None else str(best)]
            lines.append(f"| {r['K']} x {r['N']} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("prefill"):
        lines += [f"## Prefill GEMMs, M = {res['args']['prefill_m']} (us, 5 calls in one CUDA graph, median)", "",
                  "dense: F.linear (weight [N, K]) and x @ W^T stored [K, N] (nn); ours: dequantize + cuBLAS, "
                  "W_hat^T whole (sliceN) or in slices of that many features; _nk: W_hat [N, K]; "
                  "dequant_only: the dequantize kernel alone.", ""]
        for r in res["prefill"]:
            lines.append(f"- {r['K']} x {r['N']}: " + ", ".join(
                f"{k.removesuffix('_us')} {v}" for k, v in r.items() if k not in ("K", "N", "M")))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="step,generate,shapes,prefill")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--model", default="")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24, help="timed steps (after compile)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--methods", default="dense,marlin:int4,marlin:nf4",
                    help="bench_decode's methods (fused as there); '/nofuse' after one: unfused")
    ap.add_argument("--generate-methods", default="dense,marlin:int4")
    ap.add_argument("--formats", default="int4,fp4,nf4")
    ap.add_argument("--variant-formats", default="int4,nf4", help="formats whose GEMV variants are timed")
    ap.add_argument("--shape-list", default="4096x4096,4096x1024,4096x6144,4096x14336,4096x28672,14336x4096")
    ap.add_argument("--prefill-m", type=int, default=2048)
    ap.add_argument("--prefill-formats", default="int4,nf4")
    ap.add_argument("--prefill-shapes", default="4096x4096,4096x6144,4096x14336,4096x28672,14336x4096")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args(argv)
    from metal_marlin_torch.ops import cuda as C

    C.register()
    torch._dynamo.config.cache_size_limit = 64
    res: dict = {"model": f"Llama-3-8B shapes, {args.layers} layers, random bf16 weights",
                 "machine": machine_info("cuda"),
                 "command": " ".join(sys.argv if argv is None else ["profile_decode.py", *argv]),
                 "args": vars(args)}

    def save() -> None:
        if args.json:
            write_atomic(args.json, json.dumps(res, indent=1, default=str))
        if args.markdown:
            write_atomic(args.markdown, render(res))

    sections = args.sections.split(",")
    for sec, methods, fn in (("step", args.methods, profile_step),
                             ("generate", args.generate_methods, profile_generate)):
        if sec not in sections:
            continue
        res[sec] = []
        for method in methods.split(","):
            t0 = time.perf_counter()
            try:
                r = fn(args, method)
            except Exception as exc:  # noqa: BLE001 - recorded, the other sections still run
                traceback.print_exc()
                r = {"method": method, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            r["section_s"] = round(time.perf_counter() - t0, 1)
            gc.collect()
            torch.cuda.empty_cache()
            res[sec].append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("kernels", "gaps_ms")}), flush=True)
            save()
    if "shapes" in sections or "prefill" in sections:
        res["copy_gb_s"] = copy_bandwidth()
    for sec, fn in (("shapes", lambda: bench_shapes(args, res["copy_gb_s"])),
                    ("prefill", lambda: bench_prefill(args))):
        if sec in sections:
            t0 = time.perf_counter()
            try:
                res[sec] = fn()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                res[sec + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            res[sec + "_s"] = round(time.perf_counter() - t0, 1)
            save()
    print(render(res))
    return res


if __name__ == "__main__":
    main()
