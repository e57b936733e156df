"""Import GGUF files (llama.cpp) through the ``gguf`` package.

Each GGUF block type maps onto a docs/FORMAT.md format where its arithmetic is the same, keeping
the stored codes; the rest is dequantized by ``gguf`` itself and re-quantized, with the error
reported. A GGUF block stores 32 values ``j`` as nibbles (``j`` in the low nibble of byte ``j``,
``j + 16`` in the high one) or bytes; the importer reorders them into our bit stream.

========  =======================  ====================================================  =====
GGUF      metal_marlin             parameters                                            exact
========  =======================  ====================================================  =====
Q4_0      ``int4`` g32             ``q``, scale ``d``, bias ``-8 d``                     yes
Q4_1      ``int4`` g32             ``q``, scale ``d``, bias ``m``                        yes
Q5_0      ``int5`` g32             ``q``, scale ``d``, bias ``-16 d``                    yes
Q5_1      ``int5`` g32             ``q``, scale ``d``, bias ``m``                        yes
Q8_0      ``int8`` g32             ``q + 128``, scale ``d``, bias ``-128 d``             yes
MXFP4     ``mxfp4`` g32            same E2M1 nibbles and E8M0 byte                       yes
Q4_K      ``int4`` g32             ``q``, scale ``d*sc``, bias ``-dmin*m``               yes
Q5_K      ``int5`` g32             ``q``, scale ``d*sc``, bias ``-dmin*m``               yes
IQ4_NL    ``int8`` g32             ``kvalues[q] + 128``, scale ``d``, bias ``-128 d``    yes
IQ4_XS    ``int8`` g32             ``kvalues[q] + 128``, scale ``d*(ls-32)``, bias       yes
                                   ``-128 d*(ls-32)``
Q6_K      ``int8`` g16             ``q``, scale ``d*sc``, bias ``-32 d*sc``              yes
Q3_K      ``int3`` g16             ``q + 4``, scale ``d*(sc-32)``, bias ``-4`` scale     yes
Q2_K      ``int2`` g16             ``q``, scale ``d*sc``, bias ``-dmin*m``               yes
IQ2/IQ3/  ``int8`` g16/g32,        integer levels times a per-group scale, resolved by   yes
IQ1       IQ3_S ``int4`` g32       :mod:`.gguf_levels` (grid, signs, delta)
TQ1/TQ2   ``int2`` g256            ``q``, scale ``d``, bias ``-d``                       yes
other     re-quantized (RTN)       ``gguf.quants.dequantize``, then ``requantize`` fmt   no
F32/F16/BF16  dense tensor         as stored                                             yes
========  =======================  ====================================================  =====

Scales and biases are products of an fp16 value and a power of two or a small integer, so they
are computed exactly in fp32 and stored as fp16 when every value converts exactly (else fp32).
"Exact" means the imported tensor dequantizes in float32 to exactly what
``gguf.quants.dequantize`` returns. The exact mappings of Q4_K and the IQ4 types cost more
bits than the GGUF type (Q4_K: 4 + 2*16/32 = 5 bits per weight with fp16 scales, 6 with fp32,
instead of 4.5; IQ4_NL/IQ4_XS: 8 bits plus scales, instead of 4.5/4.25: our formats have no
arbitrary 16-entry codebook, and llama.cpp's IQ4 table is integers in [-127, 113], so int8 holds
it exactly). ``compact=True`` (``marlin import-gguf --compact``) re-quantizes those widened types
to ``requantize`` (default: int4 below 5 bits per weight, else int8) instead, with the added error
reported per tensor. Q5_K's exact ``int5`` (6 bits per weight with fp16 scales, 7 with fp32,
instead of 5.5) is kept under ``compact`` too: the default re-quantization target of a 5.5-bit
type (int8) would be larger.

Q6_K, Q3_K, Q2_K and some IQ types have a scale per 16 weights: the integer formats' group 16.
Every exact mapping of a type of fewer than 8 bits is widened (``WIDENED_TYPES``); ``compact``
re-quantizes them. Q8_K is llama.cpp's activation type for dot products, never stored in model
files; ``gguf`` cannot read it either.

"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig
from . import gguf_levels
from .mlx_import import lossless_scale_dtype

BLOCK = 32
EXACT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q5_K", "TQ2_0", "TQ1_0")
# exact, but with more bits than the GGUF type: ``compact=True`` re-quantizes these instead
WIDENED_TYPES = ("Q4_K", "IQ4_NL", "IQ4_XS", *(t for t in gguf_levels.READERS if t not in EXACT_TYPES))
# llama.cpp's IQ4_NL / IQ4_XS codebook (kvalues_iq4nl in ggml-common.h), integers in [-127, 113]
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
DENSE_TYPES = ("F32", "F16", "BF16")


@dataclass
class GGUFTensorImport:
    """How one GGUF tensor was imported.

    Attributes:
        ggml_type: the GGUF block type (``Q4_0``, ``Q6_K``, ...).
        target: ``format/gG`` or ``dense <dtype>``.
        exact: whether it dequantizes to exactly what ``gguf`` does.
        rel_rms_error: ``||W_imported - W_gguf|| / ||W_gguf||`` (0 when exact).
        max_abs_error: largest ``|W_imported - W_gguf|``.
    """

    ggml_type: str
    target: str
    exact: bool
    rel_rms_error: float = 0.0
    max_abs_error: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.rel_rms_error == 0 else -20 * math.log10(self.rel_rms_error)


@dataclass
class GGUFTensors:
    """Result of :func:`read_gguf`: converted tensors by GGUF name, and a report for each."""

    tensors: dict[str, F.QuantizedTensor | torch.Tensor] = field(default_factory=dict)
    report: dict[str, GGUFTensorImport] = field(default_factory=dict)

    def summary(self) -> str:
        rows: dict[tuple[str, str], list[GGUFTensorImport]] = {}
        for r in self.report.values():
            rows.setdefault((r.ggml_type, r.target), []).append(r)
        lines = [f"imported {len(self.report)} GGUF tensors:"]
        for (src, dst), items in sorted(rows.items()):
            worst = max(i.rel_rms_error for i in items)
            err = "exact" if all(i.exact for i in items) else f"re-quantized, worst relative RMS error {worst:.4f}"
            lines.append(f"  {src:>6} -> {dst}: {len(items)} ({err})")
        return "\n".join(lines)

    def details(self) -> str:
        """One line per re-quantized tensor: its added relative RMS error, SQNR and worst error."""
        return "\n".join(f"  {name}: {r.ggml_type} -> {r.target}: relative RMS error {r.rel_rms_error:.5f} "
                         f"({r.sqnr_db:.1f} dB), max abs {r.max_abs_error:.4g}"
                         for name, r in self.report.items() if not r.exact)


def _blocks(data: np.ndarray, n: int, k: int, type_size: int) -> np.ndarray:
    """Raw bytes ``[N, K/32 * type_size]`` as ``[N, K/32, type_size]``."""
    return np.ascontiguousarray(data).view(np.uint8).reshape(n, k // BLOCK, type_size)


def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` codes: low nibbles are values 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _affine(codes: np.ndarray, bits: int, scale: torch.Tensor, bias: torch.Tensor, n: int, k: int,
            group: int = BLOCK) -> F.QuantizedTensor:
    sdt = lossless_scale_dtype(scale, bias)
    words = F.pack(torch.from_numpy(codes.reshape(n, k).astype(np.int64)), bits)
    return F.QuantizedTensor(words, scale.reshape(n, k // group).to(sdt), bias.reshape(n, k // group).to(sdt),
                             None, f"int{bits}", group, (n, k))


def _convert_levels(data: np.ndarray, ggml_type: str, n: int, k: int) -> F.QuantizedTensor:
    """A type of :data:`gguf_levels.READERS`: code ``(level + offset) / step``, scale
    ``step * scale``, bias ``-offset * scale`` (plus Q2_K's own ``-dmin * m``)."""
    reader, size, fmt, offset, step = gguf_levels.READERS[ggml_type]
    if k % gguf_levels.QK_K:
        raise ValueError(f"gguf import: {ggml_type} needs K divisible by {gguf_levels.QK_K}, got {k}")
    lv = reader(np.ascontiguousarray(data).view(np.uint8).reshape(-1, size))
    bits = F.get_format(fmt).bits
    codes = lv.levels + offset
    if step != 1:
        if np.any(codes % step):
            raise ValueError(f"gguf import: {ggml_type} has levels off its grid of step {step}")
        codes = codes // step
    if codes.min() < 0 or codes.max() >= (1 << bits):
        raise ValueError(f"gguf import: {ggml_type} codes {codes.min()}..{codes.max()} do not fit {fmt}")
    scale = torch.from_numpy(np.ascontiguousarray(lv.scales, dtype=np.float32))
    bias = -offset * scale  # exact: offset is a small integer (at most 8 bits)
    if lv.bias is not None:
        bias = bias + torch.from_numpy(np.ascontiguousarray(lv.bias, dtype=np.float32))
    return _affine(codes, bits, scale * step, bias, n, k, lv.group)


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")  # bit j of the uint32 -> value j
    return _nibbles(qs) | (high << 4)


def convert_exact(data: np.ndarray, ggml_type: str, n: int, k: int) -> F.QuantizedTensor:
    """A GGUF matrix of an exactly-mapped type (``EXACT_TYPES`` + ``WIDENED_TYPES``) as our format."""
    if k % BLOCK:
        raise ValueError(f"gguf import: K={k} is not a multiple of the {BLOCK}-value block")
    if ggml_type == "Q4_0":
        b = _blocks(data, n, k, 18)
        d = _f16(b[..., 0:2])
        return _affine(_nibbles(b[..., 2:]), 4, d, -8 * d, n, k)
    if ggml_type == "Q4_1":
        b = _blocks(data, n, k, 20)
        return _affine(_nibbles(b[..., 4:]), 4, _f16(b[..., 0:2]), _f16(b[..., 2:4]), n, k)
    if ggml_type == "Q5_0":
        b = _blocks(data, n, k, 22)
        d = _f16(b[..., 0:2])
        return _affine(_q5_codes(b[..., 2:6], b[..., 6:]), 5, d, -16 * d, n, k)
    if ggml_type == "Q5_1":
        b = _blocks(data, n, k, 24)
        return _affine(_q5_codes(b[..., 4:8], b[..., 8:]), 5, _f16(b[..., 0:2]), _f16(b[..., 2:4]), n, k)
    if ggml_type == "Q8_0":
        b = _blocks(data, n, k, 34)
        d = _f16(b[..., 0:2])
        codes = b[..., 2:].view(np.int8).astype(np.int16) + 128
        return _affine(codes, 8, d, -128 * d, n, k)
    if ggml_type == "MXFP4":
        b = _blocks(data, n, k, 17)
        words = F.pack(torch.from_numpy(_nibbles(b[..., 1:]).reshape(n, k).astype(np.int64)), 4)
        return F.QuantizedTensor(words, torch.from_numpy(b[..., 0].copy()), None, None, "mxfp4", BLOCK, (n, k))
    if ggml_type == "IQ4_NL":
        b = _blocks(data, n, k, 18)
        d = _f16(b[..., 0:2])
        return _affine(_iq4_codes(b[..., 2:]), 8, d, -128 * d, n, k)
    if ggml_type == "IQ4_XS":
        return _convert_iq4_xs(data, n, k)
    if ggml_type in ("Q4_K", "Q5_K"):
        return _convert_k(data, ggml_type, n, k)
    if ggml_type in gguf_levels.READERS:
        return _convert_levels(data, ggml_type, n, k)
    raise ValueError(f"gguf import: {ggml_type} has no exact mapping; expected one of {EXACT_TYPES + WIDENED_TYPES}")


def _iq4_codes(qs: np.ndarray) -> np.ndarray:
    """IQ4 nibbles ``[..., 16]`` -> int8 codes ``kvalues[q] + 128`` (1..241) ``[..., 32]``: with
    scale ``d`` and bias ``-128 d`` they dequantize to ``d * kvalues[q]``, llama.cpp's value."""
    table = np.asarray(IQ4_VALUES, dtype=np.int16) + 128
    return table[_nibbles(qs)]


def _convert_iq4_xs(data: np.ndarray, n: int, k: int) -> F.QuantizedTensor:
    """IQ4_XS super-blocks of 256 (136 bytes): fp16 ``d``, 6-bit sub-block scales ``ls`` (low 4
    bits in ``scales_l``, high 2 in ``scales_h``), 8 sub-blocks of 16 nibble bytes; a value is
    ``d * (ls - 32) * kvalues[q]``. ``|ls - 32| <= 32`` has at most 5 significant bits, so the
    scale ``d*(ls-32)`` (16 bits) times a code of 8 bits stays within float32's 24: exact."""
    if k % 256:
        raise ValueError(f"gguf import: IQ4_XS needs K divisible by 256, got {k}")
    b = np.ascontiguousarray(data).view(np.uint8).reshape(-1, 136)
    d = _f16(b[:, 0:2])
    scales_h = b[:, 2:4].copy().view(np.uint16)[:, 0].astype(np.int32)
    scales_l = b[:, 4:8]
    sub = np.arange(8)
    low = (scales_l[:, sub // 2] >> (4 * (sub % 2)).astype(np.uint8)) & 0x0F
    high = (scales_h[:, None] >> (2 * sub)) & 0x03
    ls = (low.astype(np.int32) | (high << 4)) - 32
    scale = (d[:, None] * torch.from_numpy(ls.astype(np.float32))).reshape(n, k // BLOCK)
    codes = _iq4_codes(b[:, 8:].reshape(-1, 8, 16))
    return _affine(codes.reshape(n, k), 8, scale, -128 * scale, n, k)


def _convert_k(data: np.ndarray, ggml_type: str, n: int, k: int) -> F.QuantizedTensor:
    """Q4_K / Q5_K super-blocks of 256: 8 sub-blocks of 32 with ``w = d*sc * q - dmin*m``."""
    from gguf.quants import Q4_K  # noqa: PLC0415

    if k % 256:
        raise ValueError(f"gguf import: {ggml_type} needs K divisible by 256, got {k}")
    size = 144 if ggml_type == "Q4_K" else 176
    b = np.ascontiguousarray(data).view(np.uint8).reshape(-1, size)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16])
    scale = (d[:, None] * torch.from_numpy(sc.astype(np.float32))).reshape(n, k // BLOCK)  # exact in fp32
    bias = -(dmin[:, None] * torch.from_numpy(m.astype(np.float32))).reshape(n, k // BLOCK)
    if ggml_type == "Q4_K":
        qs = b[:, 16:].reshape(-1, 4, 32)  # 32 bytes: sub-block 2i in low nibbles, 2i+1 in high
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 256)
        bits = 4
    else:
        qh = b[:, 16:48]  # bit i of byte j: high bit of value j of sub-block i
        qs = b[:, 48:].reshape(-1, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        codes = (low | (high << 4)).reshape(-1, 256)
        bits = 5
    return _affine(codes, bits, scale, bias, n, k)


def gguf_dequantize(data: np.ndarray, ggml_type: str, n: int, k: int) -> torch.Tensor:
    """What a quantized GGUF tensor means, float32 ``[N, K]``, by ``gguf.quants.dequantize``
    (dense types never get here: :func:`convert_tensor` returns them as they are)."""
    from gguf import GGMLQuantizationType  # noqa: PLC0415
    from gguf.quants import dequantize  # noqa: PLC0415

    out = dequantize(np.ascontiguousarray(data), GGMLQuantizationType[ggml_type])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(n, k)


def default_requant_format(ggml_type: str) -> str:
    """``int4`` for types of fewer than 5 bits per weight, else ``int8``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: PLC0415

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return "int4" if size * 8 / block < 5 else "int8"


def _error(qt: F.QuantizedTensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = F.dequantize(qt, torch.float32) - ref
    norm = float(ref.norm())
    return (float(diff.norm()) / norm if norm else float(diff.norm())), float(diff.abs().max())


def convert_tensor(
    data: np.ndarray,
    ggml_type: str,
    shape: tuple[int, ...],
    requantize: str | None = None,
    group_size: int = 32,
    compact: bool = False,
    dense_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[F.QuantizedTensor | torch.Tensor, GGUFTensorImport]:
    """One GGUF tensor (raw ``data`` as the reader gives it, logical ``shape`` in torch order).

    Args:
        requantize: target format for types without an exact mapping (None: int4 below 5 bits
            per weight, else int8).
        group_size: group of the re-quantized format.
        compact: re-quantize the types whose exact mapping takes more bits than they do
            (``WIDENED_TYPES``: Q4_K, IQ4_NL, IQ4_XS and the group-16 K-quants and IQ types) instead of
            keeping them exactly.
        dense_dtype: dtype of dense tensors (None: as stored; F32 stays F32).
        scale_dtype: scale dtype of re-quantized tensors.
    """
    if ggml_type in DENSE_TYPES:
        if ggml_type == "BF16":
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).reshape(shape).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(data).reshape(shape).copy())
        if dense_dtype is not None:
            t = t.to(dense_dtype)
        return t, GGUFTensorImport(ggml_type, f"dense {str(t.dtype).replace('torch.', '')}", True)
    if len(shape) != 2:
        raise ValueError(f"gguf import: quantized tensors must be 2-D [N, K], got shape {shape} ({ggml_type})")
    n, k = shape
    if ggml_type in EXACT_TYPES or (not compact and ggml_type in WIDENED_TYPES):
        qt = convert_exact(data, ggml_type, n, k)
        return qt, GGUFTensorImport(ggml_type, f"{qt.format}/g{qt.group_size}", True)
    ref = gguf_dequantize(data, ggml_type, n, k)
    fmt = requantize or default_requant_format(ggml_type)
    qt = F.quantize(ref, fmt, group_size, scale_dtype)
    rel, worst = _error(qt, ref)
    return qt, GGUFTensorImport(ggml_type, f"{fmt}/g{qt.group_size}", False, rel, worst)


def read_gguf(path: str | os.PathLike, **options: Any) -> GGUFTensors:
    """Every tensor of the GGUF file ``path``, converted (options as :func:`convert_tensor`)."""
    from gguf import GGUFReader  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_gguf: {path} not found")
    out = GGUFTensors()
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists the innermost dim first
        out.tensors[t.name], out.report[t.name] = convert_tensor(t.data, t.tensor_type.name, shape, **options)
    return out


def _row_permutation(processor: Any, gguf_name: str, n: int) -> np.ndarray | None:
    """The row order transformers' tensor processor applies to ``gguf_name`` (None: identity).

    Found by running the processor on the row indices themselves; a processor that does
    anything but reorder rows (reshape, transpose) is refused rather than guessed at.
    """
    idx = np.arange(n, dtype=np.int64).reshape(n, 1)
    moved = np.asarray(processor.process(idx.copy(), gguf_name).weights)
    if moved.shape != (n, 1) or not np.array_equal(np.sort(moved[:, 0]), idx[:, 0]):
        raise ValueError(f"gguf import: transformers transforms {gguf_name} beyond a row permutation")
    return None if np.array_equal(moved, idx) else moved[:, 0]


def _permute(x: F.QuantizedTensor | torch.Tensor, perm: np.ndarray) -> F.QuantizedTensor | torch.Tensor:
    p = torch.from_numpy(perm)
    if isinstance(x, torch.Tensor):
        return x[p]
    return F.QuantizedTensor(x.weight[p], x.scales[p], None if x.biases is None else x.biases[p],
                             x.global_scale, x.format, x.group_size, x.shape)


def import_gguf(path: str | os.PathLike, dense_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                **options: Any) -> tuple[nn.Module, GGUFTensors]:
    """The model a GGUF file holds, with its quantized linear layers as :class:`MarlinLinear`.

    The configuration and the GGUF -> transformers tensor names come from transformers' GGUF
    support (the architectures it lists); embeddings and other non-linear tensors are
    dequantized to ``dense_dtype``. ``options`` go to :func:`convert_tensor`.

    Returns:
        ``(model, tensors)``: the model (``save_quantized`` writes it as a checkpoint) and the
        per-tensor import report.
    """
    import transformers  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import (  # noqa: PLC0415
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from .checkpoint import convert_to_marlin, load_state  # noqa: PLC0415
    from .skeleton import empty_parameters  # noqa: PLC0415

    path = Path(path)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    cfg = dict(parsed["config"])
    model_type = cfg.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    with empty_parameters(), torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.config.architectures = [type(model).__name__]  # so that load_quantized can rebuild it
    arch = model_type
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    act = "fp16" if dense_dtype == torch.float16 else "bf16"
    result = read_gguf(path, **options)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for gname, value in result.tensors.items():
        if gname not in names:
            raise ValueError(f"gguf import: tensor {gname!r} has no counterpart in {type(model).__name__}")
        hf_name = names[gname]
        rows = value.shape[0] if len(value.shape) >= 1 else 0
        perm = _row_permutation(processor, gname, rows) if rows else None
        if perm is not None:
            value = _permute(value, perm)
        module_name, _, leaf = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(value, F.QuantizedTensor) and isinstance(module, nn.Linear) and leaf == "weight":
            sdt = "fp32" if value.scales.dtype == torch.float32 else "fp16"
            layers[module_name] = {"format": value.format, "group_size": value.group_size,
                                   "dtype_config": DTypeConfig(weights=act, activations=act, scales=sdt).to_dict()}
            for suffix in ("weight", "scales", "biases", "global_scale"):
                t = getattr(value, suffix)
                if t is not None:
                    tensors[f"{module_name}.{suffix}"] = t
        else:
            if isinstance(value, F.QuantizedTensor):
                value = F.dequantize(value, dense_dtype)
                result.report[gname].target += f" -> dense {str(dense_dtype).replace('torch.', '')}"
            tensors[hf_name] = value.to(dense_dtype) if value.is_floating_point() else value
    convert_to_marlin(model, layers, device="meta")
    tied = {}
    if hf_config.tie_word_embeddings and "lm_head.weight" not in tensors:
        tied = {"lm_head.weight": "model.embed_tokens.weight"}
    load_state(model, {k: v.to(device) for k, v in tensors.items()}, tied)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"gguf import: tensors never loaded: {leftover[:8]}")
    return model.eval(), result
