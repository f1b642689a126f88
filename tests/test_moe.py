"""The MoE layer against a naive per-token loop: every token, its k experts one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.common.moe import MoE, MoEArgs


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    a = moe.args
    flat = x.reshape(-1, a.dim)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        token = flat[n]
        logits = moe.router.gate.weight @ token
        scores = torch.sigmoid(logits) if a.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        biased = [(scores[e] + moe.expert_bias[e]).item() for e in range(a.n_experts)]
        allowed = range(a.n_experts)
        if a.n_expert_groups > 1:  # keep the groups whose two best biased scores sum highest
            size = a.n_experts // a.n_expert_groups
            group_score = [sum(sorted(biased[g * size:(g + 1) * size])[-2:]) for g in range(a.n_expert_groups)]
            best = sorted(range(a.n_expert_groups), key=lambda g: -group_score[g])[: a.n_limited_groups]
            allowed = [e for e in allowed if e // size in best]
        chosen = sorted(allowed, key=lambda e: -biased[e])[: a.top_k]
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
    # DeepSeek-V3's group-limited routing: 3 groups of 2 experts, a token may use the best 2 groups
    "grouped": MoEArgs(dim=16, hidden_dim=8, n_experts=6, top_k=3, n_shared_experts=1, score_func="sigmoid",
                       route_norm=True, route_scale=2.5, n_expert_groups=3, n_limited_groups=2),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_matches_the_per_token_loop(name):
    torch.manual_seed(0)
    moe = MoE(FAMILIES[name])
    moe.init_weights(std=0.5)
    if name != "softmax":
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


def test_group_limit_keeps_tokens_inside_their_best_groups():
    torch.manual_seed(0)
    moe = MoE(FAMILIES["grouped"])
    moe.init_weights(std=0.5)
    weights, chosen = moe.router(torch.randn(64, 16), moe.expert_bias)
    groups_used = (chosen // 2).sort(-1).values
    # 3 experts from at most 2 of the 3 groups: some token must span two groups, none all three
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)
    assert any(len(set(row.tolist())) == 2 for row in groups_used)


def test_balance_loss_adds_its_gradient_without_changing_the_output():
    from pretrain.models.common.moe import balance_loss

    torch.manual_seed(0)
    args = MoEArgs(dim=16, hidden_dim=8, n_experts=6, top_k=2, route_norm=True, aux_loss_coeff=0.1)
    moe = MoE(args)
    moe.init_weights(std=0.5)
    moe.aux_loss_scale = 0.5
    x = torch.randn(2, 5, 16)
    out = moe(x)
    gate_grad = torch.autograd.grad(out.sum(), moe.router.gate.weight)[0]
    # the same loss written out: output + coeff x scale x balance loss
    moe.args.aux_loss_coeff = 0.0
    out_plain = moe(x)
    torch.testing.assert_close(out_plain, out, rtol=0, atol=0)
    weights, chosen, scores = moe.router.route(x.reshape(-1, 16), moe.expert_bias)
    expected = out_plain.sum() + 0.1 * 0.5 * balance_loss(scores, chosen, 6)
    torch.testing.assert_close(gate_grad, torch.autograd.grad(expected, moe.router.gate.weight)[0])
    # uniform scores give top_k whatever the routing; every token routed to, and scoring only, experts 0
    # and 1 gives E (the loss rewards spreading both the routes and the scores)
    routes = torch.tensor([[0, 1]] * 4)
    uniform = torch.full((4, 6), 1 / 6)
    assert balance_loss(uniform, routes, 6).item() == pytest.approx(2.0)
    concentrated = torch.tensor([[0.5, 0.5, 0, 0, 0, 0]] * 4)
    assert balance_loss(concentrated, routes, 6).item() == pytest.approx(6.0)
