"""Learned rounding (quant/autoround.py) on tiny random Llamas: the block output error falls
below RTN's and GPTQ's on the same data, codes stay in range and move at most to a neighbouring
codebook value, resume works, unsupported formats and bad options are reported."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import plan_layers
from metal_marlin_torch.quant import autoround as AR
from metal_marlin_torch.quant.budget import sensitivity_kind
from metal_marlin_torch.quant.driver import DriverOptions, capture_inputs, find_blocks, quantize_layerwise
from metal_marlin_torch.quant.mr_gptq import quantize_linear
from tests.quant.test_driver import tiny_llama, tokens
from tests.quant.test_refine import layers

pytestmark = pytest.mark.usefixtures("one_thread")



def block0_error(dense: nn.Module, quantized: nn.Module, ids: torch.Tensor) -> float:
    """Relative squared error of the first block's output against the dense first block's on
    the same inputs (the embeddings: identical in both models), measured here independently
    of the method's own report."""
    _, dense_blocks = find_blocks(dense)
    _, q_blocks = find_blocks(quantized)
    (args, kwargs), = capture_inputs(dense, dense_blocks, ids, ids.shape[0], "cpu", "cpu")
    with torch.no_grad():
        ref = dense_blocks[0](*args, **kwargs)
        out = q_blocks[0](*args, **kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("fmt", ["int3", "nf3"])
def test_learned_rounding_beats_rtn_and_gptq_on_the_block_output(fmt):
    calib = tokens(16, 32, seed=1)
    dense = tiny_llama()
    plans = plan_layers(dense, QuantConfig(format=fmt, group_size=32))[0]
    err = {}
    for name, method, opts in [("rtn", "rtn", {}), ("gptq", "gptq", {}),
                               ("ar", "autoround", {"autoround_steps": 48}),
                               ("ar-rtn", "autoround", {"autoround_steps": 48, "autoround_init": "rtn"})]:
        model = tiny_llama()
        quantize_layerwise(model, plans, calib, DriverOptions.from_options(method, opts), progress=False)
        err[name] = block0_error(dense, model, calib)
    assert err["gptq"] < err["rtn"], err  # the references are what they should be
    assert err["ar"] < 0.8 * err["gptq"], err
    assert err["ar-rtn"] < 0.8 * err["rtn"] and err["ar-rtn"] < err["gptq"], err


def test_codes_stay_in_range_and_move_at_most_one_codebook_step():
    """Each learned code is the base method's or a neighbouring value in the sorted codebook;
    decoded weights stay on the format's grid (nf3: table value times the group scale)."""
    calib = tokens(16, 32, seed=1)
    for fmt, init in (("int2", "gptq"), ("nf3", "gptq"), ("int3", "rtn")):
        born: dict[int, torch.Tensor] = {}

        def recording(linear, plan, *args, born=born):
            layer = quantize_linear(linear, plan, *args)
            born[id(layer)] = layer.weight.clone()
            return layer
        model = tiny_llama()
        plans = plan_layers(model, QuantConfig(format=fmt, group_size=32))[0]
        opts = DriverOptions.from_options("autoround", {"autoround_steps": 32, "autoround_init": init})
        report = quantize_layerwise(model, plans, calib, opts, progress=False, layer_fn=recording)
        spec = F.get_format(fmt)
        values, order = AR.sorted_codebook(spec)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        moved = 0
        for name, m in layers(model).items():
            k = m.in_features
            new = F.unpack(m.weight, spec.bits, k).long()
            old = F.unpack(born[id(m)], spec.bits, k).long()
            assert int(new.max()) < (1 << spec.bits), name
            assert int((rank[new] - rank[old]).abs().max()) <= 1, name
            moved += int((new != old).sum())
            if fmt == "nf3":  # weight / scale is a codebook value
                w = m.dequantized_weight(torch.float32).view(m.out_features, -1, 32)
                u = w / m.scales.float().unsqueeze(-1)
                assert torch.allclose(u, values[rank[new.view_as(u)]], atol=1e-5), name
        assert moved == sum(r["changed"] for r in report["autoround"].values()) > 0, fmt


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    calib = tokens(8, 32, seed=1)
    cfg = QuantConfig(format="int3", group_size=32)
    opts = DriverOptions.from_options("autoround", {"autoround_steps": 8})
    whole = tiny_llama()
    plans = plan_layers(whole, cfg)[0]
    quantize_layerwise(whole, plans, calib, opts, progress=False)
    calls = {"n": 0}

    def failing(linear, plan, *args):
        calls["n"] += 1
        if calls["n"] > 7:  # the second block's first layer
            raise KeyboardInterrupt
        return quantize_linear(linear, plan, *args)
    broken = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        quantize_layerwise(broken, plans, calib, opts, progress=False, work_dir=tmp_path, layer_fn=failing)
    resumed = tiny_llama()
    report = quantize_layerwise(resumed, plans, calib, opts, progress=False, work_dir=tmp_path)
    assert report["resumed_blocks"] == [0] and report["quantized_blocks"] == [1]
    assert list(report["autoround"]) == [1]
    for (n, a), b in zip(layers(whole).items(), layers(resumed).values(), strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales), n


def test_unsupported_formats_keep_the_base_codes_with_a_message(caplog):
    assert AR.supported("int2") and AR.supported("int8") and AR.supported("nf4")
    assert not AR.supported("fp4") and not AR.supported("mxfp4") and not AR.supported("nvfp4")
    calib = tokens(8, 32, seed=1)
    model, plain = tiny_llama(), tiny_llama()
    plans = plan_layers(model, QuantConfig(format="fp4", group_size=32))[0]
    quantize_layerwise(plain, plans, calib, DriverOptions.from_options("gptq", {}), progress=False)
    with caplog.at_level(logging.INFO, logger="metal_marlin_torch"):
        report = quantize_layerwise(model, plans, calib, DriverOptions.from_options("autoround", {}),
                                    progress=False)
    assert "keeps the base method's codes" in caplog.text
    assert len(report["autoround"][0]["kept_base"]) == 7
    for (n, a), b in zip(layers(plain).items(), layers(model).values(), strict=True):
        assert torch.equal(a.weight, b.weight), n


def test_bit_budget_and_quantize_model_take_the_method():
    calib = tokens(8, 32, seed=1)
    cfg = QuantConfig(bits_per_weight=3.5, method="autoround", method_options={"autoround_steps": 4},
                      candidates=(("int2", 32), ("int3", 32), ("nf3", 32), ("int4", 32)), budget_samples=4)
    assert sensitivity_kind(cfg) == "gptq"
    assert sensitivity_kind(cfg.with_(method_options={"autoround_init": "rtn"})) == "search"
    model = tiny_llama()
    summary = quantize_model(model, cfg, calibration=calib, progress=False)
    assert 3.0 < summary.bits_per_weight <= 3.5 and len(summary.layers) == 14
    assert set(summary.method_report["autoround"]) == {0, 1}


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="autoround: steps must be an int >= 0, got -1"):
        DriverOptions.from_options("autoround", {"autoround_steps": -1})
    with pytest.raises(ValueError, match=r"autoround: init must be one of \('gptq', 'rtn'\), got 'hqq'"):
        DriverOptions.from_options("autoround", {"autoround_init": "hqq"})
    with pytest.raises(ValueError, match="autoround: lr must be a number in"):
        AR.AutoRoundOptions(lr=2.0)
    with pytest.raises(ValueError, match=r"autoround: loss must be one of \('mse', 'token'\), got 'kl'"):
        DriverOptions.from_options("autoround", {"autoround_loss": "kl"})
    with pytest.raises(ValueError, match="autoround: batch must be a positive int"):
        AR.AutoRoundOptions(batch=0)
    with pytest.raises(ValueError, match=r"\['autoround_steps'\] apply to method 'autoround', not 'gptq'"):
        DriverOptions.from_options("gptq", {"autoround_steps": 4})
    with pytest.raises(ValueError, match="QuantConfig.method must be one of"):
        QuantConfig(method="auto-round")
