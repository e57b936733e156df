"""Quality and memory of the quantized KV caches on pylm-s.

The same tokens are evaluated at every context length L: a few regions spread over the held-out
standard-library text (pylm_eval_files.txt), each cut into windows of L tokens. Each window is
run through the model (float32 compute) once per cache, so every token attends to the quantized
keys and values of all earlier tokens of its window (a one-shot forward equals token-by-token
decoding here: every position is quantized on its own).
Reported per cache and L: perplexity, KL(bf16-cache || cache) of the next-token distributions,
the same KL over the last quarter of each window (the longest contexts), top-1 agreement with
the bf16 cache, and the storage bytes per token (all layers, keys + values, scales/norms
included). The bf16 cache is the baseline; the float32 row shows its own distance from exact.

    python benchmarks/kv_cache.py                         # writes benchmarks/results/kv_cache.{json,md}
    python benchmarks/kv_cache.py --lengths 128 --regions 1 --out /tmp/kv   # quick look

Runs on CPU in a few minutes on 2 cores (one torch thread is fastest on a busy 2-core box).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metal_marlin_torch.io.atomic import atomic_path  # noqa: E402
from metal_marlin_torch.kv import make_cache, store_for  # noqa: E402

CACHES = [("fp32", None), ("bf16", None), ("fp8", None), ("turboquant", 8), ("turboquant", 6), ("turboquant", 5),
          ("turboquant", 4)]


def default_model() -> Path:
    """pylm-s under $MARLIN_SHARED, else under the nearest ``shared/`` beside an ancestor folder."""
    if "MARLIN_SHARED" in os.environ:
        return Path(os.environ["MARLIN_SHARED"]) / "models" / "pylm-s"
    for parent in ROOT.parents:
        if (parent / "shared" / "models" / "pylm-s").is_dir():
            return parent / "shared" / "models" / "pylm-s"
    return ROOT.parent / "shared" / "models" / "pylm-s"


def label(method: str, bits: int | None) -> str:
    return f"turboquant-{bits}" if method == "turboquant" else method


def eval_tokens(model_dir: Path, tokenizer) -> torch.Tensor:
    names = (model_dir.parent / "pylm_eval_files.txt").read_text().split()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / n).read_text(encoding="utf-8", errors="replace") for n in names)
    return tokenizer(text, return_tensors="pt").input_ids[0]


def bytes_per_token(config, method: str, bits: int | None) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_pos = 4 * head_dim if method == "fp32" else store_for(method, bits or 4)[0].bytes_per_position(
        head_dim, **store_for(method, bits or 4)[1])
    return 2 * config.num_hidden_layers * config.num_key_value_heads * per_pos


def run_window(model, ids: torch.Tensor, method: str, bits: int | None) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache() if method == "fp32" else make_cache(model.config, method=method, bits=bits or 4)
    with torch.no_grad():
        return torch.log_softmax(model(ids, past_key_values=cache, use_cache=True).logits[0].double(), -1)


def evaluate(model, tokens: torch.Tensor, length: int, regions: list[int], region: int) -> dict[str, dict[str, float]]:
    """The same tokens at every length: each region of ``region`` tokens cut into windows."""
    starts = [r + i * length for r in regions for i in range(max(1, region // length))]
    windows = len(starts)
    stats = {label(m, b): {"nll": 0.0, "kl": 0.0, "kl_tail": 0.0, "agree": 0.0} for m, b in CACHES}
    count = tail_count = 0
    tail = length - length // 4
    for s in starts:
        ids = tokens[s:s + length + 1].unsqueeze(0)
        target = ids[0, 1:]
        base = run_window(model, ids[:, :-1], "bf16", None)
        count += length
        tail_count += length - tail
        for m, b in CACHES:
            logp = base if m == "bf16" else run_window(model, ids[:, :-1], m, b)
            kl = (base.exp() * (base - logp)).sum(-1)
            st = stats[label(m, b)]
            st["nll"] -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
            st["kl"] += kl.sum().item()
            st["kl_tail"] += kl[tail:].sum().item()
            st["agree"] += (logp.argmax(-1) == base.argmax(-1)).sum().item()
    return {k: {"ppl": math.exp(v["nll"] / count), "kl": v["kl"] / count, "kl_tail": v["kl_tail"] / tail_count,
                "top1_agree": v["agree"] / count, "windows": windows} for k, v in stats.items()}


def markdown(result: dict) -> str:
    lines = [
        "# KV-cache quality and memory on pylm-s",
        "",
        f"Model `{result['model']}` (float32 compute), eval text: held-out standard-library files "
        f"({result['eval_tokens']} tokens; the same {len(result['regions']['starts'])} regions of "
        f"{result['regions']['tokens']} tokens at every context length).",
        f"Machine: {result['machine']}. torch {result['torch']}.",
        "KL = mean KL(bf16 cache || cache) of next-token distributions (nats); tail = last quarter of each window; "
        "bytes/token = all layers, keys + values, scales/norms included.",
        "",
    ]
    for length, rows in result["lengths"].items():
        lines += [f"## context {length} ({next(iter(rows.values()))['windows']} windows)", "",
                  "| cache | bytes/token | vs bf16 | perplexity | KL | KL tail | top-1 agree |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        bf16_bytes = result["bytes_per_token"]["bf16"]
        for name, r in rows.items():
            b = result["bytes_per_token"][name]
            lines.append(f"| {name} | {b} | {b / bf16_bytes:.2f}x | {r['ppl']:.4f} | {r['kl']:.2e} | "
                         f"{r['kl_tail']:.2e} | {100 * r['top1_agree']:.2f}% |")
        lines.append("")
    lines += ["5- and 6-bit TurboQuant codes take a byte each in this layout (the seeds/003 contract), so they "
              "store as much as 8-bit; only 4-bit is nibble-packed.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512],
                    help="context lengths (pylm-s was trained on 512-token sequences)")
    ap.add_argument("--regions", type=int, default=8, help="text regions, spread over the eval text")
    ap.add_argument("--region", type=int, default=512, help="tokens per region (a multiple of every length)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_cache")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"kv_cache.py: no model at {args.model} (pass --model or set MARLIN_SHARED)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = eval_tokens(args.model, AutoTokenizer.from_pretrained(args.model))
    t0 = time.perf_counter()
    result = {
        "model": args.model.name, "eval_tokens": len(tokens), "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, {args.threads} torch thread(s)",
        "bytes_per_token": {label(m, b): bytes_per_token(model.config, m, b) for m, b in CACHES},
        "lengths": {},
    }
    regions = torch.linspace(0, len(tokens) - args.region - 1, args.regions).long().tolist()
    result["regions"] = {"starts": regions, "tokens": args.region}
    for length in args.lengths:
        result["lengths"][str(length)] = evaluate(model, tokens, length, regions, args.region)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    md = markdown(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", md)):
        with atomic_path(args.out.with_suffix(suffix)) as tmp:
            tmp.write_text(text)


if __name__ == "__main__":
    main()
