"""Quantized checkpoints: safetensors shards + ``config.json`` (docs/FORMAT.md §6).

``save_quantized`` writes the model's whole ``state_dict`` in the Hugging Face layout (one
file, or shards plus an index), every file atomically, with a ``quantization_config`` that
lists each quantized layer. ``load_quantized`` rebuilds the model skeleton on the meta device,
swaps in :class:`MarlinLinear` where the config says, validates every tensor's shape and dtype
against it, and loads the tensors memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig, get_default_config
from ..nn.experts import MarlinExperts, experts_shape
from ..nn.linear import MarlinLinear
from ..nn.quantize import moe_router_names, replace_module
from ..nn.router import convert_routers
from .atomic import staged_dir, write_json
from .hf import copy_into
from .skeleton import hf_skeleton

FORMAT_VERSION = 1
QUANT_METHOD = "metal_marlin"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
LAYERS_KEY = "marlin_layers"  # safetensors __metadata__: the quantized layers a shard holds (JSON)
HASHES_KEY = "marlin_sha256"  # safetensors __metadata__: sha256 of each tensor's bytes (JSON)
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


def layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every :class:`MarlinLinear` of ``model``: name -> format, bits, group, rotation, dtypes;
    and every :class:`MarlinExperts`: its :meth:`~MarlinExperts.layer_spec` (``kind: experts``)."""
    from ..nn.fuse import OutputSlice  # noqa: PLC0415

    table = {}
    fused = set()
    for name, m in model.named_modules():
        if isinstance(m, OutputSlice):
            # a projection fused by fuse_projections: saved under its own name (its parent's
            # state_dict hook splits the fused layer's tensors), with the fused layer's spec
            parent = name.rpartition(".")[0]
            source = f"{parent}.{m.fused_name}" if parent else m.fused_name
            fused.add(source)
            m = model.get_submodule(source)
        if isinstance(m, MarlinLinear):
            table[name] = {"format": m.format, "bits": m.bits, "group_size": m.group_size,
                           "rotation_block": m.rotation_block, "dtype_config": m.dtype_config.to_dict()}
        elif isinstance(m, MarlinExperts):
            table[name] = m.layer_spec()
    return {k: v for k, v in table.items() if k not in fused}


def quantization_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``model``."""
    layers = layer_table(model)
    first = next(iter(layers.values()), None)
    cfg: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "format": first["format"] if first else None,
        "group_size": first["group_size"] if first else None,
        "dtype_config": first["dtype_config"] if first else get_default_config().to_dict(),
        "layers": layers,
    }
    cfg.update(extra or {})
    return cfg


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); return aliases."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel():
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures raised as the ``OSError`` they
    are (safetensors reports a full disk as ``SafetensorError("... I/O error: No space left on
    device (os error 28)")``), so callers and the CLI can tell a full disk from a bug."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        m = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(err))
        if m is None:
            raise
        raise OSError(int(m.group(2)), m.group(1), str(path)) from err


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's bytes in row-major order, as safetensors stores them."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def shard_metadata(shard: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]],
                   hashes: bool = True) -> dict[str, str]:
    """The safetensors ``__metadata__`` of one shard: format version, the entry of
    ``layers`` (:func:`layer_table`) of every quantized layer with a tensor in the shard (so
    a ``config.json`` that disagrees with the tensors is caught at load), and optionally the
    sha256 of every tensor (checked by ``marlin info --verify``)."""
    owners = {}
    for key in shard:
        module = key.rpartition(".")[0]
        if module in layers:
            owners[module] = layers[module]
    meta = {"format": "pt", "metal_marlin_version": str(FORMAT_VERSION),
            LAYERS_KEY: json.dumps(owners, sort_keys=True)}
    if hashes:
        meta[HASHES_KEY] = json.dumps({k: tensor_sha256(t) for k, t in shard.items()}, sort_keys=True)
    return meta


def read_header(file: str | os.PathLike, who: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file, after checking that the
    file is as long as its header says: a truncated or corrupt file is a ValueError naming it
    (memory-mapping a truncated file would crash the process on first access instead)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{who}: {file} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            meta = header.pop("__metadata__", None) or {}
            end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{who}: {file} is corrupt: its safetensors header is not valid") from None
    if 8 + n + end > size:
        raise ValueError(f"{who}: {file} is truncated: its header describes {8 + n + end:,} bytes, "
                         f"the file has {size:,}")
    return header, meta


def check_layer_metadata(layers: dict[str, dict[str, Any]], file: Path, meta: dict[str, str], who: str) -> None:
    """ValueError naming the layer when the shard's recorded layers (:func:`shard_metadata`)
    disagree with ``config.json``'s ``layers`` (format, group, rotation, dtypes)."""
    raw = meta.get(LAYERS_KEY)
    if raw is None:  # written before the layers were recorded, or by another writer
        return
    try:
        recorded = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{who}: {file} has corrupt {LAYERS_KEY} metadata") from None
    for name, spec in recorded.items():
        cfg = layers.get(name)
        if cfg is None:
            raise ValueError(f"{who}: layer {name!r} is quantized ({spec.get('format')}) in {file.name}, "
                             f"but config.json does not list it as quantized")
        for key in sorted(set(spec) & set(cfg)):
            if spec[key] != cfg[key]:
                raise ValueError(f"{who}: layer {name!r}: config.json says {key}={cfg[key]!r}, but its "
                                 f"tensors in {file.name} were written with {key}={spec[key]!r}")


