"""MarlinLinear against nn.Linear, and quantize_model on a tiny Llama."""

import pytest
import torch
from torch import nn

from metal_marlin_torch import DTypeConfig, MarlinLinear, QuantConfig, quantize_model
from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import MIXED_4_3_RULES
from tests.conftest import tiny_llama


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


# Minimum output SQNR on Gaussian weights and inputs: about 6 dB per bit for the uniform grids,
# a little less for the coarse 3- and 2-bit ones.
MIN_SQNR = {"int8": 40, "fp8_e4m3": 28, "fp8_e5m2": 22, "fp4": 15, "mxfp4": 14, "nvfp4": 16, "nf4": 17,
            "int4": 17, "int3": 11, "nf3": 11, "int2": 5, "int6": 29, "int5": 23}


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_from_linear_tracks_dense_output(fmt):
    linear = nn.Linear(256, 96)
    layer = MarlinLinear.from_linear(linear, fmt)
    x = torch.randn(4, 7, 256)
    ref = linear(x)
    out = layer(x.to(torch.bfloat16)).float()
    assert sqnr_db(ref, out) > MIN_SQNR[fmt]
    # and exactly x @ W_hat.T + b, the dequantized weight through a plain matmul
    w_hat = layer.dequantized_weight()
    torch.testing.assert_close(layer(x), x @ w_hat.T + linear.bias.detach(), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_repr():
    layer = MarlinLinear.from_linear(nn.Linear(128, 32), "int3", 64)
    fresh = MarlinLinear(128, 32, True, "int3", 64, bias_dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))
    r = repr(layer)
    assert "format=int3" in r and "bits=3" in r and "group_size=64" in r
    assert layer.weight.dtype == torch.uint32 and layer.weight.shape == (32, 12)


def test_scales_follow_dtype_config():
    layer = MarlinLinear.from_linear(nn.Linear(64, 8), "fp4", 32, DTypeConfig(scales="fp32"))
    assert layer.scales.dtype == torch.float32
    assert MarlinLinear.from_linear(nn.Linear(64, 8), "fp4", 32).scales.dtype == torch.float16


def test_layer_errors():
    with pytest.raises(TypeError, match="expected nn.Linear"):
        MarlinLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="not divisible by group_size"):
        MarlinLinear(100, 8, format="fp4", group_size=32)
    with pytest.raises(ValueError, match="rotation_block"):
        MarlinLinear(128, 8, format="fp4", group_size=32, rotation_block=48)


def test_rotation_preserves_the_product():
    """A layer storing W·Hᵀ and rotating its input computes x Wᵀ (docs/FORMAT.md §5)."""
    linear = nn.Linear(128, 16, bias=False)
    signs = torch.where(torch.rand(128) < 0.5, -1.0, 1.0)
    rotated = torch.ops.marlin.hadamard(linear.weight.detach() * signs, 64)
    layer = MarlinLinear(128, 16, False, "int8", 32, DTypeConfig(scales="fp32"))
    layer.load_quantized(F.quantize(rotated, "int8", 32, torch.float32), rotation_block=64, rotation_signs=signs)
    x = torch.randn(5, 128)
    assert sqnr_db(linear(x), layer(x)) > 38


def test_quantize_model_defaults_and_summary():
    model = tiny_llama()
    n_linear = sum(1 for m in model.modules() if type(m) is nn.Linear)
    summary = quantize_model(model, QuantConfig(format="fp4", group_size=32))
    assert len(summary.layers) == n_linear - 1  # all but lm_head
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, MarlinLinear)
    # bytes: 4-bit codes plus one fp16 scale per 32 weights, against fp32 weights
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, MarlinLinear))
    assert summary.bytes_before == 4 * weights
    assert summary.bytes_after == weights // 2 + 2 * (weights // 32)
    assert "quantized" in str(summary)


def test_mixed_precision_rules():
    model = tiny_llama()
    summary = quantize_model(model, QuantConfig(format="fp4", group_size=64, rules=MIXED_4_3_RULES))
    layer = model.model.layers[1]
    formats = (layer.self_attn.q_proj.format, layer.mlp.down_proj.format, layer.mlp.up_proj.format)
    assert formats == ("fp4", "fp4", "nf3")
    assert summary.layers["model.layers.1.mlp.gate_proj"] == ("nf3", 64)


def test_include_exclude_and_skipped_shapes():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 8))
    summary = quantize_model(model, QuantConfig(format="int4", group_size=64, exclude=("0",)))
    assert list(summary.layers) == ["1"]
    assert "not divisible" in summary.skipped["2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_config_validation():
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(format="mxfp4", group_size=128)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="unknown format"):
        QuantConfig(format="int7")
    with pytest.raises(ValueError, match="only 'format' and 'group_size'"):
        QuantConfig(rules=(("*", {"bits": 3}),))
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_model(nn.Linear(4, 4), {"format": "fp4"})


def test_every_linear_replacement_keeps_the_bias_dtype():
    """RTN (from_linear), GPTQ and the empty twin (like) agree: a float32 bias stays float32 with
    bf16 activations, on the linear's device, and a layer without bias gets none."""
    from metal_marlin_torch.nn.config import LayerPlan
    from metal_marlin_torch.quant.mr_gptq import quantize_linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 16)  # float32 bias
    dcfg = DTypeConfig(activations="bf16")
    h = torch.eye(64)
    layers = [MarlinLinear.from_linear(linear, "int4", 32, dcfg),
              quantize_linear(linear, LayerPlan("int4", 32), dcfg, hessian=h),
              MarlinLinear.like(linear, "int4", 32, dcfg)]
    for layer in layers:
        assert layer.bias is not None and layer.bias.dtype == torch.float32
        assert layer.weight.device == linear.weight.device
    for layer in layers[:2]:
        assert torch.equal(layer.bias, linear.bias)
    assert MarlinLinear.like(nn.Linear(64, 16, bias=False), "int4", 32).bias is None
    with pytest.raises(TypeError, match="expected nn.Linear"):
        MarlinLinear.like(nn.Conv1d(4, 4, 1), "int4")
