"""torch.compile(fullgraph=True) of a quantized Llama: no graph break, same output as eager."""

import pytest
import torch

from metal_marlin_torch import QuantConfig, quantize_model
from tests.conftest import tiny_llama


@pytest.mark.parametrize("fmt", ["fp4", "int3"])
def test_compiled_quantized_llama_matches_eager(fmt):
    torch._dynamo.reset()
    model = tiny_llama()
    quantize_model(model, QuantConfig(format=fmt, group_size=32))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_lora_style_training_through_quantized_layer():
    """Gradients flow to an adapter on top of a frozen quantized base (autograd w.r.t. x)."""
    from torch import nn

    from metal_marlin_torch import MarlinLinear

    base = MarlinLinear.from_linear(nn.Linear(64, 64), "fp4", 32)
    adapter = nn.Linear(64, 64)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 64)
    losses = []
    for _ in range(5):
        loss = (base(adapter(x)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
