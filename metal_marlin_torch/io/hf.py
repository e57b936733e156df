"""Loading local Hugging Face models (no hub access) and copying their tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# a sentence-transformers folder's pipeline: without these, SentenceTransformer loads the model
# with default mean pooling and no normalization (embedding norms 5-7 instead of 1 for MiniLM)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


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
    """The non-weight files a model folder needs to be used as it was, present in ``src``: the
    tokenizer, generation config and chat template, and a sentence-transformers pipeline
    (``modules.json`` and friends, and the module folders it names, e.g. ``1_Pooling/``).
    Folders are returned as folder paths (copy them whole)."""
    src = Path(src)
    out = [src / name for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES if (src / name).is_file()]
    if (src / "modules.json").is_file():
        try:
            modules = json.loads((src / "modules.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{src / 'modules.json'} is not valid JSON: {err}") from None
        for entry in modules if isinstance(modules, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            # path "" is the transformer itself (the folder's root, which is what gets quantized)
            if sub and "/" not in sub and sub not in (".", "..") and (src / sub).is_dir():
                out.append(src / sub)
    return out


def copy_into(f: Path, dst_dir: Path) -> None:
    """Copy file or folder ``f`` into ``dst_dir`` under its own name, atomically (a folder is
    copied to a temporary sibling, then renamed; an earlier copy is replaced as a whole)."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from .atomic import copy_file  # noqa: PLC0415

    if not f.is_dir():
        copy_file(f, dst_dir / f.name)
        return
    target = dst_dir / f.name
    tmp = dst_dir / f".{f.name}.tmp-{os.getpid()}"
    try:
        shutil.copytree(f, tmp)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the files of :func:`tokenizer_files` of ``src`` into ``dst``, each atomically."""
    copied = []
    for f in tokenizer_files(src):
        copy_into(f, Path(dst))
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
