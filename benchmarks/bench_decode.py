"""End-to-end decode and prefill of a Llama-shaped model: dense, ours (int4, fp4, nf4, ...),
torch's int4 tinygemm and MLX, on whatever device is present (issue 24).

    python benchmarks/bench_decode.py --device cuda --json out.json --markdown out.md
    python benchmarks/bench_decode.py --device cpu --model /work/shared/models/pylm-s
    python benchmarks/bench_decode.py --model PATH --methods dense,marlin:int4,mlx  # a Mac: mps

Model: Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256) with
random bf16 weights and ``--layers`` decoder layers (32 is the real model), or a local HF
checkpoint (``--model``). Device: ``--device`` (default mps > cuda > cpu). Methods: ``dense``
(the activation dtype: bf16 on CUDA, fp16 on MPS, fp32 and bf16 (``dense-bf16``) on CPU),
``marlin:<fmt>`` (or just ``<fmt>``; ``quantize_model`` RTN, group 128, lm_head kept dense as
by default; ``fuse_projections`` (q/k/v and gate/up one layer each) after the eager columns,
see ``--fuse``), ``tinygemm`` (int4 through ``aten._weight_int4pack_mm``, CUDA, same codes as our
int4) and ``mlx`` (``mlx_lm``'s own 4-bit, group 64, on MLX's default device; needs
``--model`` and an importable ``mlx_lm``, else the row says why it is missing). Each method's
model is built, measured and freed in turn.

Columns:
  * ``quantize_s``: ``quantize_model`` wall time (on the device, repack included);
  * ``resident_gb``: device memory held by the model (CUDA: ``memory_allocated`` after build),
    and ``checkpoint_gb``: the bytes of its state_dict (packed tensors + unquantized layers);
  * ``eager_tok_s``: ``generate()`` with a static cache and ``disable_compile=True``,
    ``--prompt`` tokens in, ``--new`` greedy tokens out, tokens out / wall seconds, median of
    ``--generate-repeats`` calls after a warm-up call;
  * ``compiled_tok_s`` (CUDA): ``generate()`` with its automatic compile (static cache:
    ``torch.compile`` of the decode step, mode reduce-overhead), timed on the calls after the
    first (median of ``--generate-repeats``);
    ``compile_s``: its first call;
  * ``eager_split`` / ``compiled_split``: the timed call's first token (prefill and setup) and
    its median per-token gap; ``compiled_counters``: dynamo's graphs and graph breaks;
  * ``step_graph_tok_s`` (CUDA): the decode step alone as one CUDA graph (``torch.compile``d
    forward, reduce-overhead, replayed for ``--new`` positions, no generate loop);
  * ``prefill_<T>_ms``: one forward of T tokens (batch 1), captured as a CUDA graph on CUDA
    (eager where capture fails, marked), wall clock on CPU / MPS; median of ``--repeats``;
  * ``agree``: the fraction of the timed eager call's greedy tokens equal to dense's (a check
    that the quantized model still computes the same function, not a quality metric).
Ratios to dense come from the same run. CPU and MPS runs skip the compiled columns. (This
script replaced ``bench_decode_mlx.py``, whose HF-model, MPS and MLX rows it now has.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cpu_gemm import cpu_name  # noqa: E402
from benchmarks.bench_gemm import machine_info, tinygemm_pack, write_atomic  # noqa: E402
from metal_marlin_torch import MarlinLinear, QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.nn import fuse_projections  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


class TinyGemmLinear(nn.Module):
    """int4 through ``aten._weight_int4pack_mm`` (torchao's tinygemm), bf16, group 128."""

    def __init__(self, layer: MarlinLinear) -> None:
        super().__init__()
        t = layer._canonical_tensors()
        packed, sz = tinygemm_pack(t["weight"], t["scales"], t["biases"], layer.in_features,
                                   layer.group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("sz", sz)
        self.group = layer.group_size
        self.out_features = layer.out_features
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group,
                                               self.sz)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def build(args, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    config = LlamaConfig(num_hidden_layers=args.layers, **LLAMA3_8B)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():  # small random weights: logits stay finite, greedy decode varies
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class _Stamps:
    """A logits processor that notes when each token's logits are ready (host clock): the gaps
    split a generate() into its first token (prefill) and the per-token decode steps."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.t.append(time.perf_counter())
        return scores


def generate_tok_s(model, ids, new: int, device: str, compile_: bool,
                   repeats: int = 1) -> tuple[float, float, dict, list[int]]:
    """tok/s of the timed calls (median of ``repeats`` calls after the first), seconds of the
    first, and the timed calls' split: ``first_ms`` (call start to the first token's logits:
    prefill and setup) and ``step_ms`` (median gap between later tokens), medians over the
    timed calls. Eager ``generate()`` is bound by the host's Python, whose speed drifts by a few
    percent from one call to the next: one timed call made the ratio to dense swing between
    0.94x and 1.04x in two runs of the same code (docs/CUDA.md 7.5). Also the last call's new
    tokens."""
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              pad_token_id=0, disable_compile=not compile_,
              logits_processor=LogitsProcessorList([stamps]))
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, **kw)  # warm-up (compiles when compile_)
    sync(device)
    first = time.perf_counter() - t0
    rates, firsts, steps, means, maxes, lasts = [], [], [], [], [], []
    for _ in range(max(1, repeats)):
        stamps.t.clear()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
        t1 = time.perf_counter()
        dt = t1 - t0
        assert out.shape[1] == ids.shape[1] + new
        rates.append(new / dt)
        gaps = [b - a for a, b in zip(stamps.t, stamps.t[1:], strict=False)]
        if stamps.t:
            firsts.append(stamps.t[0] - t0)
            lasts.append(t1 - stamps.t[-1])
        if gaps:
            steps.append(statistics.median(gaps))
            means.append(statistics.mean(gaps))
            maxes.append(max(gaps))

    def ms(v: list[float], nd: int = 3) -> float | None:
        return round(statistics.median(v) * 1e3, nd) if v else None

    # first + (new - 1) * step_mean + after_last is the whole call: the median step alone
    # hides slow steps (a re-recorded graph, a host hiccup)
    split = {"first_ms": ms(firsts, 2), "step_ms": ms(steps), "step_mean_ms": ms(means),
             "step_max_ms": ms(maxes), "after_last_ms": ms(lasts), "calls": len(rates)}
    return statistics.median(rates), first, split, out[0, ids.shape[1]:].tolist()


def _compile_counters() -> dict:
    """What dynamo / inductor did (graph breaks, graphs, cudagraph skips), for the record."""
    try:
        from torch._dynamo.utils import counters

        out = {"graph_breaks": sum(counters["graph_break"].values()),
               "unique_graphs": counters["stats"].get("unique_graphs", 0)}
        out.update({k: v for k, v in counters["inductor"].items() if "cudagraph" in k})
        return out
    except Exception as exc:  # noqa: BLE001 - a torch without these counters: say so, measure on
        return {"error": f"{type(exc).__name__}: {exc}"}


def step_graph_tok_s(model, ids, new: int) -> float:
    """The decode step alone: a compiled forward (reduce-overhead) on a static cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new + 1)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    pos = torch.arange(ids.shape[1], device=ids.device)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, cache_position=pos, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(new):
            p = torch.tensor([ids.shape[1] + i], device=ids.device)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step(tok, past_key_values=cache, cache_position=p, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    steady = times[new // 4:]  # after compile and the cudagraph warm-up / record steps
    return 1.0 / statistics.median(steady)


def prefill_ms(model, tokens: int, device: str, repeats: int) -> tuple[float, str]:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        model(ids, use_cache=False)
        if device != "cuda":
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3, "wall"
        sync(device)
        how = "graph"
        try:
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                model(ids, use_cache=False)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                model(ids, use_cache=False)
            run = graph.replay
        except Exception as exc:  # noqa: BLE001 - recorded in the output
            how = f"eager ({type(exc).__name__})"
            torch.cuda.synchronize()

            def run():
                model(ids, use_cache=False)
        run()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        del run
        if how == "graph":
            del graph
        return statistics.median(times), how


def prompt_ids(args, vocab: int, device: str) -> torch.Tensor:
    """The same prompt for every method (``agree`` compares their greedy tokens)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (1, args.prompt), generator=g).to(device)


def measure_mlx(args) -> dict:
    """``mlx_lm``'s 4-bit decode of ``--model``, or a row saying why there is none: tok/s of
    ``--new`` greedy tokens past the first (median of ``--generate-repeats``) and the prompt's
    forward (first token) in ms."""
    if not args.model:
        return {"method": "mlx", "skipped": "needs --model (an HF checkpoint mlx_lm can load)"}
    try:
        import mlx.core as mx  # noqa: PLC0415
        import mlx_lm  # noqa: PLC0415
        from mlx_lm.models.cache import make_prompt_cache  # noqa: PLC0415
        from mlx_lm.utils import quantize_model as mlx_quantize  # noqa: PLC0415
    except ImportError as exc:
        return {"method": "mlx", "skipped": f"{exc.name} not importable"}
    model, _ = mlx_lm.load(args.model)
    model, _ = mlx_quantize(model, {}, q_group_size=64, q_bits=4)
    ids = mx.array(prompt_ids(args, model.args.vocab_size, "cpu").tolist())

    def gen(n: int) -> tuple[float, float]:
        cache, y = make_prompt_cache(model), ids
        t0 = time.perf_counter()
        first = None
        for _ in range(n):
            y = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.eval(y)
            first = first or time.perf_counter()
        return first - t0, time.perf_counter() - first

    gen(2)
    runs = [gen(args.new) for _ in range(max(1, args.generate_repeats))]
    return {"method": "mlx", "eager_tok_s": round((args.new - 1) / statistics.median(r[1] for r in runs), 2),
            "eager_split": {"first_ms": round(statistics.median(r[0] for r in runs) * 1e3, 2)},
            "note": f"mlx_lm 4-bit group 64 on {mx.default_device()}"}


def measure(args, method: str, device: str, dtype: torch.dtype) -> dict:
    if method == "mlx":
        return measure_mlx(args)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        base = torch.cuda.memory_allocated()
    elif device == "mps":
        torch.mps.empty_cache()
        base = torch.mps.current_allocated_memory()
    model = build(args, device, dtype)
    row: dict = {"method": method}
    t0 = time.perf_counter()
    fused = convert(args, model, method)
    if fused is not None:
        row["fused"] = fused
    sync(device)
    quantized = not method.startswith("dense")
    row["quantize_s"] = round(time.perf_counter() - t0, 2) if quantized else None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        row["resident_gb"] = round((torch.cuda.memory_allocated() - base) / 1e9, 3)
    elif device == "mps":
        row["resident_gb"] = round((torch.mps.current_allocated_memory() - base) / 1e9, 3)
    row["checkpoint_bytes"] = state_bytes(model)
    row["checkpoint_gb"] = round(row["checkpoint_bytes"] / 1e9, 3)
    ids = prompt_ids(args, model.config.vocab_size, device)
    with torch.no_grad():
        row["eager_tok_s"], _, split, row["tokens"] = generate_tok_s(
            model, ids, args.new, device, False, args.generate_repeats)
        row["eager_split"] = split
        if args.fuse == "after-eager" and method.startswith("marlin:") and "fused" not in row:
            row["fused"] = fuse_projections(model)  # for the compiled, graph and prefill columns
            sync(device)
        if device == "cuda" and not args.no_compile:
            try:
                from torch._dynamo.utils import counters

                counters.clear()
                row["compiled_tok_s"], first, split, _ = generate_tok_s(
                    model, ids, args.new, device, True, args.generate_repeats)
                row["compile_s"] = round(first, 1)
                row["compiled_split"] = split
                row["compiled_counters"] = _compile_counters()
            except Exception as exc:  # noqa: BLE001 - a crash is a result here
                row["compiled_tok_s"] = None
                row["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if not args.no_step_graph and (not args.step_graph_methods
                                           or method in args.step_graph_methods.split(",")):
                try:
                    torch._dynamo.reset()
                    row["step_graph_tok_s"] = step_graph_tok_s(model, ids, args.new)
                except Exception as exc:  # noqa: BLE001
                    row["step_graph_tok_s"] = None
                    row["step_graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for t in args.prefill:
        ms, how = prefill_ms(model, t, device, args.repeats)
        row[f"prefill_{t}_ms"] = round(ms, 3)
        row[f"prefill_{t}_how"] = how
    for k in ("eager_tok_s", "compiled_tok_s", "step_graph_tok_s"):
        if row.get(k):
            row[k] = round(row[k], 2)
    del model
    print(json.dumps(row), flush=True)
    return row


def per_call_us(device: str, shapes, repeats: int = 5, calls: int = 300) -> list[dict]:
    """Host cost of one call at M = 1 (issue 24 item 1): wall time of ``calls`` back-to-back
    calls, synchronized once, per call; median of ``repeats``. ``nn.Linear`` (bf16), the
    ``MarlinLinear`` forward (int4, its recorded launch), ``torch.ops.marlin.gemm`` on canonical
    tensors (int4) and tinygemm, on each shape (K x N)."""
    from metal_marlin_torch import ops

    rows = []
    for k, n in shapes:
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        layer = MarlinLinear.from_linear(lin, "int4", 128).to(device)
        w, s, b, _ = ops.quantize(lin.weight.float(), "int4", 128)
        tiny = TinyGemmLinear(layer) if device == "cuda" else None
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        fns = {"nn.Linear": partial(lin, x), "MarlinLinear": partial(layer, x),
               "marlin.gemm (canonical)": partial(torch.ops.marlin.gemm, x, w, s, b, None, None,
                                                  "int4", 128)}
        if tiny is not None:
            fns["tinygemm"] = partial(tiny, x)
        row = {"K": k, "N": n}
        with torch.no_grad():
            for name, fn in fns.items():
                for _ in range(20):
                    fn()
                sync(device)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    sync(device)
                    ts.append((time.perf_counter() - t0) / calls * 1e6)
                row[name] = round(statistics.median(ts), 2)
        row["ratio MarlinLinear / nn.Linear"] = round(row["MarlinLinear"] / row["nn.Linear"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render(result: dict) -> str:
    rows = result["rows"]
    dense = next((r for r in rows if r["method"].startswith("dense")), None)
    cols = ["quantize_s", "resident_gb", "checkpoint_gb", "eager_tok_s", "compiled_tok_s", "compile_s",
            "step_graph_tok_s"] + [f"prefill_{t}_ms" for t in result["args"]["prefill"]] + ["agree"]
    cols = [c for c in cols if any(c in r for r in rows)]
    mi = result["machine"]
    where = mi.get("gpu") or mi.get("cpu") or mi.get("processor") or mi["platform"]
    load = mi.get("load_average")
    lines = [f"# bench_decode: {result['model']}", "",
             f"Machine: {where}; "
             f"torch {result['machine']['torch']}; {mi.get('threads')} CPU threads; load average "
             f"{[round(v, 2) for v in load] if load else '-'} at the end; command: "
             f"`{result['command']}`", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['method']} | skipped: {r['skipped']} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cell = "-" if v is None else str(v)
            if dense and v and dense.get(c) and r is not dense and c.endswith(("tok_s", "_ms")):
                ratio = v / dense[c] if c.endswith("tok_s") else dense[c] / v
                cell += f" ({ratio:.2f}x)"
            if c.startswith("prefill") and r.get(c.replace("_ms", "_how"), "").startswith("eager"):
                cell += " eager"
            cells.append(cell)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for r in rows:
        for k in ("compiled_error", "step_graph_error"):
            if r.get(k):
                lines.append(f"\n{r['method']} {k}: `{r[k]}`")
    if any(r.get("eager_split") for r in rows):
        lines += ["", "Where a generate() call's time goes (medians over the timed calls; first: call "
                  "start to the first token's logits, prefill included; step: median gap between "
                  "later tokens; mean / max: of those gaps; after last: the last token's logits to "
                  "the call's return; ms):", "",
                  "| method | eager first | eager step | compiled first | compiled step | "
                  "compiled step mean / max | compiled after last | compiled graphs / breaks |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            e, c = r.get("eager_split") or {}, r.get("compiled_split") or {}
            cc = r.get("compiled_counters") or {}
            graphs = f"{cc['unique_graphs']} / {cc['graph_breaks']}" if "graph_breaks" in cc else "-"
            lines.append(f"| {r['method']} | {e.get('first_ms', '-')} | {e.get('step_ms', '-')} | "
                         f"{c.get('first_ms', '-')} | {c.get('step_ms', '-')} | "
                         f"{c.get('step_mean_ms', '-')} / {c.get('step_max_ms', '-')} | "
                         f"{c.get('after_last_ms', '-')} | {graphs} |")
    if result.get("per_call"):
        lines += ["", "Per-call host cost at M = 1 (us a call, back-to-back calls, one sync):", ""]
        keys = [k for k in result["per_call"][0] if k not in ("K", "N")]
        lines += ["| K x N | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in result["per_call"]:
            lines.append(f"| {r['K']} x {r['N']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    lines += ["", "Ratios in parentheses: to the dense row of the same run (tok/s: method / dense; "
              "ms: dense / method)."]
    return "\n".join(lines) + "\n"



def build_method(args, method: str, device: str, dtype: torch.dtype):
    """The model of one method (quantized / swapped to tinygemm as :func:`measure` does). A
    ``+fused`` suffix (``marlin:int4+fused``) fuses that model whatever ``--fuse`` says, so
    ``--eager-interleaved`` can time a fused and an unfused model in the same rounds."""
    model = build(args, device, dtype)
    convert(args, model, method)
    return model


def convert(args, model, method: str) -> dict | None:
    """Quantize ``model`` in place for ``method`` (dense: nothing; tinygemm: int4 layers swapped
    to :class:`TinyGemmLinear`; ours fused with ``--fuse all`` or a ``+fused`` suffix). Returns
    :func:`fuse_projections`' counts when it fused, else None."""
    method, _, opt = method.partition("+")
    if opt not in ("", "fused") or (opt and not method.startswith("marlin:")):
        raise ValueError(f"--methods: the only suffix is '+fused' after a marlin method, got {method}+{opt}")
    if not (method.startswith("marlin:") or method == "tinygemm"):
        return None
    fmt = "int4" if method == "tinygemm" else method.split(":")[1]
    quantize_model(model, QuantConfig(format=fmt, group_size=args.group))
    if method == "tinygemm":
        for name, mod in list(model.named_modules()):
            if isinstance(mod, MarlinLinear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, TinyGemmLinear(mod))
    elif opt == "fused" or getattr(args, "fuse", "none") == "all":
        return fuse_projections(model)
    return None


def eager_interleaved(args, methods: list[str], device: str) -> list[dict]:
    """Eager ``generate()`` of every method with all models resident, timed in rounds: each
    round runs one call of each method in turn, so a host that speeds up or slows down over
    the run (eager decode is bound by its Python) moves every method alike. tok/s: median over
    ``--generate-repeats`` rounds, after a warm-up round; ``step_ms``: median per-token gap."""
    from transformers import LogitsProcessorList

    models = {}
    for m in methods:
        if m == "mlx":
            continue
        dtype = (torch.bfloat16 if (device == "cuda" or m == "dense-bf16")
                 else torch.float16 if device == "mps" else torch.float32)
        models[m] = build_method(args, m, device, dtype)
    ids = prompt_ids(args, next(iter(models.values())).config.vocab_size, device)
    stamps = _Stamps()
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
              cache_implementation="static", pad_token_id=0, disable_compile=True,
              logits_processor=LogitsProcessorList([stamps]))
    rates: dict[str, list[float]] = {m: [] for m in models}
    steps: dict[str, list[float]] = {m: [] for m in models}
    with torch.no_grad():
        for r in range(1 + max(1, args.generate_repeats)):
            for m, model in models.items():
                stamps.t.clear()
                sync(device)
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                sync(device)
                if r:  # round 0 warms up
                    rates[m].append(args.new / (time.perf_counter() - t0))
                    steps[m].append(statistics.median(b - a for a, b in zip(stamps.t, stamps.t[1:],
                                                                            strict=False)))
    del models
    dense = statistics.median(rates[methods[0]])
    rows = [{"method": m, "eager_tok_s": round(statistics.median(rates[m]), 2),
             "x_first": round(statistics.median(rates[m]) / dense, 3),
             "step_ms": round(statistics.median(steps[m]) * 1e3, 3),
             "rounds_tok_s": [round(v, 2) for v in rates[m]]} for m in rates]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def agreement(rows: list[dict]) -> None:
    """``agree`` on every row with tokens: the fraction equal to the dense row's."""
    dense = next((r for r in rows if r["method"].startswith("dense") and r.get("tokens")), None)
    for r in rows:
        if dense is not None and r.get("tokens"):
            r["agree"] = round(sum(a == b for a, b in zip(r["tokens"], dense["tokens"], strict=False))
                               / len(r["tokens"]), 3)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), cpu, cuda, mps")
    ap.add_argument("--model", default="", help="a local HF checkpoint instead of Llama-3-8B shapes")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--methods", default="")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--generate-repeats", type=int, default=3,
                    help="timed generate() calls per method (median), after a warm-up call")
    ap.add_argument("--fuse", choices=("after-eager", "all", "none"), default="after-eager",
                    help="fuse_projections on our methods (q/k/v and gate/up one quantized GEMV "
                         "each): after the eager columns (default: the compiled, graph and prefill "
                         "columns run fused), for every column (and --eager-interleaved), or never")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-step-graph", action="store_true")
    ap.add_argument("--step-graph-methods", default="", help="only these methods (default: all)")
    ap.add_argument("--per-call", default="4096x4096,4096x14336,14336x4096",
                    help="K x N shapes of the per-call host cost ('' to skip)")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: default)")
    ap.add_argument("--eager-interleaved", action="store_true",
                    help="only eager generate(), all models resident, one call of each method per "
                         "round (the first method is the baseline of x_first)")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    args = ap.parse_args(argv)
    if args.new < 2:
        ap.error(f"--new must be at least 2 (decode is timed past the first token), got {args.new}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.prefill = [int(t) for t in args.prefill.split(",") if t]
    if args.device == "auto":
        from metal_marlin_torch.cli.generate import pick_device  # noqa: PLC0415

        args.device = pick_device("auto").type
    device = args.device
    if device == "cuda":
        from metal_marlin_torch.ops import cuda as C

        C.register()
        torch._dynamo.config.cache_size_limit = 64
    default = (["dense", "marlin:int4", "marlin:fp4", "marlin:nf4", "tinygemm"] if device == "cuda"
               else ["dense", "marlin:int4", "marlin:fp4", "mlx"] if device == "mps"
               else ["dense", "dense-bf16", "marlin:int4", "marlin:fp4", "marlin:nf4", "marlin:int8"])
    methods = [m if m in ("dense", "dense-bf16", "tinygemm", "mlx") or m.startswith("marlin:")
               else f"marlin:{m}" for m in (args.methods.split(",") if args.methods else default)]
    rows: list[dict] = []
    per_call: list[dict] = []
    if args.eager_interleaved:
        rows = eager_interleaved(args, methods, device)
        out = {"model": args.model or f"Llama-3-8B shapes, {args.layers} layers, random bf16 weights",
               "machine": {**machine_info(device), "threads": torch.get_num_threads(), "cpu": cpu_name()},
               "command": " ".join(sys.argv if argv is None else ["bench_decode.py", *argv]),
               "args": vars(args), "rows": rows}
        lines = [f"# bench_decode --eager-interleaved: {out['model']}", "",
                 f"Machine: {out['machine'].get('gpu') or out['machine']['cpu']}; torch "
                 f"{torch.__version__}; command: `{out['command']}`", "",
                 "| method | eager tok/s (median of rounds) | x first method | step ms | rounds tok/s |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['eager_tok_s']} | {r['x_first']}x | {r['step_ms']} | "
                  f"{r['rounds_tok_s']} |" for r in rows]
        if args.json:
            write_atomic(args.json, json.dumps(out, indent=1, default=str))
        if args.markdown:
            write_atomic(args.markdown, "\n".join(lines) + "\n")
        print("\n".join(lines))
        return out

    def result() -> dict:
        agreement(rows)
        return {"model": args.model or f"Llama-3-8B shapes, {args.layers} layers, random bf16 weights",
                "machine": {**machine_info(device), "threads": torch.get_num_threads(),
                            "cpu": cpu_name(),
                            # a shared machine's load says how much to trust its times
                            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
                "command": " ".join(sys.argv if argv is None else ["bench_decode.py", *argv]),
                "args": vars(args), "rows": rows, "per_call": per_call,
                "formats": sorted(F.FORMATS)}

    def save() -> None:  # after every method: a run cut short keeps what it measured
        if args.json:
            write_atomic(args.json, json.dumps(result(), indent=1, default=str))
        if args.markdown:
            write_atomic(args.markdown, render(result()))

    for method in methods:
        dtype = (torch.bfloat16 if (device == "cuda" or method == "dense-bf16")
                 else torch.float16 if device == "mps" else torch.float32)
        rows.append(measure(args, method, device, dtype))
        save()
    if args.per_call and device == "cuda":
        per_call.extend(per_call_us(device, [tuple(int(v) for v in s.split("x"))
                                             for s in args.per_call.split(",")]))
        save()
    out = result()
    print(render(out))
    return out


if __name__ == "__main__":
    main()
