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

GGUF (llama architecture; the tensors as llama.cpp's converter writes them, Q/K rows permuted):

==============================================  =======  =====================================
metal_marlin                                    GGUF     condition
==============================================  =======  =====================================
``int4`` g32, bias ``== -8 * scale``            Q4_0     scale exact in fp16
``int4`` g32                                    Q4_1     scale and bias exact in fp16
``int8`` g32, bias ``== -128 * scale``, codes   Q8_0     scale exact in fp16
in 1..255
``mxfp4`` g32                                   MXFP4
other                                           refused  no GGUF block type holds it exactly
==============================================  =======  =====================================

Dense tensors (embeddings, norms, unquantized layers) are written as F32, F16 or BF16 as stored.
"""

from __future__ import annotations

import json
import os
import shutil
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


def gguf_blocks(name: str, m: MarlinLinear) -> tuple[np.ndarray, str]:
    """The GGUF blocks ``uint8 [N, K/32 * type_size]`` and type name of layer ``name``, exactly
    (module docstring table), or ExportError with the reason."""
    if m.rotation_block:
        raise ExportError(f"export-gguf: layer {name!r} has an input rotation, which llama.cpp cannot apply")
    if m.group_size != 32 or m.format not in ("int4", "int8", "mxfp4"):
        raise ExportError(f"export-gguf: layer {name!r} is {m.format}/g{m.group_size}; GGUF holds exactly only "
                          "int4 g32 (Q4_0/Q4_1), int8 g32 with bias -128*scale (Q8_0) and mxfp4 (MXFP4)")
    t = _canonical(m)
    n, k = m.out_features, m.in_features
    fmt = F.get_format(m.format)
    codes = F.unpack(t["weight"], fmt.bits, k).numpy().astype(np.int64).reshape(n, k // 32, 32)
    if m.format == "mxfp4":
        blocks = np.concatenate([t["scales"].numpy().astype(np.uint8)[..., None], _interleave(codes)], axis=-1)
        return blocks.reshape(n, -1), "MXFP4"
    s, b = t["scales"].float(), t["biases"].float()
    if m.format == "int4":
        if not _fp16_exact(s):
            raise ExportError(f"export-gguf: layer {name!r} has scales that fp16 does not hold exactly")
        d = s.half().numpy()
        if torch.equal(b, -8 * s):
            return np.concatenate([d[..., None].view(np.uint8), _interleave(codes)], axis=-1).reshape(n, -1), "Q4_0"
        if not _fp16_exact(b):
            raise ExportError(f"export-gguf: layer {name!r} (int4 -> Q4_1) has biases that fp16 does not hold exactly")
        mins = b.half().numpy()
        return np.concatenate([d[..., None].view(np.uint8), mins[..., None].view(np.uint8), _interleave(codes)],
                              axis=-1).reshape(n, -1), "Q4_1"
    if not torch.equal(b, -128 * s) or not _fp16_exact(s) or codes.min() < 1:
        raise ExportError(f"export-gguf: layer {name!r} is int8 but not symmetric (Q8_0 needs bias == -128*scale, "
                          "codes 1..255 and fp16 scales); no GGUF type holds an 8-bit affine group exactly")
    q = (codes - 128).astype(np.int8)
    d = s.half().numpy()
    return np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1).reshape(n, -1), "Q8_0"


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


def export_gguf(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a transformers Llama model with MarlinLinear layers as a llama-architecture GGUF file.

    Quantized layers become the GGUF block type that holds them exactly (module docstring);
    dense tensors keep their dtype. The hyper-parameters transformers' and llama.cpp's loaders
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
    layers = _layers(model)
    planned: dict[str, tuple[np.ndarray, Any]] = {}
    for name, m in layers.items():
        blocks, qtype = gguf_blocks(name, m)
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
    return Path(out)
