"""Pure-torch kernels of the decoder-layer ops: RMSNorm, LayerNorm (each with an optional fused
residual add), gated activations (SiLU, GELU-tanh) and RoPE (issue 22).

These are the CPU/CUDA implementation and the oracle of the Metal kernels (shaders/norm.h,
shaders/act.h, shaders/rope.h). Each one computes what the Hugging Face module computes, rounding
where it rounds, so a model whose layers call these ops gives the tokens the unpatched model gives:

- ``rms_norm``: ``LlamaRMSNorm``: ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(dtype)``, the
  product rounded to ``x.dtype``. With ``residual``: ``h = x + residual`` rounded to ``x.dtype``
  first (what the decoder layer's ``residual + hidden_states`` gives), returns ``[y, h]``.
- ``layer_norm``: ``nn.LayerNorm`` (biased variance, fp32 inside, one rounding at the end);
  ``weight``/``bias`` optional; the same residual rule.
- ``silu_mul`` / ``gelu_mul``: ``act(gate)`` rounded to the dtype, times ``up`` rounded again,
  as ``act_fn(gate_proj(x)) * up_proj(x)`` does (``ACT2FN["silu"]``, ``ACT2FN["gelu_pytorch_tanh"]``).
  ``up=None``: ``gate`` is ``[..., 2I]``, gate the first half and up the second (a fused
  ``gate_up_proj``, as Phi-3 splits it).
- ``rope``: ``apply_rotary_pos_emb`` with ``LlamaRotaryEmbedding``'s cos/sin: angle
  ``float32(pos) * inv_freq`` (fp32), ``cos(angle) * scaling`` rounded to the dtype, then
  ``x0*cos - x1*sin`` and ``x1*cos + x0*sin`` with each product and the sum rounded to the dtype.
  ``inv_freq`` (``[R/2]`` float32) and ``scaling`` come from the model (any HF rope type: default,
  Llama-3, YaRN, ...; :func:`rope_parameters`). Half-split layout pairs ``(i, i + R/2)``,
  interleaved pairs ``(2i, 2i + 1)``; dims past ``R`` pass through (partial rotary).

NaN/Inf policy: nothing is clamped or masked; specials propagate as these formulas propagate them
(a NaN in a row makes that row's norm output NaN; ``silu(-inf) = gelu(-inf) = NaN`` as in torch).
"""

from __future__ import annotations

import torch


def _check_float(where: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{where}: {name} must be floating point, got {t.dtype}")


def _check_same(where: str, name: str, t: torch.Tensor | None, x: torch.Tensor, shape: tuple | None) -> None:
    if t is None:
        return
    if t.dtype != x.dtype:
        raise ValueError(f"{where}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{where}: {name} must be on x's device {x.device}, got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_norm_args(where: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, eps: float) -> None:
    _check_float(where, "x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{where}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    _check_same(where, "weight", weight, x, (x.shape[-1],))
    _check_same(where, "bias", bias, x, (x.shape[-1],))
    _check_same(where, "residual", residual, x, tuple(x.shape))
    if not eps >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps!r}")


def _residual_add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else x + residual


def rms_norm(x, weight, residual, eps):
    check_norm_args("marlin.rms_norm", x, weight, None, residual, eps)
    h = _residual_add(x, residual)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = weight * y
    return [y] if residual is None else [y, h]


def layer_norm(x, weight, bias, residual, eps):
    check_norm_args("marlin.layer_norm", x, weight, bias, residual, eps)
    h = _residual_add(x, residual)
    hf = h.float()
    mean = hf.mean(-1, keepdim=True)
    c = hf - mean
    y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return [y] if residual is None else [y, h]


def check_act_args(where: str, gate: torch.Tensor, up: torch.Tensor | None) -> int:
    """The intermediate size ``I`` of a gated activation's output."""
    _check_float(where, "gate", gate)
    if gate.dim() < 1:
        raise ValueError(f"{where}: gate must have at least one dim, got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"{where}: with up=None, gate's last dim must be even ([..., 2I]), "
                             f"got shape {tuple(gate.shape)}")
        return gate.shape[-1] // 2
    _check_same(where, "up", up, gate, tuple(gate.shape))
    return gate.shape[-1]


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


def silu_mul(gate, up):
    check_act_args("marlin.silu_mul", gate, up)
    g, u = _split(gate, up)
    return torch.nn.functional.silu(g) * u


def gelu_mul(gate, up):
    check_act_args("marlin.gelu_mul", gate, up)
    g, u = _split(gate, up)
    return torch.nn.functional.gelu(g, approximate="tanh") * u


def check_rope_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    where = "marlin.rope"
    _check_float(where, "q", q)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{where}: q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"{where}: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim")
    _check_same(where, "k", k, q, None)
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: positions must be int32 or int64, got {positions.dtype}")
    if positions.dim() != 2 or positions.shape[1] != s or positions.shape[0] not in (1, b):
        raise ValueError(f"{where}: positions must be [batch or 1, seq] = [{b} or 1, {s}], "
                         f"got {tuple(positions.shape)}")
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1:
        raise ValueError(f"{where}: inv_freq must be a 1-D float32 tensor, got {inv_freq.dtype} "
                         f"of shape {tuple(inv_freq.shape)}")
    if d % 2 or not 1 <= inv_freq.shape[0] <= d // 2:
        raise ValueError(f"{where}: head_dim must be even and inv_freq's length in 1..head_dim/2 = {d // 2}, "
                         f"got head_dim {d} and {inv_freq.shape[0]} frequencies")
    for name, t in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if t.device != q.device:
            raise ValueError(f"{where}: {name} must be on q's device {q.device}, got {t.device}")


def rope(q, k, positions, inv_freq, scaling, interleaved):
    check_rope_args(q, k, positions, inv_freq)
    freqs = positions.float()[..., None] * inv_freq  # [B or 1, S, R/2], fp32 as HF's
    cos = (freqs.cos() * scaling).to(q.dtype)[:, None]  # [B or 1, 1, S, R/2]
    sin = (freqs.sin() * scaling).to(q.dtype)[:, None]
    rot = 2 * inv_freq.shape[0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rot]
        if interleaved:
            x0, x1 = xr[..., 0::2], xr[..., 1::2]
        else:
            x0, x1 = xr[..., : rot // 2], xr[..., rot // 2:]
        o0 = x0 * cos - x1 * sin
        o1 = x1 * cos + x0 * sin
        out = torch.stack((o0, o1), -1).flatten(-2) if interleaved else torch.cat((o0, o1), -1)
        return torch.cat((out, x[..., rot:]), -1)

    return apply(q), apply(k)


def rope_parameters(config, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq float32 [R/2], attention_scaling)`` of a transformers config's rope (default,
    ``llama3``, ``yarn``, ``linear``, ... as ``LlamaRotaryEmbedding`` computes them), for
    :func:`rope`. Computed once per model on the host; the kernels take the frequencies as given."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415 (optional dependency)

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
    return inv_freq.float(), float(scaling)


REFERENCE = {
    "rms_norm": rms_norm,
    "layer_norm": layer_norm,
    "silu_mul": silu_mul,
    "gelu_mul": gelu_mul,
    "rope": rope,
}

__all__ = ["REFERENCE", "gelu_mul", "layer_norm", "rms_norm", "rope", "rope_parameters", "silu_mul"]
