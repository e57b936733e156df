"""marlin.moe_route (pure torch) against the routers of the installed transformers.

Each family's own router module is built from a tiny config with random weights; its logits
go through marlin.moe_route with the family's settings, and the chosen experts and their
weights must match (DeepSeek-V3/GLM routers return ids unsorted: both sides are compared sorted
by expert id). Logits are random, so ties (where top-k order is unspecified) do not occur.
"""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch import ops

transformers = pytest.importorskip("transformers")


def by_id(w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(-1)
    return w.gather(-1, order), ids.gather(-1, order)


def compare(router, mode: str, renormalize: bool, bias=None, n_group=1, topk_group=1, scaling=1.0,
            hidden: int = 32, tokens: int = 7) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        h = torch.randn(tokens, hidden, generator=gen)
        logits, hf_w, hf_ids = router(h)
    w, ids = ops.moe_route(logits, router.top_k, mode, renormalize, bias, n_group, topk_group, scaling)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == hf_ids.shape
    hw, hi = by_id(hf_w.float(), hf_ids)
    mw, mi = by_id(w, ids)
    assert torch.equal(mi, hi)
    torch.testing.assert_close(mw, hw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    compare(Qwen3MoeTopKRouter(cfg), "softmax_topk", norm_topk_prob)


def test_mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(cfg)
    compare(router, "softmax_topk", True)
    compare(router, "topk_softmax", False)  # the same routing written the other way round


@pytest.mark.parametrize(("n_group", "topk_group", "norm"), [(4, 2, True), (1, 1, False)])
def test_deepseek_v3(n_group, topk_group, norm):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.1
    router.e_score_correction_bias.copy_(bias)
    compare(router, "sigmoid", norm, bias, n_group, topk_group, 2.5)


def test_glm4_moe():
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeConfig, Glm4MoeTopkRouter

    cfg = Glm4MoeConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=2, topk_group=1,
                        norm_topk_prob=True, routed_scaling_factor=1.8)
    router = Glm4MoeTopkRouter(cfg)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(4)) * 0.1
    router.e_score_correction_bias.copy_(bias)
    compare(router, "sigmoid", True, bias, 2, 1, 1.8)


def test_leading_dims_half_logits_and_fake():
    logits = torch.randn(2, 3, 8).half()
    w, ids = ops.moe_route(logits, 2)
    assert w.shape == ids.shape == (2, 3, 2)
    ref_w, ref_ids = ops.moe_route(logits.float().reshape(6, 8), 2)
    assert torch.equal(ids.reshape(6, 2), ref_ids) and torch.equal(w.reshape(6, 2), ref_w)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fw, fi = ops.moe_route(torch.empty(5, 8), 3)
    assert fw.shape == fi.shape == (5, 3) and fi.dtype == torch.int64


def test_ties_go_to_the_lower_id():
    w, ids = ops.moe_route(torch.zeros(1, 8), 3, "topk_softmax")
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3))


def test_bad_arguments_name_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.moe_route(x, 2, "relu")
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\]"):
        ops.moe_route(x, 9)
    with pytest.raises(ValueError, match="only used by mode 'sigmoid'"):
        ops.moe_route(x, 2, bias=torch.zeros(8))
    with pytest.raises(ValueError, match="n_group must divide E=8"):
        ops.moe_route(x, 2, "sigmoid", n_group=3)
    with pytest.raises(ValueError, match="logits must be float16/bfloat16/float32"):
        ops.moe_route(x.long(), 2)
