"""Fused projections: q/k/v and gate/up of a quantized decoder layer as one ``MarlinLinear`` each.

At batch 1 a decode step is a chain of small GEMVs whose launch gaps and ramp-up cost as much as
their weight traffic (docs/CUDA.md §7.6): Llama-3-8B's k_proj and v_proj are 4096 x 1024 each.
:func:`fuse_projections` concatenates the output features of layers that read the same input
(``q_proj``, ``k_proj``, ``v_proj`` -> ``qkv_proj``; ``gate_proj``, ``up_proj`` ->
``gate_up_proj``) into one quantized layer, so one kernel reads the whole weight.

It stays a drop-in for the transformers modules without copying their forward: the parent module
(the attention or the MLP) gets a subclass of its own class whose ``forward`` runs the fused
layer on the input and passes the *fused output* to the original ``forward`` in place of the
input; ``q_proj`` / ``k_proj`` / ``v_proj`` (``gate_proj`` / ``up_proj``) become
:class:`OutputSlice` modules that return their columns of it (a view, no copy). The original
forward only ever passes its input to those projections and reads its leading shape, which the
fused output shares, so any version of those forwards works unchanged (transformers' Llama,
Mistral, Qwen2 and Qwen3 attention and MLP, ``patch_layers``' forwards and
:class:`~metal_marlin_torch.nn.MarlinGatedMLP` alike). Only parents whose class (or a base of it)
is named in :data:`FUSABLE_PARENTS` are fused: a forward that used its input for anything else
would be handed the fused output instead.

``state_dict()`` still has the original keys (``q_proj.weight`` ...; a hook splits the fused
layer's canonical tensors by rows, docs/FORMAT.md), and ``load_state_dict`` takes them (a
pre-hook joins them); ``save_quantized`` writes the original layers, so a fused model's
checkpoint loads unfused. :func:`unfuse_projections` restores the original module tree (e.g. for
requantizing).

Measured on an H200 (docs/CUDA.md §7.5-7.6, 16 Llama-3-8B layers): the graph-captured decode
step 2.39 -> 2.01 ms for int4 and 3.62 -> 2.58 ms for nf4; eager ``generate()``, fused and
unfused models timed in the same rounds, 1.08x dense fused against 1.02-1.04x unfused for int4,
fp4 and nf4 (``benchmarks/results/bench_decode_h200_eager.md``). Prefill (the dequantize path)
gains nothing from it.

Layers fuse when they share format, group size, dtype config, input size and whether they have a
layer bias (and its dtype), and have no input rotation or per-tensor global scale (nvfp4): a
rotation or a global scale belongs to one layer. Others are left as they are (the counts say so).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .linear import MarlinLinear

log = logging.getLogger("metal_marlin_torch")

# fused layer name -> the projections it replaces, in output order
GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_TENSORS = ("weight", "scales", "biases", "bias")  # split / joined by rows (output features)
# parent classes whose forward passes its input only to the fused projections (and reads its
# leading shape): checked against every class in the parent's MRO; extend it for another
# architecture whose forward does the same
FUSABLE_PARENTS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                   "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "MarlinGatedMLP"}


class OutputSlice(nn.Module):
    """Stands in for a projection fused into another layer: returns columns
    ``[start, start + out_features)`` of the fused layer's output (which the fused parent's
    forward passes in place of the input)."""

    def __init__(self, fused_name: str, start: int, in_features: int, out_features: int,
                 fused_features: int) -> None:
        super().__init__()
        self.fused_name = fused_name
        self.start = start
        self.in_features = in_features
        self.out_features = out_features
        self.fused_features = fused_features

    def forward(self, fused_out: torch.Tensor) -> torch.Tensor:
        if fused_out.shape[-1] != self.fused_features:
            # called with the layer's input, not the fused output: a forward that does not
            # go through the fused parent's (e.g. one swapped in after fuse_projections)
            raise ValueError(
                f"OutputSlice ({self.fused_name}): expected the fused layer's output, last dim "
                f"{self.fused_features}, got shape {tuple(fused_out.shape)}; run "
                f"fuse_projections after any other forward swap (patch_layers)")
        return fused_out[..., self.start:self.start + self.out_features]

    def extra_repr(self) -> str:
        return (f"columns [{self.start}, {self.start + self.out_features}) of {self.fused_name}, "
                f"in_features={self.in_features}")


def _fusable(layers: list[nn.Module]) -> str:
    """Why ``layers`` cannot be one fused layer ('' when they can)."""
    if not all(type(m) is MarlinLinear for m in layers):
        return "not all MarlinLinear"
    a = layers[0]
    for m in layers[1:]:
        if (m.format, m.group_size, m.in_features, m.dtype_config) != (
                a.format, a.group_size, a.in_features, a.dtype_config):
            return "format, group size, dtype config or in_features differ"
        if (m.bias is None) != (a.bias is None) or (a.bias is not None and m.bias.dtype != a.bias.dtype):
            return "layer biases differ"
        if m.weight.device != a.weight.device:
            return "devices differ"
    if any(m.rotation_block or m.global_scale is not None for m in layers):
        return "input rotation or global scale"
    return ""


def concat_layers(layers: list[MarlinLinear]) -> MarlinLinear:
    """One ``MarlinLinear`` whose output features are ``layers``' in order (the same function
    as running each and concatenating their outputs; bit-exact weights). The new layer is on
    the layers' device, in the CUDA kernels' layout there."""
    why = _fusable(layers)
    if why:
        raise ValueError(f"concat_layers: cannot fuse these layers: {why}")
    a = layers[0]
    parts = [m._canonical_tensors() for m in layers]
    out = MarlinLinear(a.in_features, sum(m.out_features for m in layers), a.bias is not None,
                       a.format, a.group_size, a.dtype_config, device=a.weight.device,
                       bias_dtype=None if a.bias is None else a.bias.dtype)
    out.weight = torch.cat([p["weight"] for p in parts])
    out.scales = torch.cat([p["scales"] for p in parts])
    if a.biases is not None:
        out.biases = torch.cat([p["biases"] for p in parts])
    if a.bias is not None:
        with torch.no_grad():
            out.bias.copy_(torch.cat([m.bias.detach() for m in layers]))
        out.bias.requires_grad_(a.bias.requires_grad)
    del parts
    out.train(a.training)
    out.prepare_kernel_layout()
    return out


def _fused_forward_factory(base: type):
    def forward(self, *args, **kwargs):
        # the fused layer's output goes where the input went; OutputSlice projections read it
        layer = getattr(self, self._marlin_fused_name)
        if args:
            args = (layer(args[0]), *args[1:])
        else:
            key = "hidden_states" if "hidden_states" in kwargs else "x"
            kwargs[key] = layer(kwargs[key])
        return base.forward(self, *args, **kwargs)

    return forward


_SUBCLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _fused_forward_factory(cls), "__module__": __name__,
            "_marlin_fused_base": cls})
        _SUBCLASSES[cls] = sub
    return sub


def _split_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook of a fused parent: the fused layers' tensors back under the original
    projections' keys, split by rows (canonical layout: rows are output features)."""
    for fused, names in GROUPS.items():
        if not isinstance(getattr(module, fused, None), MarlinLinear):
            continue
        sizes = [getattr(module, n).out_features for n in names]
        for t in _TENSORS:
            key = f"{prefix}{fused}.{t}"
            if key not in state_dict:
                continue
            full = state_dict.pop(key)
            for n, part in zip(names, torch.split(full, sizes), strict=True):
                state_dict[f"{prefix}{n}.{t}"] = part.clone()  # own storage: safetensors refuses shared


