"""Loading local Hugging Face models (no hub access) and copying their tokenizer files."""

from __future__ import annotations

import json
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


def tokenizer_files(src: str | Path) -> list[Path]:
    """The tokenizer (and generation config) files present in ``src``."""
    return [Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``src`` into ``dst``, each atomically."""
    from .atomic import copy_file  # noqa: PLC0415

    copied = []
    for f in tokenizer_files(src):
        copy_file(f, Path(dst) / f.name)
        copied.append(f.name)
    return copied


def check_source(path: str | Path, who: str) -> None:
    """A model directory to read: ``config.json`` present and valid JSON, every safetensors
    file complete (:func:`~.checkpoint.read_header`), so a truncated download is one clear
    error before any work instead of a crash deep inside a loader."""
    from .checkpoint import INDEX_FILE, check_files, checkpoint_files  # noqa: PLC0415

    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: {path} is not a model directory")
    if not cfg.is_file():
        raise FileNotFoundError(f"{who}: {path} is not a model directory: no config.json")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{who}: {cfg} is not valid JSON: {err}") from None
    any_name = not (path / INDEX_FILE).is_file()
    check_files(checkpoint_files(path, who, any_name=any_name), who)
