"""LoRA through peft on a quantized model (metal_marlin_torch.nn.lora).

pylm-s quantized to int4 trains LoRA adapters for a few steps on real text with plain
``get_peft_model(model, LoraConfig(...))``; the reference for merging is the adapter model
itself (base + ``scaling * B A x`` computed by the LoRA branch), which the requantized merge
must match within the int4 quantization error of the update and the dense merge exactly.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test extra (pip install -e .[test])")

from metal_marlin_torch import MarlinLinear, QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch.io.hf import load_pretrained  # noqa: E402
from metal_marlin_torch.nn.lora import MarlinLoraLinear, merge_and_unload  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def quantized_pylm(path: Path) -> torch.nn.Module:
    model = load_pretrained(path, dtype=torch.float32)
    quantize_model(model, QuantConfig(format="int4", group_size=64))
    return model


@pytest.fixture(scope="module")
def batch(pylm_s_path) -> torch.Tensor:
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(pylm_s_path))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = torch.tensor(tok(text)["input_ids"][:4 * 64]).view(4, 64)
    return ids


@pytest.fixture(scope="module")
def trained(pylm_s_path, batch, tmp_path_factory):
    """(peft model after 8 steps, losses, adapter folder)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(quantized_pylm(pylm_s_path),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(folder))
    return model, losses, folder


def test_get_peft_model_wraps_marlin_layers_and_loss_falls(trained):
    model, losses, _ = trained
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MarlinLoraLinear) and isinstance(q.get_base_layer(), MarlinLinear)
    assert losses[-1] < losses[0] * 0.9, losses


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_requantizes_within_quantization_error(trained, batch, pylm_s_path):
    model, _, folder = trained
    adapter_out = logits(model, batch)
    base_out = logits(quantized_pylm(pylm_s_path), batch)
    # a fresh copy of the trained model (merging replaces its layers)
    copy = peft.PeftModel.from_pretrained(quantized_pylm(pylm_s_path), str(folder)).eval()
    torch.testing.assert_close(logits(copy, batch), adapter_out)  # adapters saved and loaded by peft
    merged, report = merge_and_unload(copy)
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MarlinLinear) and layer.format == "int4" and layer.group_size == 64
    assert set(report) >= {"model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj"}
    assert all(0 < e.relative < 0.2 for e in report.values()), report
    err_merged = (logits(merged, batch) - adapter_out).norm()
    err_base = (base_out - adapter_out).norm()  # what the adapter changed
    # requantizing W + delta to int4 loses part of the update (much of it is below one int4
    # step), but the merged model is closer to the adapter model than the base it started from
    assert err_merged < 0.6 * err_base, (float(err_merged), float(err_base))


def test_dense_merge_is_exact(trained, batch, pylm_s_path):
    model, _, folder = trained
    adapter_out = logits(model, batch)
    copy = peft.PeftModel.from_pretrained(quantized_pylm(pylm_s_path), str(folder)).eval()
    merged, report = merge_and_unload(copy, dense=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(e.layer == "dense" and e.error_norm == 0 for e in report.values())
    torch.testing.assert_close(logits(merged, batch), adapter_out, rtol=1e-4, atol=1e-4)


def test_dora_matches_peft_dora_on_the_dequantized_layer():
    # the independent reference: peft's own DoRA on a dense nn.Linear holding our layer's
    # dequantized weight, with the same A, B and magnitude; outputs and gradients must agree
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ours = MarlinLinear.from_linear(lin, "int4", 32)
    dense = torch.nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(ours.dequantized_weight(torch.float32))
        dense.bias.copy_(ours.bias)
    cfg = dict(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    a = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), torch.nn.Sequential(ours))[0]
    b = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), torch.nn.Sequential(dense))[0]
    assert isinstance(a, MarlinLoraLinear)
    with torch.no_grad():
        a.lora_A["default"].weight.copy_(b.lora_A["default"].weight)
        a.lora_B["default"].weight.copy_(b.lora_B["default"].weight)
        # the magnitude starts as ||W + s B A|| per row (each from its own random B): equal now
        # that A and B are, up to the dequantized W being the same numbers
        wn = (dense.weight + b.lora_B["default"].weight @ b.lora_A["default"].weight * b.scaling["default"]).norm(dim=1)
        torch.testing.assert_close(b.lora_magnitude_vector["default"].weight, wn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a._dora_norm("default"), wn, rtol=1e-5, atol=1e-6)
        a.lora_magnitude_vector["default"].weight.copy_(wn * 1.1)
        b.lora_magnitude_vector["default"].weight.copy_(wn * 1.1)
    x = torch.randn(5, 64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ya, ours(x), atol=1e-2)  # DoRA changed the output
    ya.square().sum().backward()
    yb.square().sum().backward()
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        torch.testing.assert_close(getattr(a, name)["default"].weight.grad, getattr(b, name)["default"].weight.grad,
                                   rtol=1e-3, atol=1e-4)


def test_dora_trains_and_merges(pylm_s_path, batch):
    torch.manual_seed(0)
    model = peft.get_peft_model(quantized_pylm(pylm_s_path),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True))
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < losses[0] * 0.9, losses
    adapter_out = logits(model, batch)
    base_out = logits(quantized_pylm(pylm_s_path), batch)
    import copy  # noqa: PLC0415

    dense, report = merge_and_unload(copy.deepcopy(model), dense=True)
    assert all(e.layer == "dense" for e in report.values())
    torch.testing.assert_close(logits(dense, batch), adapter_out, rtol=1e-3, atol=1e-3)
    merged, report = merge_and_unload(model)
    assert all(e.layer == "int4/g64" and e.relative < 0.2 for e in report.values())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, MarlinLinear)
    # requantizing loses the part of the update below one int4 step (see the LoRA merge test);
    # the merged model must still be clearly closer to the adapter model than the base is
    err_merged, err_base = (logits(merged, batch) - adapter_out).norm(), (base_out - adapter_out).norm()
    assert err_merged < 0.8 * err_base, (float(err_merged), float(err_base))
