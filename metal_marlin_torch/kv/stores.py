"""Storage of one quantized tensor stream (the keys or the values of one attention layer).

A store holds ``rows`` independent sequences (batch x KV heads folded together) of
``capacity`` positions of ``head_dim`` values. ``write(x, positions)`` quantizes ``x [rows, n,
head_dim]`` into the given positions; ``read(n)`` returns positions ``[0, n)`` dequantized to
the original domain as ``[rows, n, head_dim]`` in the requested dtype. Every position is
quantized on its own (per-position scale or norm), so the order of writes never changes what a
position holds: a token-by-token decode sees exactly the values a one-shot prefill sees.
"""

from __future__ import annotations

import abc

import torch

from ..ops import kv as kv_ref
from . import ops as kv_ops
from .codebook import lloyd_max_codebook

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


class KVStore(abc.ABC):
    """One quantized K or V buffer of ``[rows, capacity, head_dim]``."""

    def __init__(self, rows: int, capacity: int, head_dim: int, device: torch.device) -> None:
        self.rows, self.capacity, self.head_dim, self.device = rows, capacity, head_dim, torch.device(device)

    @abc.abstractmethod
    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Quantize ``x [rows, n, head_dim]`` into ``positions`` (int64 ``[n]``)."""

    @abc.abstractmethod
    def read(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Positions ``[0, n)`` dequantized, original domain, ``[rows, n, head_dim]``."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors (each ``[rows, capacity, ...]``)."""

    @classmethod
    @abc.abstractmethod
    def bytes_per_position(cls, head_dim: int, **options) -> int:
        """Storage bytes per row and position."""

    def _set(self, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            setattr(self, name, t)

    def resize(self, capacity: int, keep: int) -> None:
        """Reallocate to ``capacity`` positions keeping positions ``[0, keep)`` (bytes copied)."""
        new = {}
        for name, t in self.tensors().items():
            fresh = t.new_zeros((t.shape[0], capacity, *t.shape[2:]))
            fresh[:, :keep] = t[:, :keep]
            new[name] = fresh
        self._set(**new)
        self.capacity = capacity

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat rows: ``index`` int64 into dimension 0."""
        self._set(**{name: t.index_select(0, index.to(t.device)) for name, t in self.tensors().items()})
        self.rows = int(index.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class FP8Store(KVStore):
    """FP8 E4M3 values with one float32 scale per (row, position): ``scale = absmax / 448``.

    A per-token scale (rather than one per head fixed at the first update, as transformers'
    ``Fp8QuantizedLayer`` does per tensor) never clips later tokens and needs no calibration;
    it costs 4 bytes per row and position.
    """

    def __init__(self, rows: int, capacity: int, head_dim: int, device: torch.device) -> None:
        super().__init__(rows, capacity, head_dim, device)
        # the E4M3 bytes, kept as uint8 (index_copy_ has no float8 kernel on every device)
        self.codes = torch.zeros((rows, capacity, head_dim), dtype=torch.uint8, device=self.device)
        self.scales = torch.zeros((rows, capacity, 1), dtype=torch.float32, device=self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales}

    @classmethod
    def bytes_per_position(cls, head_dim: int, **options) -> int:
        return head_dim + 4

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., D]`` -> (E4M3 codes as uint8, float32 scales ``[..., 1]``)."""
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (xf / safe).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8), scale

    @staticmethod
    def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (codes.view(FP8_DTYPE).float() * scales).to(dtype)

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        codes, scales = self.quantize(x)
        self.codes.index_copy_(1, positions, codes)
        self.scales.index_copy_(1, positions, scales)

    def read(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(self.codes[:, :n], self.scales[:, :n], dtype)


class TurboQuantStore(KVStore):
    """Hadamard-rotated, per-block-normalized, Lloyd–Max codebook codes (``marlin::kv_*`` ops).

    ``bits`` 4 (nibble-packed), 5, 6 or 8 (a byte per element). The codebook is
    :func:`~metal_marlin_torch.kv.codebook.lloyd_max_codebook` for ``B = min(head_dim, 256)``.
    """

    def __init__(self, rows: int, capacity: int, head_dim: int, device: torch.device, bits: int = 4) -> None:
        kv_ref.check_bits("TurboQuantStore", bits)
        kv_ref.check_head_dim("TurboQuantStore", head_dim)
        super().__init__(rows, capacity, head_dim, device)
        self.bits = bits
        self.codebook = lloyd_max_codebook(bits, kv_ref.block_of(head_dim)).to(self.device)
        self.packed = torch.zeros((rows, capacity, kv_ref.packed_dim(head_dim, bits)), dtype=torch.uint8,
                                  device=self.device)
        self.norms = torch.zeros((rows, capacity, kv_ref.norms_per_pos(head_dim)), dtype=torch.float32,
                                 device=self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "norms": self.norms}

    @classmethod
    def bytes_per_position(cls, head_dim: int, bits: int = 4, **options) -> int:
        return kv_ref.packed_dim(head_dim, bits) + 4 * kv_ref.norms_per_pos(head_dim)

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        kv_ops.kv_quantize(x, positions, self.packed, self.norms, self.codebook, self.bits)

    def read_rotated(self, n: int) -> torch.Tensor:
        return kv_ops.kv_dequantize_seq(self.packed, self.norms, self.codebook, 0, n, self.bits)

    def read(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        y = self.read_rotated(n)
        return torch.ops.marlin.hadamard(y, self.head_dim).to(dtype)


class CastStore(KVStore):
    """Plain storage in a 16-bit float dtype (``DTypeConfig.kv_cache`` = ``fp16``/``bf16``)."""

    def __init__(self, rows: int, capacity: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(rows, capacity, head_dim, device)
        self.values = torch.zeros((rows, capacity, head_dim), dtype=dtype, device=self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    @classmethod
    def bytes_per_position(cls, head_dim: int, dtype: torch.dtype = torch.bfloat16, **options) -> int:
        return head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        self.values.index_copy_(1, positions, x.to(self.values.dtype))

    def read(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.values[:, :n].to(dtype)
