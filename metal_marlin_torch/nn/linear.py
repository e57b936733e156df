"""`MarlinLinear`: a drop-in ``nn.Linear`` whose weight is stored quantized (docs/FORMAT.md).

The forward pass is one call of ``torch.ops.marlin.gemm`` (fused dequantize-GEMM on MPS, pure
torch on CPU, Triton on CUDA where available), optionally preceded by the layer's input
rotation (a block Hadamard transform, for rotated quantizers such as MR-GPTQ).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig, resolve


class MarlinLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` with ``W`` held in a quantized format.

    Buffers (the checkpoint's tensor names): ``weight`` (uint32 packed codes), ``scales``,
    optional ``biases`` (affine integer formats), ``global_scale`` (nvfp4),
    ``rotation_signs`` (rotated layers); parameter ``bias`` (the layer's own bias, trainable).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "fp4",
        group_size: int | None = None,
        dtype_config: DTypeConfig | None = None,
        rotation_block: int = 0,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fmt = F.get_format(format)
        group_size = F.default_group_size(format) if group_size is None else group_size
        g = fmt.check_group_size(group_size, in_features)
        if rotation_block and (rotation_block & (rotation_block - 1) or in_features % rotation_block):
            raise ValueError(
                f"rotation_block must be a power of two dividing in_features={in_features}, "
                f"got {rotation_block}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.format = format
        self.group_size = group_size
        self.dtype_config = resolve(dtype_config)
        self.rotation_block = rotation_block
        sdt = fmt.scale_dtype(self.dtype_config.torch_scales)
        n_groups = in_features // g
        self.register_buffer("weight", torch.zeros(
            out_features, F.packed_words(in_features, fmt.bits), dtype=torch.uint32, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=sdt, device=device))
        self.register_buffer("biases", torch.zeros(out_features, n_groups, dtype=sdt, device=device)
                             if fmt.has_biases else None)
        self.register_buffer("global_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if fmt.has_global_scale else None)
        self.register_buffer("rotation_signs", None)
        bias_dtype = bias_dtype or self.dtype_config.torch_activations
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None

    @property
    def bits(self) -> int:
        return F.get_format(self.format).bits

    @classmethod
    def like(
        cls,
        linear: nn.Linear,
        format: str = "fp4",
        group_size: int | None = None,
        dtype_config: DTypeConfig | None = None,
        rotation_block: int = 0,
        device: torch.device | str | None = None,
    ) -> MarlinLinear:
        """An empty (zero) quantized layer shaped like ``linear``: its features, a bias if it has
        one, in the bias's own dtype (a float32 bias stays float32, whatever the activations),
        on ``linear``'s device unless ``device`` is given. Every path that replaces an
        ``nn.Linear`` (RTN, GPTQ, loading a checkpoint, the transformers quantizer) builds its
        layer here, so they agree on those choices."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MarlinLinear.like: expected nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, linear.bias is not None, format, group_size,
                   dtype_config, rotation_block, device=linear.weight.device if device is None else device,
                   bias_dtype=None if linear.bias is None else linear.bias.dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str = "fp4",
        group_size: int | None = None,
        dtype_config: DTypeConfig | None = None,
    ) -> MarlinLinear:
        """Round-to-nearest quantize an ``nn.Linear`` (its weight is not modified)."""
        layer = cls.like(linear, format, group_size, dtype_config)
        qt = F.quantize(linear.weight, format, layer.group_size, layer.dtype_config.torch_scales)
        layer.load_quantized(qt, bias=linear.bias)
        return layer

    def load_quantized(
        self,
        qt: F.QuantizedTensor,
        bias: torch.Tensor | None = None,
        rotation_block: int = 0,
        rotation_signs: torch.Tensor | None = None,
    ) -> None:
        """Install a :class:`~metal_marlin_torch.formats.QuantizedTensor` (from RTN, GPTQ, ...)."""
        if qt.format != self.format or qt.group_size != self.group_size:
            raise ValueError(
                f"load_quantized: layer is {self.format}/g{self.group_size}, "
                f"got {qt.format}/g{qt.group_size}"
            )
        if tuple(qt.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"load_quantized: layer is [{self.out_features}, {self.in_features}], got {qt.shape}"
            )
        self.weight = qt.weight.to(self.weight.device)
        self.scales = qt.scales.to(self.weight.device)
        if qt.biases is not None:
            self.biases = qt.biases.to(self.weight.device)
        if qt.global_scale is not None:
            self.global_scale = qt.global_scale.to(self.weight.device)
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias.detach().to(self.bias.dtype))
        self.rotation_block = rotation_block
        self.rotation_signs = None if rotation_signs is None else rotation_signs.to(self.weight.device)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer's input rotation (docs/FORMAT.md §5); identity when it has none."""
        if not self.rotation_block:
            return x
        if self.rotation_signs is not None:
            x = x * self.rotation_signs.to(x.dtype)
        return torch.ops.marlin.hadamard(x, self.rotation_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.marlin.gemm(
            self.rotate_input(x), self.weight, self.scales, self.biases, self.global_scale,
            self.bias, self.format, self.group_size,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [out, in]`` in the rotated basis the kernel sees."""
        return torch.ops.marlin.dequantize(
            self.weight, self.scales, self.biases, self.global_scale, self.format,
            self.group_size, self.in_features, dtype,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Optional tensors that a checkpoint has but a fresh layer does not (rotation) are adopted.
        key = prefix + "rotation_signs"
        if key in state_dict and self.rotation_signs is None:
            self.rotation_signs = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        rot = f", rotation_block={self.rotation_block}" if self.rotation_block else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, bits={self.bits}, "
            f"group_size={self.group_size}{rot}"
        )
