"""Quality metrics of a quantized model against its unquantized original.

- perplexity on a text: ``exp`` of the mean next-token negative log-likelihood;
- KL divergence ``KL(P_ref || P_quant)`` of the next-token distributions, per token, reported
  as mean and percentiles (a quantized model can keep perplexity yet move probability mass);
- top-1 agreement: the fraction of positions where both models' most likely token is the same;
- embedding cosine for encoders: cosine similarity of mean-pooled sentence embeddings.

The token-level functions take logits ``[..., V]`` and are exact (float64 reductions); the
``evaluate_*`` helpers run models over fixed token windows in batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

KL_PERCENTILES = (50, 90, 99)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of ``logits [..., V]``."""
    return F.log_softmax(logits.float(), dim=-1)


def kl_divergence(ref_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(P_ref || P_q) = sum_v p_ref (log p_ref - log p_q)`` (nats), from log-probs."""
    if ref_logp.shape != q_logp.shape:
        raise ValueError(f"kl_divergence: shapes differ, {tuple(ref_logp.shape)} vs {tuple(q_logp.shape)}")
    p = ref_logp.double().exp()
    # 0 * log 0 = 0: positions where p_ref underflows to 0 contribute nothing
    terms = torch.where(p > 0, p * (ref_logp.double() - q_logp.double()), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of ``targets`` under log-probs ``logp [..., V]``."""
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-position bool: the two models' argmax tokens are equal."""
    return ref_logits.argmax(-1) == q_logits.argmax(-1)


def percentiles(values: torch.Tensor, qs: Sequence[float] = KL_PERCENTILES) -> dict[str, float]:
    """``{"p50": ..., ...}`` of a 1-D tensor (linear interpolation, as numpy's default)."""
    v = values.double().flatten()
    return {f"p{q:g}": float(torch.quantile(v, q / 100.0)) for q in qs}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``a, b [n, d]``."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [n, L, d]`` over positions where ``mask [n, L]`` is 1 (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@dataclass
class LMQuality:
    """Results of :func:`evaluate_causal_lm` (``tokens`` = number of predicted positions)."""

    tokens: int
    perplexity: float
    nll: float
    kl_mean: float | None = None
    kl_percentiles: dict[str, float] | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Consecutive non-overlapping ``[n, seq_len]`` windows of a 1-D stream, ``n*seq_len <= max_tokens``."""
    if tokens.dim() != 1:
        raise ValueError(f"eval_windows: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = min(tokens.numel(), max_tokens) // seq_len
    if n < 1:
        raise ValueError(
            f"eval_windows: {tokens.numel()} tokens (budget {max_tokens}) is less than one window of {seq_len}"
        )
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def causal_lm_logprobs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """float32 next-token log-probs ``[n, L-1, V]`` of ``model`` on token ``windows [n, L]``."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s:s + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        out.append(log_softmax(logits).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_causal_lm(
    model: torch.nn.Module, windows: torch.Tensor, ref_logprobs: torch.Tensor | None = None, batch_size: int = 8,
    ref_model: torch.nn.Module | None = None,
) -> LMQuality:
    """Perplexity of ``model`` on ``windows [n, L]`` and, given the unquantized model's
    ``ref_logprobs`` (:func:`causal_lm_logprobs`) or the model itself (``ref_model``), KL
    divergence and top-1 agreement.

    With ``ref_model`` the reference log-probs are computed batch by batch, beside the model's,
    and dropped after use: memory holds one batch's ``[B, L-1, V]`` log-probs of each model
    instead of the whole ``[n, L-1, V]`` reference (21.7 GB for 4096 tokens of a 128k-vocabulary
    model). The results are the same numbers, since each reference batch is the same computation.
    """
    if ref_logprobs is not None and ref_model is not None:
        raise ValueError("evaluate_causal_lm: give ref_logprobs or ref_model, not both")
    device = next(model.parameters()).device
    nll_sum = 0.0
    count = 0
    kls = []
    agree = 0
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s:s + batch_size].to(device)
        logp = log_softmax(model(input_ids=batch).logits[:, :-1]).cpu()
        targets = batch[:, 1:].cpu()
        nll_sum += float(nll(logp, targets).sum())
        count += targets.numel()
        ref = None
        if ref_model is not None:
            ref = causal_lm_logprobs(ref_model, windows[s:s + batch_size], batch_size)
        elif ref_logprobs is not None:
            ref = ref_logprobs[s:s + batch_size]
        if ref is not None:
            kls.append(kl_divergence(ref, logp).flatten())
            agree += int(top1_agreement(ref, logp).sum())
    mean_nll = nll_sum / count
    result = LMQuality(tokens=count, perplexity=math.exp(mean_nll), nll=mean_nll)
    if kls:
        kl = torch.cat(kls)
        result.kl_mean = float(kl.mean())
        result.kl_percentiles = percentiles(kl)
        result.top1_agreement = agree / count
    return result


@torch.no_grad()
def sentence_embeddings(
    model: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], max_length: int = 128,
) -> torch.Tensor:
    """Mean-pooled, L2-normalized embeddings ``[n, d]`` of an encoder (all-MiniLM style)."""
    device = next(model.parameters()).device
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    hidden = model(**enc).last_hidden_state
    return F.normalize(mean_pool(hidden.float(), enc["attention_mask"]), dim=-1).cpu()


def embedding_quality(ref: torch.Tensor, quant: torch.Tensor) -> dict[str, float]:
    """Mean and minimum cosine between reference and quantized embeddings of the same sentences."""
    c = cosine(ref, quant)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
