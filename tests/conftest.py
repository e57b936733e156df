"""Shared fixtures: paths to the shared test models and small model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """$MARLIN_SHARED, else the nearest ``shared/`` folder with models beside an ancestor of the
    checkout (a git worktree may sit deeper than the main checkout)."""
    if "MARLIN_SHARED" in os.environ:
        return Path(os.environ["MARLIN_SHARED"])
    for parent in ROOT.parents:
        if (parent / "shared" / "models").is_dir():
            return parent / "shared"
    return ROOT.parent / "shared"


SHARED = _find_shared()
PYLM_S = SHARED / "models" / "pylm-s"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pylm_s_path() -> Path:
    if not (PYLM_S / "config.json").is_file():
        pytest.skip(f"needs the pylm-s test model at {PYLM_S} (set MARLIN_SHARED)")
    return PYLM_S


def tiny_llama(vocab: int = 128, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    """A randomly initialized Llama small enough for fast tests (K divisible by 32 and 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()
