"""`MarlinLinear`: a drop-in ``nn.Linear`` whose weight is stored quantized (docs/FORMAT.md).

The forward pass is one call of ``torch.ops.marlin.gemm`` (fused dequantize-GEMM on MPS, a
C++ dequantize-GEMV / GEMM on CPU, Triton on CUDA where available), optionally preceded by the
layer's input rotation (a block Hadamard transform, for rotated quantizers such as MR-GPTQ).

On CUDA, where the Triton kernels are registered, a layer holds its weight in the kernels'
layout only (docs/CUDA.md §1: K-major weight, ``[n_groups, N]`` scales and biases): it repacks
when it moves to a GPU, when quantized tensors are installed there, or at its first eager call,
and the canonical tensors are freed, so the weight is resident once. ``state_dict()`` gives the
canonical tensors back (docs/FORMAT.md), and loading a state dict or moving the layer converts
back first. Its eager forward replays a launch recorded once per input shape
(:class:`~metal_marlin_torch.ops.cuda.dispatch.LayerPlan`); under ``torch.compile`` it calls the
``marlin::gemm_prepared`` op instead, which compiled graphs and CUDA graphs capture.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig, resolve


def _cuda_fast_path() -> bool:
    from ..ops import cuda

    return cuda.registered()


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
        self._plan = None  # LayerPlan while the tensors are in the CUDA kernels' layout
        self._register_state_dict_hook(_canonical_state_dict)

    @property
    def kernel_layout(self) -> bool:
        """The layer holds its weight in the CUDA kernels' layout (not docs/FORMAT.md's)."""
        return self._plan is not None

    def prepare_kernel_layout(self) -> bool:
        """Repack for the CUDA kernels in place, dropping the canonical tensors (one resident
        copy); returns whether the layer now holds that layout. Does nothing off CUDA, without
        the Triton kernels, or inside a compiled or captured region (allocating there would
        leave the weight in a graph's memory pool)."""
        if self._plan is not None:
            return True
        w = self.weight
        if (w.device.type != "cuda" or w.dtype != torch.uint32 or not _cuda_fast_path()
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return False
        from ..ops.cuda import dispatch

        pw = dispatch.prepare_cuda_weight(w, self.scales, self.biases, self.global_scale,
                                          self.format, self.group_size, self.in_features)
        self._install_prepared(pw)
        return True

    def _install_prepared(self, pw) -> None:
        from ..ops.cuda import dispatch

        self.weight = pw.weight
        self.scales = pw.scales
        if pw.biases is not None:
            self.biases = pw.biases
        self._plan = dispatch.LayerPlan(pw)

    def _canonical_tensors(self) -> dict[str, torch.Tensor]:
        """``weight``, ``scales`` (and ``biases``) in docs/FORMAT.md's layout, whatever the
        layer holds (new tensors when it holds the kernels' layout)."""
        if self._plan is None:
            out = {"weight": self.weight, "scales": self.scales}
            if self.biases is not None:
                out["biases"] = self.biases
            return out
        from ..ops.cuda import layout

        fmt = F.get_format(self.format)
        sdt = fmt.scale_dtype(self.dtype_config.torch_scales)
        out = {"weight": layout.from_k_major(self.weight, self.out_features, self.in_features, fmt.bits),
               "scales": layout.canonical_scales(self.format, self.scales, self.global_scale, sdt)}
        if self.biases is not None:
            out["biases"] = self.biases.t().contiguous()
        return out

    def to_canonical_layout(self) -> None:
        """Back to docs/FORMAT.md's tensors (the inverse of :meth:`prepare_kernel_layout`)."""
        if self._plan is None:
            return
        tensors = self._canonical_tensors()
        self._plan = None
        for name, t in tensors.items():
            setattr(self, name, t)

    def _apply(self, fn, recurse=True):
        # moving or casting a layer in the kernels' layout: convert back, apply, repack on CUDA
        prepared = self._plan is not None
        self.to_canonical_layout()
        out = super()._apply(fn, recurse)
        if prepared or self.weight.device.type == "cuda":
            self.prepare_kernel_layout()
        return out

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
        self.to_canonical_layout()
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
        self.prepare_kernel_layout()

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer's input rotation (docs/FORMAT.md §5); identity when it has none."""
        if not self.rotation_block:
            return x
        if self.rotation_signs is not None:
            x = x * self.rotation_signs.to(x.dtype)
        return torch.ops.marlin.hadamard(x, self.rotation_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if (plan is not None and not torch.is_grad_enabled() and not self.rotation_block
                and not torch.compiler.is_compiling()):
            # eager inference on a prepared layer (what generate() runs per token): straight to
            # the recorded launch, no other Python (eager decode is bound by the host's Python)
            return plan(x, self.bias)
        x = self.rotate_input(x)
        if plan is None and x.is_cuda and not torch.compiler.is_compiling():
            self.prepare_kernel_layout()  # first eager call on CUDA (e.g. after from_pretrained)
            plan = self._plan
        if plan is not None:
            if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                    x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
                # an op that graphs capture and autograd differentiates
                return torch.ops.marlin.gemm_prepared(
                    x, self.weight, self.scales, self.biases, self.bias, self.format,
                    self.group_size, self.in_features, self.out_features)
            return plan(x, self.bias)  # eager: the recorded launch, no dispatcher
        return torch.ops.marlin.gemm(
            x, self.weight, self.scales, self.biases, self.global_scale,
            self.bias, self.format, self.group_size,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [out, in]`` in the rotated basis the kernel sees."""
        t = self._canonical_tensors()
        return torch.ops.marlin.dequantize(
            t["weight"], t["scales"], t.get("biases"), self.global_scale, self.format,
            self.group_size, self.in_features, dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` computing the same function: ``W_hat`` with the input rotation
        folded back in (``x R W_hat^T = x (W_hat R^T)^T``), the layer's own bias, on the layer's
        device. ``dtype`` defaults to the layer's activation dtype; the weight is computed in
        float32 and rounded once."""
        from ..quant.hadamard import unrotate  # noqa: PLC0415  (quant imports nn)

        dtype = dtype or self.dtype_config.torch_activations
        w = self.dequantized_weight(torch.float32)
        if self.rotation_block:
            w = unrotate(w, self.rotation_block, self.rotation_signs)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach().to(dtype))
        return lin

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a layer in the kernels' layout loads canonical tensors: convert back first, repack after
        prepared = self._plan is not None
        self.to_canonical_layout()
        # Optional tensors that a checkpoint has but a fresh layer does not (rotation) are adopted.
        key = prefix + "rotation_signs"
        if key in state_dict and self.rotation_signs is None:
            self.rotation_signs = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prepared:
            self.prepare_kernel_layout()

    def extra_repr(self) -> str:
        rot = f", rotation_block={self.rotation_block}" if self.rotation_block else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, bits={self.bits}, "
            f"group_size={self.group_size}{rot}"
        )


def _canonical_state_dict(module: MarlinLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` hook: a layer in the kernels' layout saves docs/FORMAT.md's tensors."""
    if module._plan is None:
        return
    for name, t in module._canonical_tensors().items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = t
