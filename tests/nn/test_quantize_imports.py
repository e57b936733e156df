"""``nn`` sits below ``quant`` (quant imports nn's layers and registries): ``nn/quantize.py``
must reach GPTQ, the RTN variants and the bit budget through the registries that ``quant``
fills when the package is imported, never by importing ``quant`` (the circle the two had)."""

from __future__ import annotations

import ast
from pathlib import Path

import metal_marlin_torch
from metal_marlin_torch.nn import quantize as nnq


def test_nn_quantize_does_not_import_quant():
    src = Path(nnq.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):  # module-level and lazy (in-function) imports alike
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update(f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if m.lstrip(".").split(".")[0] == "quant" or ".quant" in m], imported


def test_quant_fills_the_registries_on_package_import():
    from metal_marlin_torch.quant import budget, methods

    assert metal_marlin_torch.quantize_model is nnq.quantize_model
    assert {"rtn", "gptq", "mr-gptq"} <= set(nnq.QUANTIZERS)
    assert nnq.QUANTIZERS["rtn"] is methods._rtn_method
    assert nnq.BUDGET_PLANNER["plan"] is budget.plan_budget
