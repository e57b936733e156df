"""Streaming quantization of sharded safetensors checkpoints larger than memory.

:func:`quantize_checkpoint` turns a Hugging Face checkpoint directory (``config.json`` plus
``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards) into a metal_marlin
checkpoint (docs/FORMAT.md §6) without ever materializing the model:

- the model is built once on the meta device (:func:`~.skeleton.hf_skeleton`), only to learn
  which tensors belong to ``nn.Linear`` layers and what :class:`~..nn.QuantConfig` plans for them;
- input shards are read one at a time through memory-mapped ``safe_open``, tensor by tensor;
  planned weights are quantized round-to-nearest in row chunks (rows are independent, so the
  result is bit-identical to quantizing the whole matrix), everything else passes through;
- output shard ``i`` holds exactly the tensors of input shard ``i`` and is written atomically;
  a progress manifest (:data:`MANIFEST`) records every finished shard, so an interrupted run
  started again with the same arguments skips finished shards and redoes only the rest;
- ``config.json`` (with its ``quantization_config``) is written last, so a directory that has it
  is complete.

Peak memory is about one input shard (its pass-through tensors and quantized outputs, plus its
memory-mapped pages) plus the working set of one row chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import formats as F
from ..dtypes import resolve
from ..nn.config import QuantConfig
from ..nn.quantize import plan_layers
from .atomic import atomic_path, check_output_dir, write_json
from .checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    QUANT_METHOD,
    SINGLE_FILE,
    checkpoint_files,
    read_header,
    shard_metadata,
    write_safetensors,
)
from .hf import copy_tokenizer
from .skeleton import hf_skeleton

log = logging.getLogger("metal_marlin_torch")

MANIFEST = ".marlin-stream.json"
MANIFEST_VERSION = 1
DEFAULT_CHUNK_ELEMENTS = 1 << 20  # ~1M weights per quantization step: tens of MB of working memory


@dataclass
class StreamSummary:
    """What :func:`quantize_checkpoint` did.

    Attributes:
        out: the output directory.
        shards_written: output shards written by this call.
        shards_skipped: shards found finished by an earlier, interrupted call.
        layers: quantized layer name -> ``(format, group_size)``.
        skipped: selected layers left unquantized -> reason.
        bytes_in: bytes of the source tensors.
        bytes_out: bytes of the written checkpoint tensors.
    """

    out: Path
    shards_written: int = 0
    shards_skipped: int = 0
    layers: dict[str, tuple[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0

    def __str__(self) -> str:
        return (
            f"quantized {len(self.layers)} layers ({len(self.skipped)} skipped), "
            f"{self.shards_written} shards written, {self.shards_skipped} already done: "
            f"{self.bytes_in / 2**20:.2f} MiB -> {self.bytes_out / 2**20:.2f} MiB"
        )


def source_files(src: str | os.PathLike) -> list[Path]:
    """The safetensors files of the checkpoint directory ``src``, in shard order."""
    return checkpoint_files(src, "quantize_checkpoint")


def is_sharded(src: str | os.PathLike) -> bool:
    """Whether ``src`` is a sharded safetensors checkpoint (has an index file)."""
    return (Path(src) / INDEX_FILE).is_file()


def _keys(file: Path) -> list[str]:
    read_header(file, "quantize_checkpoint")  # truncation: a clear error, not a crash on mmap
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"quantize_checkpoint: {file} is corrupt or truncated: {err}") from None


def _output_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _tied_aliases(model: nn.Module, stored: set[str]) -> dict[str, str]:
    """``alias -> source`` for parameters shared between names where only ``source`` is stored."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    aliases: dict[str, str] = {}
    for names in by_id.values():
        present = [n for n in names if n in stored]
        if len(names) > 1 and present:
            aliases.update({n: present[0] for n in names if n not in stored})
    return aliases


def _fingerprint(src: Path, files: list[Path]) -> dict[str, Any]:
    config_sha = hashlib.sha256((src / CONFIG_FILE).read_bytes()).hexdigest()
    return {"config_sha256": config_sha, "files": {f.name: f.stat().st_size for f in files}}


