"""save_quantized / load_quantized: bit-exact round trips and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from metal_marlin_torch import QuantConfig, load_quantized, quantize_model, save_quantized
from metal_marlin_torch.nn import MIXED_4_3_RULES
from tests.conftest import tiny_llama


@pytest.fixture
def quantized():
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="fp4", group_size=32, rules=MIXED_4_3_RULES))
    return model


def test_round_trip_is_bit_exact(tmp_path, quantized):
    save_quantized(quantized, tmp_path)
    loaded = load_quantized(tmp_path)
    a, b = quantized.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, loaded(ids).logits)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "metal_marlin" and cfg["format_version"] == 1
    assert cfg["layers"]["model.layers.0.mlp.up_proj"]["format"] == "nf3"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_sharded_round_trip(tmp_path, quantized):
    save_quantized(quantized, tmp_path, max_shard_size=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_quantized(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in quantized.state_dict().items())


def test_tied_embeddings(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_truncated_file(tmp_path, quantized):
    save_quantized(quantized, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        load_quantized(tmp_path)


def _rewrite(tmp_path, edit):
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_wrong_shape_missing_and_wrong_dtype(tmp_path, quantized):
    save_quantized(quantized, tmp_path)
    key = "model.layers.0.self_attn.q_proj.scales"
    _rewrite(tmp_path, lambda t: t.__setitem__(key, t[key][:, :1].clone()))
    with pytest.raises(ValueError, match=f"tensor '{key}' has shape"):
        load_quantized(tmp_path)
    save_quantized(quantized, tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__(key, t[key].float()))
    with pytest.raises(ValueError, match=f"tensor '{key}' has dtype"):
        load_quantized(tmp_path)
    save_quantized(quantized, tmp_path)
    _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing tensors.*q_proj.scales"):
        load_quantized(tmp_path)


def _edit_config(tmp_path, edit):
    f = tmp_path / "config.json"
    cfg = json.loads(f.read_text())
    edit(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def test_unknown_format_and_version(tmp_path, quantized):
    save_quantized(quantized, tmp_path)
    _edit_config(tmp_path, lambda q: q["layers"]["model.layers.0.mlp.up_proj"].__setitem__("format", "fp5"))
    with pytest.raises(ValueError, match="unknown format 'fp5'"):
        load_quantized(tmp_path)
    save_quantized(quantized, tmp_path)
    _edit_config(tmp_path, lambda q: q.__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="format_version 99"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="quant_method 'metal_marlin'"):
        load_quantized(tmp_path)


def test_missing_shard(tmp_path, quantized):
    save_quantized(quantized, tmp_path, max_shard_size=20_000)
    sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shard .* is missing"):
        load_quantized(tmp_path)


def test_generic_module_with_skeleton(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_model(model, QuantConfig(format="nf4", group_size=32))
    save_quantized(model, tmp_path)
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    loaded = load_quantized(tmp_path, model=skeleton)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_files(tmp_path):
    """One finder for every reader: index order, the single file, any name (MLX), and errors
    that name the caller."""
    from metal_marlin_torch.io.checkpoint import INDEX_FILE, SINGLE_FILE, checkpoint_files

    with pytest.raises(FileNotFoundError, match=f"import_mlx: no \\*.safetensors or {INDEX_FILE}"):
        checkpoint_files(tmp_path, "import_mlx", any_name=True)
    (tmp_path / "b.safetensors").write_bytes(b"")
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert checkpoint_files(tmp_path, "x", any_name=True) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(FileNotFoundError, match=f"load_quantized: no {SINGLE_FILE}"):
        checkpoint_files(tmp_path, "load_quantized")
    (tmp_path / SINGLE_FILE).write_bytes(b"")
    assert checkpoint_files(tmp_path, "load_quantized") == [tmp_path / SINGLE_FILE]
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"w2": "b.safetensors", "w1": "a.safetensors"}}')
    assert checkpoint_files(tmp_path, "x") == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="quantize_checkpoint: .* is not a valid index"):
        checkpoint_files(tmp_path, "quantize_checkpoint")
