"""What every weight format shares: group handling, scale rounding, and the container type.

A format is a :class:`WeightFormat` subclass that knows three things about groups of weights
viewed as ``[N, n_groups, G]``: how to choose a group's parameters (:meth:`group_params`),
how to map values to codes given those parameters (:meth:`encode`), and how to map codes back
(:meth:`decode`). Round-to-nearest quantization, packing, GPTQ's column-by-column quantization
and every backend's oracle are built from those three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, packed_words, unpack

PER_CHANNEL = -1
# WeightFormat.quantize works through a large weight in blocks of about this many elements
QUANTIZE_BLOCK_ELEMENTS = 1 << 17
STANDARD_GROUPS: tuple[int, ...] = (32, 64, 128, 256, PER_CHANNEL)


@dataclass
class GroupParams:
    """Per-group parameters of one weight matrix.

    Attributes:
        scales: ``[N, n_groups]`` in the storage dtype (float, ``uint8`` E8M0 for mxfp4,
            ``float8_e4m3fn`` for nvfp4).
        biases: ``[N, n_groups]`` (affine integer formats) or None.
        global_scale: ``float32 [1]`` (nvfp4) or None.
    """

    scales: torch.Tensor
    biases: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


@dataclass
class QuantizedTensor:
    """A packed weight ``W[N, K]`` in the canonical layout of docs/FORMAT.md.

    Attributes:
        weight: ``uint32 [N, ceil(K*bits/32)]`` packed codes.
        scales: ``[N, K/G]`` group scales.
        biases: ``[N, K/G]`` (affine integer formats) or None.
        global_scale: ``float32 [1]`` (nvfp4) or None.
        format: format name (a key of ``metal_marlin_torch.formats.FORMATS``).
        group_size: ``G`` as requested (-1 = per-channel).
        shape: ``(N, K)`` of the dequantized weight.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None
    global_scale: torch.Tensor | None
    format: str
    group_size: int
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor together."""
        tensors = (self.weight, self.scales, self.biases, self.global_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def resolve_group_size(group_size: int, k: int) -> int:
    """The group length ``G``: ``group_size`` itself, or ``k`` when it is -1 (per-channel)."""
    return k if group_size == PER_CHANNEL else group_size


def round_scale(values: torch.Tensor, dtype: torch.dtype, what: str = "scale") -> torch.Tensor:
    """Round float32 ``values`` to the scale storage ``dtype``; overflow is an error, not Inf."""
    out = values.to(dtype)
    if not torch.isfinite(out.float()).all():
        worst = float(values.abs().max())
        raise ValueError(
            f"{what} {worst:.6g} overflows the scale dtype {dtype}; use DTypeConfig(scales='fp32')"
        )
    return out


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as float32 with zeros replaced by one (a zero scale means an all-zero group)."""
    s = scale.float()
    return torch.where(s == 0, torch.ones_like(s), s)


