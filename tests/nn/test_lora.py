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


def test_dora_is_refused_with_a_message(pylm_s_path):
    with pytest.raises(ValueError, match="DoRA is not supported"):
        peft.get_peft_model(quantized_pylm(pylm_s_path), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
