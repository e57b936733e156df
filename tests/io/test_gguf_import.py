"""GGUF files into metal_marlin formats (metal_marlin_torch.io.gguf_import).

Files are written by ``gguf.GGUFWriter`` with blocks from ``gguf.quants.quantize`` (or, for the
K-quants, which gguf-py cannot quantize, with a small encoder in this file); the reference for
what a file means is ``gguf.quants.dequantize``, and for a whole model transformers' own GGUF
loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch.io import load_quantized, save_quantized
from metal_marlin_torch.io.gguf_import import convert_tensor, import_gguf, read_gguf
from metal_marlin_torch.nn import MarlinLinear

gguf = pytest.importorskip("gguf", reason="needs the gguf package")
from gguf import GGMLQuantizationType as T  # noqa: E402


def weights(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows of very different magnitudes, one all-zero block, one outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.logspace(-3, 1, n, dtype=np.float32)[:, None]
    w[0, :32] = 0.0
    w[1, 5] = 40.0
    return w


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T]]) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reader_data(path: Path) -> dict[str, tuple[np.ndarray, T]]:
    return {t.name: (np.array(t.data), t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize(("qtype", "fmt", "group"), [
    (T.Q4_0, "int4", 32), (T.Q4_1, "int4", 32), (T.Q5_0, "int5", 32), (T.Q5_1, "int5", 32), (T.Q8_0, "int8", 32),
    (T.MXFP4, "mxfp4", 32),
    (T.TQ2_0, "int2", 256), (T.TQ1_0, "int2", 256),  # ternary: level q - 1, one fp16 scale per 256
])
def test_exact_types(tmp_path: Path, qtype: T, fmt: str, group: int) -> None:
    w = weights(12, 256)
    write_gguf(tmp_path / "m.gguf", {"w": (gguf.quants.quantize(w, qtype), qtype)})
    out = read_gguf(tmp_path / "m.gguf")
    qt, report = out.tensors["w"], out.report["w"]
    assert (qt.format, qt.group_size, report.exact, report.rel_rms_error) == (fmt, group, True, 0.0)
    data, _ = reader_data(tmp_path / "m.gguf")["w"]
    ref = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    assert torch.equal(F.dequantize(qt, torch.float32), ref)


def test_large_q8_scale_kept_exactly() -> None:
    # d = 600 is an fp16 value, but the bias -128 d = -76800 is not: scales go to fp32, still exact
    w = np.full((1, 32), 600.0 * 127, dtype=np.float32)
    w[0, 0] = -600.0 * 127
    data = gguf.quants.quantize(w, T.Q8_0)
    qt, _ = convert_tensor(data, "Q8_0", (1, 32))
    assert qt.scales.dtype == torch.float32
    assert torch.equal(F.dequantize(qt), torch.from_numpy(gguf.quants.dequantize(data, T.Q8_0)))


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks (d, dmin fp16; 6-bit sub-scales and mins; 4-bit q) of ``w [N, K]``, K % 256 == 0."""
    sub = w.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / 15
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    sc = np.clip(np.round(step / np.where(d == 0, 1, d.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / np.where(dmin == 0, 1, dmin.astype(np.float32))[:, None]), 0, 63).astype(np.uint8)
    eff_s = d.astype(np.float32)[:, None, None] * sc[..., None]
    eff_m = dmin.astype(np.float32)[:, None, None] * m[..., None]
    q = np.clip(np.round((sub + eff_m) / np.where(eff_s == 0, 1, eff_s)), 0, 15).astype(np.uint8)
    scales = np.zeros((len(sub), 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(w.shape[0], -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K blocks (int8 scale per 16, fp16 d, 6-bit q - 32) of ``w [N, K]``, K % 256 == 0."""
    sub = w.reshape(-1, 16, 16)
    step = np.abs(sub).max(-1) / 31
    d = (step.max(-1) / 127).astype(np.float16)
    sc = np.clip(np.round(step / np.where(d == 0, 1, d.astype(np.float32))[:, None]), -128, 127).astype(np.int8)
    eff = d.astype(np.float32)[:, None, None] * sc[..., None]
    q = (np.clip(np.round(sub / np.where(eff == 0, 1, eff)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 2, 64)
    ql = (q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d[:, None].view(np.uint8)],
                            axis=1)
    return blocks.reshape(w.shape[0], -1)


@pytest.mark.parametrize(("qtype", "encode", "target", "bound", "compact"), [
    (T.Q4_K, encode_q4_k, "int4/g32", 0.12, True),    # 4-bit codes either way: error of a second RTN step
    (T.Q6_K, encode_q6_k, "int8/g32", 0.012, True),   # scale per 16 -> 32, 6 -> 8 bits: small
])
def test_k_quants_requantized_with_error(tmp_path: Path, qtype: T, encode, target: str, bound: float,
                                         compact: bool) -> None:
    w = weights(16, 512, seed=3)
    w[1, 5] = 1.0  # no outlier: keep the test about the re-quantization
    write_gguf(tmp_path / "k.gguf", {"w": (encode(w), qtype)})
    data, _ = reader_data(tmp_path / "k.gguf")["w"]
    source = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    # the test's encoder is sane: the file means about what was written
    assert float((source - torch.from_numpy(w)).norm() / torch.from_numpy(w).norm()) < 0.1
    out = read_gguf(tmp_path / "k.gguf", compact=compact)
    qt, report = out.tensors["w"], out.report["w"]
    assert (report.target, report.exact) == (target, False)
    diff = F.dequantize(qt) - source
    assert report.rel_rms_error == pytest.approx(float(diff.norm() / source.norm()), rel=1e-6)
    assert report.max_abs_error == pytest.approx(float(diff.abs().max()), rel=1e-6)
    assert 0 < report.rel_rms_error < bound
    assert f"w: {qtype.name} -> {target}: relative RMS error" in out.details()


# byte offset of the fp16 super-block scale(s) that must be finite; every other byte may be anything
_D_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.Q6_K: (208,), T.Q3_K: (108,),
              T.Q2_K: (80, 82), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,),
              T.IQ1_S: (0,), T.IQ1_M: ()}


def _set_iq1_m_d(blocks: np.ndarray, d: np.ndarray) -> None:
    """IQ1_M keeps its fp16 ``d`` in the top nibbles of its 4 uint16 scale words (bytes 48-55)."""
    bits = d.astype(np.float16).view(np.uint16).astype(np.uint32)
    words = blocks[:, 48:56].copy().view(np.uint16).astype(np.uint32)
    for i in range(4):
        words[:, i] = (words[:, i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
    blocks[:, 48:56] = words.astype(np.uint16).view(np.uint8)


def random_blocks(qtype: T, n: int, k: int) -> np.ndarray:
    """Random bytes, which are valid blocks of these types once their fp16 scales are finite:
    every code, sub-block scale, min, grid entry and sign is exercised, unlike blocks of one
    encoder."""
    rng = np.random.default_rng(int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(n, k // block * size), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    for i, off in enumerate(_D_OFFSETS[qtype]):
        d = rng.uniform(1e-4, 0.5, size=len(blocks)) * (1 if i == 0 else 0.3)
        blocks[:, off:off + 2] = d.astype(np.float16)[:, None].view(np.uint8)
    if qtype == T.IQ1_M:
        _set_iq1_m_d(blocks, rng.uniform(1e-4, 0.5, size=len(blocks)))
    return data


@pytest.mark.parametrize(("qtype", "fmt", "group"), [
    (T.Q4_K, "int4", 32), (T.IQ4_NL, "int8", 32), (T.IQ4_XS, "int8", 32),
    (T.Q6_K, "int8", 16), (T.Q3_K, "int3", 16), (T.Q2_K, "int2", 16),   # a scale per 16 values
    (T.IQ2_XXS, "int8", 32), (T.IQ2_XS, "int8", 16), (T.IQ2_S, "int8", 16), (T.IQ3_XXS, "int8", 32),
    (T.IQ3_S, "int4", 32),                                                 # odd levels -15..15
    (T.IQ1_S, "int8", 32), (T.IQ1_M, "int8", 16),
])
def test_widened_types_exact_by_default(tmp_path: Path, qtype: T, fmt: str, group: int) -> None:
    k = 512
    data = random_blocks(qtype, 6, k)
    write_gguf(tmp_path / "x.gguf", {"w": (data, qtype)})
    out = read_gguf(tmp_path / "x.gguf")
    qt, report = out.tensors["w"], out.report["w"]
    assert report.exact and (qt.format, qt.group_size, qt.shape) == (fmt, group, (6, k))
    ref = torch.from_numpy(gguf.quants.dequantize(reader_data(tmp_path / "x.gguf")["w"][0], qtype))
    assert torch.equal(F.dequantize(qt), ref)
    # compact: fewer bits, the added error measured against the same reference
    qc, rc = convert_tensor(data, qtype.name, (6, k), compact=True)
    assert not rc.exact and qc.nbytes < qt.nbytes
    assert rc.rel_rms_error == pytest.approx(float((F.dequantize(qc) - ref).norm() / ref.norm()), rel=1e-6)


def test_q5_k_exact_as_int5_even_compact(tmp_path: Path) -> None:
    # 5-bit codes kept as int5 (earlier: widened to int8): the same words whatever `compact`
    # says, since its default target for a 5.5-bit type, int8, would be larger
    k = 512
    data = random_blocks(T.Q5_K, 6, k)
    write_gguf(tmp_path / "x.gguf", {"w": (data, T.Q5_K)})
    out = read_gguf(tmp_path / "x.gguf")
    qt, report = out.tensors["w"], out.report["w"]
    assert report.exact and (qt.format, qt.group_size, qt.shape) == ("int5", 32, (6, k))
    assert qt.weight.shape == (6, k * 5 // 32)
    ref = torch.from_numpy(gguf.quants.dequantize(reader_data(tmp_path / "x.gguf")["w"][0], T.Q5_K))
    assert torch.equal(F.dequantize(qt), ref)
    qc, rc = convert_tensor(data, "Q5_K", (6, k), compact=True)
    assert rc.exact and torch.equal(qc.weight, qt.weight)


def test_iq4_table_is_llama_cpps() -> None:
    from metal_marlin_torch.io.gguf_import import IQ4_VALUES  # noqa: PLC0415

    assert IQ4_VALUES == gguf.quants.IQ4_NL.kvalues


def test_dense_types(tmp_path: Path) -> None:
    w = weights(4, 64)
    write_gguf(tmp_path / "d.gguf", {"f32": (w, T.F32), "f16": (w.astype(np.float16), T.F16),
                                     "bf16": (gguf.quants.quantize(w, T.BF16), T.BF16), "vec": (w[2], T.F32)})
    out = read_gguf(tmp_path / "d.gguf")
    assert torch.equal(out.tensors["f32"], torch.from_numpy(w))
    assert torch.equal(out.tensors["f16"], torch.from_numpy(w.astype(np.float16)))
    bf16_ref = torch.from_numpy(gguf.quants.dequantize(reader_data(tmp_path / "d.gguf")["bf16"][0], T.BF16))
    assert out.tensors["bf16"].dtype == torch.bfloat16 and torch.equal(out.tensors["bf16"].float(), bf16_ref)
    assert out.tensors["vec"].shape == (64,)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2-D"):
        convert_tensor(np.zeros((2, 2, 18), np.uint8), "Q4_0", (2, 2, 32))
    with pytest.raises(ValueError, match="256"):
        convert_tensor(np.zeros((2, 144), np.uint8), "Q4_K", (2, 128))
    with pytest.raises(ValueError, match="256"):
        convert_tensor(np.zeros((2, 136), np.uint8), "IQ4_XS", (2, 128))
    with pytest.raises(FileNotFoundError):
        read_gguf("/nonexistent.gguf")


# ---- a whole model --------------------------------------------------------------------------

def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion reorders Q/K rows (interleaved rotary halves); undone on import."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, qtype: T) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random Llama as llama.cpp would convert it; returns the model and, by HF name, what
    each quantized weight means (row-wise quantization commutes with the Q/K row permutation)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    meaning: dict[str, torch.Tensor] = {}

    def add(name: str, hf_name: str, w: np.ndarray) -> None:
        if w.ndim == 2:
            meaning[hf_name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(sd[hf_name], qtype), qtype))
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            meaning[hf_name] = torch.from_numpy(w)
            writer.add_tensor(name, w)

    add("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", "model.norm.weight", sd["model.norm.weight"])
    add("output.weight", "lm_head.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute_for_gguf(w, cfg.num_attention_heads)
            if gg == "attn_k":
                w = _permute_for_gguf(w, cfg.num_key_value_heads)
            add(f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dense = LlamaForCausalLM(cfg).eval()
    dense.load_state_dict(meaning)
    return dense, meaning


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_import_model(tmp_path: Path, qtype: T) -> None:
    ref, meaning = write_llama_gguf(tmp_path / "tiny.gguf", qtype)
    model, result = import_gguf(tmp_path / "tiny.gguf", dense_dtype=torch.float32)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, MarlinLinear) and q.format == ("int4" if qtype == T.Q4_0 else "int8")
    assert all(r.exact for r in result.report.values())
    for name, m in model.named_modules():
        if isinstance(m, MarlinLinear):  # the same weights, rows back in Hugging Face order
            assert torch.equal(m.dequantized_weight(), meaning[f"{name}.weight"]), name
    assert torch.equal(model.model.embed_tokens.weight, meaning["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 17, 42, 299, 3, 8]])
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got, ref(ids).logits, rtol=1e-4, atol=1e-4)
    save_quantized(model, tmp_path / "marlin")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "marlin")(ids).logits, got)


def test_cli_import_gguf(tmp_path: Path, capsys) -> None:
    from metal_marlin_torch.cli import main  # noqa: PLC0415

    write_llama_gguf(tmp_path / "tiny.gguf", T.Q4_1)
    assert main(["import-gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "out")]) == 0
    assert "Q4_1 -> int4/g32" in capsys.readouterr().out
    assert load_quantized(tmp_path / "out").model.layers[0].mlp.up_proj.format == "int4"
