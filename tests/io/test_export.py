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
    with pytest.raises(ExportError, match="int3/g32.*requantize='Q8_0'"):
        export_gguf(quantized_llama(QuantConfig(format="int3", group_size=32)), tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="not symmetric"):
        export_gguf(quantized_llama(QuantConfig(format="int8", group_size=32)), tmp_path / "b.gguf")
    # RTN int6 is affine: Q6_K and Q8_0 are symmetric; the message names the layer and the option
    with pytest.raises(ExportError, match=r"'model.layers.0.self_attn.q_proj' is int6/g64 with affine biases.*"
                                          r"--requantize Q8_0"):
        export_gguf(quantized_llama(QuantConfig(format="int6", group_size=64)), tmp_path / "c.gguf")
    with pytest.raises(ExportError, match="int5/g16; a GGUF block of 32 values has one scale"):
        export_gguf(quantized_llama(QuantConfig(format="int5", group_size=16)), tmp_path / "e.gguf")
    with pytest.raises(ValueError, match="requantize must be None or one of"):
        export_gguf(quantized_llama(QuantConfig(format="int6", group_size=64)), tmp_path / "d.gguf",
                    requantize="Q4_0")
    assert not any((tmp_path / f).exists() for f in ("a.gguf", "b.gguf", "c.gguf", "d.gguf", "e.gguf"))


def _layer(fmt: str, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group: int) -> MarlinLinear:
    """A MarlinLinear holding exactly ``codes`` with ``scales``/``biases`` (fp16) per group."""
    from metal_marlin_torch import formats as F  # noqa: PLC0415

    n, k = codes.shape
    layer = MarlinLinear(k, n, False, fmt, group)
    layer.load_quantized(F.QuantizedTensor(F.pack(codes, F.get_format(fmt).bits), scales.half(), biases.half(),
                                           None, fmt, group, (n, k)))
    return layer


def _gguf_weight(blocks: np.ndarray, qtype: str, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(n, k))


