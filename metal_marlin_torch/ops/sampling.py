"""Pure-torch kernel of ``marlin::sample``: one token per row of ``logits [B, V]``, given one
uniform draw per row, so the result is reproducible under a seed (the caller draws the uniforms
with its ``torch.Generator``; :func:`metal_marlin_torch.ops.sample` does). The Metal kernel
(shaders/sample.h) computes exactly this: the same token for the same uniforms, by construction.

Why integers: transformers' processors filter on float softmax probabilities and their float
cumulative sums; a GPU sums in another order and its ``exp`` differs by an ulp, so a float
definition would let the two kernels pick different tokens near a top-p or draw boundary. So
after the float steps whose IEEE results are the same everywhere (``*``, ``/``, ``-``, compare,
``floor``: correctly rounded in Metal's precise math as on a CPU), each token gets an integer
weight, a fixed-point ``exp``, and every sum, cumulative sum and threshold is integer arithmetic:
exact and independent of the order of summation.

Semantics (float32 scores):

1. repetition penalty (``prev_tokens [B, T]`` given and ``repetition_penalty != 1``):
   ``RepetitionPenaltyLogitsProcessor`` (scores of seen tokens: ``s < 0 ? s * p : s / p``);
   entries outside ``[0, V)`` (padding) are ignored;
2. a row holding a NaN score gives token -1 (NaN policy: no token is made up from NaN; the
   Python wrapper :func:`metal_marlin_torch.ops.sample` raises on it);
3. ``temperature == 0``: greedy, the first index of the row's maximum (the uniforms are unused);
4. ``t = s / temperature``; a row whose max ``m`` of ``t`` is +inf or -inf (all -inf) gives -1;
5. top-k (``0 < top_k < V``): keep ``t >= `` the k-th largest ``t`` (ties at the cut all stay,
   as ``TopKLogitsWarper``);
6. weights: ``w = W(t - m)`` for kept tokens, 0 for removed ones, where
   ``W(d) = floor(2^31 * 2^(-e/4096)) >> ...`` is computed from ``e = floor(-d * log2(e) * 4096)``
   (float32 multiply by ``LOG2E``, the product scaled by 4096 and floored) with two 64-entry
   tables (:data:`EXP2_HI`, :data:`EXP2_LO`): ``((EXP2_HI[f >> 6] * EXP2_LO[f & 63]) >> 31) >> a``
   for ``e = 4096 a + f``; ``e >= 32 * 4096`` (a token 2^-32 times less likely than the best) gives 0.
   The max token weighs exactly 2^31; a weight is exp(d) within 0.02%;
7. top-p (``top_p < 1``): order tokens by ``t`` descending, ties by index ascending; with ``W``
   the top-k weights' sum and ``P = floor(top_p * 2^24)``, keep the tokens whose weight ahead
   of them is below ``max(mul24(W, P), 1)``, ``mul24(W, P) = (W >> 24) * P + (((W & (2^24-1)) * P) >> 24)``
   (``TopPLogitsWarper``'s rule; at least the best token stays);
8. min-p (``min_p > 0``): keep tokens with ``w >= floor(min_p * 2^31)`` (``MinPLogitsWarper``'s
   ``p >= min_p * p_max``, the best token always stays);
9. draw: ``U = floor(u * 2^24)`` (clamped to [0, 2^24 - 1], NaN -> 0), ``C`` the cumulative sum of
   the surviving weights in vocab order; the token is the first index with
   ``C > mul24(C[-1], U)`` (inverse CDF; never a token of weight 0).

:func:`filter_logits` is transformers' float filtering (steps 1, 3-5 and float top-p/min-p),
which tests hold against the processors themselves; the kept sets of the two agree but for
tokens within the fixed point's 0.02% of a top-p/min-p boundary.
"""

from __future__ import annotations

import math

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
    if logits.shape[1] > MAX_VOCAB:
        raise ValueError(f"{where}: vocab must be <= 2^24 = {MAX_VOCAB}, got {logits.shape[1]}")


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