def check_files(files: Iterable[Path], who: str) -> list[dict[str, str]]:
    """:func:`read_header` of every file (truncation, corruption); their metadata."""
    return [read_header(f, who)[1] for f in files]


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    extra_config: dict[str, Any] | None = None,
    copy_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Save ``model`` (quantized by :func:`quantize_model`) to the directory ``path``.

    Everything is written into a hidden sibling folder first and renamed into ``path`` only
    when complete (:func:`~.atomic.staged_dir`): a full disk or a permission error leaves no
    partial checkpoint. Each shard records its quantized layers and the sha256 of its tensors
    in its safetensors metadata (:func:`shard_metadata`).

    Args:
        model: the model; a Hugging Face model's ``config`` is written too.
        path: output directory (created if needed; an existing checkpoint is replaced).
        max_shard_size: bytes per safetensors file before the checkpoint is sharded.
        extra_config: extra keys for ``quantization_config`` (e.g. the method used).
        copy_files: files copied into the checkpoint with it (tokenizer files).
    """
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"save_quantized: max_shard_size must be a positive int, got {max_shard_size!r}")
    state, aliases = _dedupe_tied(model.state_dict())
    shards = _shards(state, max_shard_size)
    layers = layer_table(model)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    qcfg = quantization_config(model, extra_config)
    qcfg["tied"] = aliases
    hf_config = getattr(model, "config", None)
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else {}
    if config and not config.get("architectures"):
        config["architectures"] = [type(model).__name__]  # models built from a config lack it
    config["quantization_config"] = qcfg
    out = Path(path)
    with staged_dir(out, "save_quantized") as stage:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(shard, stage / name, metadata=shard_metadata(shard, layers))
        if len(shards) > 1:
            weight_map = {t: n for n, shard in zip(names, shards, strict=True) for t in shard}
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_json(stage / INDEX_FILE, {"metadata": {"total_size": total, "aliases": aliases},
                                            "weight_map": weight_map})
        for f in copy_files:
            copy_into(Path(f), stage)  # a file, or a folder such as sentence-transformers' 1_Pooling/
        write_json(stage / CONFIG_FILE, config)
    # files of an earlier save with a different sharding would otherwise confuse readers
    stale = [out / INDEX_FILE] if len(shards) == 1 else [out / SINGLE_FILE]
    stale += [p for p in out.glob("model-*-of-*.safetensors") if p.name not in names]
    for p in stale:
        if p.exists():
            p.unlink()
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint, with its ``quantization_config`` validated."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_quantized: {cfg_path} not found")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_quantized: {cfg_path} is not valid JSON: {err}") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"load_quantized: {cfg_path} has no quantization_config with quant_method "
            f"{QUANT_METHOD!r}"
        )
    if q.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_quantized: format_version {q.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    for name, layer in q.get("layers", {}).items():
        if layer.get("format") not in F.FORMATS:
            raise ValueError(
                f"load_quantized: layer {name!r} has unknown format {layer.get('format')!r}; "
                f"expected one of {sorted(F.FORMATS)}"
            )
    return config


def checkpoint_files(path: str | os.PathLike, who: str, any_name: bool = False) -> list[Path]:
    """The safetensors files of the checkpoint directory ``path``, in shard order: the shards
    named by the index file (each checked to exist), else the single file, or with
    ``any_name`` every ``*.safetensors`` (MLX saves ``model.safetensors`` or its own shard
    names). Errors name ``who``, the API the user called."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            names = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{who}: {path / INDEX_FILE} is not a valid index: {err}") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{who}: shard {missing[0]} is missing ({len(missing)} of the "
                                    f"{len(files)} shards named by {INDEX_FILE} are)")
        return files
    files = sorted(path.glob("*.safetensors")) if any_name else [path / SINGLE_FILE]
    files = [f for f in files if f.is_file()]
    if not files:
        wanted = "*.safetensors" if any_name else SINGLE_FILE
        raise FileNotFoundError(f"{who}: no {wanted} or {INDEX_FILE} in {path}")
    return files


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu",
                 layers: dict[str, dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (memory-mapped reads); corrupt or truncated files
    name themselves. With ``layers`` (``config.json``'s table) each shard's recorded layers
    must agree with it (:func:`check_layer_metadata`)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path, "load_quantized"):  # every file exists
        _, meta = read_header(file, "load_quantized")
        if layers is not None:
            check_layer_metadata(layers, file, meta, "load_quantized")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"load_quantized: {file} is corrupt or truncated: {err}") from None
    return tensors


