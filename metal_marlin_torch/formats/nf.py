"""NormalFloat codebooks: ``nf4`` (the 16 QLoRA / bitsandbytes values) and ``nf3`` (8 values
built the same way). Codes index the codebook; the group scale is the absmax."""

from __future__ import annotations

import torch

from .base import GroupParams, WeightFormat, round_scale, safe_divisor
from .codebook import nearest_index
from .tables import device_table

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# docs/FORMAT.md §4: QLoRA's construction with 3 bits, offset (1 - 1/14 + 1 - 1/16) / 2.
NF3_VALUES = (
    -1.0, -0.5350227355957031, -0.2469313889741897, 0.0,
    0.18333752453327179, 0.38199394941329956, 0.6229856610298157, 1.0,
)


class _NormalFloat(WeightFormat):
    values: tuple[float, ...] = ()

    def _table(self, device: torch.device) -> torch.Tensor:
        return device_table(self.values, torch.float32, device)

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        return GroupParams(round_scale(groups.abs().amax(-1), scale_dtype))

    def encode(self, values: torch.Tensor, params: GroupParams) -> torch.Tensor:
        x = values / safe_divisor(params.scales).unsqueeze(-1)
        return nearest_index(x, self._table(values.device))

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self._table(codes.device)[codes.long()] * params.scales.float().unsqueeze(-1)


class NF4(_NormalFloat):
    name = "nf4"
    bits = 4
    values = NF4_VALUES
    description = "NF4: 16 normal-quantile levels (QLoRA) with an absmax scale per group"


class NF3(_NormalFloat):
    name = "nf3"
    bits = 3
    values = NF3_VALUES
    description = "NF3: 8 normal-quantile levels with an absmax scale per group"
