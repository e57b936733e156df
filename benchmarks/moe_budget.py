"""A bit budget over a MoE model: the experts' projection stacks planned with the layers (issue 20).

    python benchmarks/moe_budget.py --json benchmarks/results/moe_budget_linux_cpu2.json

Model: a Mixtral upcycled from pylm-s (``bench_moe.upcycle_llama``: 6 layers, hidden 384, 8
experts top-2, each expert the trained MLP plus 2% noise), float32, round to nearest. Rows:
uniform int4 at g128 (4.25 bits/weight) and g64 (4.5), and ``QuantConfig(bits_per_weight=B)``
for each ``--budgets`` (default candidates, every Linear but lm_head and every expert stack
planned; the Fisher from ``--calib`` stdlib windows of 256 tokens). Quality: mean KL per token
of the quantized model's next-token distribution to the dense model's over ``--windows``
held-out windows of 512 tokens from pylm-s's evaluation files (benchmarks/quality_common.py),
the stored bits per weight over the quantized layers and experts (``summary.bits_per_weight``),
the expert stacks' share of the bits, and ``quantize_model``'s wall time. One run on the shared
2-core Linux machine; no Apple timing claimed.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe import upcycle_llama  # noqa: E402
from benchmarks.quality_common import eval_files, machine, md_table, models_dir, write_json, write_text  # noqa: E402
from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch.quant.calibration import load_calibration  # noqa: E402


def held_out(tok: Any, models: Path, n: int, length: int) -> torch.Tensor:
    """``n`` consecutive windows of ``length`` tokens from the evaluation files' text."""
    text = "\n".join(f.read_text(errors="replace") for f in eval_files(models))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < n * length:
        raise ValueError(f"held_out: {ids.numel()} tokens, need {n * length}")
    return ids[: n * length].reshape(n, length)


def mean_kl(ref: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            p = torch.log_softmax(ref(input_ids=w[None]).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=w[None]).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            count += w.numel()
    return total / count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="folder with pylm-s and pylm_eval_files.txt")
    ap.add_argument("--budgets", default="4.25,4.5")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    models = models_dir(args.models)
    tok = AutoTokenizer.from_pretrained(models / "pylm-s")
    dense = upcycle_llama(str(models / "pylm-s"), 8, 2, 0.02, "cpu").float()
    windows = held_out(tok, models, args.windows, 512)
    calib = load_calibration(None, tok, n_samples=args.calib, seq_len=256)
    configs = {"int4 g128": QuantConfig(format="int4", group_size=128),
               "int4 g64": QuantConfig(format="int4", group_size=64)}
    for b in args.budgets.split(","):
        configs[f"budget {b}"] = QuantConfig(bits_per_weight=float(b), budget_samples=args.calib)
    rows = []
    for name, cfg in configs.items():
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        summary = quantize_model(model, cfg, calibration=calib)
        seconds = time.perf_counter() - t0
        kl = mean_kl(dense, model, windows)
        plan = summary.budget
        stacks = {} if plan is None else {n: f"{p.format} g{p.group_size}" for n, p in plan.units().items()
                                          if n in plan.to_dict()["experts"]}
        rows.append({"config": name, "bits_per_weight": summary.bits_per_weight, "kl": kl,
                     "quantize_s": seconds, "histogram": None if plan is None else plan.histogram(),
                     "expert_stacks": stacks})
        print(f"{name}: {summary.bits_per_weight:.4f} bits/weight, KL {kl:.5f}, {seconds:.1f} s", flush=True)
    table = md_table(["config", "bits/weight", "mean KL", "quantize s", "expert stacks (plan)"],
                     [[r["config"], f"{r['bits_per_weight']:.4f}", f"{r['kl']:.5f}", f"{r['quantize_s']:.1f}",
                       ", ".join(sorted(set(r["expert_stacks"].values()))) or "-"] for r in rows])
    print(table)
    result = {"machine": {**machine(), "platform": platform.platform()},
              "model": "Mixtral upcycled from pylm-s (8 experts, top-2, expert noise 0.02)",
              "windows": [args.windows, 512], "calibration": [args.calib, 256], "rows": rows}
    if args.json:
        write_json(Path(args.json), result)
        write_text(Path(args.json).with_suffix(".md"), table)
    return result


if __name__ == "__main__":
    main()
