"""Export quantized models to MLX (mlx-lm folders) and GGUF (llama.cpp files), where exact.

The reverse of :mod:`.mlx_import` and :mod:`.gguf_import`: a layer is written only when the
target holds its codes and parameters unchanged, so the exported file dequantizes to exactly the
same weights; anything else is refused with the reason (:class:`ExportError`).

MLX (mlx-lm's folder: ``config.json`` with a ``quantization`` entry, ``model.safetensors``):

==========================  ======================================  ==========================
metal_marlin                MLX                                     condition
==========================  ======================================  ==========================
``int2/3/4/5/6/8`` g32-128  ``affine``, same bits: same words,      no rotation
                            scales and biases (kept in their dtype)
``mxfp4`` g32               ``mxfp4``: same words and E8M0 bytes    no rotation
other formats, group 256,   refused                                 MLX has no such mode/group
per-channel, rotated layers
==========================  ======================================  ==========================

GGUF (llama architecture; the tensors as llama.cpp's converter writes them, Q/K rows permuted).
A group of 64, 128, 256 or a whole row is written as 2, 4, 8 or K/32 blocks of 32 carrying
the same scale (and bias): exact, since each block dequantizes with its own copy.

==============================================  =======  =====================================
metal_marlin (group 32 or a multiple of 32)     GGUF     condition
==============================================  =======  =====================================
``int4``, bias ``== -8 * scale``                Q4_0     scale exact in fp16
``int4``                                        Q4_1     scale and bias exact in fp16
``int5``, bias ``== -16 * scale``               Q5_0     scale exact in fp16
``int5``                                        Q5_1     scale and bias exact in fp16
``int6``, bias ``== -32 * scale``               Q6_K     K % 256 == 0 and each 256-value
                                                         super-block's scales are one fp16 ``d``
                                                         times int8 sub-scales (per-channel,
                                                         g256; rarely finer groups)
``int6``, bias ``== -32 * scale``               Q8_0     otherwise (exact, 8.5 bits per weight)
``int8``, bias ``== -128 * scale``, codes       Q8_0     scale exact in fp16
in 1..255
``mxfp4`` g32                                   MXFP4
other (affine ``int6``/``int8``, ``int2/3``,    refused  no GGUF block type holds it exactly;
``nf*``, ``fp*``, rotated layers)                        ``requantize="Q8_0"`` writes it as
                                                         Q8_0 from the dense weight instead,
                                                         with the error reported
==============================================  =======  =====================================

Dense tensors (embeddings, norms, unquantized layers) are written as F32, F16 or BF16 as stored.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import formats as F
from ..nn import MarlinLinear

# the files besides weights and config that a model folder needs to be used (mlx-lm reads the
# tokenizer with transformers' AutoTokenizer)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
MLX_AFFINE_GROUPS = (32, 64, 128)


class ExportError(ValueError):
    """A layer or model that the target format cannot hold exactly; the message says why."""


def _layers(model: nn.Module) -> dict[str, MarlinLinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MarlinLinear)}
    if not layers:
        raise ExportError("export: the model has no quantized (MarlinLinear) layers")
    return layers


def _canonical(m: MarlinLinear) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in m._canonical_tensors().items() if v is not None}


def _mlx_entry(name: str, m: MarlinLinear) -> dict[str, Any]:
    """MLX's ``{"group_size", "bits", "mode"}`` for layer ``name``, or ExportError with the reason."""
    if m.rotation_block:
        raise ExportError(f"export-mlx: layer {name!r} has an input rotation (Hadamard block {m.rotation_block}), "
                          "which MLX's QuantizedLinear cannot apply; dequantize it or quantize without rotation")
    if m.format in ("int2", "int3", "int4", "int5", "int6", "int8"):
        if m.group_size not in MLX_AFFINE_GROUPS:
            raise ExportError(f"export-mlx: layer {name!r} is {m.format} with group {m.group_size}; MLX's affine mode "
                              f"takes groups {MLX_AFFINE_GROUPS}")
        return {"group_size": m.group_size, "bits": int(m.format[3:]), "mode": "affine"}
    if m.format == "mxfp4":
        return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    raise ExportError(f"export-mlx: layer {name!r} is {m.format}, which no MLX mode holds exactly "
                      "(MLX has affine int2-8, mxfp4, nvfp4 and mxfp8 with E8M0 scales)")


