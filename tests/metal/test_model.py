"""A whole quantized model under emulator.use(): same output as the pure-torch path."""

from __future__ import annotations

import torch

from metal_marlin_torch import emulator, quantize_model
from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import MarlinLinear, QuantConfig
from metal_marlin_torch.ops import reference
from tests.conftest import tiny_llama

from .conftest import needs_emulator

pytestmark = needs_emulator


def rotated_tiny_llama() -> torch.nn.Module:
    """tiny_llama quantized to fp4 whose layers also carry a block-32 input rotation, so the
    forward pass calls marlin.hadamard as well as marlin.gemm."""
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="fp4", group_size=32))
    for layer in model.modules():
        if isinstance(layer, MarlinLinear):
            w = layer.dequantized_weight(torch.float32)
            signs = torch.where(torch.rand(w.shape[1]) < 0.5, -1.0, 1.0)
            w_rot = torch.ops.marlin.hadamard(w * signs, 32)
            layer.load_quantized(F.quantize(w_rot, "fp4", 32), rotation_block=32, rotation_signs=signs)
    return model


def test_tiny_llama_same_logits_under_the_emulator(emu):
    model = rotated_tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        with emulator.use() as session:
            out = model(ids).logits
    assert "hadamard" in session.calls  # the rotation ran on the emulated Metal kernel
    assert "gemm" in session.calls  # and every projection on the emulated GEMM kernels
    # The FWHT kernel is bitwise the torch op; the GEMM kernels accumulate in fp32 like it but
    # in another order (tests/metal/test_gemm_emu.py bounds that per call), so the fp32
    # logits agree to rounding, not bitwise.
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dequantized_weight_and_routing_report(emu):
    model = rotated_tiny_llama()
    layer = next(m for m in model.modules() if isinstance(m, MarlinLinear))
    ref = layer.dequantized_weight(torch.bfloat16)
    with emulator.use() as session:
        from metal_marlin_torch import backend_info
        info = backend_info()
        out = layer.dequantized_weight(torch.bfloat16)
    assert session.calls == ["dequantize"]
    assert info["kernels"]["cpu"]["dequantize"] == "metal-emulator"
    assert backend_info()["kernels"]["cpu"]["dequantize"] == "torch"  # restored on exit
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fake_quantize_routed_under_use(emu):
    x = torch.randn(300)
    with emulator.use() as session:
        y = torch.ops.marlin.fake_quantize(x, 3)
    assert session.calls == ["fake_quantize"]
    torch.testing.assert_close(y, reference.fake_quantize(x, 3), rtol=0, atol=0)
