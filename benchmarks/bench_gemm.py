"""Time ``marlin.gemm`` against dense matmul (and peers) on whatever device is present.

    python benchmarks/bench_gemm.py                      # device picked: cuda > mps > cpu
    python benchmarks/bench_gemm.py --json out.json --markdown out.md

Shapes are the Llama-3-8B projections (K x N: 4096 x 4096, 4096 x 14336, 14336 x 4096) at
M in {1, 4, 16, 128, 512}; on CPU a small shape, since the pure-torch kernel is the only one.

Rows per (shape, M):
  * ``dense``: ``F.linear`` in the activation dtype (bf16 on CUDA, fp16 on MPS, fp32 on CPU);
  * ``marlin:<fmt>``: ``torch.ops.marlin.gemm`` (Triton on CUDA, Metal on MPS, torch on CPU);
  * torch's own int4 kernel on the same int4 weights (group 128): ``tinygemm`` on CUDA
    (``aten._weight_int4pack_mm``, torchao's int4 backend), ``torch int4pack`` on MPS (the same op,
    PyTorch's Metal kernel) and on CPU (``aten._weight_int4pack_mm_for_cpu``); its note gives the
    relative error against ``marlin.gemm`` int4, so a packing mismatch shows instead of a timing;
  * CUDA only: ``dequant+mm:<fmt>`` (pure-torch ``marlin.dequantize`` to bf16, then ``F.linear``)
    and ``dequant+mm compiled:<fmt>`` (the same function through ``torch.compile``);
  * ``mlx`` importable: ``mlx:<fmt>`` (``mx.quantized_matmul`` on MLX's default device: the GPU
    on a Mac, the CPU on Linux; affine int formats, MLX's own quantization of the same weights).

Timing: CUDA runs each method as a CUDA graph of calls rotating over enough weight copies
that they cannot all sit in L2, timed with CUDA events; the median over repeats, divided by
the calls per replay, is reported. MPS and CPU use a wall clock around synchronized loops.
Columns: ms, GB/s of weight traffic (the method's own weight bytes), TFLOPS (2 M N K),
ratio to dense (dense time / method time, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch import ops  # noqa: E402

LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
SMALL_SHAPES = [(512, 512), (512, 1376)]
M_VALUES = [1, 4, 16, 128, 512]
GROUP = 128


# ---- timers -------------------------------------------------------------------------------


def time_cuda(calls: list[Callable[[], object]], repeats: int = 25, loops: int = 4) -> float:
    """Median ms per call: the calls (one per weight copy) captured ``loops`` times in one
    CUDA graph; each replay is timed with events. Falls back to eager launches (timed the same
    way) when a call cannot be captured."""
    for c in calls:  # warm-up: compilation, autotuning, allocator
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    calls[0]()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 3e-4:  # slow baselines: fewer calls (still the median)
        calls, loops, repeats = calls[:2], 1, 7
    n = len(calls) * loops
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            for _ in range(loops):
                for c in calls:
                    c()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - reported, then timed without a graph
        print(f"  (not capturable, timing eager launches: {type(exc).__name__}: {exc})")

        def run():
            for _ in range(loops):
                for c in calls:
                    c()
    # warm-up of the replay itself, >= 25 ms as triton.testing.do_bench does (first timings of
    # a shape ran up to ~20% slow on the H100; docs/CUDA.md §4 "spread")
    t0 = time.perf_counter()
    while True:
        run()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > 0.025:
            break
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def time_wall(calls: list[Callable[[], object]], sync: Callable[[], None], repeats: int = 11,
              loops: int = 4) -> float:
    """Median ms per call around synchronized loops of the calls (MPS, CPU)."""
    for c in calls:
        c()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            for c in calls:
                c()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / (loops * len(calls)))
    return statistics.median(times)


# ---- baselines ------------------------------------------------------------------------------


def tinygemm_pack(weight, scales, biases, k: int, group: int, device: str | None = None):
    """``aten._weight_int4pack_mm`` operands for our int4 weight: codes as uint8 pairs (even k
    in the high nibble), ``scales_and_zeros [K/G, N, 2]`` with tinygemm's
    ``w = (q - 8) * scale + zero``, i.e. ``zero = bias + 8 * scale``."""
    codes = F.unpack(weight, 4, k).to(torch.int32)
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    if device is not None:
        pairs = pairs.to(device)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
    s = scales.to(torch.bfloat16)
    z = (biases.float() + 8 * scales.float()).to(torch.bfloat16)
    sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()
    return packed, sz if device is None else sz.to(device)


def torch_int4(device: str, weight, scales, biases, k: int, group: int, dtype: torch.dtype):
    """(method name, call(x)) for torch's own int4 matmul on ``device`` (CPU or MPS), fed our int4
    weight; None when this torch has no such kernel there (said on stdout, not hidden)."""
    weight, scales, biases = weight.cpu(), scales.cpu(), biases.cpu()
    try:
        if device == "cpu":
            codes = F.unpack(weight, 4, k).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([scales.float().t(), (biases.float() + 8 * scales.float()).t()], -1)
            sz = sz.to(dtype).contiguous()

            def call(x):
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        else:  # MPS: PyTorch's Metal int4 kernel, operands packed by torch on the device
            packed, sz = tinygemm_pack(weight, scales, biases, k, group, device=device)
            sz = sz.to(dtype)

            def call(x):
                return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
        return "torch int4pack", call
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  torch int4 kernel unavailable on {device}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None


def dequant_matmul(fmt: str, group: int, k: int):
    """``x @ dequantize(W).T`` with the pure-torch dequantize (the format's own code)."""
    spec = F.get_format(fmt)

    def fn(x, weight, scales, biases, gscale):
        w_hat = spec.dequantize_packed(weight, scales, biases, gscale, group, k, x.dtype)
        return TF.linear(x, w_hat)

    return fn


def mlx_matmul(mlx, xm, wq, sc, bi, group: int, bits: int) -> None:
    mlx.eval(mlx.quantized_matmul(xm, wq, sc, bi, transpose=True, group_size=group, bits=bits))


# ---- the benchmark --------------------------------------------------------------------------


def add_row(rows: list, k: int, n: int, m: int, method: str, fmt: str, ms: float, wbytes: int,
            note: str = "") -> None:
    flops = 2.0 * m * n * k
    rows.append({"K": k, "N": n, "M": m, "method": method, "format": fmt, "ms": ms,
                 "weight_GBps": wbytes / (ms * 1e6), "TFLOPS": flops / (ms * 1e9), "note": note})
    print(f"K={k:5d} N={n:5d} M={m:3d} {method:22s} {fmt:9s} {ms:8.4f} ms {note}", flush=True)



def pick_device(name: str | None) -> str:
    if name:
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def machine_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, l2_bytes=p.L2_cache_size,
                    cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        from metal_marlin_torch.ops import cuda as C

        info["marlin_cuda"] = C.info()
    if device == "mps":
        info["processor"] = platform.processor()
    return info


def copies_for(nbytes: int, device: str) -> int:
    """Weight copies to rotate over so that they exceed twice the L2 (CUDA)."""
    if device != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(16, math.ceil(2 * l2 / max(nbytes, 1))))


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def bench(args) -> dict:
    device = pick_device(args.device)
    dtype = {"cuda": torch.bfloat16, "mps": torch.float16, "cpu": torch.float32}[device]
    if device == "cuda":
        from metal_marlin_torch.ops import cuda as C

        C.register()
    shapes = SMALL_SHAPES if (device == "cpu" and not args.shapes) else LLAMA_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    m_values = [int(v) for v in args.m.split(",")] if args.m else (
        [1, 16] if device == "cpu" else M_VALUES)
    formats = args.formats.split(",")
    compiled_formats = set(args.compiled_formats.split(",")) if args.compiled_formats else set()
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize(),
            "cpu": lambda: None}[device]

    def timer(calls):
        return time_cuda(calls) if device == "cuda" else time_wall(calls, sync)

    # one compiled dequantize+matmul per (shape, M): more than dynamo's default recompile limit
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    mlx = None
    if device != "cuda" and not args.no_mlx:
        try:
            import mlx.core as mlx  # noqa: F811
        except ImportError:
            print("mlx not importable: no MLX rows")

    rows = []
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        dense_w = w.to(device=device, dtype=dtype)
        dense_copies = [dense_w] + [dense_w.clone() for _ in range(
            copies_for(nbytes(dense_w), device) - 1)]
        quant = {}
        for fmt in formats:
            group = GROUP if GROUP in F.get_format(fmt).group_sizes else F.default_group_size(fmt)
            qt = F.quantize(w, fmt, group)
            tensors = [t.to(device) if t is not None else None
                       for t in (qt.weight, qt.scales, qt.biases, qt.global_scale)]
            reps = copies_for(nbytes(*tensors), device)
            copies = [tensors] + [[t.clone() if t is not None else None for t in tensors]
                                  for _ in range(reps - 1)]
            quant[fmt] = (group, copies, nbytes(*tensors))
        tiny = None
        if "int4" in quant and quant["int4"][0] == GROUP:
            group, copies, _ = quant["int4"]
            if device == "cuda":
                packs = [tinygemm_pack(c[0], c[1], c[2], k, group) for c in copies]
                tiny = ("tinygemm", [partial(lambda x, p, sz: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, sz),
                                             p=p, sz=sz) for p, sz in packs])
            else:
                got = torch_int4(device, *copies[0][:3], k, group, dtype)
                tiny = None if got is None else (got[0], [got[1]])
        compiled = {}
        for m in m_values:
            x = (torch.randn(m, k, generator=gen) / math.sqrt(k)).to(device=device, dtype=dtype)

            add = partial(add_row, rows, k, n, m)
            add("dense", str(dtype).replace("torch.", ""),
                timer([partial(TF.linear, x, w_) for w_ in dense_copies]), nbytes(dense_w))
            if tiny is not None:
                name, calls = tiny
                ref = ops.gemm(x, *quant["int4"][1][0], None, "int4", quant["int4"][0])
                got = calls[0](x)
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                # same weights: a large error means a packing mismatch, not a fast kernel
                note = f"rel err vs marlin int4 {err:.1e}" + (" (MISMATCH)" if err > 2e-2 else "")
                add(name, "int4", timer([partial(c, x) for c in calls]),
                    quant["int4"][2], note)
            for fmt, (group, copies, qbytes) in quant.items():
                add("marlin", fmt, timer([partial(ops.gemm, x, *c, None, fmt, group)
                                          for c in copies]), qbytes)
                if device == "cuda":
                    fn = dequant_matmul(fmt, group, k)
                    add("dequant+mm", fmt, timer([partial(fn, x, *c) for c in copies]), qbytes)
                    if fmt in compiled_formats:
                        if fmt not in compiled:
                            compiled[fmt] = torch.compile(fn, dynamic=False)
                        try:
                            add("dequant+mm compiled", fmt,
                                timer([partial(compiled[fmt], x, *c) for c in copies]), qbytes)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            print(f"  torch.compile failed: {type(exc).__name__}: {exc}")
                if mlx is not None and fmt.startswith("int") and group in (32, 64, 128):
                    bits = F.get_format(fmt).bits
                    mdt = mlx.float16 if dtype == torch.float16 else mlx.float32
                    wq, sc, bi = mlx.quantize(mlx.array(w.numpy()).astype(mdt), group_size=group, bits=bits)
                    xm = mlx.array(x.float().cpu().numpy()).astype(mdt)
                    run_mlx = partial(mlx_matmul, mlx, xm, wq, sc, bi, group, bits)
                    add("mlx", fmt, time_wall([run_mlx], lambda: None), qbytes,
                        f"mlx {mlx.default_device()}")
    dense = {(r["K"], r["N"], r["M"]): r["ms"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["ratio_to_dense"] = dense[(r["K"], r["N"], r["M"])] / r["ms"]
    return {"machine": machine_info(device), "dtype": str(dtype), "group_size": GROUP,
            "timing": ("CUDA graph replays, CUDA events, median" if device == "cuda"
                       else "wall clock around synchronized loops, median"),
            "rows": rows, "targets": targets(rows) if device == "cuda" else {}}


def targets(rows: list[dict]) -> dict:
    """The CUDA targets of the project (4-bit formats): >= 2.6x dense and faster than tinygemm
    at M = 1, >= 0.9x dense at M >= 128, never slower than dequantize+matmul."""
    out = {}
    by = {(r["K"], r["N"], r["M"], r["method"], r["format"]): r for r in rows}
    for r in rows:
        if r["method"] != "marlin":
            continue
        key = (r["K"], r["N"], r["M"])
        res = {"ratio_to_dense": round(r["ratio_to_dense"], 3)}
        deq = by.get((*key, "dequant+mm", r["format"]))
        comp = by.get((*key, "dequant+mm compiled", r["format"]))
        res["faster_than_dequant_mm"] = deq is None or r["ms"] <= deq["ms"]
        if comp is not None:
            res["faster_than_compiled_dequant_mm"] = r["ms"] <= comp["ms"]
        if F.get_format(r["format"]).bits == 4:
            if r["M"] == 1:
                tiny = by.get((*key, "tinygemm", "int4"))
                res["ge_2.6x_dense"] = r["ratio_to_dense"] >= 2.6
                if tiny is not None:
                    res["faster_than_tinygemm"] = r["ms"] <= tiny["ms"]
            if r["M"] >= 128:
                res["ge_0.9x_dense"] = r["ratio_to_dense"] >= 0.9
        out[f"{r['format']} K={r['K']} N={r['N']} M={r['M']}"] = res
    return out


def markdown(result: dict) -> str:
    mi = result["machine"]
    head = [f"# marlin.gemm benchmark ({mi['device']})", "",
            f"Machine: {mi.get('gpu', mi.get('processor') or mi['platform'])}; torch "
            f"{mi['torch']}" + (f", Triton {mi['triton']}, CUDA {mi['cuda']}"
                                if mi["device"] == "cuda" else "") + ".",
            f"Activations {result['dtype']}, group size {result['group_size']} (mxfp4: 32, "
            f"nvfp4: 16). Timing: {result['timing']}. Ratio = dense time / method time.", "",
            "| K | N | M | method | format | ms | weight GB/s | TFLOPS | x dense |",
            "|---|---|---|---|---|---|---|---|---|"]
    body = [f"| {r['K']} | {r['N']} | {r['M']} | {r['method']} | {r['format']} | "
            f"{r['ms']:.4f} | {r['weight_GBps']:.0f} | {r['TFLOPS']:.1f} | "
            f"{r['ratio_to_dense']:.2f} |" for r in result["rows"]]
    return "\n".join(head + body) + "\n"


def max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (NaN where ``y`` has unwritten NaN entries)."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def cuda_sweep_meta(**fields) -> dict:
    """The metadata every CUDA sweep JSON carries (machine, versions, how it timed and how the
    error is defined), plus the sweep's own ``fields``."""
    import triton

    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, **fields,
                timing="CUDA graph replays over weight copies > 2x L2, CUDA events, median",
                rel_error="max |y - ref| / max |ref|; ref = dequant_kernel + cuBLAS")


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary name in the same folder, then rename (no partial files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], help="default: best present")
    p.add_argument("--shapes", help="K x N list, e.g. 4096x4096,4096x14336")
    p.add_argument("--m", help="comma-separated M values")
    p.add_argument("--formats", default="fp4,int4,int3",
                   help="comma-separated formats (default fp4,int4,int3; the H100 run adds nf4, "
                        "int8, fp8_e4m3)")
    p.add_argument("--compiled-formats", default="int4",
                   help="formats that also get the torch.compile'd dequantize+matmul row (CUDA)")
    p.add_argument("--no-mlx", action="store_true", help="skip the MLX rows even when mlx is importable")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--markdown", help="write the table as markdown here")
    args = p.parse_args(argv)
    result = bench(args)
    table = markdown(result)
    print(table)
    if result["targets"]:
        print(json.dumps(result["targets"], indent=1))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1))
    if args.markdown:
        write_atomic(args.markdown, table)


if __name__ == "__main__":
    main()
