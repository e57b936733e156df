"""MLX-quantized checkpoints into MarlinLinear (metal_marlin_torch.io.mlx_import).

The reference is MLX itself (``pip install "mlx[cpu]"`` on Linux): ``mx.quantize`` writes the
tensors, ``mx.dequantize`` says what they mean, and the imported layer must dequantize to the
same float32 values bit for bit.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch.io import load_quantized, save_quantized
from metal_marlin_torch.io.mlx_import import convert_mlx_tensors, import_mlx
from metal_marlin_torch.nn import MarlinLinear

mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install 'mlx[cpu]' on Linux)")

MX_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def to_torch(a) -> torch.Tensor:
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def mlx_weights(n: int, k: int, dtype: str, seed: int):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((n, k)) * 0.1).astype(np.float32)).astype(getattr(mx, MX_DTYPES[dtype]))


def mlx_reference(wq, scales, biases, **kw) -> torch.Tensor:
    """``mx.dequantize`` of the same stored tensors, evaluated in float32."""
    s = scales.astype(mx.float32) if scales.dtype != mx.uint8 else scales
    b = None if biases is None else biases.astype(mx.float32)
    return to_torch(mx.dequantize(wq, s, b, dtype=mx.float32, **kw))


AFFINE_CASES = list(itertools.product(
    (1, 2, 3, 4, 5, 6, 8),  # bits
    (32, 64, 128),          # group size
))


@pytest.mark.parametrize(("bits", "group"), AFFINE_CASES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_affine_bit_exact(bits: int, group: int, dtype: str) -> None:
    n, k = 6, 384  # 3-bit: 36 words per row, codes straddling words; 384 = 3 * 128
    wq, s, b = mx.quantize(mlx_weights(n, k, dtype, bits * group), group_size=group, bits=bits)
    qt, info = convert_mlx_tensors(to_torch(wq), to_torch(s), to_torch(b), bits, group)
    expect_bits = {1: 2}.get(bits, bits)
    assert qt.format == f"int{expect_bits}" and info.exact
    if bits != 1:  # the words MLX wrote, unchanged (5 and 6 bits: no widening to 8)
        assert torch.equal(qt.weight.view(torch.int32), to_torch(wq).view(torch.int32))
    ref = mlx_reference(wq, s, b, group_size=group, bits=bits)
    assert torch.equal(F.dequantize(qt, torch.float32), ref)
    # MLX's own dequantize in the scale dtype computes (s * q) + b with a rounding after each
    # step; the imported codes and parameters reproduce that too
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    codes = F.unpack(qt.weight, expect_bits, k).view(n, k // group, group).to(tdt)
    s_t, b_t = (x.to(tdt).unsqueeze(-1) for x in (qt.scales, qt.biases))
    native = to_torch(mx.dequantize(wq, s, b, group_size=group, bits=bits))
    assert torch.equal((codes * s_t + b_t).reshape(n, k), native)


def test_scales_kept_exactly() -> None:
    # bf16 scales that fp16 holds exactly become fp16; ones it cannot hold stay exact as fp32
    w = mlx_weights(4, 64, "bf16", 0)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    qt, _ = convert_mlx_tensors(to_torch(wq), to_torch(s), to_torch(b), 4, 32)
    assert torch.equal(qt.scales.to(torch.bfloat16), to_torch(s))
    big = mx.quantize(w * 1e6, group_size=32, bits=4)  # scales above fp16's 65504
    qt, _ = convert_mlx_tensors(*(to_torch(a) for a in big), 4, 32)
    assert qt.scales.dtype == torch.float32 and torch.equal(qt.scales, to_torch(big[1]).float())


@pytest.mark.parametrize(("mode", "target", "global_scale"), [
    ("mxfp4", "mxfp4", None), ("nvfp4", "nvfp4", None), ("nvfp4", "nvfp4", 3.0), ("mxfp8", "fp8_e4m3", None),
])
def test_fp_modes(mode: str, target: str, global_scale: float | None) -> None:
    w = mlx_weights(5, 256, "fp32", 7)
    g = None if global_scale is None else mx.array([global_scale], dtype=mx.float32)
    wq, s = mx.quantize(w, mode=mode, global_scale=g)[:2]
    group = 16 if mode == "nvfp4" else 32
    qt, _ = convert_mlx_tensors(to_torch(wq), to_torch(s), None, 4, group, mode,
                                None if g is None else to_torch(g))
    assert qt.format == target
    ref = mlx_reference(wq, s, None, mode=mode, global_scale=g)
    got = F.dequantize(qt, torch.float32)
    if global_scale is None:
        assert torch.equal(got, ref)
    else:  # MLX's g / (6 * 448) is rounded once to our fp32 global scale
        torch.testing.assert_close(got, ref, rtol=2**-22, atol=0)


def test_bad_inputs() -> None:
    w = torch.zeros(2, 8, dtype=torch.uint32)
    s = torch.zeros(2, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="mode"):
        convert_mlx_tensors(w, s, s, 4, 32, mode="int4")
    with pytest.raises(ValueError, match="group_size"):
        convert_mlx_tensors(w, s, s, 4, 48)
    with pytest.raises(ValueError, match="bits"):
        convert_mlx_tensors(w, s, s, 7, 32)
    with pytest.raises(ValueError, match="biases"):
        convert_mlx_tensors(w, s, None, 4, 32)
    with pytest.raises(ValueError, match="scales/biases must be"):
        convert_mlx_tensors(w, s[:, :1], s[:, :1], 4, 32)
    with pytest.raises(ValueError, match="uint32"):
        convert_mlx_tensors(w.float(), s, s, 4, 32)


def write_mlx_llama(path: Path, bits: int, group: int, overrides: dict, tied: bool = False) -> dict:
    """A tiny Llama quantized the way mlx-lm does it (embeddings and lm_head too), saved by MLX."""
    from transformers import LlamaConfig  # noqa: PLC0415

    from metal_marlin_torch.io.skeleton import hf_skeleton  # noqa: PLC0415

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                      tie_word_embeddings=tied).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    skeleton = hf_skeleton(cfg)
    arrays, dense_ref = {}, {}
    rng = np.random.default_rng(1)
    for name, t in skeleton.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if tied and module == "lm_head":  # mlx-lm saves a tied head once, as the embedding
            continue
        w = mx.array((rng.standard_normal(tuple(t.shape)) * 0.05).astype(np.float32)).astype(mx.bfloat16)
        if t.dim() == 2:
            p = overrides.get(module, {"bits": bits, "group_size": group})
            wq, s, b = mx.quantize(w, group_size=p["group_size"], bits=p["bits"])
            arrays.update({f"{module}.weight": wq, f"{module}.scales": s, f"{module}.biases": b})
            dense_ref[name] = mlx_reference(wq, s, b, group_size=p["group_size"], bits=p["bits"])
        else:
            arrays[name] = w if "norm" not in name else mx.ones(w.shape, dtype=mx.bfloat16)
            dense_ref[name] = to_torch(arrays[name]).float()
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    cfg["quantization"] = {"group_size": group, "bits": bits, **overrides}
    (path / "config.json").write_text(json.dumps(cfg))
    return dense_ref


def test_import_model_and_save(tmp_path: Path) -> None:
    overrides = {"model.layers.1.mlp.down_proj": {"bits": 6, "group_size": 32},  # mixed, as mlx-lm writes it
                 "model.layers.0.mlp.up_proj": {"bits": 5, "group_size": 64}}
    dense_ref = write_mlx_llama(tmp_path / "mlx", 3, 64, overrides)
    result = import_mlx(tmp_path / "mlx")
    model = result.model
    assert isinstance(model.model.layers[0].self_attn.q_proj, MarlinLinear)
    assert model.model.layers[0].self_attn.q_proj.format == "int3"
    assert model.model.layers[1].mlp.down_proj.format == "int6"
    assert model.model.layers[0].mlp.up_proj.format == "int5"
    assert result.layers["model.layers.0.mlp.up_proj"].target == "int5/g64"
    assert result.layers["model.embed_tokens"].target == "dense"
    for name, m in model.named_modules():
        if isinstance(m, MarlinLinear):
            assert torch.equal(m.dequantized_weight(torch.float32), dense_ref[f"{name}.weight"]), name
    # the same network, dense, in float32: logits agree
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    dense = LlamaForCausalLM(model.config).float().eval()
    dense.load_state_dict({k: v for k, v in dense_ref.items()}, strict=False)
    dense.model.embed_tokens.weight.data = dense_ref["model.embed_tokens.weight"].bfloat16().float()
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        got, ref = copy.deepcopy(model).float()(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    save_quantized(result.model, tmp_path / "marlin")
    reloaded = load_quantized(tmp_path / "marlin")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_cli_import_mlx(tmp_path: Path, capsys) -> None:
    from metal_marlin_torch.cli import main  # noqa: PLC0415

    write_mlx_llama(tmp_path / "mlx", 4, 32, {}, tied=True)
    assert main(["import-mlx", str(tmp_path / "mlx"), str(tmp_path / "out")]) == 0
    assert "affine4/g32 -> int4/g32" in capsys.readouterr().out
    model = load_quantized(tmp_path / "out")
    assert model.model.layers[1].mlp.up_proj.format == "int4"
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_mlx_lm_mixed_predicate_config(tmp_path: Path) -> None:
    """mlx-lm's mixed recipes (``--quant-predicate mixed_3_6``) write every layer's entry with
    ``"group_size": null`` (the default) and a copy under ``quantization_config``; this failed
    with "takes group_size in (32, 64, 128), got None". 6-bit layers import exactly as int6."""
    six = {"bits": 6, "group_size": 64}
    overrides = {"model.layers.0.self_attn.v_proj": six, "model.layers.1.mlp.down_proj": six}
    dense_ref = write_mlx_llama(tmp_path / "mlx", 3, 64, overrides)
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    # mlx-lm hands each layer's entry to ``to_quantized(**entry)``: a null group size is mlx.nn's
    # default for the mode (64 for affine), whatever the top level says (32 here, so that reading
    # the top-level value instead, as an earlier version did, fails)
    import mlx.nn  # noqa: PLC0415

    assert mlx.nn.Linear(64, 8).to_quantized(group_size=None, bits=3).group_size == 64
    q = {"group_size": 32, "bits": 4, "mode": "affine"}
    for name in {k.rsplit(".", 1)[0] for k in dense_ref if k.endswith(".weight") and "norm" not in k}:
        q[name] = {"group_size": None, "bits": overrides.get(name, {"bits": 3})["bits"], "mode": "affine"}
    cfg["quantization"] = cfg["quantization_config"] = q
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(cfg))
    result = import_mlx(tmp_path / "mlx")
    model = result.model
    assert model.model.layers[0].self_attn.q_proj.format == "int3"
    assert model.model.layers[1].mlp.down_proj.format == "int6"
    assert result.layers["model.layers.1.mlp.down_proj"].note == ""  # not widened
    for name, m in model.named_modules():
        if isinstance(m, MarlinLinear):
            assert torch.equal(m.dequantized_weight(torch.float32), dense_ref[f"{name}.weight"]), name
