"""Scales refined against the model (quant/refine.py) and searched / importance-weighted RTN
(quant/rtn.py), on tiny models: lower KL than without, codes unchanged, resume and checkpoint
round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metal_marlin_torch import QuantConfig, load_quantized, quantize_model, save_quantized
from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import MarlinLinear, plan_layers
from metal_marlin_torch.quant.driver import DriverOptions, quantize_layerwise
from metal_marlin_torch.quant.mr_gptq import quantize_linear
from metal_marlin_torch.quant.refine import RefineOptions, _take
from metal_marlin_torch.quant.rtn import rtn_search
from tests.quant.test_driver import tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def mean_kl(ref: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def layers(model: nn.Module) -> dict[str, MarlinLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MarlinLinear)}


def test_refined_rtn_lowers_held_out_kl_and_keeps_the_codes():
    calib, held_out = tokens(32, 32, seed=1), tokens(16, 32, seed=5)  # disjoint seeds
    base = tiny_llama()
    opts = {"scale_search": True, "refine_steps": 48}
    plain, refined = tiny_llama(), tiny_llama()
    quantize_model(plain, QuantConfig(format="int3", group_size=32, method_options=opts))
    quantize_model(refined, QuantConfig(format="int3", group_size=32, method_options=opts, refine=True),
                   calibration=calib, progress=False)
    kl_plain, kl_refined = mean_kl(base, plain, held_out), mean_kl(base, refined, held_out)
    assert kl_refined < 0.97 * kl_plain, (kl_plain, kl_refined)
    a, b = layers(plain), layers(refined)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name].weight, b[name].weight), name  # RTN codes: untouched
    assert all(not torch.equal(a[n].scales, b[n].scales) for n in a)  # every layer's scales trained
    assert all(b[n].scales.dtype == torch.float16 and b[n].biases.dtype == torch.float16 for n in b)


def test_refined_gptq_lowers_held_out_kl_and_keeps_gptqs_codes():
    """GPTQ's codes depend on the (refined) earlier blocks' outputs, so the codes each layer had
    when GPTQ produced it are recorded and compared with the final ones."""
    calib, held_out = tokens(32, 32, seed=1), tokens(16, 32, seed=5)
    base, plain, refined = tiny_llama(), tiny_llama(), tiny_llama()
    plans = plan_layers(base, QuantConfig(format="int3", group_size=32))[0]
    born: dict[int, torch.Tensor] = {}

    def recording(linear, plan, *args):
        layer = quantize_linear(linear, plan, *args)
        born[id(layer)] = layer.weight.clone()
        return layer
    quantize_layerwise(plain, plans, calib, DriverOptions.from_options("gptq", {}), progress=False)
    quantize_layerwise(refined, plans, calib, DriverOptions.from_options("gptq", {"refine": True, "refine_steps": 48}),
                       progress=False, layer_fn=recording)
    assert mean_kl(base, refined, held_out) < 0.97 * mean_kl(base, plain, held_out)
    final = layers(refined)
    assert len(born) == len(final) == 14
    assert all(torch.equal(born[id(m)], m.weight) for m in final.values())


def test_refine_nf_and_rotated_layers_train_in_their_basis():
    """NormalFloat (scales only, no biases) under an MR-GPTQ rotation: the trained layer must
    still compute from its own codes, and the block loss must fall."""
    calib = tokens(16, 32, seed=1)
    model = tiny_llama()
    plans, _ = plan_layers(model, QuantConfig(format="nf3", group_size=32))
    opts = DriverOptions.from_options("mr-gptq", {"refine": True, "refine_steps": 24})
    report = quantize_layerwise(model, plans, calib, opts, progress=False)
    for i in (0, 1):
        r = report["refine"][i]
        assert r["loss_after"] < r["loss_before"], r
    lay = layers(model)
    assert all(m.rotation_block in (64, 128) and m.biases is None for m in lay.values())


def test_refined_run_resumes_and_round_trips(tmp_path):
    calib = tokens(8, 32, seed=1)
    cfg = QuantConfig(format="int4", group_size=32, method="gptq", refine=True,
                      method_options={"refine_steps": 8})
    first = tiny_llama()
    quantize_model(first, cfg, calibration=calib, progress=False, work_dir=tmp_path / "work")
    again = tiny_llama()  # every block comes back from the work folder, refined
    report = quantize_layerwise(again, plan_layers(again, cfg)[0], calib,
                                DriverOptions.from_options("gptq", {"refine": True, "refine_steps": 8}),
                                progress=False, work_dir=tmp_path / "work")
    assert report["resumed_blocks"] == [0, 1] and report["refine"] == {}
    for (n, a), b in zip(layers(first).items(), layers(again).values(), strict=True):
        assert torch.equal(a.scales, b.scales) and torch.equal(a.biases, b.biases), n
    save_quantized(first, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    ids = tokens(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match="refine: steps must be an int >= 0, got -1"):
        RefineOptions(steps=-1)
    with pytest.raises(ValueError, match="refine: lr must be a number in"):
        DriverOptions.from_options("gptq", {"refine_lr": 5.0})
    with pytest.raises(ValueError, match="QuantConfig.refine must be a bool"):
        QuantConfig(refine="yes")
    with pytest.raises(ValueError, match="'imatrix' applies to method 'rtn'"):
        DriverOptions.from_options("gptq", {"imatrix": True})


def test_take_cuts_batch_tensors_and_keeps_broadcast_ones():
    h = torch.arange(24.0).view(4, 3, 2)
    cos = torch.ones(1, 3, 2)
    args, kwargs = _take(((h,), {"position_embeddings": (cos, cos), "flag": True}), 4, slice(1, 3))
    assert torch.equal(args[0], h[1:3]) and kwargs["position_embeddings"][0] is cos and kwargs["flag"]


def test_rtn_search_plain_grid_is_rtn_and_search_and_importance_lower_their_errors():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.linspace(0.2, 3.0, 128)
    imp = torch.rand(128) ** 4  # a few columns matter far more than the rest
    for fmt in ("int3", "nf3", "int4", "nf4", "int2"):
        plain = F.quantize(w, fmt, 32)
        same = rtn_search(w, fmt, 32, grid=1)
        assert torch.equal(plain.weight, same.weight) and torch.equal(plain.scales, same.scales)
        searched = rtn_search(w, fmt, 32)
        weighted = rtn_search(w, fmt, 32, importance=imp)

        def err(qt, wt=None):
            d = (F.dequantize(qt) - w).pow(2)
            return float((d if wt is None else d * wt).sum())
        assert err(searched) < err(plain), fmt
        assert err(weighted, imp) < err(searched, imp), fmt
    with pytest.raises(ValueError, match=r"importance must be \[128\] or \[48, 128\]"):
        rtn_search(w, "int4", 32, importance=torch.ones(5))


def test_rtn_method_options_route_to_searched_and_imatrix_rtn():
    calib = tokens(8, 32, seed=1)
    plain, searched, imatrix = tiny_llama(), tiny_llama(), tiny_llama()
    quantize_model(plain, QuantConfig(format="int3", group_size=32))
    quantize_model(searched, QuantConfig(format="int3", group_size=32, method_options={"scale_search": True}))
    quantize_model(imatrix, QuantConfig(format="int3", group_size=32, method_options={"imatrix": True}),
                   calibration=calib, progress=False)
    lin = tiny_llama().model.layers[0].mlp.down_proj
    w = lin.weight.detach().float()
    rtn = layers(plain)["model.layers.0.mlp.down_proj"]
    srch = layers(searched)["model.layers.0.mlp.down_proj"]
    assert torch.equal(srch.weight, rtn_search(w, "int3", 32).weight)
    assert not torch.equal(rtn.scales, srch.scales)
    assert any(not torch.equal(a.scales, b.scales) for a, b in zip(layers(searched).values(),
                                                                    layers(imatrix).values(), strict=True))
