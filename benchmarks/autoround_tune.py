"""Choose learned rounding's settings (quant/autoround.py) on *calibration* data only.

The pylm-s layers get a fixed per-layer plan (a budget row's plan from
``results/quality_budget.json``), are quantized with the default calibration windows (as
``quality.py`` does: 32 x 512 tokens, seed 0) by GPTQ and by ``autoround`` variants, and are
scored by mean KL to the dense model on *other* windows of the calibration files (seed 1): the
evaluation files (``pylm_eval_files.txt``) are never read here. Prints a table and writes
``results/autoround_tune.json`` (rows cached by key: an interrupted run continues).

    PYTHONPATH=. python3 benchmarks/autoround_tune.py --budget 3.5 --variants gptq ar100 ar100-rtn
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import RESULTS, load_pylm, machine, md_table, models_dir, write_json  # noqa: E402

from metal_marlin_torch.nn.config import LayerPlan  # noqa: E402
from metal_marlin_torch.quant import calibration as C  # noqa: E402
from metal_marlin_torch.quant.driver import DriverOptions, quantize_layerwise  # noqa: E402

GPTQ = {"damp": 0.01, "block_size": 128, "act_order": True, "scale_search": True}
PLAN_ROWS = {2.5: "pylm-s|budget 2.5|gptq", 3.5: "pylm-s|budget 3.5|gptq|gptq sensitivity",
             4.5: "pylm-s|budget 4.5|gptq|gptq sensitivity"}


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """``gptq`` or ``ar<steps>[-rtn][-noscale][-lr<x>][-b<batch>]`` -> (method, options)."""
    if name == "gptq":
        return "gptq", dict(GPTQ)
    if name == "rtn":
        return "rtn", {"scale_search": True}
    parts = name.split("-")
    if not parts[0].startswith("ar"):
        raise ValueError(f"--variants: unknown variant {name!r}")
    opts: dict[str, Any] = {**GPTQ, "autoround_steps": int(parts[0][2:])}
    for p in parts[1:]:
        if p == "rtn":
            opts["autoround_init"] = "rtn"
        elif p == "noscale":
            opts["autoround_scales"] = False
        elif p == "token":
            opts["autoround_loss"] = "token"
        elif p.startswith("lr"):
            opts["autoround_lr"] = float(p[2:])
        elif p.startswith("b"):
            opts["autoround_batch"] = int(p[1:])
        else:
            raise ValueError(f"--variants: unknown part {p!r} of {name!r}")
    return "autoround", opts


def mean_kl(ref_logp: list[torch.Tensor], model: torch.nn.Module, windows: torch.Tensor) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i, ids in enumerate(windows):
            q = torch.log_softmax(model(input_ids=ids[None]).logits.float(), -1)[0]
            p = ref_logp[i]
            total += float((p.exp() * (p - q)).sum(-1).sum())
            n += p.shape[0]
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=3.5, choices=sorted(PLAN_ROWS))
    ap.add_argument("--variants", nargs="+", default=["gptq", "ar100"])
    ap.add_argument("--holdout", type=int, default=8, help="calibration windows (seed 1) scored")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = RESULTS / "autoround_tune.json"
    result = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    result["machine"] = machine()
    tok, base = load_pylm(models_dir())
    files = C.default_calibration_files()
    calib = C.load_calibration(files, tok, n_samples=32, seq_len=512)
    held = C.load_calibration(files, tok, n_samples=args.holdout, seq_len=512, seed=1)
    budget_rows = json.loads((RESULTS / "quality_budget.json").read_text())["rows"]
    plans = {n: LayerPlan(f, g) for n, (f, g) in budget_rows[PLAN_ROWS[args.budget]]["layers"].items()}
    with torch.no_grad():
        ref = [torch.log_softmax(base(input_ids=w[None]).logits.float(), -1)[0] for w in held]
    for name in args.variants:
        key = f"budget {args.budget:g}|{name}|holdout {args.holdout}"
        if key in result["rows"]:
            continue
        method, opts = variant(name)
        model = copy.deepcopy(base)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        report = quantize_layerwise(model, plans, calib, DriverOptions.from_options(method, opts), progress=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"budget": args.budget, "variant": name, "kl_holdout": mean_kl(ref, model, held),
               "quantize_s": wall, "quantize_cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
               "blocks": {str(i): {k: v for k, v in r.items() if k != "kept_base"}
                          for i, r in report.get("autoround", {}).items()}}
        result["rows"][key] = row
        write_json(out, result)
        print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
    rows = [r for k, r in result["rows"].items() if r["budget"] == args.budget]
    print(md_table(["budget", "variant", "KL (held-out calibration windows)", "quantize s", "CPU s"],
                   [[r["budget"], r["variant"], r["kl_holdout"], r["quantize_s"], r["quantize_cpu_s"]]
                    for r in sorted(rows, key=lambda r: r["kl_holdout"])]))


if __name__ == "__main__":
    main()