@pytest.mark.parametrize(("fmt", "group", "sym", "qtype"), [
    ("int5", 32, False, "Q5_1"), ("int5", 64, False, "Q5_1"), ("int5", 128, True, "Q5_0"),
    ("int5", -1, False, "Q5_1"), ("int4", 64, False, "Q4_1"), ("int4", 256, True, "Q4_0"),
    ("int6", 32, True, "Q8_0"), ("int6", 64, True, "Q8_0"), ("int8", 128, True, "Q8_0"),
])
def test_gguf_blocks_exact(fmt: str, group: int, sym: bool, qtype: str) -> None:
    """int4/int5 (affine or symmetric) and symmetric int6/int8 at groups 32..256 and per-channel
    become the GGUF type whose own dequantize gives our dequantized weight bit for bit."""
    from metal_marlin_torch.io.export import gguf_blocks  # noqa: PLC0415

    torch.manual_seed(1)
    n, k, bits = 6, 256, int(fmt[3:])
    ng = 1 if group == -1 else k // group
    codes = torch.randint(1 if fmt == "int8" else 0, 1 << bits, (n, k))
    scales = torch.rand(n, ng) * 0.1 + 0.01
    biases = -(1 << (bits - 1)) * scales.half().float() if sym else torch.randn(n, ng) * 0.1
    layer = _layer(fmt, codes, scales, biases, group)
    blocks, got = gguf_blocks("x", layer)
    assert got == qtype
    assert blocks.shape == (n, k // 32 * gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    assert torch.equal(_gguf_weight(blocks, qtype, n, k), layer.dequantized_weight(torch.float32))
    _assert_imports_back(blocks, qtype, layer)


def _assert_imports_back(blocks: np.ndarray, qtype: str, layer: MarlinLinear) -> None:
    """Our GGUF importer reads the blocks back to the layer's weight, bit for bit."""
    from metal_marlin_torch import formats as F  # noqa: PLC0415
    from metal_marlin_torch.io.gguf_import import convert_exact  # noqa: PLC0415

    qt = convert_exact(blocks, qtype, layer.out_features, layer.in_features)
    assert torch.equal(F.dequantize(qt), layer.dequantized_weight(torch.float32))


@pytest.mark.parametrize("case", ["per-channel", "g256", "g32 on a grid"])
def test_gguf_blocks_int6_q6_k(case: str) -> None:
    """Symmetric int6 whose scales in each 256-value super-block are one fp16 d times int8
    sub-scales is Q6_K (6.56 bits), bit-exact through gguf's dequantize; other scales Q8_0."""
    from metal_marlin_torch.io.export import gguf_blocks  # noqa: PLC0415

    torch.manual_seed(2)
    n, k = 4, 512
    codes = torch.randint(0, 64, (n, k))
    if case == "per-channel":
        group, scales = -1, torch.rand(n, 1) * 0.1 + 0.01
    elif case == "g256":
        group, scales = 256, torch.rand(n, 2) * 0.1 + 0.01
    else:  # d * sc with sc in -100..100 per 32-group: what Q6_K's sub-scales can hold
        group = 32
        d = torch.tensor([[2.0 ** -12], [3.0 * 2 ** -13], [2.0 ** -11], [2.0 ** -10]])
        scales = d * torch.randint(1, 101, (n, k // 32)).float() * torch.where(torch.rand(n, k // 32) < 0.2, -1, 1)
    layer = _layer("int6", codes, scales, -32 * scales.half().float(), group)
    blocks, qtype = gguf_blocks("x", layer)
    assert qtype == "Q6_K" and blocks.shape == (n, k // 256 * 210)
    assert torch.equal(_gguf_weight(blocks, "Q6_K", n, k), layer.dequantized_weight(torch.float32))
    _assert_imports_back(blocks, "Q6_K", layer)
    # one scale off the grid (1 + 2^-10 times another) leaves no d for its super-block: Q8_0
    scales[0, 0] = scales[0, 0] * (1 + 2 ** -10) if group == 32 else scales[0, 0]
    if group == 32:
        layer = _layer("int6", codes, scales, -32 * scales.half().float(), group)
        assert gguf_blocks("x", layer)[1] == "Q8_0"


def test_export_gguf_int5_int6_reads_back(tmp_path: Path) -> None:
    """A model mixing int5 g32/g64/g128 and affine int6 exports (int6 re-quantized to Q8_0 on
    request, with its error measured against gguf's dequantize) and reads back through our GGUF
    importer: int5 layers to exactly our weights, int6 layers to exactly what the Q8_0 blocks
    hold."""
    from metal_marlin_torch.io.gguf_import import import_gguf  # noqa: PLC0415

    cfg = QuantConfig(format="int5", group_size=32, rules=(("*.up_proj", {"format": "int6", "group_size": 64}),
                                                           ("*.down_proj", {"format": "int5", "group_size": 128}),
                                                           ("*.v_proj", {"format": "int5", "group_size": 64})))
    model = quantized_llama(cfg)
    result = export_gguf(model, tmp_path / "m.gguf", requantize="Q8_0")
    reader = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert reader["blk.0.attn_q.weight"].tensor_type.name == "Q5_1"
    assert reader["blk.1.ffn_down.weight"].tensor_type.name == "Q5_1"
    assert reader["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    ours = _dequant(model)
    up = "model.layers.0.mlp.up_proj"
    r = result.layers[up]
    assert (r.source, r.ggml_type, r.exact) == ("int6/g64", "Q8_0", False)
    t = reader["blk.0.ffn_up.weight"]
    written = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(ours[up].shape)
    diff = written - ours[up]
    assert r.rel_rms_error == pytest.approx(float(diff.norm() / ours[up].norm()), rel=1e-5)
    assert 0 < r.rel_rms_error < 0.01 and r.max_abs_error == pytest.approx(float(diff.abs().max()), rel=1e-6)
    assert all(v.exact for n, v in result.layers.items() if "up_proj" not in n)
    assert "int6/g64 -> Q8_0: 2 (re-quantized" in result.summary()
    back, report = import_gguf(tmp_path / "m.gguf", dense_dtype=torch.float32)
    assert all(r.exact for r in report.report.values())
    got = _dequant(back)
    assert back.model.layers[0].self_attn.q_proj.format == "int5"
    assert torch.equal(got[up], written)
    assert all(torch.equal(w, got[n]) for n, w in ours.items() if "up_proj" not in n)


def test_cli_exports(tmp_path: Path, capsys) -> None:
    from metal_marlin_torch.cli import main  # noqa: PLC0415
    from metal_marlin_torch.io import save_quantized  # noqa: PLC0415

    save_quantized(quantized_llama(QuantConfig(format="int4", group_size=32)), tmp_path / "ckpt")
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors} >= {"Q4_1"}
    assert main(["export-mlx", str(tmp_path / "ckpt"), str(tmp_path / "mlx")]) == 0
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]["bits"] == 4
    save_quantized(quantized_llama(QuantConfig(format="int6", group_size=32)), tmp_path / "int6")
    assert main(["export-gguf", str(tmp_path / "int6"), str(tmp_path / "bad.gguf")]) == 2
    assert "--requantize Q8_0" in capsys.readouterr().err and not (tmp_path / "bad.gguf").exists()
    assert main(["export-gguf", str(tmp_path / "int6"), str(tmp_path / "q8.gguf"), "--requantize", "Q8_0"]) == 0
    out = capsys.readouterr().out
    assert "int6/g32 -> Q8_0: 14 (re-quantized" in out and "model.layers.1.mlp.up_proj: int6/g32 -> Q8_0" in out
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
