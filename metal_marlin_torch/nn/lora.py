"""LoRA adapters on quantized layers through peft (QLoRA-style fine-tuning).

peft wraps the layers it targets in a LoRA layer chosen by a list of dispatchers; quantized
layer types it knows (bitsandbytes, HQQ, torchao, ...) have their own LoRA class there, and
other types are added through peft's documented extension point for custom layers,
``LoraConfig._register_custom_module({LayerType: LoraLayerType})``. :func:`register` adds
``MarlinLinear -> MarlinLoraLinear`` to every ``LoraConfig`` created afterwards (including the
one ``PeftModel.from_pretrained`` reads from ``adapter_config.json``), so the usual calls work
unchanged::

    from peft import LoraConfig, get_peft_model
    model = get_peft_model(quantized_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    model.save_pretrained("adapter")               # peft's own files
    merged = model.merge_and_unload()              # merged layers requantized to their format

``import metal_marlin_torch`` calls :func:`register` as soon as ``peft`` is imported (peft is
optional and slow to import, so it is never imported for you).

The frozen base runs ``marlin::gemm`` (differentiable with respect to its input); only the
adapter's ``lora_A``/``lora_B`` train. Merging adds ``scaling * B @ A`` to the dequantized
weight and quantizes the sum again with the layer's own format, group and rotation (round to
nearest), or keeps it dense (``nn.Linear``) inside :func:`merge_dense`; either way the error
of the merge is measured per layer and kept in :data:`MERGE_REPORT` (logged at INFO).
DoRA (``LoraConfig(use_dora=True)``) works too: its column norm ``||W + scaling * B A||`` is
computed from the dequantized base weight at every step (as peft does for bitsandbytes and HQQ
bases), and merging scales the merged weight by ``m / ||W + scaling * B A||`` before
requantizing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .. import formats as F
from .linear import MarlinLinear

log = logging.getLogger("metal_marlin_torch")


@dataclass
class MergeError:
    """How much a merge changed a layer beyond the adapter's own update.

    Attributes:
        layer: ``repr`` of the merged layer's format (``int4/g128``) or ``dense``.
        delta_norm: ``||scaling * B @ A||_F``, the update the adapter asks for.
        error_norm: ``||W_merged - (W + delta)||_F`` after requantization (0 when dense).
        relative: ``error_norm / ||W + delta||_F``.
    """

    layer: str
    delta_norm: float
    error_norm: float
    relative: float


# id of the last merged layer's LoRA wrapper -> its MergeError; cleared by merge_and_unload()
MERGE_REPORT: dict[str, MergeError] = {}
_DENSE = {"on": False}


@contextlib.contextmanager
def merge_dense() -> Iterator[None]:
    """Inside this block, merging an adapter into a :class:`MarlinLinear` gives a dense
    ``nn.Linear`` holding ``W + delta`` exactly (instead of requantizing)."""
    old = _DENSE["on"]
    _DENSE["on"] = True
    try:
        yield
    finally:
        _DENSE["on"] = old


def _dense_weight(layer: MarlinLinear) -> torch.Tensor:
    """``W [N, K]`` in float32 in the layer's input space (a rotated layer's rotation undone)."""
    w = layer.dequantized_weight(torch.float32)
    if layer.rotation_block:
        from ..quant.hadamard import unrotate  # noqa: PLC0415

        w = unrotate(w, layer.rotation_block, layer.rotation_signs)
    return w


def requantize(layer: MarlinLinear, w: torch.Tensor) -> MarlinLinear:
    """A new :class:`MarlinLinear` like ``layer`` (format, group, dtypes, rotation, bias)
    holding ``w [N, K]`` (input space) quantized by round to nearest with fresh group
    parameters.

    (Tried and measured on pylm-s int4 after 8 LoRA steps: re-encoding on the layer's old grid
    wherever that reconstructs ``w`` better per group keeps more codes but drops the update
    coherently, and the merged logits moved 40% further from the adapter model's.)"""
    target = w.float()
    if layer.rotation_block:
        from ..quant.hadamard import rotate  # noqa: PLC0415

        target = rotate(target, layer.rotation_block, layer.rotation_signs)
    qt = F.quantize(target, layer.format, layer.group_size, layer.dtype_config.torch_scales)
    new = MarlinLinear(layer.in_features, layer.out_features, layer.bias is not None, layer.format, layer.group_size,
                       layer.dtype_config, layer.rotation_block, device=layer.weight.device,
                       bias_dtype=None if layer.bias is None else layer.bias.dtype)
    new.load_quantized(qt, bias=layer.bias, rotation_block=layer.rotation_block,
                       rotation_signs=layer.rotation_signs)
    return new


def _dense_linear(layer: MarlinLinear, w: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear`` holding ``w`` (and the layer's bias) in ``dtype`` (the adapter's: the
    dtype the rest of the model computes in)."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=w.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


class MarlinLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer around a frozen :class:`MarlinLinear` (peft's conventions for
    quantized bases: ``base_layer`` computes, ``lora_A``/``lora_B`` add ``scaling * B A x``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ValueError("MarlinLoraLinear: lora_bias is not supported; set LoraConfig(lora_bias=False)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._dora_factor: dict[str, torch.Tensor] = {}
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        return None  # DoRA is done here (peft's DoRA variant would read the packed codes as weights)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        """peft's LoRA setup, plus DoRA's magnitude vector when ``config.use_dora``."""
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.use_dora[adapter_name] = bool(config.use_dora)
        if config.use_dora:
            if "lora_magnitude_vector" not in self.adapter_layer_names:
                self.adapter_layer_names = (*self.adapter_layer_names, "lora_magnitude_vector")
            with torch.no_grad():
                norm = self._dora_norm(adapter_name)
            mag = nn.Module()
            mag.weight = nn.Parameter(norm.to(self.lora_A[adapter_name].weight.dtype))
            self.lora_magnitude_vector[adapter_name] = mag
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _dora_norm(self, adapter: str) -> torch.Tensor:
        """``||W + scaling * B A||`` per output row, in float32, W dequantized (as peft's DoRA
        does for bitsandbytes and HQQ bases: the norm needs the dense weight)."""
        return (self._current_weight() + self.get_delta_weight(adapter)).norm(dim=1)

    def _dora_update(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output: ``m / ||W + s B A|| * (W x + s B A x)``, returned as the part to add
        to ``result`` (= ``W x + bias``). The norm is detached, as in the DoRA paper (sec. 4.3)
        and peft: gradients reach ``m``, ``A`` and ``B`` through the rest."""
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        w = self._current_weight()
        delta = (lora_b.weight.float() @ lora_a.weight.float()) * self.scaling[adapter]
        norm = (w + delta).norm(dim=1).detach()
        factor = self.lora_magnitude_vector[adapter].weight.float() / norm  # [N]
        base = self.get_base_layer()
        plain = result if base.bias is None else result - base.bias.to(result.dtype)
        h = self._cast_input_dtype(x, lora_a.weight.dtype)
        lora = lora_b(lora_a(self.lora_dropout[adapter](h))).float() * self.scaling[adapter]
        # with dropout on, peft's DoRA applies it to the LoRA path only; (factor - 1) W x uses x
        return ((factor - 1) * plain.float() + factor * lora).to(result.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in float32, ``[out_features, in_features]``."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def _replace_base(self, w: torch.Tensor, delta: torch.Tensor, adapter: str) -> None:
        base = self.get_base_layer()
        if _DENSE["on"] or not isinstance(base, MarlinLinear):
            dtype = self.lora_A[adapter].weight.dtype
            new: nn.Module = _dense_linear(base, w, dtype) if isinstance(base, MarlinLinear) else base
            if not isinstance(base, MarlinLinear):  # already dense (an earlier dense merge)
                with torch.no_grad():
                    base.weight.copy_(w)
            err, label = 0.0, "dense"
        else:
            new = requantize(base, w)
            err = float((_dense_weight(new) - w).norm())
            label = f"{base.format}/g{base.group_size}"
        report = MergeError(label, float(delta.norm()), err, err / max(float(w.norm()), 1e-30))
        MERGE_REPORT[f"{id(self):x}:{adapter}"] = report
        log.info("metal_marlin_torch: merged LoRA adapter %r into %s: |delta| %.4g, requantization error %.4g "
                 "(%.3g of the weight)", adapter, label, report.delta_norm, report.error_norm, report.relative)
        self.base_layer = new

    def _current_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return _dense_weight(base) if isinstance(base, MarlinLinear) else base.weight.detach().float()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters to the base weight and requantize it (dense inside :func:`merge_dense`)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            delta = self.get_delta_weight(adapter)
            w = self._current_weight() + delta
            if self.use_dora.get(adapter, False):
                # W' = m / ||W + dW|| * (W + dW); the factor is kept to undo it on unmerge
                factor = (self.lora_magnitude_vector[adapter].weight.detach().float() / w.norm(dim=1))[:, None]
                self._dora_factor[adapter] = factor
                w = factor * w
                delta = w - self._current_weight()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"merge: NaN or Inf in the merged weights; the adapter {adapter!r} seems broken")
            self._replace_base(w, delta, adapter)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again (requantized: a second rounding, not the original codes)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                delta = self.get_delta_weight(adapter)
                w = self._current_weight()
                factor = self._dora_factor.pop(adapter, None)
                new = (w / factor if factor is not None else w) - delta
                self._replace_base(new, new - w, adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters if adapter_names is None else sorted(set(adapter_names)):
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            if self.use_dora.get(adapter, False):
                update = self._dora_update(adapter, x, result)
            else:
                h = self._cast_input_dtype(x, lora_a.weight.dtype)
                update = lora_b(lora_a(self.lora_dropout[adapter](h))) * self.scaling[adapter]
            if adapter_names is not None:  # mixed batch: each row uses its own adapter
                rows = torch.tensor([n == adapter for n in adapter_names], device=x.device)
                update = update * rows.view(-1, *([1] * (update.dim() - 1))).to(update.dtype)
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register() -> None:
    """Make every ``peft.LoraConfig`` map :class:`MarlinLinear` to :class:`MarlinLoraLinear` and
    :class:`~.experts.MarlinExperts` to :class:`~.lora_experts.MarlinLoraExperts` (through
    ``LoraConfig._register_custom_module``, peft's extension point); idempotent."""
    if getattr(LoraConfig, "_metal_marlin_registered", False):
        return
    original = LoraConfig.__post_init__

    from .experts import MarlinExperts  # noqa: PLC0415
    from .lora_experts import MarlinLoraExperts  # noqa: PLC0415

    def __post_init__(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._register_custom_module({MarlinLinear: MarlinLoraLinear, MarlinExperts: MarlinLoraExperts})

    LoraConfig.__post_init__ = __post_init__
    LoraConfig._metal_marlin_registered = True


def merge_and_unload(model: nn.Module, dense: bool = False) -> tuple[nn.Module, dict[str, MergeError]]:
    """``model.merge_and_unload()`` of a peft model, and the merge error of every merged layer
    (by module name). ``dense``: merged layers become ``nn.Linear`` (exact) instead of being
    requantized."""
    from .lora_experts import MarlinLoraExperts  # noqa: PLC0415

    wrappers = {id(m): n.removeprefix("base_model.model.") for n, m in model.named_modules()
                if isinstance(m, (MarlinLoraLinear, MarlinLoraExperts))}
    MERGE_REPORT.clear()
    with merge_dense() if dense else contextlib.nullcontext():
        merged = model.merge_and_unload()
    report = {}
    for key, err in MERGE_REPORT.items():
        wid, _, adapter = key.partition(":")
        adapter, _, proj = adapter.partition(":")  # experts: one entry per projection
        name = wrappers.get(int(wid, 16), key) + (f".{proj}" if proj else "")
        report[name if adapter == "default" else f"{name}:{adapter}"] = err
    return merged, report