def _join_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a fused parent: the original projections' tensors joined
    into the fused layer's keys."""
    for fused, names in GROUPS.items():
        if not isinstance(getattr(module, fused, None), MarlinLinear):
            continue
        for t in _TENSORS:
            keys = [f"{prefix}{n}.{t}" for n in names]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{t}"] = torch.cat([state_dict.pop(k) for k in keys])


def fuse_projections(model: nn.Module, *, qkv: bool = True, gate_up: bool = True) -> dict[str, int]:
    """Fuse every module's ``q_proj``/``k_proj``/``v_proj`` (``qkv``) and ``gate_proj``/
    ``up_proj`` (``gate_up``) ``MarlinLinear`` layers into ``qkv_proj`` / ``gate_up_proj``, in
    place (see the module docstring). Returns how many of each were fused and how many groups
    were found but left as they are (``skipped``; the reason is logged; a module fuses one
    group: its forward's input goes to one fused layer). Run it after
    :func:`~metal_marlin_torch.quantize_model` (and after ``patch_layers`` if used)."""
    counts = {"qkv_proj": 0, "gate_up_proj": 0, "skipped": 0}
    wanted = {"qkv_proj": qkv, "gate_up_proj": gate_up}
    for name, module in list(model.named_modules()):
        for fused, names in GROUPS.items():
            if not wanted[fused] or hasattr(module, fused) or not all(
                    isinstance(getattr(module, n, None), nn.Module) for n in names):
                continue
            layers = [getattr(module, n) for n in names]
            why = _fusable(layers)
            if not why and not any(c.__name__ in FUSABLE_PARENTS for c in type(module).__mro__):
                why = f"{type(module).__name__} is not in FUSABLE_PARENTS"
            if not why and hasattr(type(module), "_marlin_fused_base"):
                why = "its module already runs another fused layer on its input"
            if why:
                counts["skipped"] += 1
                log.info("metal_marlin_torch: fuse_projections left %s.%s as they are: %s",
                         name, "/".join(names), why)
                continue
            layer = concat_layers(layers)
            start = 0
            for n, m in zip(names, layers, strict=True):
                setattr(module, n, OutputSlice(fused, start, m.in_features, m.out_features,
                                               layer.out_features))
                start += m.out_features
            del layers
            module.add_module(fused, layer)
            module.__class__ = _fused_class(type(module))
            module._marlin_fused_name = fused
            module._marlin_fuse_hooks = (module._register_state_dict_hook(_split_state),
                                         module.register_load_state_dict_pre_hook(_join_state))
            counts[fused] += 1
    log.info("metal_marlin_torch: fuse_projections %s", counts)
    return counts


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: each fused layer split back into the original projections
    (``MarlinLinear`` layers with the same weights, bit-exact) and each parent back to its own
    class. Returns the number of fused layers split."""
    done = 0
    for _, module in list(model.named_modules()):
        base = getattr(type(module), "_marlin_fused_base", None)
        if base is None:
            continue
        for fused, names in GROUPS.items():
            layer = getattr(module, fused, None)
            if not isinstance(layer, MarlinLinear):
                continue
            t = layer._canonical_tensors()
            slices = [getattr(module, n) for n in names]
            for n, sl in zip(names, slices, strict=True):
                rows = slice(sl.start, sl.start + sl.out_features)
                part = MarlinLinear(layer.in_features, sl.out_features, layer.bias is not None,
                                    layer.format, layer.group_size, layer.dtype_config,
                                    device=layer.weight.device,
                                    bias_dtype=None if layer.bias is None else layer.bias.dtype)
                part.weight = t["weight"][rows].clone()
                part.scales = t["scales"][rows].clone()
                if "biases" in t:
                    part.biases = t["biases"][rows].clone()
                if layer.bias is not None:
                    with torch.no_grad():
                        part.bias.copy_(layer.bias.detach()[rows])
                part.train(layer.training)
                part.prepare_kernel_layout()
                setattr(module, n, part)
            del t
            delattr(module, fused)
            done += 1
        for h in module._marlin_fuse_hooks:
            h.remove()
        del module._marlin_fuse_hooks, module._marlin_fused_name
        module.__class__ = base
    return done
