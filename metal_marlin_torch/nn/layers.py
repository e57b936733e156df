"""Decoder-layer modules on the ``marlin`` ops: :func:`patch_layers` swaps a Llama-family
model's RMSNorms and gated MLP activations for them and sets ``attn_implementation="marlin"``,
so with :func:`quantize_model` a whole decoder layer runs on our kernels (Metal on MPS, the
emulated Metal kernels under ``emulator.use()``, pure torch on CPU/CUDA). Each replacement
computes what the transformers module computes (ops/layer.py), so greedy tokens do not change.

Not swapped (yet): RoPE (transformers applies it inside the attention module's forward, with
a module-level function) and the decoder layer's residual add (the fused ``rms_norm(residual=)``
needs the layer's forward rewritten).
"""

from __future__ import annotations

import logging

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


def patch_layers(model: nn.Module, *, norms: bool = True, mlp: bool = True, attention: bool = True) -> dict[str, int]:
    """Swap ``model``'s RMSNorms (``norms``), gated MLPs (``mlp``) and attention (``attention``:
    ``attn_implementation="marlin"``, io/attention.py) for the marlin ops, in place. Returns how
    many modules of each kind were swapped. A module that does not have the expected parts
    (``weight`` + ``variance_epsilon``; ``gate_proj``/``up_proj``/``down_proj`` and a
    supported ``config.hidden_act``) is left as it is, and the count says so."""
    config = getattr(model, "config", None)
    hidden_act = getattr(config, "hidden_act", None)
    counts = {"norms": 0, "mlp": 0, "attention": 0}
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
    if attention:
        from ..io.attention import NAME, register_attention  # noqa: PLC0415

        register_attention()
        model.set_attn_implementation(NAME)
        counts["attention"] = sum(1 for m in model.modules() if type(m).__name__.endswith("Attention"))
    log.info("metal_marlin_torch: patch_layers swapped %s", counts)
    return counts
