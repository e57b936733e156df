"""Pure-torch kernel of ``marlin::sample``: one token per row of ``logits [B, V]``, given one
uniform draw per row, so the result is reproducible under a seed (the caller draws the uniforms
with its ``torch.Generator``; :func:`metal_marlin_torch.ops.sample` does).

Semantics (in float32, the order of transformers' ``generate()``):

1. repetition penalty (``prev_tokens [B, T]`` given and ``repetition_penalty != 1``):
   ``RepetitionPenaltyLogitsProcessor`` (scores of seen tokens: ``s < 0 ? s * p : s / p``);
2. ``temperature == 0``: greedy, the first index of the row's maximum (the uniforms are unused);
3. otherwise ``TemperatureLogitsWarper``, then ``TopKLogitsWarper`` (``top_k > 0``),
   ``TopPLogitsWarper`` (``top_p < 1``), ``MinPLogitsWarper`` (``min_p > 0``), each exactly as
   transformers computes it (same tensor ops, one kept token at least), removed tokens at -inf;
4. ``p = softmax(filtered)``, ``c = cumsum(p)`` (vocab order); the token is the first index with
   ``c > u * c[-1]`` (inverse CDF), never one of probability 0.

:func:`filter_logits` returns step 1-3's scores, which tests hold against transformers' own
processors. NaN logits: step 1-3 propagate them as transformers does; a row whose filtered
probabilities are not finite raises instead of sampling garbage.
"""

from __future__ import annotations

import torch


def check_sample_args(logits: torch.Tensor, uniforms: torch.Tensor, prev_tokens: torch.Tensor | None,
                      repetition_penalty: float, temperature: float, top_k: int, top_p: float,
                      min_p: float) -> None:
    where = "marlin.sample"
    if not logits.dtype.is_floating_point or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{where}: logits must be a floating [batch, vocab] tensor, got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    if uniforms.dtype != torch.float32 or tuple(uniforms.shape) != (logits.shape[0],):
        raise ValueError(f"{where}: uniforms must be float32 [{logits.shape[0]}] (one draw per row in [0, 1)), "
                         f"got {uniforms.dtype} of shape {tuple(uniforms.shape)}")
    if prev_tokens is not None and (prev_tokens.dtype != torch.int64 or prev_tokens.dim() != 2
                                    or prev_tokens.shape[0] != logits.shape[0]):
        raise ValueError(f"{where}: prev_tokens must be int64 [{logits.shape[0]}, T], got {prev_tokens.dtype} "
                         f"of shape {tuple(prev_tokens.shape)}")
    if not repetition_penalty > 0:
        raise ValueError(f"{where}: repetition_penalty must be > 0, got {repetition_penalty!r}")
    if not temperature >= 0:
        raise ValueError(f"{where}: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"{where}: top_k must be >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"{where}: min_p must be in [0, 1] (0 = off), got {min_p!r}")


def filter_logits(logits, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Steps 1-3 of the module docstring: float32 ``[B, V]`` scores, removed tokens at -inf
    (with ``temperature == 0`` only step 1, the greedy choice's input)."""
    scores = logits.float()
    if prev_tokens is not None and prev_tokens.shape[1] and repetition_penalty != 1.0:
        score = torch.gather(scores, 1, prev_tokens)
        score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
        scores = scores.scatter(1, prev_tokens, score)
    if temperature == 0:
        return scores
    scores = scores / temperature
    neg_inf = -float("inf")
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], neg_inf)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), neg_inf)
    if min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        sorted_indices = torch.argsort(scores, descending=True, dim=-1)
        sorted_remove = torch.gather(remove, -1, sorted_indices)
        sorted_remove[..., :1] = False
        scores = scores.masked_fill(sorted_remove.scatter(1, sorted_indices, sorted_remove), neg_inf)
    return scores


def sample(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p):
    check_sample_args(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p)
    scores = filter_logits(logits, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p)
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError("marlin.sample: the filtered probabilities of some row are not finite "
                         "(NaN or all -inf logits)")
    c = torch.cumsum(probs, dim=-1)
    target = (uniforms * c[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(c, target, right=True).squeeze(1)
    # u * total may round up to total: take the last token of nonzero probability then
    last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last)


REFERENCE = {"sample": sample}
