"""Loading local Hugging Face models (no hub access) and copying their tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
)


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model in the local directory ``path``, by the architecture its config names.

    Causal LMs load with their head (``AutoModelForCausalLM``); anything else through the
    class named in ``config.json``'s ``architectures``, else ``AutoModel``.
    """
    import transformers  # noqa: PLC0415

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if archs and hasattr(transformers, archs[0]):
        cls = getattr(transformers, archs[0])
    elif archs and archs[0].endswith("ForCausalLM"):
        cls = transformers.AutoModelForCausalLM
    else:
        cls = transformers.AutoModel
    return cls.from_pretrained(str(path), local_files_only=True, **kwargs).eval()


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``src`` into ``dst``."""
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
            copied.append(name)
    return copied
