"""Decoder-layer modules on the ``marlin`` ops: :func:`patch_layers` swaps a Llama-family
model's RMSNorms and gated MLP activations for them, applies RoPE to q and k in one
``marlin::rope`` launch inside each attention module, fuses the decoder layer's
``residual + attention`` add with the post-attention RMSNorm (``marlin::rms_norm(residual=)``)
and sets ``attn_implementation="marlin"``, so with :func:`quantize_model` a whole decoder layer
runs on our kernels (Metal on MPS, the emulated Metal kernels under ``emulator.use()``, pure
torch on CPU/CUDA). Each replacement computes what the transformers module computes
(ops/layer.py), so greedy tokens do not change.

RoPE and the fused add are swapped by giving the attention and decoder-layer modules a subclass
of their own class whose ``forward`` calls the ops (same parameters, same state_dict keys,
``isinstance`` still holds), for the architectures whose forward we copy: Llama, Mistral, Qwen2
and Qwen3 (q_norm/k_norm over the head dim, then RoPE). The decoder layer's last add
(``residual + mlp``) stays a torch add: fusing it with the next layer's input norm would change
the model's layer loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import ops
from .quantize import replace_module

log = logging.getLogger("metal_marlin_torch")

# transformers' hidden_act names of the gated activations we have kernels for
_GATED_ACTS = {"silu": ops.silu_mul, "swish": ops.silu_mul, "gelu_pytorch_tanh": ops.gelu_mul}


class MarlinRMSNorm(nn.Module):
    """``LlamaRMSNorm`` through ``marlin::rms_norm`` (same weight parameter, same eps)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MarlinGatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the activation and product in one
    ``marlin::silu_mul`` / ``gelu_mul`` launch; the projections are the original modules
    (``MarlinLinear`` after :func:`quantize_model`)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, hidden_act: str) -> None:
        super().__init__()
        if hidden_act not in _GATED_ACTS:
            raise ValueError(f"MarlinGatedMLP: hidden_act must be one of {sorted(_GATED_ACTS)}, got {hidden_act!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.hidden_act = hidden_act
        self._act_mul = _GATED_ACTS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._act_mul(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"hidden_act={self.hidden_act!r}"


# The decoder-layer and attention classes whose forward the patched forwards below reproduce
# (transformers 5.x: LlamaDecoderLayer.forward; LlamaAttention / MistralAttention / Qwen2Attention
# / Qwen3Attention.forward, Qwen3's with q_norm/k_norm before RoPE).
_DECODER_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
# rope types whose inv_freq and attention scaling are fixed at init (dynamic/longrope change them
# with the sequence length; their models keep transformers' RoPE)
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def _decoder_layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = False,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           **kwargs: Any) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` with ``residual + attention`` and the post-attention
    RMSNorm in one ``marlin::rms_norm(residual=)`` launch (which returns both)."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    hidden_states, residual = ops.rms_norm(hidden_states, norm.weight, norm.variance_epsilon, residual=residual)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


_warned_positions = False


def _attention_forward(self, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, cache: Any = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LlamaAttention.forward`` (Qwen3: with q_norm/k_norm) with q and k rotated by one
    ``marlin::rope`` launch at the layer's ``position_ids`` (what the decoder layer passes on)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415 (optional dependency)

    global _warned_positions
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over the head dim, before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        rotary = self._marlin_rotary[0]
        q, k = ops.rope(q, k, position_ids, rotary.inv_freq, float(rotary.attention_scaling))
    else:  # called without positions (not from the decoder layer): transformers' cos/sin
        if not _warned_positions:
            log.info("metal_marlin_torch: patched attention called without position_ids; RoPE from cos/sin in torch")
            _warned_positions = True
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
    if interface is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: PLC0415

        interface = eager_attention_forward
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    dropout = 0.0 if not self.training else self.attention_dropout
    out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                             sliding_window=sliding_window, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap_forward(module: nn.Module, forward: Any, kind: str) -> None:
    """Give ``module`` a subclass of its class (cached per class) whose forward is ``forward``."""
    cls = type(module)
    if cls.__name__.startswith("Marlin"):
        return
    sub = _SUBCLASSES.get((cls, kind))
    if sub is None:
        sub = type(f"Marlin{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _SUBCLASSES[(cls, kind)] = sub
    module.__class__ = sub


def _find_rotary(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq") \
                and hasattr(m, "attention_scaling") and getattr(m, "rope_type", "default") in _STATIC_ROPE:
            return m
    return None


def patch_layers(model: nn.Module, *, norms: bool = True, mlp: bool = True, attention: bool = True,
                 rope: bool = True, residual_norm: bool = True) -> dict[str, int]:
    """Swap ``model``'s RMSNorms (``norms``), gated MLPs (``mlp``), attention (``attention``:
    ``attn_implementation="marlin"``, io/attention.py), RoPE (``rope``: q and k in one
    ``marlin::rope`` launch) and the decoder layer's residual add + post-attention RMSNorm
    (``residual_norm``) for the marlin ops, in place. Returns how many modules of each kind were
    swapped. A module that does not have the expected parts (``weight`` + ``variance_epsilon``;
    ``gate_proj``/``up_proj``/``down_proj`` and a supported ``config.hidden_act``; a Llama,
    Mistral, Qwen2 or Qwen3 attention/decoder layer; a rotary embedding of a static rope type) is
    left as it is, and the count says so."""
    config = getattr(model, "config", None)
    hidden_act = getattr(config, "hidden_act", None)
    counts = {"norms": 0, "mlp": 0, "attention": 0, "rope": 0, "residual_norm": 0}
    rotary = _find_rotary(model) if rope else None
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        if norms and cls.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
                and isinstance(getattr(module, "weight", None), nn.Parameter):
            replace_module(model, name, MarlinRMSNorm(module.weight, module.variance_epsilon))
            counts["norms"] += 1
        elif mlp and cls.endswith("MLP") and hidden_act in _GATED_ACTS \
                and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            replace_module(model, name, MarlinGatedMLP(module.gate_proj, module.up_proj, module.down_proj, hidden_act))
            counts["mlp"] += 1
        elif rotary is not None and cls in _ATTENTIONS:
            module._marlin_rotary = (rotary,)  # a tuple: not registered as a submodule
            _swap_forward(module, _attention_forward, "attention")
            counts["rope"] += 1
        if residual_norm and cls in _DECODER_LAYERS \
                and hasattr(getattr(module, "post_attention_layernorm", None), "variance_epsilon"):
            _swap_forward(module, _decoder_layer_forward, "decoder")
            counts["residual_norm"] += 1
    if attention:
        from ..io.attention import NAME, register_attention  # noqa: PLC0415

        register_attention()
        model.set_attn_implementation(NAME)
        counts["attention"] = sum(1 for m in model.modules() if type(m).__name__.endswith("Attention"))
    log.info("metal_marlin_torch: patch_layers swapped %s", counts)
    return counts