# 2^31 * 2^(-j/64) and 2^31 * 2^(-j/4096), j = 0..63, rounded to nearest (computed with
# 60-digit decimals); shaders/sample.h holds the same literals (tests/metal/test_sample.py checks).
EXP2_HI = (
    2147483648, 2124350982, 2101467502, 2078830522, 2056437387, 2034285470, 2012372174, 1990694927,
    1969251188, 1948038440, 1927054196, 1906295993, 1885761398, 1865448001, 1845353420, 1825475297,
    1805811301, 1786359126, 1767116489, 1748081133, 1729250827, 1710623359, 1692196547, 1673968228,
    1655936265, 1638098541, 1620452965, 1602997467, 1585730000, 1568648537, 1551751076, 1535035634,
    1518500250, 1502142985, 1485961921, 1469955159, 1454120821, 1438457051, 1422962010, 1407633882,
    1392470869, 1377471191, 1362633090, 1347954824, 1333434672, 1319070932, 1304861917, 1290805962,
    1276901417, 1263146652, 1249540052, 1236080024, 1222764986, 1209593378, 1196563654, 1183674286,
    1170923762, 1158310587, 1145833280, 1133490379, 1121280436, 1109202018, 1097253708, 1085434106,
)
EXP2_LO = (
    2147483648, 2147120270, 2146756953, 2146393698, 2146030505, 2145667373, 2145304302, 2144941293,
    2144578345, 2144215459, 2143852634, 2143489870, 2143127168, 2142764527, 2142401948, 2142039429,
    2141676973, 2141314577, 2140952243, 2140589970, 2140227759, 2139865609, 2139503520, 2139141492,
    2138779525, 2138417620, 2138055776, 2137693994, 2137332272, 2136970612, 2136609013, 2136247475,
    2135885998, 2135524583, 2135163228, 2134801935, 2134440703, 2134079532, 2133718422, 2133357373,
    2132996386, 2132635459, 2132274593, 2131913789, 2131553046, 2131192363, 2130831742, 2130471182,
    2130110682, 2129750244, 2129389867, 2129029550, 2128669295, 2128309101, 2127948967, 2127588895,
    2127228883, 2126868932, 2126509043, 2126149214, 2125789446, 2125429739, 2125070092, 2124710507,
)
LOG2E = 1.4426950216293335  # float32 bits 0x3FB8AA3B, the shader's LOG2E
MAX_VOCAB = 1 << 24  # keeps every integer sum below 2^63 (V * 2^31) and per-thread sums small


def fixed24(x: float) -> int:
    """``floor(x * 2^24)``: top_p and u as 24-bit fractions (the host code computes the same)."""
    return int(math.floor(x * 16777216.0))


def mul24(w: torch.Tensor, p: torch.Tensor | int) -> torch.Tensor:
    """``floor(w * p / 2^24)`` for int64 ``w < 2^55`` and ``p < 2^24``, without overflow."""
    return (w >> 24) * p + (((w & 0xFFFFFF) * p) >> 24)


def penalized_scores(logits: torch.Tensor, prev_tokens: torch.Tensor | None, repetition_penalty: float) -> torch.Tensor:
    """Step 1: float32 scores; prev_tokens outside [0, V) are ignored."""
    scores = logits.float()
    if prev_tokens is None or not prev_tokens.shape[1] or repetition_penalty == 1.0:
        return scores
    v = scores.shape[1]
    valid = (prev_tokens >= 0) & (prev_tokens < v)
    seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    seen.scatter_add_(1, prev_tokens.clamp(0, v - 1), valid.int())
    p = torch.tensor(repetition_penalty, dtype=torch.float32, device=scores.device)
    return torch.where(seen > 0, torch.where(scores < 0, scores * p, scores / p), scores)


def weights(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Step 6: int64 ``W(t - m)`` (``m`` the row max, broadcast)."""
    y = (t - m) * torch.tensor(LOG2E, dtype=torch.float32, device=t.device)
    live = y > -32.0
    e = torch.floor(torch.where(live, -y, 0.0) * 4096.0).long()
    hi = torch.tensor(EXP2_HI, dtype=torch.int64, device=t.device)
    lo = torch.tensor(EXP2_LO, dtype=torch.int64, device=t.device)
    f = e & 4095
    w = ((hi[f >> 6] * lo[f & 63]) >> 31) >> (e >> 12)
    return torch.where(live, w, 0)


def sample(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p):
    check_sample_args(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p)
    b, v = logits.shape
    s = penalized_scores(logits, prev_tokens, repetition_penalty)
    nan_row = torch.isnan(s).any(-1)
    if temperature == 0:
        return torch.where(nan_row, -1, s.argmax(-1))
    t = s / torch.tensor(temperature, dtype=torch.float32, device=s.device)
    m = t.max(-1, keepdim=True).values
    bad = nan_row | torch.isinf(m[:, 0])
    t = torch.where(bad[:, None], 0.0, t)  # bad rows: any finite stand-in, their token is -1
    m = torch.where(bad[:, None], 0.0, m)
    keep = torch.ones_like(t, dtype=torch.bool)
    if 0 < top_k < v:
        keep = t >= torch.topk(t, top_k).values[:, -1:]
    w = torch.where(keep, weights(t, m), 0)
    if top_p < 1.0:
        # t descending, ties by index ascending (a stable sort keeps index order among equals)
        order = torch.sort(t, dim=-1, descending=True, stable=True).indices
        ws = torch.gather(w, 1, order)
        ahead = torch.cumsum(ws, -1) - ws
        limit = mul24(ws.sum(-1, keepdim=True), fixed24(top_p)).clamp(min=1)
        keep_sorted = ahead < limit
        w = w * torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    if min_p > 0.0:
        w = torch.where(w >= int(math.floor(min_p * 2147483648.0)), w, 0)
    c = torch.cumsum(w, -1)
    u = torch.where(uniforms >= 0, torch.clamp(torch.floor(uniforms * 16777216.0), max=16777215.0), 0.0).long()
    target = mul24(c[:, -1], u)
    token = torch.searchsorted(c, target[:, None], right=True)[:, 0]
    return torch.where(bad, -1, token)


REFERENCE = {"sample": sample}
