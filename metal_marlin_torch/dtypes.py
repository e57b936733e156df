"""`DTypeConfig`: the one place that decides weight, activation, scale and KV-cache dtypes.

Every function that takes ``dtype_config=None`` uses the process-wide default
(:func:`get_default_config`), so a program changes precision in one call
(:func:`set_default_config`) instead of chasing hard-coded ``torch.float16`` literals.
Accumulation is always fp32: long dot products in fp16 overflow and lose small terms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

WeightDType = Literal["fp16", "bf16"]
ActivationDType = Literal["fp16", "bf16"]
AccumulationDType = Literal["fp32"]
ScaleDType = Literal["fp16", "fp32"]
KVCacheDType = Literal["fp16", "bf16", "fp8"]

_ALLOWED: dict[str, tuple[str, ...]] = {
    "weights": ("fp16", "bf16"),
    "activations": ("fp16", "bf16"),
    "accumulation": ("fp32",),
    "scales": ("fp16", "fp32"),
    "kv_cache": ("fp16", "bf16", "fp8"),
}

_TORCH = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}
# numpy has no bfloat16 or fp8: they are stored as their raw bit patterns (uint16 / uint8).
_NUMPY = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "fp8": np.uint8}
_METAL = {"fp16": "half", "bf16": "bfloat", "fp32": "float", "fp8": "uchar"}


@dataclass(frozen=True)
class DTypeConfig:
    """Precision choices for one model.

    Attributes:
        weights: dtype weights are dequantized to inside the kernels (``fp16``/``bf16``).
        activations: dtype of layer inputs and outputs (``fp16``/``bf16``).
        accumulation: GEMM accumulator; always ``fp32``.
        scales: storage dtype of per-group quantization scales (``fp16``/``fp32``).
        kv_cache: KV-cache storage (``fp16``/``bf16``/``fp8``, FP8 E4M3 with per-head scales).
    """

    weights: WeightDType = "bf16"
    activations: ActivationDType = "bf16"
    accumulation: AccumulationDType = "fp32"
    scales: ScaleDType = "fp16"
    kv_cache: KVCacheDType = "bf16"

    def __post_init__(self) -> None:
        for field, allowed in _ALLOWED.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"DTypeConfig.{field} must be one of {allowed}, got {value!r}"
                )

    # torch dtypes ---------------------------------------------------------------------------
    @property
    def torch_weights(self) -> torch.dtype:
        return _TORCH[self.weights]

    @property
    def torch_activations(self) -> torch.dtype:
        return _TORCH[self.activations]

    @property
    def torch_accumulation(self) -> torch.dtype:
        return _TORCH[self.accumulation]

    @property
    def torch_scales(self) -> torch.dtype:
        return _TORCH[self.scales]

    @property
    def torch_kv_cache(self) -> torch.dtype:
        return _TORCH[self.kv_cache]

    # numpy storage dtypes -------------------------------------------------------------------
    @property
    def numpy_weights(self) -> type:
        return _NUMPY[self.weights]

    @property
    def numpy_activations(self) -> type:
        return _NUMPY[self.activations]

    @property
    def numpy_scales(self) -> type:
        return _NUMPY[self.scales]

    @property
    def numpy_kv_cache(self) -> type:
        return _NUMPY[self.kv_cache]

    # Metal type names -----------------------------------------------------------------------
    @property
    def metal_weights(self) -> str:
        return _METAL[self.weights]

    @property
    def metal_activations(self) -> str:
        return _METAL[self.activations]

    @property
    def metal_accumulation(self) -> str:
        return _METAL[self.accumulation]

    @property
    def metal_scales(self) -> str:
        return _METAL[self.scales]

    @property
    def metal_kv_cache(self) -> str:
        return _METAL[self.kv_cache]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DTypeConfig:
        unknown = set(data) - set(_ALLOWED)
        if unknown:
            raise ValueError(
                f"DTypeConfig.from_dict: unknown fields {sorted(unknown)}; "
                f"expected a subset of {sorted(_ALLOWED)}"
            )
        return cls(**data)


def fp16_config() -> DTypeConfig:
    """Everything fp16: maximum compatibility (older GPUs without bf16)."""
    return DTypeConfig("fp16", "fp16", "fp32", "fp16", "fp16")


def bf16_config() -> DTypeConfig:
    """bf16 weights/activations/KV, fp16 scales: the default, best dynamic range."""
    return DTypeConfig("bf16", "bf16", "fp32", "fp16", "bf16")


def memory_efficient_config() -> DTypeConfig:
    """fp16 everywhere and an FP8 KV cache: long contexts in little memory."""
    return DTypeConfig("fp16", "fp16", "fp32", "fp16", "fp8")


def high_precision_config() -> DTypeConfig:
    """bf16 with fp32 scales: for evaluation where every bit of accuracy counts."""
    return DTypeConfig("bf16", "bf16", "fp32", "fp32", "bf16")


_default: DTypeConfig = DTypeConfig()


def get_default_config() -> DTypeConfig:
    """The process-wide default used wherever ``dtype_config=None`` is passed."""
    return _default


def set_default_config(config: DTypeConfig) -> None:
    """Replace the process-wide default."""
    global _default
    if not isinstance(config, DTypeConfig):
        raise TypeError(f"set_default_config: config must be a DTypeConfig, got {type(config)}")
    _default = config


def reset_default_config() -> None:
    """Restore the factory default (:func:`bf16_config`)."""
    global _default
    _default = DTypeConfig()


def resolve(config: DTypeConfig | None) -> DTypeConfig:
    """``config`` itself, or the process-wide default when it is None."""
    if config is None:
        return _default
    if not isinstance(config, DTypeConfig):
        raise TypeError(f"dtype_config must be a DTypeConfig or None, got {type(config)}")
    return config
