"""The E2M1 (FP4) family: ``fp4`` (float group scale), ``mxfp4`` (OCP MX, E8M0 scale per 32)
and ``nvfp4`` (E4M3 scale per 16 plus an fp32 tensor scale).

An E2M1 code is 4 bits: bit 3 the sign, bits 0-2 index the magnitudes below. The magnitudes are
not evenly spaced, so encoding is a nearest-value search rather than a rounding.
"""

from __future__ import annotations

import torch

from .base import GroupParams, WeightFormat, round_scale, safe_divisor
from .tables import device_table

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
# All 16 codes in code order: 0..7 positive, 8..15 negative (8 is -0, decoded as 0).
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)
_E2M1_DECODED = (0.0,) + E2M1_VALUES[1:8] + (0.0,) + E2M1_VALUES[9:]  # code 8 (-0) decodes to +0
# Midpoints between neighbouring magnitudes (exact in float32): the nearest-value thresholds.
_E2M1_MIDS = tuple((a + b) / 2 for a, b in zip(E2M1_MAGNITUDES[:-1], E2M1_MAGNITUDES[1:], strict=True))


# Nearest magnitude by a table instead of a search. Every midpoint is a multiple of 1/4, so
# c = ceil(4|x|) (exact: a power-of-two multiply) tells which quarter interval ((c-1)/4, c/4]
# |x| lies in, and no midpoint falls inside one: _E2M1_QUARTER_IDX[c] = the number of midpoints
# below it, i.e. bucketize(|x|, mids, right=False) (ties toward zero). c >= 21 means |x| > 5.
# Measured on the 2-core test machine, one thread, 393k values: 3.5 ms against 11 ms for
# bucketize (a binary search per element); it runs for every scale-search candidate.
_E2M1_QUARTER_IDX = tuple(sum(m <= (c - 1) / 4 for m in _E2M1_MIDS) if c else 0 for c in range(22))
_E2M1_QUARTER_MAG = tuple(E2M1_MAGNITUDES[i] for i in _E2M1_QUARTER_IDX)


def _e2m1_quarters(x: torch.Tensor) -> torch.Tensor:
    """``ceil(4 |x|)`` clamped to 21, as int64 indices into the quarter tables."""
    return torch.ceil(x.abs() * 4).clamp_(max=21).long()


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of float32 ``x`` (already divided by the scale); saturates at +-6."""
    idx = device_table(_E2M1_QUARTER_IDX, torch.int64, x.device)[_e2m1_quarters(x)]
    negative = (x < 0) & (idx > 0)  # zero always gets code 0, never -0
    return idx | (negative.to(torch.int64) << 3)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """``e2m1_decode(e2m1_encode(x))`` without the codes (the scale search and GPTQ's column
    loop need only the values): the nearest E2M1 value, except that a negative ``x`` rounded to
    magnitude 0 gives -0.0 instead of +0.0 (equal in every difference and product)."""
    mag = device_table(_E2M1_QUARTER_MAG, torch.float32, x.device)[_e2m1_quarters(x)]
    return torch.copysign(mag, x)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 ``codes``."""
    return device_table(_E2M1_DECODED, torch.float32, codes.device)[codes.long()]


class _E2M1Format(WeightFormat):
    bits = 4

    def _effective_scale(self, params: GroupParams) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, values: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return e2m1_encode(values / safe_divisor(self._effective_scale(params)).unsqueeze(-1))

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return e2m1_decode(codes) * self._effective_scale(params).unsqueeze(-1)


class FP4(_E2M1Format):
    name = "fp4"
    description = "FP4 E2M1 with an absmax/6 scale per group"

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        return GroupParams(round_scale(groups.abs().amax(-1) / E2M1_MAX, scale_dtype))

    def _effective_scale(self, params: GroupParams) -> torch.Tensor:
        return params.scales.float()


class MXFP4(_E2M1Format):
    name = "mxfp4"
    group_sizes = (32,)
    fixed_scale_dtype = torch.uint8
    description = "OCP MXFP4: E2M1 with one E8M0 power-of-two scale per 32 values"

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        amax = groups.abs().amax(-1)
        # OCP MX: shared exponent = floor(log2(amax)) - emax(E2M1) where emax = 2 (6 = 1.5 * 2^2)
        exp = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - 2
        e = torch.where(amax > 0, (exp + 127).clamp(0, 254), torch.zeros_like(exp))
        return GroupParams(e.to(torch.uint8))

    def _effective_scale(self, params: GroupParams) -> torch.Tensor:
        return torch.exp2(params.scales.float() - 127.0)


class NVFP4(_E2M1Format):
    name = "nvfp4"
    group_sizes = (16,)
    fixed_scale_dtype = torch.float8_e4m3fn
    has_global_scale = True
    description = "NVFP4: E2M1 with an E4M3 scale per 16 values and an fp32 tensor scale"

    E4M3_MAX = 448.0

    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        tensor_amax = groups.abs().amax()
        g = tensor_amax / (E2M1_MAX * self.E4M3_MAX)
        g = torch.where(g > 0, g, torch.ones_like(g)).reshape(1).float()
        block = groups.abs().amax(-1) / (E2M1_MAX * g)
        scales = block.clamp(max=self.E4M3_MAX).to(torch.float8_e4m3fn)
        return GroupParams(scales, None, g)

    def _effective_scale(self, params: GroupParams) -> torch.Tensor:
        return params.scales.float() * params.global_scale.float()
