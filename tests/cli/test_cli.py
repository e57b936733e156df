"""The marlin command end to end on the real pylm-s model."""

import json

import torch

from metal_marlin_torch import load_quantized
from metal_marlin_torch.cli import main


def test_quantize_then_info_then_load(tmp_path, pylm_s_path, capsys):
    out = tmp_path / "pylm-s-int4"
    assert main(["quantize", str(pylm_s_path), str(out), "--format", "int4", "--group-size", "64", "--mixed"]) == 0
    assert "quantized 42 layers" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["layers"]["model.layers.0.mlp.up_proj"]["format"] == "nf3"
    assert cfg["layers"]["model.layers.0.self_attn.q_proj"]["format"] == "fp4"
    assert (out / "tokenizer.json").is_file()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized layers: 42" in info and "nf3 group   64: 12 layers" in info
    model = load_quantized(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 4096, (1, 8))).logits).all()


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "kernels" in capsys.readouterr().out


def test_demo_runs(capsys):
    assert main(["demo", "--formats", "int8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("int8"))
    cos_mean = float(row.split("|")[4])
    assert cos_mean > 0.999  # int8 keeps sentence embeddings nearly identical
    assert "identical embeddings" in out
