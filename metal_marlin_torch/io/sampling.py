"""A ``generate()`` hook for ``marlin::sample``: a logits processor that draws the next token
with the op and hands ``generate()`` scores that are -inf everywhere but there, so greedy
decoding (``do_sample=False``) takes exactly the op's token.

    sampler = MarlinSampler(temperature=0.7, top_p=0.9, seed=0)
    model.generate(ids, do_sample=False, logits_processor=[sampler])

The repetition penalty sees the tokens so far (``input_ids``), as transformers' own processor
does; the draws come from the sampler's ``torch.Generator``, so a seed reproduces a generation.
"""

from __future__ import annotations

import torch

from .. import ops


class MarlinSampler:
    """Logits processor running ``marlin::sample`` (semantics: metal_marlin_torch/ops/sampling.py)."""

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None) -> None:
        self.kwargs = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                       "repetition_penalty": repetition_penalty}
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = ops.sample(scores, prev_tokens=input_ids, generator=self.generator, **self.kwargs)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, tokens[:, None], 0.0)
