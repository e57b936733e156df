"""Calibration data for GPTQ: token windows from text files, a folder of text, or token tensors.

Defaults (documented in docs/QUANTIZATION.md): 128 windows of 512 tokens, start offsets drawn
from a generator seeded with 0 over the concatenated, tokenized text (windows may overlap when
the text is short; text shorter than one window is an error). Without a source,
:func:`default_calibration_files` gives a fixed list of Python standard-library modules: no
download needed, and disjoint from the evaluation text of our quality benchmark (the stdlib
packages ``email``, ``json``, ``xml``, ``http`` and ``asyncio``, held out of pylm-s's training).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 0
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex")

# Standard-library packages held out as evaluation text; calibration never reads them.
HELD_OUT_STDLIB_PACKAGES = ("email", "json", "xml", "http", "asyncio")

# A fixed list of standard-library modules (paths relative to the stdlib folder), none in
# HELD_OUT_STDLIB_PACKAGES; about 2.4 MB of Python source together.
DEFAULT_STDLIB_FILES = (
    "argparse.py", "collections/__init__.py", "difflib.py", "inspect.py", "typing.py",
    "pathlib.py", "subprocess.py", "threading.py", "logging/__init__.py", "unittest/case.py",
    "dataclasses.py", "functools.py", "tarfile.py", "zipfile.py", "textwrap.py", "shutil.py",
    "pydoc.py", "pickle.py", "configparser.py", "enum.py", "csv.py", "heapq.py", "random.py",
    "statistics.py", "fractions.py", "_pydecimal.py", "ast.py", "tokenize.py", "doctest.py",
    "traceback.py", "contextlib.py", "locale.py", "calendar.py", "datetime.py",
)


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_calibration_files() -> list[Path]:
    """Absolute paths of :data:`DEFAULT_STDLIB_FILES` (those present in this Python)."""
    root = stdlib_dir()
    return [root / f for f in DEFAULT_STDLIB_FILES if (root / f).is_file()]


def check_disjoint(calibration: Iterable[str | os.PathLike], evaluation: Iterable[str | os.PathLike]) -> None:
    """ValueError if a calibration file is also an evaluation file (compared resolved)."""
    ev = {Path(p).resolve() for p in evaluation}
    both = sorted(str(p) for p in calibration if Path(p).resolve() in ev)
    if both:
        raise ValueError(f"calibration files overlap the evaluation files: {both[:5]}")


def text_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``source``: a file, a folder (its text files, recursively, sorted) or a list."""
    if isinstance(source, (str, os.PathLike)):
        sources: list[str | os.PathLike] = [source]
    elif isinstance(source, Sequence):
        sources = list(source)
    else:
        raise TypeError(f"calibration source must be a path or a list of paths, got {type(source).__name__}")
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"calibration folder {p} has no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"calibration source {p} is neither a file nor a folder")
    if not files:
        raise ValueError("calibration source names no files")
    return files


def read_text(files: Iterable[Path]) -> str:
    """The files' text (UTF-8, undecodable bytes replaced), separated by blank lines."""
    return "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """1-D int64 token ids of ``text`` by a Hugging Face tokenizer (no special tokens added)."""
    if tokenizer is None:
        raise ValueError("calibration from text needs the model's tokenizer, got tokenizer=None")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``[n_samples, seq_len]`` windows of a 1-D token stream at seeded random offsets."""
    if tokens.dim() != 1:
        raise ValueError(f"sample_windows: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"sample_windows: n_samples and seq_len must be >= 1, got {n_samples}, {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def load_calibration(
    source: Any = None,
    tokenizer: Any = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """Calibration token windows ``int64 [n_samples, seq_len]``.

    Args:
        source: None (the default stdlib files), a text file, a folder of text files, a list
            of files, a 1-D token tensor (windows are sampled from it) or a 2-D ``[n, L]`` token
            tensor (used as is: n_samples/seq_len are then ignored).
        tokenizer: the model's tokenizer (needed for text).
        n_samples, seq_len, seed: see the module docstring.
    """
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration tokens must be int64/int32, got {source.dtype}")
        if source.dim() == 2:
            if source.numel() == 0:
                raise ValueError("calibration tokens are empty")
            return source.long()
        if source.dim() == 1:
            return sample_windows(source.long(), n_samples, seq_len, seed)
        raise ValueError(f"calibration tokens must be 1-D or 2-D, got shape {tuple(source.shape)}")
    files = default_calibration_files() if source is None else text_files(source)
    return sample_windows(tokenize(read_text(files), tokenizer), n_samples, seq_len, seed)
