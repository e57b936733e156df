"""DTypeConfig: fields, presets, conversions and the process-wide default (seeds/000)."""

import numpy as np
import pytest
import torch

import metal_marlin_torch as mm
from metal_marlin_torch.dtypes import DTypeConfig, resolve


def test_defaults_and_presets():
    assert DTypeConfig().to_dict() == {"weights": "bf16", "activations": "bf16", "accumulation": "fp32",
                                       "scales": "fp16", "kv_cache": "bf16"}
    assert mm.fp16_config().to_dict() == dict.fromkeys(("weights", "activations", "scales", "kv_cache"), "fp16") | {
        "accumulation": "fp32"}
    assert mm.bf16_config() == DTypeConfig()
    assert mm.memory_efficient_config().kv_cache == "fp8" and mm.memory_efficient_config().weights == "fp16"
    assert mm.high_precision_config().scales == "fp32"


def test_conversions():
    c = DTypeConfig(weights="fp16", scales="fp32", kv_cache="fp8")
    assert c.torch_weights == torch.float16 and c.torch_activations == torch.bfloat16
    assert c.torch_accumulation == torch.float32
    assert c.torch_scales == torch.float32 and c.torch_kv_cache == torch.float8_e4m3fn
    assert c.numpy_scales is np.float32 and c.numpy_weights is np.float16
    assert DTypeConfig().numpy_activations is np.uint16  # bf16 stored as its bit pattern
    assert (c.metal_weights, c.metal_activations, c.metal_scales, c.metal_accumulation) == (
        "half", "bfloat", "float", "float")


@pytest.mark.parametrize("field,value", [("weights", "fp32"), ("activations", "int8"), ("accumulation", "fp16"),
                                         ("scales", "bf16"), ("kv_cache", "fp4")])
def test_bad_values_name_field_and_options(field, value):
    with pytest.raises(ValueError, match=rf"DTypeConfig\.{field} must be one of .* got '{value}'"):
        DTypeConfig(**{field: value})


def test_global_default():
    try:
        assert resolve(None) == DTypeConfig()
        mm.set_default_config(mm.fp16_config())
        assert mm.get_default_config() == mm.fp16_config() and resolve(None).activations == "fp16"
        from torch import nn

        layer = mm.MarlinLinear.from_linear(nn.Linear(64, 8), "fp4", 32)  # dtype_config=None -> default
        assert layer.dtype_config == mm.fp16_config() and layer.bias.dtype == torch.float32
        with pytest.raises(TypeError, match="DTypeConfig"):
            mm.set_default_config("fp16")
    finally:
        mm.reset_default_config()
    assert mm.get_default_config() == DTypeConfig()


def test_from_dict_rejects_unknown_fields():
    assert DTypeConfig.from_dict({"scales": "fp32"}).scales == "fp32"
    with pytest.raises(ValueError, match="unknown fields"):
        DTypeConfig.from_dict({"scale": "fp32"})
