"""CPU kernels of the decoder-layer ops: the same math as the oracle (ops/layer.py), through
torch's fused CPU functions where those compute it (issue 22 item 7).

The oracle spells each formula out op by op (what the transformers module does), which on CPU
costs several passes and temporaries; the stock module a user compares against often calls one
fused kernel instead (``F.layer_norm``), so the oracle ran 0.16-0.66x the stock op. Here:

- ``layer_norm``: ``F.layer_norm`` on ``x + residual``: fp32 statistics and one rounding, as the
  oracle (the sum order differs: results agree within an ulp of float before the rounding).
- ``rms_norm``: float32 ``F.rms_norm(h, weight)`` (``h * rsqrt(mean(h²) + eps) * weight`` in
  float, what ``LlamaRMSNorm`` computes when nothing rounds in between); half/bfloat
  ``F.rms_norm(h.float()).to(dtype) * weight`` (the module rounds before the weight product).
- ``silu_mul`` / ``gelu_mul``: the activation into a new tensor, the product in place (one
  temporary fewer; same roundings).
- ``rope``: cos/sin once, each half written into a preallocated output (no cat/stack copies).

The oracle stays the reference of the tests (tests/ops/test_layer_cpu.py holds these kernels
against it and the transformers modules; the emulator tests use the oracle directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layer


def rms_norm(x, weight, residual, eps):
    layer.check_norm_args("marlin.rms_norm", x, weight, None, residual, eps)
    h = x if residual is None else x + residual
    if x.dtype == torch.float32:
        y = F.rms_norm(h, (h.shape[-1],), weight, eps)
    else:
        y = F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(x.dtype).mul_(weight)
    return [y] if residual is None else [y, h]


def layer_norm(x, weight, bias, residual, eps):
    layer.check_norm_args("marlin.layer_norm", x, weight, bias, residual, eps)
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return [y] if residual is None else [y, h]


def silu_mul(gate, up):
    layer.check_act_args("marlin.silu_mul", gate, up)
    g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
    return F.silu(g).mul_(u)


def gelu_mul(gate, up):
    layer.check_act_args("marlin.gelu_mul", gate, up)
    g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
    return F.gelu(g, approximate="tanh").mul_(u)


def rope(q, k, positions, inv_freq, scaling, interleaved):
    layer.check_rope_args(q, k, positions, inv_freq)
    freqs = positions.float()[..., None] * inv_freq  # [B or 1, S, R/2], fp32 as HF's
    cos = (freqs.cos() * scaling).to(q.dtype)[:, None]
    sin = (freqs.sin() * scaling).to(q.dtype)[:, None]
    rot = 2 * inv_freq.shape[0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        if interleaved:
            x0, x1, o0, o1 = x[..., 0:rot:2], x[..., 1:rot:2], out[..., 0:rot:2], out[..., 1:rot:2]
        else:
            h = rot // 2
            x0, x1, o0, o1 = x[..., :h], x[..., h:rot], out[..., :h], out[..., h:rot]
        # x0*cos - x1*sin and x1*cos + x0*sin, each product and the sum rounded to the dtype
        torch.mul(x0, cos, out=o0)
        o0.sub_(x1 * sin)
        torch.mul(x1, cos, out=o1)
        o1.add_(x0 * sin)
        if rot < x.shape[-1]:
            out[..., rot:] = x[..., rot:]
        return out

    return apply(q), apply(k)


KERNELS = {"rms_norm": rms_norm, "layer_norm": layer_norm, "silu_mul": silu_mul, "gelu_mul": gelu_mul, "rope": rope}
