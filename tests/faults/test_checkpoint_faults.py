"""No silent wrong result from a checkpoint (issue 19): a ``config.json`` that disagrees with
the tensors, a missing tensor or changed bytes fail loading through every path, naming the
layer or tensor; a layer quantize_model cannot take is a warning the user sees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from metal_marlin_torch.cli import main
from metal_marlin_torch.io import load_quantized
from metal_marlin_torch.io.mlx_import import import_mlx
from metal_marlin_torch.nn import QuantConfig, quantize_model

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def fp4_ckpt(tmp_path_factory, tiny_src) -> Path:
    out = tmp_path_factory.mktemp("fp4") / "ckpt"
    assert main(["quantize", str(tiny_src), str(out), "--format", "fp4", "--group-size", "32"]) == 0
    return out


def edited_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def rewritten_tensors(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose model.safetensors is rewritten by ``edit(tensors)``, keeping its metadata."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(f), metadata=meta)
    return dst


def from_pretrained(path: Path):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)


def test_config_format_disagrees_with_tensors(fp4_ckpt, tmp_path, capsys):
    """config.json says nf4 for a layer quantized as fp4 (same shapes: it used to load and run
    with outputs off by up to 17.6)."""
    bad = edited_config(fp4_ckpt, tmp_path / "bad", lambda q: q["layers"][LAYER].update(format="nf4"))
    message = f"layer '{LAYER}': config.json says format='nf4', but its tensors in model.safetensors " \
              f"were written with format='fp4'"
    with pytest.raises(ValueError, match=message):
        load_quantized(bad)
    with pytest.raises(ValueError, match=message):
        from_pretrained(bad)
    assert main(["info", str(bad)]) == 2
    assert message in capsys.readouterr().err
    load_quantized(fp4_ckpt)  # the untouched checkpoint loads


def test_config_drops_a_quantized_layer(fp4_ckpt, tmp_path):
    bad = edited_config(fp4_ckpt, tmp_path / "bad", lambda q: q["layers"].pop(LAYER))
    with pytest.raises(ValueError, match=f"layer '{LAYER}' is quantized .* config.json does not list it"):
        load_quantized(bad)


@pytest.mark.parametrize("tensor", ["scales", "weight"])
def test_missing_tensor_fails_every_loader(fp4_ckpt, tmp_path, tensor):
    """A deleted ``scales`` used to load through from_pretrained (randomly initialized) and give NaN logits."""
    key = f"{LAYER}.{tensor}"
    bad = rewritten_tensors(fp4_ckpt, tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"missing tensors.*{key}"):
        load_quantized(bad)
    with pytest.raises(ValueError, match=f"missing tensors of quantized layers.*{key}"):
        from_pretrained(bad)


def test_from_pretrained_loads_a_good_checkpoint(fp4_ckpt):
    model = from_pretrained(fp4_ckpt)
    ref = load_quantized(fp4_ckpt)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float())


def test_verify_finds_changed_bytes(fp4_ckpt, tmp_path, capsys):
    assert main(["info", str(fp4_ckpt), "--verify"]) == 0
    assert "verified: all" in capsys.readouterr().out
    key = f"{LAYER}.scales"

    def flip(t):
        s = t[key].clone()
        s.view(torch.int16)[0, 0] ^= 1  # one bit of one scale: loads fine, outputs differ
        t[key] = s

    bad = rewritten_tensors(fp4_ckpt, tmp_path / "bad", flip)
    load_quantized(bad)  # without verify the bytes are not hashed (loading stays memory-mapped)
    with pytest.raises(ValueError, match=f"sha256.*{key}"):
        load_quantized(bad, verify=True)
    assert main(["info", str(bad), "--verify"]) == 2
    captured = capsys.readouterr()
    assert f"FAILED {key}: sha256 differs" in captured.out
    assert "1 of" in captured.err and "failed verification" in captured.err


def test_import_mlx_missing_scales(tmp_path):
    pytest.importorskip("mlx.core", reason="writes the MLX checkpoint with MLX itself")
    from tests.io.test_mlx_import import write_mlx_llama  # noqa: PLC0415

    src = tmp_path / "mlx"
    write_mlx_llama(src, 4, 32, {})
    f = src / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != f"{LAYER}.scales"}  # noqa: SIM118
    save_file(tensors, str(f), metadata={"format": "mlx"})
    with pytest.raises(ValueError, match=f"{LAYER}.*packed.*no scales"):
        import_mlx(src)


def test_skipped_layer_is_a_visible_warning():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(100, 64))  # K=100: no group of 32 divides it
    with pytest.warns(UserWarning, match="leaving 2 unquantized: .*K=100 is not divisible by group_size=32"):
        summary = quantize_model(model, QuantConfig(format="int4", group_size=32))
    assert list(summary.skipped) == ["2"] and list(summary.layers) == ["0"]
    assert "(1 skipped: 2)" in str(summary)


def test_cli_lists_skipped_layers(tiny_src, tmp_path, capsys):
    assert main(["quantize", str(tiny_src), str(tmp_path / "out"), "--format", "int4", "--group-size", "128"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {LAYER} left unquantized: format 'int4': in_features K=64" in captured.err
    assert "quantized 2 layers (12 skipped:" in captured.out  # only down_proj (K=128) fits group 128