def convert_to_marlin(model: nn.Module, layers: dict[str, dict[str, Any]], device=None) -> None:
    """Swap the ``nn.Linear`` layers named in ``layers`` for empty :class:`MarlinLinear` layers
    (on ``device``; by default each linear's own)."""
    for name, spec in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: the model has no layer {name!r}") from None
        if isinstance(linear, (MarlinLinear, MarlinExperts)):
            continue
        if spec.get("kind") == "experts":
            if experts_shape(linear) is None:
                raise ValueError(f"load_quantized: {name!r} is a {type(linear).__name__}, not a fused experts module")
            dcfg = DTypeConfig.from_dict(spec["dtype_config"]) if "dtype_config" in spec else None
            replace_module(model, name, MarlinExperts.like(
                linear, MarlinExperts.plans_from_spec(spec), dcfg, device=device))
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"load_quantized: {name!r} is a {type(linear).__name__}, not nn.Linear")
        dcfg = DTypeConfig.from_dict(spec["dtype_config"]) if "dtype_config" in spec else None
        replace_module(model, name, MarlinLinear.like(
            linear, spec["format"], spec["group_size"], dcfg, spec.get("rotation_block", 0), device=device))


def _check_against(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    expected = model.state_dict()
    marlin_prefixes = tuple(f"{n}." for n, m in model.named_modules()
                            if isinstance(m, (MarlinLinear, MarlinExperts)))
    missing = [k for k in expected if k not in tensors and k not in tied]
    optional = [k for k in missing if k.endswith("rotation_signs")]
    missing = [k for k in missing if k not in optional]
    if missing:
        raise ValueError(f"load_quantized: checkpoint is missing tensors {missing[:8]}")
    # a rotated layer's signs (docs/FORMAT.md §5) are optional: a fresh layer has none yet
    linears = {f"{n}.rotation_signs": m for n, m in model.named_modules() if isinstance(m, MarlinLinear)}
    unexpected = [k for k in tensors if k not in expected and k not in linears]
    if unexpected:
        raise ValueError(f"load_quantized: checkpoint has unexpected tensors {unexpected[:8]}")
    for key, t in tensors.items():
        if key not in expected:  # rotation signs: [in_features] of a rotated layer
            layer = linears[key]
            if not layer.rotation_block or tuple(t.shape) != (layer.in_features,):
                raise ValueError(
                    f"load_quantized: tensor {key!r} of shape {tuple(t.shape)} needs a rotated layer with "
                    f"in_features={layer.in_features} (rotation_block={layer.rotation_block})"
                )
            continue
        ref = expected[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"load_quantized: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        strict = key.startswith(marlin_prefixes) and not key.endswith((".bias", "_bias"))
        if strict and t.dtype != ref.dtype:
            raise ValueError(f"load_quantized: tensor {key!r} has dtype {t.dtype}, expected {ref.dtype}")


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Validate ``tensors`` against ``model`` and load them (``assign``: no copies)."""
    _check_against(model, tensors, tied)
    model.load_state_dict(tensors, strict=False, assign=True)
    for alias, source in tied.items():
        parent, _, attr = alias.rpartition(".")
        src_parent, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                getattr(model.get_submodule(src_parent), src_attr))


def load_quantized(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    verify: bool = False,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`.

    Every shard's header is checked against its size (truncation), its recorded quantized
    layers against ``config.json`` (a disagreement fails naming the layer), and every tensor
    the model needs must be present.

    Args:
        path: checkpoint directory.
        device: where the tensors go.
        model: a skeleton of the same architecture (any device, meta is best); None rebuilds
            a Hugging Face model from ``config.json``.
        verify: also check every tensor against the sha256 recorded at save
            (:func:`verify_checkpoint`).
    """
    path = Path(path)
    config = read_config(path)
    q = config["quantization_config"]
    if model is None:
        model = hf_skeleton(config)
    convert_to_marlin(model, q.get("layers", {}), device="meta")
    tensors = read_tensors(path, device, layers=q.get("layers", {}))
    if verify:
        bad = verify_checkpoint(path)
        if bad:
            raise ValueError(f"load_quantized: {len(bad)} tensors fail their recorded sha256: {bad[:4]}")
    load_state(model, tensors, q.get("tied", {}))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise ValueError(f"load_quantized: tensors never loaded: {leftover[:8]}")
    # MoE routers on marlin.moe_route, as quantize_model leaves them (their weights are loaded now)
    convert_routers(model, moe_router_names(model, [n for n, m in model.named_modules()
                                                     if isinstance(m, MarlinExperts)]))
    return model.eval()


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Tensors whose bytes differ from the sha256 recorded at save (``name: reason``); empty
    when all match. Shards written without hashes are reported as unverifiable."""
    problems: list[str] = []
    for file in checkpoint_files(path, "verify"):
        header, meta = read_header(file, "verify")
        raw = meta.get(HASHES_KEY)
        if raw is None:
            problems.append(f"{file.name}: no recorded hashes (written before they were recorded)")
            continue
        hashes = json.loads(raw)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in header:
                if key not in hashes:
                    problems.append(f"{key}: no recorded hash")
                elif tensor_sha256(f.get_tensor(key)) != hashes[key]:
                    problems.append(f"{key}: sha256 differs from the one recorded in {file.name}")
        problems += [f"{k}: recorded in {file.name} but absent" for k in hashes if k not in header]
    return problems
