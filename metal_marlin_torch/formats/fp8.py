"""FP8 weight formats ``fp8_e4m3`` and ``fp8_e5m2``: the code is the float8 byte itself, with
an absmax scale per group (or per channel) that maps the group's absmax onto the largest
finite float8 value."""

from __future__ import annotations

import torch

from .base import GroupParams, WeightFormat, round_scale, safe_divisor


class _FP8(WeightFormat):
    bits = 8
    fp8_dtype: torch.dtype = torch.float8_e4m3fn

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.fp8_dtype).max)

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        return GroupParams(round_scale(groups.abs().amax(-1) / self.max_value, scale_dtype))

    def encode(self, values: torch.Tensor, params: GroupParams) -> torch.Tensor:
        x = (values / safe_divisor(params.scales).unsqueeze(-1)).clamp(-self.max_value, self.max_value)
        code = x.to(self.fp8_dtype).view(torch.uint8).to(torch.int64)
        # -0.0 becomes +0.0 so that zero has one code
        return torch.where(code == 0x80, torch.zeros_like(code), code)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        vals = codes.to(torch.uint8).view(self.fp8_dtype).float()
        return vals * params.scales.float().unsqueeze(-1)


class FP8E4M3(_FP8):
    name = "fp8_e4m3"
    fp8_dtype = torch.float8_e4m3fn
    description = "FP8 E4M3 (max 448) with an absmax scale per group"


class FP8E5M2(_FP8):
    name = "fp8_e5m2"
    fp8_dtype = torch.float8_e5m2
    description = "FP8 E5M2 (max 57344) with an absmax scale per group"
