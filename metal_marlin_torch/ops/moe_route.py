"""Pure-torch kernel of ``marlin::moe_route``: router logits -> top-k expert ids and weights.

One op covers the routings of the common Hugging Face MoE families (tests/ops/test_moe_route.py
holds it equal to each family's own router code in the installed transformers):

    mode "softmax_topk"  p = softmax(logits); top-k of p; optionally renormalized to sum 1
                         (Qwen2/3-MoE with norm_topk_prob, Mixtral: renormalize=True; OLMoE,
                         Qwen without norm_topk_prob: False)
    mode "topk_softmax"  top-k of the logits, softmax over those k (equal to softmax_topk with
                         renormalization in exact arithmetic; some models write it this way)
    mode "sigmoid"       s = sigmoid(logits); choice = s + bias (e_score_correction_bias); with
                         n_group > 1 only the topk_group groups of experts whose two best choice
                         scores sum highest compete; top-k of choice; weights = s at the chosen
                         ids, optionally divided by (their sum + 1e-20) (DeepSeek-V3, GLM-4.5/4.7)

then every weight is multiplied by ``scaling`` (routed_scaling_factor; 1 elsewhere). Outputs:
``weights`` float32 ``[..., top_k]`` and ``ids`` int64 ``[..., top_k]``, by descending choice
score (ties: the lower expert id first). Arithmetic in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch

MODES = ("softmax_topk", "topk_softmax", "sigmoid")
MAX_EXPERTS = 1024  # the Metal kernel's limit (shaders/moe_route.h), checked here for every backend
MAX_TOP_K = 32


def check_moe_route_args(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, mode: str,
                         renormalize: bool, n_group: int, topk_group: int, scaling: float) -> None:
    """Validate ``marlin::moe_route`` arguments (shapes and dtypes only, no data reads)."""
    where = "marlin.moe_route"
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{where}: logits must be float16/bfloat16/float32, got {logits.dtype}")
    if logits.dim() < 1 or not 1 <= logits.shape[-1] <= MAX_EXPERTS:
        raise ValueError(f"{where}: logits must be [..., E] with 1 <= E <= {MAX_EXPERTS}, got shape "
                         f"{tuple(logits.shape)}")
    e = logits.shape[-1]
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if not 1 <= top_k <= min(e, MAX_TOP_K):
        raise ValueError(f"{where}: top_k must be in [1, {min(e, MAX_TOP_K)}], got {top_k}")
    if bias is not None:
        if mode != "sigmoid":
            raise ValueError(f"{where}: bias (score correction) is only used by mode 'sigmoid', got mode {mode!r}")
        if tuple(bias.shape) != (e,) or not bias.is_floating_point():
            raise ValueError(f"{where}: bias must be a float tensor of shape ({e},), got {bias.dtype} "
                             f"{tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"{where}: bias must be on logits' device {logits.device}, got {bias.device}")
    if n_group < 1 or e % n_group != 0 or not 1 <= topk_group <= n_group:
        raise ValueError(f"{where}: n_group must divide E={e} and 1 <= topk_group <= n_group, got "
                         f"n_group={n_group}, topk_group={topk_group}")
    if n_group > 1 and (mode != "sigmoid" or e // n_group < 2 or n_group > MAX_TOP_K
                        or top_k > topk_group * (e // n_group)):
        raise ValueError(f"{where}: group-limited selection (n_group={n_group}) needs mode 'sigmoid', "
                         f">= 2 experts per group, n_group <= {MAX_TOP_K} and top_k <= topk_group * E/n_group")


def _topk(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by descending value, ties to the lower index (what the Metal kernel does; torch.topk
    leaves tie order unspecified): a stable sort of the negated values."""
    idx = torch.sort(-v, dim=-1, stable=True)[1][..., :k]
    return v.gather(-1, idx), idx


def moe_route(logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling):
    check_moe_route_args(logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling)
    x = logits.float()
    if mode == "softmax_topk":
        w, ids = _topk(torch.softmax(x, dim=-1), top_k)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    elif mode == "topk_softmax":
        top, ids = _topk(x, top_k)
        w = torch.softmax(top, dim=-1)
    else:
        s = torch.sigmoid(x)
        choice = s if bias is None else s + bias.float()
        if n_group > 1:
            e = x.shape[-1]
            grouped = choice.reshape(*choice.shape[:-1], n_group, e // n_group)
            group_scores = _topk(grouped, 2)[0].sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(-1, _topk(group_scores, topk_group)[1], True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=-1), float("-inf"))
        ids = _topk(choice, top_k)[1]
        w = s.gather(-1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return (w * scaling).contiguous(), ids.contiguous()
