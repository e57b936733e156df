"""MarlinLinear.dequantize, dequantize_model and transformers' model.dequantize()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from metal_marlin_torch import MarlinConfig, QuantConfig, dequantize_model, quantize_model
from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import MarlinLinear
from metal_marlin_torch.quant.hadamard import random_signs
from tests.conftest import tiny_llama


@pytest.mark.parametrize("fmt", ["int4", "fp4", "nvfp4", "int3"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_dequantize_same_function(fmt: str, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=bias)
    q = MarlinLinear.from_linear(lin, fmt, group_size=F.default_group_size(fmt) if fmt == "nvfp4" else 32)
    dense = q.dequantize(torch.float32)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    assert torch.equal(dense.weight, q.dequantized_weight(torch.float32))  # no rotation: W_hat itself
    x = torch.randn(3, 128)
    torch.testing.assert_close(dense(x), q(x), rtol=1e-4, atol=1e-4)


def test_rotated_layer_folds_rotation_back() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(128, 24)
    q = MarlinLinear.like(lin, "int4", 32)
    signs = random_signs(128, seed=3)
    q.load_quantized(F.quantize(torch.randn(24, 128), "int4", 32), bias=lin.bias, rotation_block=64,
                     rotation_signs=signs)
    dense = q.dequantize(torch.float32)
    assert not torch.equal(dense.weight, q.dequantized_weight())  # the rotation is in the dense weight
    x = torch.randn(5, 128)
    torch.testing.assert_close(dense(x), q(x), rtol=1e-4, atol=1e-4)


def test_dequantize_model_matches_quantized_logits() -> None:
    model = tiny_llama().eval()
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    ids = torch.tensor([[1, 5, 9, 100, 3]])
    with torch.no_grad():
        ref = model(ids).logits
    assert dequantize_model(model, torch.float32) is model
    assert not any(isinstance(m, MarlinLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="MarlinLinear"):
        dequantize_model(MarlinLinear(64, 8, format="int4", group_size=32))


def test_transformers_model_dequantize(tmp_path: Path) -> None:
    # transformers' own entry point: model.dequantize() raised NotImplementedError before
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    tiny_llama().save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=MarlinConfig(
        format="int8", group_size=32))
    assert any(isinstance(m, MarlinLinear) for m in model.modules())
    ids = torch.tensor([[2, 7, 11]])
    with torch.no_grad():
        ref = model(ids).logits
    model = model.dequantize()
    assert not any(isinstance(m, MarlinLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-3, atol=1e-3)
    model.save_pretrained(tmp_path / "out")  # a plain dense checkpoint again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