def _copy_side_files(src: Path | None, out: Path) -> list[str]:
    copied = []
    if src is not None:
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                copied.append(name)
    return copied


def _tied(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


def export_mlx(model: nn.Module, out: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (a transformers model with MarlinLinear layers) as an mlx-lm folder.

    The quantized layers keep their packed words, scales and biases (MLX's layout is
    docs/FORMAT.md's); everything else is written as stored. ``config.json`` is the model's
    config with a ``quantization`` entry (and its copy ``quantization_config``) whose top level
    is the most common layer setting and which names every other layer, as mlx-lm writes mixed
    models. Tokenizer and generation files are copied from ``source_dir`` when given.

    Raises:
        ExportError: a layer MLX cannot hold exactly (the message names it and why).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    from .atomic import staged_dir  # noqa: PLC0415

    layers = _layers(model)
    entries = {name: _mlx_entry(name, m) for name, m in layers.items()}
    keys = [json.dumps(e, sort_keys=True) for e in entries.values()]
    top = json.loads(max(set(keys), key=keys.count))
    quantization: dict[str, Any] = dict(top)
    quantization.update({n: e for n, e in entries.items() if e != top})
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        t = _canonical(m)
        tensors[f"{name}.weight"] = t["weight"]
        tensors[f"{name}.scales"] = t["scales"]
        if "biases" in t:
            tensors[f"{name}.biases"] = t["biases"]
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().cpu()
    quantized = set(layers)
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantized:
            continue
        if key == "lm_head.weight" and _tied(model):
            continue  # mlx-lm ties the head to the embedding itself
        tensors[key] = value.detach().cpu().contiguous()
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared storage in safetensors
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config.pop("quantization_config", None)
    if hasattr(model, "config") and not config.get("architectures"):
        config["architectures"] = [type(model).__name__]  # what transformers (and our importer) rebuild
    config["quantization"] = config["quantization_config"] = quantization
    src = Path(source_dir) if source_dir is not None else None
    with staged_dir(out, "export-mlx") as stage:
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "mlx"})
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        _copy_side_files(src, stage)
    return Path(out)


# ---- GGUF --------------------------------------------------------------------------------------

def _fp16_exact(t: torch.Tensor) -> bool:
    t = t.float()
    return bool(torch.equal(t.half().float(), t)) and bool(torch.isfinite(t.half()).all())


def _interleave(codes: np.ndarray) -> np.ndarray:
    """Codes ``[..., 32]`` (4-bit) -> GGUF's 16 bytes: value j low nibble, j+16 high nibble."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    """fp16-exact values ``[...]`` as their 2 little-endian bytes ``[..., 2]``."""
    return t.half().numpy()[..., None].view(np.uint8)


def _per_block(t: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group parameters ``[N, K/g]`` -> one per 32-value GGUF block ``[N, K/32]``: a group of
    64, 128, 256 or a whole row (per-channel) is 2, 4, 8 or K/32 blocks with the same scale and
    bias, which is exact because every block dequantizes with its own copy."""
    return t.repeat_interleave(k // 32 // t.shape[1], dim=1)


def _q5_blocks(codes: np.ndarray, head: list[np.ndarray]) -> np.ndarray:
    """Q5_0 / Q5_1 blocks: the fp16 header bytes, ``qh`` (bit j of a little-endian uint32 = bit 4
    of value j) and the 16 nibble bytes of the low 4 bits (:func:`_interleave`)."""
    qh = np.packbits((codes >> 4).astype(np.uint8), axis=-1, bitorder="little")
    return np.concatenate([*head, qh, _interleave(codes & 0x0F)], axis=-1)


def _q6_k_blocks(codes: np.ndarray, s: torch.Tensor) -> np.ndarray | None:
    """Q6_K super-blocks (210 bytes per 256 values: ``ql``, ``qh``, int8 ``scales[16]``, fp16 ``d``)
    for symmetric int6 codes ``[N, K/32, 32]`` (value ``s * (q - 32)``) with per-block scales ``s``
    ``[N, K/32]``, or None when some super-block's 16 sub-scales are not ``d * sc`` exactly for
    one fp16 ``d`` and integers ``sc`` in [-128, 127] (true of per-channel and group-256 scales,
    rarely of finer groups). ``d`` is tried as ``max|s| / m`` for ``m = 1..127``."""
    n, nb = s.shape
    sub = s.float().numpy().repeat(2, axis=1).reshape(n * nb // 8, 16)  # 16-value sub-blocks
    big = np.abs(sub).max(axis=1, keepdims=True)
    d = np.zeros_like(big)
    sc = np.zeros(sub.shape, np.int64)
    todo = big[:, 0] > 0  # an all-zero super-block is d = 0, sc = 0
    for m in range(1, 128):
        if not todo.any():
            break
        cand = (big / m).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(np.where(cand > 0, sub / np.where(cand > 0, cand, 1), 0))
        ok = todo & (cand[:, 0] > 0) & (np.abs(q) <= 127).all(1) & ((cand * q.astype(np.float32)) == sub).all(1)
        d[ok], sc[ok] = cand[ok], q[ok].astype(np.int64)
        todo &= ~ok
    if todo.any():
        return None
    v = (codes.reshape(-1, 2, 128)).astype(np.uint8)  # two halves of 128 per super-block
    ql = (v[..., :64] & 0x0F) | ((v[..., 64:] & 0x0F) << 4)  # value e: byte e % 64, nibble e // 64
    hi = (v >> 4).reshape(-1, 2, 4, 32)  # value e: byte e % 32, bits 2 * (e // 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           d.astype(np.float16).view(np.uint8)], axis=-1).reshape(n, -1)


# the types ``export_gguf(requantize=...)`` may write a layer as when no type holds it exactly
REQUANTIZE_TYPES = ("Q8_0",)


def gguf_blocks(name: str, m: MarlinLinear) -> tuple[np.ndarray, str]:
    """The GGUF blocks ``uint8 [N, K/32 * type_size]`` (Q6_K: ``K/256 * 210``) and type name of
    layer ``name``, exactly (module docstring table), or ExportError with the reason."""
    if m.rotation_block:
        raise ExportError(f"export-gguf: layer {name!r} has an input rotation, which llama.cpp cannot apply")
    n, k = m.out_features, m.in_features
    if m.format not in ("int4", "int5", "int6", "int8", "mxfp4") or k % 32 or (
            m.format == "mxfp4" and m.group_size != 32):
        raise ExportError(f"export-gguf: layer {name!r} is {m.format}/g{m.group_size}; GGUF holds exactly only "
                          "int4 (Q4_0/Q4_1), int5 (Q5_0/Q5_1), symmetric int6 (Q6_K/Q8_0) and symmetric int8 "
                          "(Q8_0) with groups of 32 or multiples of 32, and mxfp4 g32 (MXFP4)")
    t = _canonical(m)
    if (k // t["scales"].shape[1]) % 32:  # group 16 (GGUF K-quant imports): finer than a 32-value block
        raise ExportError(f"export-gguf: layer {name!r} is {m.format}/g{m.group_size}; a GGUF block of 32 values "
                          "has one scale, so groups must be 32 or a multiple of 32")
    fmt = F.get_format(m.format)
    codes = F.unpack(t["weight"], fmt.bits, k).numpy().astype(np.int64).reshape(n, k // 32, 32)
    if m.format == "mxfp4":
        blocks = np.concatenate([t["scales"].numpy().astype(np.uint8)[..., None], _interleave(codes)], axis=-1)
        return blocks.reshape(n, -1), "MXFP4"
    s, b = _per_block(t["scales"].float(), k), _per_block(t["biases"].float(), k)
    if not _fp16_exact(s):
        raise ExportError(f"export-gguf: layer {name!r} has scales that fp16 does not hold exactly")
    half = 1 << (fmt.bits - 1)
    symmetric = torch.equal(b, -half * s)
    if m.format in ("int4", "int5"):
        if symmetric:  # Q4_0 / Q5_0: w = d * (q - 8) / d * (q - 16)
            head = [_f16_bytes(s)]
            qtype = "Q4_0" if m.format == "int4" else "Q5_0"
        else:  # Q4_1 / Q5_1: w = d * q + m
            if not _fp16_exact(b):
                raise ExportError(f"export-gguf: layer {name!r} ({m.format} -> Q{fmt.bits}_1) has biases that fp16 "
                                  "does not hold exactly")
            head = [_f16_bytes(s), _f16_bytes(b)]
            qtype = "Q4_1" if m.format == "int4" else "Q5_1"
        blocks = (np.concatenate([*head, _interleave(codes)], axis=-1) if m.format == "int4"
                  else _q5_blocks(codes, head))
        return blocks.reshape(n, -1), qtype
    if m.format == "int6":
        if not symmetric:
            raise ExportError(f"export-gguf: layer {name!r} is int6/g{m.group_size} with affine biases; no GGUF type "
                              "holds it exactly (Q6_K and Q8_0 are symmetric: they need bias == -32*scale)")
        if k % 256 == 0 and (q6 := _q6_k_blocks(codes, s)) is not None:
            return q6, "Q6_K"
    elif not symmetric or codes.min() < 1:
        raise ExportError(f"export-gguf: layer {name!r} is int8 but not symmetric (Q8_0 needs bias == -128*scale, "
                          "codes 1..255 and fp16 scales); no GGUF type holds an 8-bit affine group exactly")
    # Q8_0: w = d * q8 with q8 = q - 2^(bits-1) (int6: -32..31, int8: -127..127)
    q8 = (codes - half).astype(np.int8)
    return np.concatenate([_f16_bytes(s), q8.view(np.uint8)], axis=-1).reshape(n, -1), "Q8_0"


@dataclass
class GGUFLayerExport:
    """How one layer was written by :func:`export_gguf`.

    Attributes:
        source: ``format/gG`` of the layer.
        ggml_type: the GGUF block type written.
        exact: whether the blocks dequantize to exactly our weights (else re-quantized on request).
        rel_rms_error: ``||W_gguf - W_ours|| / ||W_ours||`` (0 when exact).
        max_abs_error: largest ``|W_gguf - W_ours|``.
    """

    source: str
    ggml_type: str
    exact: bool
    rel_rms_error: float = 0.0
    max_abs_error: float = 0.0


@dataclass
class GGUFExport:
    """Result of :func:`export_gguf`: the file written and how each quantized layer went into it."""

    path: Path
    layers: dict[str, GGUFLayerExport] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"wrote {len(self.layers)} quantized layers:"]
        rows: dict[tuple[str, str], list[GGUFLayerExport]] = {}
        for r in self.layers.values():
            rows.setdefault((r.source, r.ggml_type), []).append(r)
        for (src, dst), items in sorted(rows.items()):
            worst = max(i.rel_rms_error for i in items)
            err = "exact" if all(i.exact for i in items) else f"re-quantized, worst relative RMS error {worst:.5f}"
            lines.append(f"  {src} -> {dst}: {len(items)} ({err})")
        return "\n".join(lines)


def _requantized(name: str, m: MarlinLinear, qtype: str) -> tuple[np.ndarray, GGUFLayerExport]:
    """Layer ``name`` re-quantized by ``gguf.quants.quantize`` from its dense weight (the input
    rotation folded back in, as :meth:`MarlinLinear.dequantize` does), with the error measured
    by ``gguf``'s own dequantize against that dense weight."""
    from gguf import GGMLQuantizationType as T  # noqa: PLC0415
    from gguf.quants import dequantize, quantize  # noqa: PLC0415

    if m.in_features % 32:
        raise ExportError(f"export-gguf: layer {name!r} has K={m.in_features}, not a multiple of {qtype}'s 32")
    w = m.dequantize(torch.float32).weight.detach().cpu().numpy()
    blocks = quantize(w, T[qtype])
    diff = dequantize(blocks, T[qtype]) - w
    norm = float(np.linalg.norm(w))
    rel = float(np.linalg.norm(diff)) / norm if norm else 0.0
    return blocks, GGUFLayerExport(f"{m.format}/g{m.group_size}", qtype, False, rel, float(np.abs(diff).max()))


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders Q/K rows (rotary halves interleaved); rows are independent
    in every block type, so the same reorder applies to the blocks."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in LLAMA_NAMES:
            return f"blk.{parts[2]}.{LLAMA_NAMES[module]}.{parts[-1]}"
    raise ExportError(f"export-gguf: tensor {hf!r} has no llama GGUF name")


def _dense(t: torch.Tensor) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as T  # noqa: PLC0415
    from gguf.quants import quantize  # noqa: PLC0415

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # bf16 values are float32 values that BF16 encoding keeps exactly
        return quantize(t.float().numpy(), T.BF16), T.BF16
    if t.dtype == torch.float16:
        return t.numpy(), None
    return t.float().numpy(), None


def gguf_tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's tokenizer metadata for a Hugging Face *byte-level BPE* fast tokenizer (what
    ``convert_hf_to_gguf.py`` writes as ``tokenizer.ggml.model = gpt2``): the token strings by id,
    padded to the model's ``vocab_size`` with ``[PAD<id>]`` (type UNUSED), token types (CONTROL
    for special added tokens, USER_DEFINED for other added ones, else NORMAL), the merges as
    ``"a b"`` strings, the bos/eos/unk/pad ids and the chat template.

    Raises:
        ExportError: not a fast tokenizer, or not a byte-level BPE one (SentencePiece/Unigram
            vocabularies need scores and another GGUF tokenizer model, not converted here).
    """
    import json  # noqa: PLC0415

    import gguf  # noqa: PLC0415

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError(f"export-gguf: the tokenizer must be a fast (tokenizers) one, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ExportError(f"export-gguf: only byte-level BPE tokenizers are written (llama.cpp 'gpt2'), got "
                          f"{model.get('type')!r} with pre-tokenizer {pre[:80]}")
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"export-gguf: tokenizer ids reach {max(vocab.values())}, beyond vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens") or []:
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{role}_token", None)
        if token is not None and token in vocab:
            ids[role] = vocab[token]
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "ids": ids,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def export_gguf(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None,
                requantize: str | None = None) -> GGUFExport:
    """Write a transformers Llama model with MarlinLinear layers as a llama-architecture GGUF file.

    Quantized layers become the GGUF block type that holds them exactly (module docstring);
    dense tensors keep their dtype. A layer no type holds exactly is refused, unless
    ``requantize`` names a type of :data:`REQUANTIZE_TYPES` (``"Q8_0"``): then that layer is
    re-quantized to it from its dense weight and the result reports its error
    (:class:`GGUFExport`; ``marlin export-gguf --requantize Q8_0`` prints it).
    The hyper-parameters transformers' and llama.cpp's loaders
    read are written, and with ``tokenizer`` (a byte-level BPE fast tokenizer) its vocabulary,
    merges, special ids and chat template (:func:`gguf_tokenizer_fields`), which llama.cpp needs
    in the file.

    Raises:
        ExportError: a non-llama model, a layer no GGUF type holds exactly (named, with why), or a
            tokenizer of a kind not converted.
    """
    import gguf  # noqa: PLC0415

    from .atomic import atomic_path  # noqa: PLC0415

    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type != "llama":
        raise ExportError(f"export-gguf: only the llama architecture is written, got {model_type!r}")
    if requantize is not None and requantize not in REQUANTIZE_TYPES:
        raise ValueError(f"export_gguf: requantize must be None or one of {REQUANTIZE_TYPES}, got {requantize!r}")
    layers = _layers(model)
    planned: dict[str, tuple[np.ndarray, Any]] = {}
    result = GGUFExport(Path(out))
    for name, m in layers.items():
        try:
            blocks, qtype = gguf_blocks(name, m)
            result.layers[name] = GGUFLayerExport(f"{m.format}/g{m.group_size}", qtype, True)
        except ExportError as e:
            if requantize is None:
                raise ExportError(f"{e}. To write such layers re-quantized (inexact, error reported), pass "
                                  "requantize='Q8_0' (marlin export-gguf --requantize Q8_0)") from None
            blocks, result.layers[name] = _requantized(name, m, requantize)
            qtype = requantize
        planned[f"{name}.weight"] = (blocks, gguf.GGMLQuantizationType[qtype])
        if m.bias is not None:
            planned[f"{name}.bias"] = _dense(m.bias)
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] in layers:
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        planned[key] = _dense(value)
    tok = gguf_tokenizer_fields(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(getattr(cfg, "_name_or_path", "") or "metal_marlin export")
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(float(rope))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        if tok is not None:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tok["tokens"])
            writer.add_token_types(tok["types"])
            writer.add_token_merges(tok["merges"])
            for role, i in tok["ids"].items():
                getattr(writer, f"add_{role}_token_id")(i)
            if tok["chat_template"]:
                writer.add_chat_template(tok["chat_template"])
        for key, (data, qtype) in planned.items():
            if key.endswith("q_proj.weight"):
                data = _llama_permute(data, heads)
            elif key.endswith("k_proj.weight"):
                data = _llama_permute(data, kv_heads)
            writer.add_tensor(_gguf_name(key), np.ascontiguousarray(data), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return result
