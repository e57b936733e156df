"""Pure-torch kernel of ``marlin::moe_gemm``: one GEMM per expert over the rows routed to it.

Mixture-of-experts layers keep every expert's weight in one 3-D tensor. Expert ``e`` of
``weight [E, N, ceil(K*bits/32)]`` is exactly the 2-D layout of docs/FORMAT.md (row ``n`` of
``W_e [N, K]`` packed along K), and so are its ``scales [E, N, K/G]``, ``biases [E, N, K/G]``
and ``global_scale [E, 1]`` slices. Row ``m`` of ``x`` is multiplied by the expert
``expert_ids[m]``::

    y[m] = x[m] @ dequant(W[expert_ids[m]]).T + bias[expert_ids[m]]

The kernel sorts the rows by expert (stable), dequantizes each expert that received rows once,
and runs one dense GEMM per such expert in fp32. It is the CPU/CUDA implementation and the
oracle of the Metal kernels (shaders/moe.h, tests/metal/test_moe_emu.py). ``x`` may have leading
dimensions ``[..., K]`` with ``expert_ids`` of the same leading shape.
"""

from __future__ import annotations

import torch

from .. import formats as F
from .reference import _same_device, check_activation

_ID_DTYPES = (torch.int32, torch.int64)


def check_moe_gemm_args(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> F.WeightFormat:
    """Validate ``marlin::moe_gemm`` arguments (shapes and dtypes only, no data reads)."""
    fmt = F.get_format(format)
    where = "marlin.moe_gemm"
    check_activation(where, x)
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have at least one dimension [..., K], got shape {tuple(x.shape)}")
    if expert_ids.dtype not in _ID_DTYPES or tuple(expert_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{where}: expert_ids must be int32/int64 of x's leading shape {tuple(x.shape[:-1])}, "
            f"got {expert_ids.dtype} {tuple(expert_ids.shape)}"
        )
    if weight.dim() != 3:
        raise ValueError(f"{where}: weight must be 3-D [E, N, words], got shape {tuple(weight.shape)}")
    _same_device(where, weight, x=x, expert_ids=expert_ids, scales=scales, biases=biases,
                 global_scale=global_scale, bias=bias)
    e, n = weight.shape[0], weight.shape[1]
    for name, t in (("scales", scales), ("biases", biases)):
        if t is not None and (t.dim() != 3 or t.shape[0] != e):
            raise ValueError(f"{where}: {name} must be 3-D [{e}, {n}, K/G], got shape {tuple(t.shape)}")
    if global_scale is not None and tuple(global_scale.shape) != (e, 1):
        raise ValueError(f"{where}: global_scale must have shape ({e}, 1), got {tuple(global_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (e, n):
        raise ValueError(f"{where}: bias must have shape ({e}, {n}), got {tuple(bias.shape)}")
    if e == 0:
        raise ValueError(f"{where}: weight has no experts (shape {tuple(weight.shape)})")
    # every expert slice has the same shape: checking expert 0 checks them all
    try:
        fmt.check_tensors(weight[0], scales[0], None if biases is None else biases[0],
                          None if global_scale is None else global_scale[0], group_size, x.shape[-1])
    except ValueError as err:
        raise ValueError(f"{where}: per-expert tensors: {err}") from None
    return fmt


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Every id in ``[0, num_experts)`` (reads the data: called by kernels, not fake kernels)."""
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise ValueError(
            f"marlin.moe_gemm: expert_ids must lie in [0, {num_experts}), got values in "
            f"[{int(expert_ids.min())}, {int(expert_ids.max())}]"
        )


def expert_segments(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """``(order, [(expert, start, stop), ...])``: rows sorted by expert, one segment per used expert."""
    order = torch.argsort(expert_ids.long(), stable=True)
    counts = torch.bincount(expert_ids.long(), minlength=num_experts).tolist()
    segments = []
    start = 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
            start += count
    return order, segments


def dequantize_expert(weight, scales, biases, global_scale, fmt: F.WeightFormat, group_size: int, k: int,
                      expert: int) -> torch.Tensor:
    """``W_hat [N, k]`` (fp32) of one expert (the tensors were checked once for all experts by
    :func:`check_moe_gemm_args`)."""
    return fmt.dequantize_packed(
        weight[expert], scales[expert], None if biases is None else biases[expert],
        None if global_scale is None else global_scale[expert], group_size, k, torch.float32,
        check=False,
    )


def moe_gemm(x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size):
    fmt = check_moe_gemm_args(x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size)
    num_experts, n = weight.shape[0], weight.shape[1]
    k = x.shape[-1]
    lead = x.shape[:-1]
    x = x.reshape(-1, k)
    expert_ids = expert_ids.reshape(-1)
    check_expert_ids(expert_ids, num_experts)
    order, segments = expert_segments(expert_ids, num_experts)
    xs = x.float()[order]
    ys = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for expert, start, stop in segments:
        w_hat = dequantize_expert(weight, scales, biases, global_scale, fmt, group_size, k, expert)
        y = xs[start:stop] @ w_hat.T
        if bias is not None:
            y = y + bias[expert].float()
        ys[start:stop] = y
    out = torch.empty_like(ys)
    out[order] = ys
    return out.to(x.dtype).reshape(*lead, n)


def moe_gemm_backward(grad, expert_ids, weight, scales, biases, global_scale, format, group_size, in_features):
    """``grad_x [..., in_features]`` of :func:`moe_gemm`: ``grad[m] @ W_hat[expert_ids[m]]``."""
    x_like = grad.new_empty(*grad.shape[:-1], in_features)
    fmt = check_moe_gemm_args(x_like, expert_ids, weight, scales, biases, global_scale, None, format, group_size)
    if grad.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"marlin.moe_gemm_backward: grad must have shape {(*grad.shape[:-1], weight.shape[1])}, "
            f"got {tuple(grad.shape)}"
        )
    lead = grad.shape[:-1]
    grad = grad.reshape(-1, grad.shape[-1])
    expert_ids = expert_ids.reshape(-1)
    check_expert_ids(expert_ids, weight.shape[0])
    order, segments = expert_segments(expert_ids, weight.shape[0])
    gs = grad.float()[order]
    out_sorted = torch.empty(grad.shape[0], in_features, dtype=torch.float32, device=grad.device)
    for expert, start, stop in segments:
        w_hat = dequantize_expert(weight, scales, biases, global_scale, fmt, group_size, in_features, expert)
        out_sorted[start:stop] = gs[start:stop] @ w_hat
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out.to(grad.dtype).reshape(*lead, in_features)
