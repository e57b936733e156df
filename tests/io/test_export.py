"""export_mlx / export_gguf (metal_marlin_torch.io.export): round trips through mlx.core and gguf.

MLX: the exported folder, read with ``mx.load`` and dequantized by ``mx.dequantize`` with the
parameters mlx-lm's loader resolves from ``config.json``, gives exactly our weights; the importer
reads it back to the same model. GGUF: a file made by ``gguf.quants.quantize``, imported and
exported again, has byte-identical tensor blocks; an exported model reads back through
transformers' GGUF loader (``import_gguf``) to the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.io.export import ExportError, export_gguf, export_mlx
from metal_marlin_torch.nn import MarlinLinear
from tests.conftest import tiny_llama

MIXED = QuantConfig(format="int4", group_size=64, rules=(("*.down_proj", {"format": "int8", "group_size": 32}),
                                                         ("*.v_proj", {"format": "int3", "group_size": 32})))


def quantized_llama(config: QuantConfig = MIXED, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.tie_word_embeddings = tie
    quantize_model(model, config)
    return model


def _dequant(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.dequantized_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, MarlinLinear)}


def test_export_mlx_read_by_mlx(tmp_path: Path) -> None:
    mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install mlx[cpu] on Linux)")
    from metal_marlin_torch.io.mlx_import import _quant_params, import_mlx  # noqa: PLC0415

    model = quantized_llama()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    export_mlx(model, tmp_path / "mlx", source_dir=tmp_path / "src")
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 4, "affine") and cfg["quantization_config"] == q
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert (tmp_path / "mlx" / "tokenizer_config.json").is_file()
    weights = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    ours = _dequant(model)
    for name, w in ours.items():
        p = _quant_params(q, name)  # what mlx-lm hands to to_quantized for this layer
        got = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"].astype(mx.float32),
                            weights[f"{name}.biases"].astype(mx.float32), group_size=p["group_size"],
                            bits=p["bits"], mode=p["mode"])
        assert torch.equal(torch.from_numpy(np.array(got)), w), name
    emb = model.model.embed_tokens.weight
    assert torch.equal(torch.from_numpy(np.array(weights["model.embed_tokens.weight"].astype(mx.float32))), emb.float())
    back = import_mlx(tmp_path / "mlx").model
    assert all(torch.equal(w, _dequant(back)[n]) for n, w in ours.items())
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits.float(), model(ids).logits.float(), rtol=2e-2, atol=2e-2)


def test_export_mlx_int5_int6(tmp_path: Path) -> None:
    # MLX's 5- and 6-bit affine layers hold int5/int6 exactly: same words, read back by MLX itself
    mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install mlx[cpu] on Linux)")
    from metal_marlin_torch.io.mlx_import import _quant_params, import_mlx  # noqa: PLC0415

    cfg = QuantConfig(format="int5", group_size=32, rules=(("*.down_proj", {"format": "int6", "group_size": 64}),))
    model = quantized_llama(cfg)
    export_mlx(model, tmp_path / "mlx")
    q = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 5)
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    weights = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    ours = _dequant(model)
    for name, w in ours.items():
        p = _quant_params(q, name)
        got = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"].astype(mx.float32),
                            weights[f"{name}.biases"].astype(mx.float32), group_size=p["group_size"],
                            bits=p["bits"], mode=p["mode"])
        assert torch.equal(torch.from_numpy(np.array(got)), w), name
    back = import_mlx(tmp_path / "mlx").model
    assert back.model.layers[1].mlp.down_proj.format == "int6" and back.model.layers[1].mlp.up_proj.format == "int5"
    assert all(torch.equal(w, _dequant(back)[n]) for n, w in ours.items())


def test_export_mlx_refuses_inexact(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="nf4, which no MLX mode"):
        export_mlx(quantized_llama(QuantConfig(format="nf4", group_size=64)), tmp_path / "a")
    with pytest.raises(ExportError, match="group -1"):  # per-channel
        export_mlx(quantized_llama(QuantConfig(format="int4", group_size=-1)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


gguf = pytest.importorskip("gguf", reason="needs the gguf package")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
def test_gguf_import_export_byte_identical(tmp_path: Path, qtype: str) -> None:
    from metal_marlin_torch.io.gguf_import import import_gguf  # noqa: PLC0415
    from tests.io.test_gguf_import import write_llama_gguf  # noqa: PLC0415

    T = gguf.GGMLQuantizationType
    write_llama_gguf(tmp_path / "in.gguf", T[qtype])
    model, _ = import_gguf(tmp_path / "in.gguf", dense_dtype=torch.float32)
    export_gguf(model, tmp_path / "out.gguf")
    src = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "in.gguf")).tensors}
    out = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    assert set(src) == set(out)
    deq = gguf.quants.dequantize
    for name, t in src.items():
        if name == "token_embd.weight":  # the importer makes embeddings dense: same values, F32 now
            assert np.array_equal(deq(np.array(out[name].data), out[name].tensor_type),
                                  deq(np.array(t.data), t.tensor_type))
            continue
        assert out[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.array(out[name].data), np.array(t.data)), name


def test_export_gguf_of_rtn_model_reads_back(tmp_path: Path) -> None:
    from metal_marlin_torch.io.gguf_import import import_gguf  # noqa: PLC0415

    model = quantized_llama(QuantConfig(format="int4", group_size=32))  # affine: Q4_1
    export_gguf(model, tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    back, report = import_gguf(tmp_path / "m.gguf", dense_dtype=torch.float32)
    assert all(r.exact for r in report.report.values())
    ours = _dequant(model)
    assert all(torch.equal(w, _dequant(back)[n]) for n, w in ours.items())


def test_export_gguf_refuses_inexact(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="int4/g64"):
        export_gguf(quantized_llama(QuantConfig(format="int4", group_size=64)), tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="not symmetric"):
        export_gguf(quantized_llama(QuantConfig(format="int8", group_size=32)), tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_cli_exports(tmp_path: Path, capsys) -> None:
    from metal_marlin_torch.cli import main  # noqa: PLC0415
    from metal_marlin_torch.io import save_quantized  # noqa: PLC0415

    save_quantized(quantized_llama(QuantConfig(format="int4", group_size=32)), tmp_path / "ckpt")
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors} >= {"Q4_1"}
    assert main(["export-mlx", str(tmp_path / "ckpt"), str(tmp_path / "mlx")]) == 0
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]["bits"] == 4
    save_quantized(quantized_llama(QuantConfig(format="nf4", group_size=64)), tmp_path / "nf4")
    assert main(["export-mlx", str(tmp_path / "nf4"), str(tmp_path / "bad")]) == 2
    assert "nf4, which no MLX mode holds exactly" in capsys.readouterr().err


def test_export_gguf_writes_the_tokenizer(tmp_path: Path, pylm_s_path, capsys) -> None:
    """The exported file carries the HF tokenizer (byte-level BPE -> llama.cpp 'gpt2'): gguf reads
    the vocabulary, merges and special ids back, and transformers' GGUF loader rebuilds a
    tokenizer from the file that encodes text to the same ids as the original."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from metal_marlin_torch.cli import main  # noqa: PLC0415
    from metal_marlin_torch.io import save_quantized  # noqa: PLC0415
    from metal_marlin_torch.io.hf import copy_tokenizer, load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.nn import quantize_model  # noqa: PLC0415

    model = load_pretrained(pylm_s_path, dtype=torch.float32)
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    save_quantized(model, tmp_path / "ckpt")
    copy_tokenizer(pylm_s_path, tmp_path / "ckpt")
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    assert "tokenizer)" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(pylm_s_path))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def field(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i].item()
                for i in f.data]

    vocab = tok.get_vocab()
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    assert field("tokenizer.ggml.model") == ["gpt2"]
    assert field("tokenizer.ggml.eos_token_id") == [tok.eos_token_id]
    merges = json.loads((pylm_s_path / "tokenizer.json").read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "Once upon a time, def main():\n    return 42  # ünïcödé"
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_export_gguf_refuses_other_tokenizers(tmp_path: Path) -> None:
    class Slow:  # no backend tokenizer: not converted
        pass

    with pytest.raises(ExportError, match="fast"):
        export_gguf(quantized_llama(QuantConfig(format="int4", group_size=32)), tmp_path / "a.gguf", tokenizer=Slow())
    assert not (tmp_path / "a.gguf").exists()
