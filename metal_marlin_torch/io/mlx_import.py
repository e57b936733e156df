"""Import MLX-quantized checkpoints (the mlx-community layout) into :class:`MarlinLinear`.

An MLX quantized linear layer ``L`` is stored as ``L.weight`` (``uint32 [N, K*bits/32]``),
``L.scales`` and, in ``affine`` mode, ``L.biases`` (``[N, K/G]``), with ``config.json``'s
``quantization`` entry giving ``group_size``, ``bits`` and ``mode`` (plus per-layer overrides).
MLX packs each row as one little-endian bit stream, element ``k`` at bit ``k*bits`` — exactly
docs/FORMAT.md §2 for every width, 3 and 6 bits included — so the mapping is:

============  ==========================  ====================================================
MLX           metal_marlin                how
============  ==========================  ====================================================
affine 2-6/8  ``int2`` .. ``int6``/``int8``  same words, scales, biases (``w = s*q + b``)
affine 1      ``int2``                    codes widened 1 -> 2 bits, same scales and biases
mxfp4         ``mxfp4``                   same words and E8M0 scale bytes
nvfp4         ``nvfp4``                   same words; scale bytes read as E4M3; global scale
                                          ``g_mlx / (6 * 448)`` (1 when absent)
mxfp8         ``fp8_e4m3``                same bytes; E8M0 scale -> fp32 ``2^(e-127)``
============  ==========================  ====================================================

Every mapping keeps the stored codes and parameters, so no weight changes: the imported layer
dequantizes (in float32) to exactly what ``mx.dequantize`` gives for the same tensors in float32.
(MLX itself dequantizes in the scale dtype, rounding ``s*q`` before adding ``b``; in bf16/fp16
its values can differ from the exact ones by one rounding.) 1-bit layers have no Marlin
format of their width and cost 2 bits per weight after import. bf16 scales
become fp16 when every value converts exactly, else fp32.

Quantized embeddings (MLX ``QuantizedEmbedding``) are dequantized to dense weights: Marlin
quantizes linear layers only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig
from .checkpoint import CONFIG_FILE, check_files, checkpoint_files, convert_to_marlin, load_state
from .skeleton import hf_skeleton

MLX_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
MLX_AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = {"affine": (32, 64, 128), "mxfp4": (32,), "nvfp4": (16,), "mxfp8": (32,)}
NVFP4_GLOBAL_DIVISOR = 6.0 * 448.0  # MLX's nvfp4 global scale is the tensor amax, ours amax/(6*448)


@dataclass
class MLXLayerImport:
    """How one MLX layer was imported: source and target format, and the cost."""

    source: str
    target: str
    exact: bool = True
    note: str = ""


@dataclass
class MLXImport:
    """Result of :func:`import_mlx`: the model, and what happened to each quantized tensor."""

    model: nn.Module
    layers: dict[str, MLXLayerImport] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds: dict[tuple[str, str], int] = {}
        for v in self.layers.values():
            kinds[(v.source, v.target)] = kinds.get((v.source, v.target), 0) + 1
        lines = [f"imported {len(self.layers)} quantized MLX tensors:"]
        lines += [f"  {src} -> {dst}: {n}" for (src, dst), n in sorted(kinds.items())]
        return "\n".join(lines)


def _as_words(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype not in (torch.uint32, torch.int32):
        raise ValueError(f"import_mlx: quantized weight must be uint32, got {weight.dtype}")
    return weight.view(torch.uint32)


def lossless_scale_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp16 if every tensor converts to fp16 and back unchanged, else fp32 (both lossless)."""
    for t in tensors:
        if t.dtype == torch.float16:
            continue
        if t.dtype == torch.float32 or t.dtype == torch.bfloat16:
            half = t.to(torch.float16)
            if not (torch.isfinite(half).all() and torch.equal(half.to(t.dtype), t)):
                return torch.float32
            continue
        raise ValueError(f"scales/biases must be floating point, got {t.dtype}")
    return torch.float16


