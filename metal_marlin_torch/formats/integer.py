"""Asymmetric affine integer formats ``int8``, ``int6``, ``int5``, ``int4``, ``int3``, ``int2``: per group
``w = scale * q + bias`` with unsigned ``q`` in ``[0, 2^bits - 1]`` (the MLX convention)."""

from __future__ import annotations

import torch

from .base import STANDARD_GROUPS, GroupParams, WeightFormat, round_scale, safe_divisor

# The integer formats also take groups of 16 (GGUF's Q2_K/Q3_K/Q6_K sub-blocks import exactly
# as int2/int3/int8 g16). Every _Affine subclass inherits it, so a new intN gets g16 too.
AFFINE_GROUPS: tuple[int, ...] = (16, *STANDARD_GROUPS)


class _Affine(WeightFormat):
    has_biases = True
    group_sizes = AFFINE_GROUPS

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        lo = groups.amin(-1)
        hi = groups.amax(-1)
        scale = round_scale((hi - lo) / self.levels, scale_dtype)
        bias = round_scale(lo, scale_dtype, what="bias")
        return GroupParams(scale, bias)

    def encode(self, values: torch.Tensor, params: GroupParams) -> torch.Tensor:
        q = torch.round((values - params.biases.float().unsqueeze(-1))
                        / safe_divisor(params.scales).unsqueeze(-1))
        q = q.clamp(0, self.levels)
        return torch.where(params.scales.unsqueeze(-1) == 0, torch.zeros_like(q), q).to(torch.int64)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return (codes.float() * params.scales.float().unsqueeze(-1)
                + params.biases.float().unsqueeze(-1))


def _make(bits: int) -> type[_Affine]:
    return type(
        f"INT{bits}", (_Affine,),
        {"name": f"int{bits}", "bits": bits,
         "description": f"INT{bits}: asymmetric affine, scale and bias per group"},
    )


INT8 = _make(8)
INT6 = _make(6)  # MLX's 6-bit: 32 codes in 6 words (docs/FORMAT.md §2)
INT5 = _make(5)  # MLX's 5-bit: 32 codes in 5 words
INT4 = _make(4)
INT3 = _make(3)
INT2 = _make(2)
