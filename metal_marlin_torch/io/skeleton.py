"""Build a model's skeleton without allocating its weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside this block, every ``nn.Parameter`` a module registers lives on the meta device.

    Buffers stay real: non-persistent buffers (rotary ``inv_freq``, position ids) are computed
    at construction and never stored in checkpoints, so they must not be left on meta.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def hf_skeleton(config_dict: dict) -> nn.Module:
    """A Hugging Face model of the architecture ``config_dict`` names, parameters on meta."""
    import transformers  # noqa: PLC0415  (only needed to rebuild Hugging Face models)

    archs = config_dict.get("architectures") or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(
            "config.json names no transformers architecture; pass model= (a skeleton of the "
            "same architecture)"
        )
    fields = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    hf_config = transformers.AutoConfig.for_model(**fields)
    with empty_parameters(), torch.no_grad():
        return getattr(transformers, archs[0])._from_config(hf_config)