def convert_mlx_tensors(
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    bits: int,
    group_size: int,
    mode: str = "affine",
    global_scale: torch.Tensor | None = None,
) -> tuple[F.QuantizedTensor, MLXLayerImport]:
    """One MLX quantized matrix as a :class:`~metal_marlin_torch.formats.QuantizedTensor`.

    Args:
        weight: ``uint32 [N, K*bits/32]`` as MLX stores it.
        scales: ``[N, K/G]`` (float for affine, ``uint8`` for the fp modes).
        biases: ``[N, K/G]`` for affine, else None.
        bits, group_size, mode: the layer's MLX quantization parameters.
        global_scale: MLX's optional nvfp4 tensor scale.
    """
    if mode not in MLX_MODES:
        raise ValueError(f"import_mlx: mode must be one of {MLX_MODES}, got {mode!r}")
    if group_size not in MLX_GROUP_SIZES[mode]:
        raise ValueError(f"import_mlx: mode {mode!r} takes group_size in {MLX_GROUP_SIZES[mode]}, got {group_size!r}")
    words = _as_words(weight)
    if words.dim() != 2:
        raise ValueError(f"import_mlx: weight must be 2-D, got shape {tuple(words.shape)}")
    n = words.shape[0]
    if mode == "affine":
        if bits not in MLX_AFFINE_BITS:
            raise ValueError(f"import_mlx: affine bits must be one of {MLX_AFFINE_BITS}, got {bits!r}")
        if biases is None:
            raise ValueError("import_mlx: affine mode needs biases, got None")
        k = words.shape[1] * 32 // bits
        if scales.shape != (n, k // group_size) or biases.shape != scales.shape:
            raise ValueError(
                f"import_mlx: scales/biases must be [{n}, {k // group_size}] for weight {tuple(words.shape)} "
                f"with bits={bits}, group_size={group_size}; got {tuple(scales.shape)} / {tuple(biases.shape)}"
            )
        sdt = lossless_scale_dtype(scales, biases)
        target = {1: 2}.get(bits, bits)
        if target != bits:  # no Marlin format of this width: the same codes, wider
            words = F.pack(F.unpack(words, bits, k), target)
        note = "" if target == bits else f"{bits}-bit codes stored as {target}-bit (no {bits}-bit format)"
        qt = F.QuantizedTensor(words, scales.to(sdt), biases.to(sdt), None, f"int{target}", group_size, (n, k))
        return qt, MLXLayerImport(f"affine{bits}/g{group_size}", f"int{target}/g{group_size}", True, note)
    if scales.dtype != torch.uint8:
        raise ValueError(f"import_mlx: {mode} scales must be uint8, got {scales.dtype}")
    bits = 8 if mode == "mxfp8" else 4
    k = words.shape[1] * 32 // bits
    if scales.shape != (n, k // group_size):
        raise ValueError(f"import_mlx: scales must be [{n}, {k // group_size}], got {tuple(scales.shape)}")
    if mode == "mxfp4":
        qt = F.QuantizedTensor(words, scales, None, None, "mxfp4", 32, (n, k))
        return qt, MLXLayerImport("mxfp4/g32", "mxfp4/g32")
    if mode == "nvfp4":
        g = torch.ones(1) if global_scale is None else global_scale.float().reshape(1) / NVFP4_GLOBAL_DIVISOR
        qt = F.QuantizedTensor(words, scales.view(torch.float8_e4m3fn), None, g, "nvfp4", 16, (n, k))
        return qt, MLXLayerImport("nvfp4/g16", "nvfp4/g16")
    if (scales == 255).any():
        raise ValueError("import_mlx: mxfp8 scale byte 255 is NaN in E8M0")
    fp32_scales = torch.exp2(scales.float() - 127.0)
    qt = F.QuantizedTensor(words, fp32_scales, None, None, "fp8_e4m3", 32, (n, k))
    return qt, MLXLayerImport("mxfp8/g32", "fp8_e4m3/g32", True, "E8M0 scales stored as fp32")


# mlx.nn's defaults per mode (``_defaults_for_mode`` in mlx/nn/layers/quantized.py): what a
# layer gets when its ``group_size`` or ``bits`` is null
MLX_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def _quant_params(qcfg: dict[str, Any], layer: str) -> dict[str, Any]:
    """``bits``, ``group_size``, ``mode`` of ``layer``, as mlx-lm's loader resolves them.

    A layer without its own entry gets the top-level values. A per-layer entry (mlx-lm's mixed
    predicates write one for every layer) is passed by mlx-lm to ``to_quantized(**entry)``, so a
    null ``group_size`` or ``bits`` there means mlx.nn's default for the layer's mode (64 and 4
    for affine), not the top-level value; the two agree for what mlx-lm writes today.
    """
    mode = qcfg.get("mode") or "affine"
    top_group, top_bits = MLX_MODE_DEFAULTS.get(mode, (64, 4))
    params = {"bits": qcfg.get("bits") or top_bits, "group_size": qcfg.get("group_size") or top_group, "mode": mode}
    override = qcfg.get(layer)
    if isinstance(override, dict):
        mode = override.get("mode") or "affine"
        group, bits = MLX_MODE_DEFAULTS.get(mode, (None, None))
        params = {"bits": override.get("bits") or bits, "group_size": override.get("group_size") or group,
                  "mode": mode}
    return params


def _activation_dtype(tensors: dict[str, torch.Tensor]) -> str:
    dense = [t.dtype for t in tensors.values() if t.dtype in (torch.float16, torch.bfloat16)]
    return "fp16" if dense and dense[0] == torch.float16 else "bf16"


def import_mlx(path: str | os.PathLike, device: str | torch.device = "cpu",
               model: nn.Module | None = None) -> MLXImport:
    """Load an MLX-quantized Hugging Face-style model directory as a model with MarlinLinear layers.

    Args:
        path: directory with ``config.json`` (its ``quantization`` or ``quantization_config``
            entry as mlx-lm writes it) and safetensors weights.
        device: where the tensors go.
        model: a skeleton of the architecture (meta device is best); None builds the
            transformers class named in ``config.json``.

    Returns:
        :class:`MLXImport`; ``save_quantized(result.model, out)`` writes a metal_marlin checkpoint.
    """
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"import_mlx: {cfg_file} not found")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"import_mlx: {cfg_file} is not valid JSON: {err}") from None
    qcfg = config.get("quantization") or config.get("quantization_config")
    if not isinstance(qcfg, dict) or "bits" not in qcfg and "mode" not in qcfg:
        raise ValueError(f"import_mlx: {cfg_file} has no MLX 'quantization' entry (bits, group_size)")
    raw: dict[str, torch.Tensor] = {}
    files = checkpoint_files(path, "import_mlx", any_name=True)
    check_files(files, "import_mlx")  # truncated or corrupt files: one clear error
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    if model is None:
        clean = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        model = hf_skeleton(clean)
    act = _activation_dtype(raw)
    result = MLXImport(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    quantized = sorted(k[: -len(".scales")] for k in raw if k.endswith(".scales"))
    orphans = sorted(k[: -len(".weight")] for k, t in raw.items() if k.endswith(".weight")
                     and t.dtype in (torch.uint32, torch.int32) and k[: -len(".weight")] not in quantized)
    if orphans:
        raise ValueError(f"import_mlx: layer {orphans[0]!r} has a packed (uint32) weight but no scales "
                         f"({len(orphans)} such layers): the checkpoint is incomplete")
    missing = [f"{n}.weight" for n in quantized if f"{n}.weight" not in raw]
    if missing:
        raise ValueError(f"import_mlx: scales without their packed weight: {missing[:8]}")
    for name in quantized:
        params = _quant_params(qcfg, name)
        qt, info = convert_mlx_tensors(raw.pop(f"{name}.weight"), raw.pop(f"{name}.scales"),
                                       raw.pop(f"{name}.biases", None), params["bits"], params["group_size"],
                                       params["mode"], raw.pop(f"{name}.global_scale", None))
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"import_mlx: the model has no module {name!r}") from None
        if isinstance(module, nn.Linear):
            scales = "fp32" if qt.scales.dtype == torch.float32 else "fp16"
            layers[name] = {"format": qt.format, "group_size": qt.group_size,
                            "dtype_config": DTypeConfig(weights=act, activations=act, scales=scales).to_dict()}
            tensors.update({f"{name}.{s}": t for s, t in (("weight", qt.weight), ("scales", qt.scales),
                                                           ("biases", qt.biases), ("global_scale", qt.global_scale))
                            if t is not None})
        else:  # quantized embeddings and other non-linear modules: dense
            tensors[f"{name}.weight"] = F.dequantize(qt, torch.bfloat16 if act == "bf16" else torch.float16)
            info = MLXLayerImport(info.source, "dense", True, f"{type(module).__name__} dequantized")
        result.layers[name] = info
    tensors.update(raw)
    convert_to_marlin(model, layers, device="meta")
    tensors = {k: v.to(device) for k, v in tensors.items()}
    tied = {}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        tied = {"lm_head.weight": "model.embed_tokens.weight"}  # mlx-lm drops a tied head
    load_state(model, tensors, tied)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"import_mlx: tensors never loaded: {leftover[:8]}")
    return result
