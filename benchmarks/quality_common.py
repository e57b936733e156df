"""Shared pieces of the quality benchmarks: model paths, evaluation text, bits per weight, tables.

Paths default to the project's shared models folder beside the checkout (``../shared/models``);
override with ``--models-dir`` or ``MARLIN_MODELS_DIR``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metal_marlin_torch.nn import MarlinLinear

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def models_dir(arg: str | None = None) -> Path:
    """Folder holding ``pylm-s`` and ``pylm_eval_files.txt``: the argument, ``MARLIN_MODELS_DIR``,
    or the first ``shared/models`` found beside the checkout or one level further up."""
    if arg or os.environ.get("MARLIN_MODELS_DIR"):
        return Path(arg or os.environ["MARLIN_MODELS_DIR"])
    for up in (REPO.parent, REPO.parent.parent):
        if (up / "shared" / "models" / "pylm-s").is_dir():
            return up / "shared" / "models"
    raise FileNotFoundError("no shared/models/pylm-s beside the checkout; pass --models-dir")


def load_pylm(models: Path, device: str = "cpu") -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` of pylm-s: the unquantized model in fp32, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models / "pylm-s"
    tok = AutoTokenizer.from_pretrained(path)
    return tok, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)


def quantized_copy(
    base: nn.Module, quantize: Callable[[nn.Module], None], check_input: torch.Tensor
) -> tuple[nn.Module, float, float]:
    """``(model, seconds, bits per weight)``: a deep copy of ``base`` quantized in place by
    ``quantize`` (timed), its stored bits per weight, then densified (checked on ``check_input``)."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    quantize(model)
    seconds = time.perf_counter() - t0
    bpw = bits_per_weight(model)
    densify(model, check_input)
    return model, seconds, bpw


def stdlib_root(arg: str | None = None) -> Path:
    """The standard-library folder whose files are the evaluation/calibration text (default:
    this interpreter's; another Python's stdlib gives other text, so pass a copy when needed)."""
    return Path(arg) if arg else Path(sysconfig.get_paths()["stdlib"])


def eval_files(models: Path, stdlib: str | None = None) -> list[Path]:
    """The held-out standard-library files listed in ``pylm_eval_files.txt`` (all must exist)."""
    root = stdlib_root(stdlib)
    names = [ln.strip() for ln in (models / "pylm_eval_files.txt").read_text().splitlines() if ln.strip()]
    files = [root / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"evaluation files missing from this Python's stdlib: {missing[:5]}")
    return files


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the quantized layers: codes, scales, biases, global scale,
    rotation signs (not the layers' own bias vectors)."""
    bits = 0
    weights = 0
    for m in model.modules():
        if isinstance(m, MarlinLinear):
            for t in (m.weight, m.scales, m.biases, m.global_scale, m.rotation_signs):
                if t is not None:
                    bits += t.numel() * t.element_size() * 8
            weights += m.in_features * m.out_features
    return bits / weights if weights else 16.0


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "threads": torch.get_num_threads()}


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def densify(model: nn.Module, check_input: torch.Tensor | None = None) -> nn.Module:
    """Replace every MarlinLinear by an ``nn.Linear`` holding its dequantized weight (rotation
    folded back), in place, for fast CPU evaluation: the same function, without unpacking the
    codes on every call. With ``check_input`` (token ids), first assert that the logits or
    hidden states agree with the MarlinLinear model's to 1e-3 relative."""
    from metal_marlin_torch.nn.quantize import replace_module
    from metal_marlin_torch.quant.hadamard import unrotate

    before = None
    if check_input is not None:
        check_input = check_input.to(next(model.parameters()).device)
        with torch.no_grad():
            before = _main_output(model(input_ids=check_input))
    for name, m in list(model.named_modules()):
        if isinstance(m, MarlinLinear):
            w = m.dequantized_weight(torch.float32)
            if m.rotation_block:
                w = unrotate(w, m.rotation_block, m.rotation_signs)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            replace_module(model, name, lin)
    if before is not None:
        with torch.no_grad():
            after = _main_output(model(input_ids=check_input))
        rel = float((after - before).norm() / before.norm())
        if rel > 1e-3:
            raise AssertionError(f"densify changed the model's output: relative difference {rel:.2e}")
    return model


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