class WeightFormat:
    """Base class of the weight formats. Subclasses set the class attributes and three methods."""

    name: str = ""
    bits: int = 0
    group_sizes: tuple[int, ...] = STANDARD_GROUPS
    has_biases: bool = False
    has_global_scale: bool = False
    fixed_scale_dtype: torch.dtype | None = None  # None: the DTypeConfig's scale dtype
    description: str = ""

    # ---- the three format-specific pieces -------------------------------------------------
    def group_params(self, groups: torch.Tensor, scale_dtype: torch.dtype) -> GroupParams:
        """Parameters for float32 ``groups [N, n_groups, G]``."""
        raise NotImplementedError

    def encode(self, values: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Codes (int64) of float32 ``values [N, n_groups, g]`` under ``params`` (broadcast on g)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """float32 values of ``codes [N, n_groups, g]`` under ``params`` (broadcast on g)."""
        raise NotImplementedError

    # ---- shared machinery -------------------------------------------------------------------
    def scale_dtype(self, requested: torch.dtype) -> torch.dtype:
        return self.fixed_scale_dtype or requested

    def check_group_size(self, group_size: int, k: int) -> int:
        """Validate ``group_size`` for a row of ``k`` inputs and return the group length G."""
        if group_size not in self.group_sizes:
            raise ValueError(
                f"format {self.name!r} takes group_size in {self.group_sizes}, got {group_size!r}"
            )
        g = resolve_group_size(group_size, k)
        if k % g != 0:
            raise ValueError(
                f"format {self.name!r}: in_features K={k} is not divisible by group_size={g}"
            )
        return g

    def params_from_tensors(
        self,
        scales: torch.Tensor,
        biases: torch.Tensor | None,
        global_scale: torch.Tensor | None,
    ) -> GroupParams:
        if self.has_biases and biases is None:
            raise ValueError(f"format {self.name!r} needs biases, got None")
        if self.has_global_scale and global_scale is None:
            raise ValueError(f"format {self.name!r} needs global_scale, got None")
        return GroupParams(
            scales, biases if self.has_biases else None,
            global_scale if self.has_global_scale else None,
        )

    def quantize(
        self, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16
    ) -> QuantizedTensor:
        """Round-to-nearest quantization of ``w [N, K]`` into the canonical packed layout."""
        if w.dim() != 2:
            raise ValueError(f"quantize: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"quantize: weight must be floating point, got {w.dtype}")
        if not torch.isfinite(w).all():
            raise ValueError("quantize: weight contains NaN or Inf")
        if scale_dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"quantize: scale_dtype must be float16/float32/bfloat16, got {scale_dtype}")
        n, k = w.shape
        g = self.check_group_size(group_size, k)
        # Rows are quantized independently (a format with a tensor-wide global scale excepted), so
        # a large weight goes through in blocks of rows: the float32 upcast, codes and packing
        # temporaries (about 60 bytes per weight) then cost one block, not the whole matrix
        # (pylm-s: a 384 x 1024 layer took 25 MiB of temporaries; benchmarks/quantize_memory.py).
        rows = n if self.has_global_scale else max(1, QUANTIZE_BLOCK_ELEMENTS // k)
        blocks = [self._quantize_rows(w[i:i + rows], g, self.scale_dtype(scale_dtype)) for i in range(0, n, rows)]
        if len(blocks) == 1:
            words, params = blocks[0]
        else:
            words = torch.cat([b[0] for b in blocks])
            params = GroupParams(
                torch.cat([b[1].scales for b in blocks]),
                torch.cat([b[1].biases for b in blocks]) if self.has_biases else None,
            )
        return QuantizedTensor(
            weight=words,
            scales=params.scales,
            biases=params.biases,
            global_scale=params.global_scale,
            format=self.name,
            group_size=group_size,
            shape=(n, k),
        )

    def _quantize_rows(self, w: torch.Tensor, g: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, GroupParams]:
        """Packed words and group parameters of the rows ``w [n, k]`` (group length ``g``)."""
        n, k = w.shape
        groups = w.detach().float().reshape(n, k // g, g)
        params = self.group_params(groups, scale_dtype)
        codes = self.encode(groups, params).reshape(n, k)
        del groups
        return pack(codes, self.bits), params

    def dequantize_packed(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        biases: torch.Tensor | None,
        global_scale: torch.Tensor | None,
        group_size: int,
        k: int,
        dtype: torch.dtype = torch.float32,
        check: bool = True,
    ) -> torch.Tensor:
        """Dequantize the canonical tensors into ``W_hat [N, k]`` of ``dtype``. ``check=False``
        skips :meth:`check_tensors` for callers that ran it already (the gemm ops, per call;
        the MoE ops, once for all experts)."""
        if check:
            self.check_tensors(weight, scales, biases, global_scale, group_size, k)
        n = weight.shape[0]
        g = resolve_group_size(group_size, k)
        codes = unpack(weight, self.bits, k).view(n, k // g, g)
        params = self.params_from_tensors(scales, biases, global_scale)
        return self.decode(codes, params).reshape(n, k).to(dtype)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_packed(
            qt.weight, qt.scales, qt.biases, qt.global_scale, qt.group_size, qt.shape[1], dtype
        )

    def check_tensors(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        biases: torch.Tensor | None,
        global_scale: torch.Tensor | None,
        group_size: int,
        k: int,
    ) -> None:
        """Shapes and dtypes of the canonical tensors for ``K = k``; errors name the tensor."""
        g = self.check_group_size(group_size, k)
        if weight.dim() != 2 or weight.dtype not in (torch.uint32, torch.int32):
            raise ValueError(
                f"weight must be uint32 [N, {packed_words(k, self.bits)}], "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        n = weight.shape[0]
        if weight.shape[1] != packed_words(k, self.bits):
            raise ValueError(
                f"weight: format {self.name!r} with K={k} needs "
                f"{packed_words(k, self.bits)} words per row, got shape {tuple(weight.shape)}"
            )
        expect = (n, k // g)
        if tuple(scales.shape) != expect:
            raise ValueError(f"scales must have shape {expect}, got {tuple(scales.shape)}")
        if self.fixed_scale_dtype is not None and scales.dtype != self.fixed_scale_dtype:
            if not (self.fixed_scale_dtype.is_floating_point and scales.dtype.is_floating_point):
                raise ValueError(
                    f"scales of format {self.name!r} must be {self.fixed_scale_dtype}, got {scales.dtype}"
                )
        elif self.fixed_scale_dtype is None and not scales.dtype.is_floating_point:
            raise ValueError(f"scales must be floating point, got {scales.dtype}")
        if self.has_biases:
            if biases is None or tuple(biases.shape) != expect:
                got = None if biases is None else tuple(biases.shape)
                raise ValueError(f"biases must have shape {expect} for format {self.name!r}, got {got}")
        if self.has_global_scale:
            if global_scale is None or global_scale.numel() != 1:
                got = None if global_scale is None else tuple(global_scale.shape)
                raise ValueError(f"global_scale must be a 1-element tensor for {self.name!r}, got {got}")
