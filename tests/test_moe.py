"""The MoE layer against a naive per-token loop: every token, its k experts one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.moe import MoE, MoEArgs


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    a = moe.args
    flat = x.reshape(-1, a.dim)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        token = flat[n]
        logits = moe.router.gate.weight @ token
        scores = torch.sigmoid(logits) if a.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        chosen = sorted(range(a.n_experts), key=lambda e: -(scores[e] + moe.expert_bias[e]).item())[: a.top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if a.route_norm:
            weights = weights / weights.sum()
        for w, e in zip(weights * a.route_scale, chosen):
            ex = moe.experts
            out[n] += w * ((F.silu(ex.w1[e] @ token) * (ex.w3[e] @ token)) @ ex.w2[e].T)
        if moe.shared_experts is not None:
            sh = moe.shared_experts
            out[n] += (F.silu(sh.w1[0] @ token) * (sh.w3[0] @ token)) @ sh.w2[0].T
    return out.view_as(x)


FAMILIES = {
    # Qwen3-MoE style: softmax over experts, top-k renormalised, no shared expert
    "softmax": MoEArgs(dim=16, hidden_dim=8, n_experts=6, top_k=2, route_norm=True),
    # DeepSeek-V3 style: sigmoid scores, biased selection, renormalised and scaled, one shared expert
    "sigmoid": MoEArgs(dim=16, hidden_dim=8, n_experts=6, top_k=3, n_shared_experts=1, score_func="sigmoid",
                       route_norm=True, route_scale=2.5, bias_update_speed=1e-3),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_matches_the_per_token_loop(name):
    torch.manual_seed(0)
    moe = MoE(FAMILIES[name])
    moe.init_weights(std=0.5)
    if name == "sigmoid":
        moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, 6))  # a bias that changes some choices
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = moe(x)
    ref = naive(moe, x)
    # fp32, the same products summed in another order: ~1e-7 relative; 1e-5 leaves room, a wrong
    # expert or weight moves the output by > 1e-2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, moe.router.gate.weight, moe.experts.w1])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, moe.router.gate.weight, moe.experts.w1])
    for g, r in zip(grads, ref_grads):
        # the gradients reach O(10) with these weights; summation order leaves ~1e-5 absolute on them
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    assert moe.tokens_per_expert.sum().item() == 10 * moe.args.top_k


def test_bias_steers_selection_not_weights_and_balances():
    torch.manual_seed(0)
    moe = MoE(FAMILIES["sigmoid"])
    moe.init_weights(std=0.5)
    x = torch.randn(4, 8, 16)
    base = moe(x)
    counts = moe.tokens_per_expert.clone()
    moe.update_expert_bias()
    # under-loaded experts go up, over-loaded ones down, by the update speed; the counts restart
    expected = 1e-3 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.expert_bias, expected)
    assert moe.tokens_per_expert.sum() == 0
    # a large bias on expert 0 puts it in every token's top-k, and its weight is still its plain score
    moe.expert_bias.zero_()
    moe.expert_bias[0] = 10.0
    weights, chosen = moe.router(x.reshape(-1, 16), moe.expert_bias)
    assert (chosen == 0).any(dim=-1).all()
    assert not torch.equal(moe(x), base)
    scores = torch.sigmoid(moe.router.gate(x.reshape(-1, 16)))
    raw = scores.gather(-1, chosen)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * 2.5)
