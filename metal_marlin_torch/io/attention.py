"""``attn_implementation="marlin"`` for transformers models: their attention layers call
``marlin::attention`` (GQA without repeating K/V, causal, sliding window), on the Metal kernel on
MPS, the pure-torch kernel on CPU/CUDA, the emulated Metal kernel under ``emulator.use()``.

    from metal_marlin_torch.io.attention import register_attention
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="marlin")

The mask function registered with it is transformers' flash-attention one: no mask when the
batch has no padding (the kernel's causal rule, queries aligned to the end of the keys, is then
exact, with or without a KV cache). A padded batch is refused with a clear error (not yet
supported), never computed wrongly.
"""

from __future__ import annotations

import torch

NAME = "marlin"


def marlin_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, Hq, S, D]``, ``key``/``value
    [B, Hk, Sk, D]`` -> ``([B, S, Hq, D], None)``."""
    if attention_mask is not None:
        raise ValueError("marlin attention: padded batches (an attention mask) are not supported yet; "
                         "use attn_implementation='sdpa' for them")
    if dropout:
        raise ValueError(f"marlin attention: dropout must be 0 (inference only), got {dropout}")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = torch.ops.marlin.attention(query, key, value, scale, bool(causal), int(sliding_window or 0))
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``"marlin"`` with transformers' AttentionInterface and AttentionMaskInterface."""
    from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415 (optional dependency)
    from transformers.masking_utils import flash_attention_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, marlin_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