def _quantize_rows(w: torch.Tensor, fmt: str, group_size: int, scale_dtype: torch.dtype,
                   chunk_elements: int) -> dict[str, torch.Tensor]:
    """RTN-quantize ``w [N, K]`` in row chunks; the canonical tensors by checkpoint suffix.

    Rows are quantized independently by every format except ``nvfp4``, whose per-tensor
    ``global_scale`` needs the whole matrix, so nvfp4 is quantized in one piece.
    """
    spec = F.get_format(fmt)
    n, k = w.shape
    rows = n if spec.has_global_scale else max(1, chunk_elements // max(k, 1))
    parts = [F.quantize(w[r:r + rows], fmt, group_size, scale_dtype) for r in range(0, n, rows)]
    out = {"weight": torch.cat([p.weight for p in parts]), "scales": torch.cat([p.scales for p in parts])}
    if spec.has_biases:
        out["biases"] = torch.cat([p.biases for p in parts])
    if spec.has_global_scale:
        out["global_scale"] = parts[0].global_scale
    return out


class _Manifest:
    """The progress file: settings of the run and the shards already written."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.path = out / MANIFEST
        self.settings = settings
        self.shards: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}
            if data.get("settings") != settings:
                raise ValueError(
                    f"quantize_checkpoint: {out} holds an unfinished or finished run with other settings "
                    f"(source or quantization config differ); use an empty output directory"
                )
            self.shards = data.get("shards", {})

    def done(self, out: Path, name: str) -> bool:
        entry = self.shards.get(name)
        file = out / name
        return entry is not None and file.is_file() and file.stat().st_size == entry["bytes"]

    def record(self, name: str, entry: dict[str, Any], complete: bool = False) -> None:
        self.shards[name] = entry
        self.save(complete)

    def save(self, complete: bool = False) -> None:
        write_json(self.path, {"version": MANIFEST_VERSION, "settings": self.settings,
                               "shards": self.shards, "complete": complete})


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: QuantConfig | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool | None = None,
    on_shard_done: Callable[[int, str], None] | None = None,
) -> StreamSummary:
    """Quantize the Hugging Face checkpoint ``src`` into ``out`` one shard at a time.

    Args:
        src: directory with ``config.json`` and safetensors weights (sharded or not).
        out: output directory; an earlier interrupted run into it with the same ``src`` and
            ``config`` is resumed (finished shards are kept, not recomputed).
        config: :class:`QuantConfig`; only ``method="rtn"`` streams (GPTQ needs activations).
        chunk_elements: weights quantized per step (bounds the working memory).
        progress: tqdm bar over tensors (None: only on a terminal).
        on_shard_done: called as ``on_shard_done(index, file_name)`` after each shard written.

    Returns:
        :class:`StreamSummary`. The result loads with :func:`~.checkpoint.load_quantized` and
        equals ``quantize_model`` + ``save_quantized`` of the same model tensor for tensor.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_checkpoint: config must be a QuantConfig, got {type(config).__name__}")
    if config.method != "rtn":
        raise ValueError(
            f"quantize_checkpoint: streaming supports method 'rtn' only, got {config.method!r} "
            f"(GPTQ needs the model's activations; load the model and use quantize_model)"
        )
    if not isinstance(chunk_elements, int) or chunk_elements <= 0:
        raise ValueError(f"quantize_checkpoint: chunk_elements must be a positive int, got {chunk_elements!r}")
    src, out = Path(src), Path(out)
    if not (src / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"quantize_checkpoint: {src} has no {CONFIG_FILE}")
    if src.resolve() == out.resolve():
        raise ValueError("quantize_checkpoint: out must differ from src")
    hf_config = json.loads((src / CONFIG_FILE).read_text())
    if "quantization_config" in hf_config:
        raise ValueError(f"quantize_checkpoint: {src} is already quantized (its config has a quantization_config)")
    files = source_files(src)

    skeleton = hf_skeleton(hf_config)
    expected = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    keys_per_file = [_keys(f) for f in files]
    stored = {k for keys in keys_per_file for k in keys}
    unexpected = sorted(stored - set(expected))
    if unexpected:
        raise ValueError(f"quantize_checkpoint: tensors the model does not have: {unexpected[:8]}")
    tied = _tied_aliases(skeleton, stored)
    missing = sorted(set(expected) - stored - set(tied))
    if missing:
        raise ValueError(f"quantize_checkpoint: checkpoint is missing tensors {missing[:8]}")

    plans, skipped = plan_layers(skeleton, config)
    for name in [n for n in plans if f"{n}.weight" in tied or f"{n}.weight" in tied.values()]:
        skipped[name] = "its weight is tied to another tensor"
        del plans[name]
    for name, reason in skipped.items():
        log.warning("metal_marlin_torch: leaving %s unquantized: %s", name, reason)
    dtype_config = resolve(config.dtype_config)
    scale_dtype = dtype_config.torch_scales
    planned_weights = {f"{n}.weight": n for n in plans}

    check_output_dir(out, "quantize_checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    for stale_tmp in out.glob(".*.tmp-*"):  # left by a run that was killed mid-write
        stale_tmp.unlink()
    settings = {"source": _fingerprint(src, files), "config": config.to_dict(),
                "dtype_config": dtype_config.to_dict(), "format_version": FORMAT_VERSION}
    manifest = _Manifest(out, settings)
    names = _output_names(len(files))
    summary = StreamSummary(out=out, skipped=skipped)
    summary.layers = {n: (p.format, p.group_size) for n, p in plans.items()}
    layers = {n: {"format": p.format, "bits": F.get_format(p.format).bits, "group_size": p.group_size,
                  "rotation_block": 0, "dtype_config": dtype_config.to_dict()} for n, p in plans.items()}

    bar = tqdm(total=len(stored), desc="quantize (stream)", unit="tensor", disable=None if progress is None
               else not progress)
    for i, (file, name, keys) in enumerate(zip(files, names, keys_per_file, strict=True)):
        if manifest.done(out, name):
            summary.shards_skipped += 1
            bar.update(len(keys))
            continue
        bar.set_postfix_str(file.name)
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                if key in planned_weights:
                    layer = planned_weights[key]
                    if tuple(t.shape) != expected[key]:
                        raise ValueError(
                            f"quantize_checkpoint: {key} has shape {tuple(t.shape)}, the model expects {expected[key]}"
                        )
                    plan = plans[layer]
                    for suffix, q in _quantize_rows(t, plan.format, plan.group_size, scale_dtype,
                                                    chunk_elements).items():
                        tensors[f"{layer}.{suffix}"] = q
                else:  # including the layers' own biases, kept in their dtype as from_linear does
                    tensors[key] = t
                del t
                bar.update(1)
        with atomic_path(out / name) as tmp:
            write_safetensors(tensors, tmp, metadata=shard_metadata(tensors, layers))
        manifest.record(name, {"bytes": (out / name).stat().st_size,
                               "tensors": {k: v.numel() * v.element_size() for k, v in tensors.items()}})
        summary.shards_written += 1
        del tensors
        if on_shard_done is not None:
            on_shard_done(i, name)
    bar.close()

    weight_map = {k: n for n in names for k in manifest.shards[n]["tensors"]}
    total = sum(b for n in names for b in manifest.shards[n]["tensors"].values())
    if len(names) > 1:
        write_json(out / INDEX_FILE, {"metadata": {"total_size": total, "aliases": tied}, "weight_map": weight_map})
    stale = [out / INDEX_FILE] if len(names) == 1 else [out / SINGLE_FILE]
    stale += [p for p in out.glob("model-*-of-*.safetensors") if p.name not in names]
    for p in stale:
        if p.exists():
            p.unlink()
    first = next(iter(layers.values()), None)
    hf_config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
        "format": first["format"] if first else None, "group_size": first["group_size"] if first else None,
        "dtype_config": dtype_config.to_dict(), "layers": layers, "tied": tied,
        "method": config.method, "config": config.to_dict(),
    }
    copy_tokenizer(src, out)
    write_json(out / CONFIG_FILE, hf_config)
    manifest.save(complete=True)
    summary.bytes_in = sum(f.stat().st_size for f in files)
    summary.bytes_out = total
    return summary
