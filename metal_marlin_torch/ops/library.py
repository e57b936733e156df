"""The ``marlin`` operator namespace: every schema, defined once.

Schemas use ``torch.library.define`` + ``impl`` (lower per-call overhead than ``custom_op``).
Backends only add kernels for these names: the pure-torch kernels in :mod:`.reference`
(CPU, CUDA), the Metal kernels of the compiled extension (MPS), the emulator (``marlin_emu``).
"""

from __future__ import annotations

import torch

NAMESPACE = "marlin"
LIB = torch.library.Library(NAMESPACE, "DEF")

SCHEMAS: dict[str, str] = {
    "gemm": (
        "gemm(Tensor x, Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "Tensor? bias, str format, int group_size) -> Tensor"
    ),
    "dequantize": (
        "dequantize(Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "str format, int group_size, int in_features, ScalarType dtype) -> Tensor"
    ),
    "quantize": "quantize(Tensor w, str format, int group_size, ScalarType scale_dtype) -> Tensor[]",
    "fake_quantize": "fake_quantize(Tensor x, int bits) -> Tensor",
    "hadamard": "hadamard(Tensor x, int block) -> Tensor",
    # mixture of experts: row m of x times expert expert_ids[m] of 3-D weights [E, N, words]
    "moe_gemm": (
        "moe_gemm(Tensor x, Tensor expert_ids, Tensor weight, Tensor scales, Tensor? biases, "
        "Tensor? global_scale, Tensor? bias, str format, int group_size) -> Tensor"
    ),
    # its gradient w.r.t. x: grad_x[m] = grad[m] @ dequant(weight[expert_ids[m]]) -> [M, in_features]
    "moe_gemm_backward": (
        "moe_gemm_backward(Tensor grad, Tensor expert_ids, Tensor weight, Tensor scales, Tensor? biases, "
        "Tensor? global_scale, str format, int group_size, int in_features) -> Tensor"
    ),
}

for _schema in SCHEMAS.values():
    LIB.define(_schema)
