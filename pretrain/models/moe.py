"""Mixture-of-Experts feed-forward layer shared by the model families (plain nn.Module, no distributed code).

    x (B, T, D) -> router scores (N, E) -> top-k experts per token -> tokens sorted by expert ->
    each expert's SwiGLU on its tokens (grouped weights) -> weighted sum back per token (+ shared experts)

Routing as the families use it: softmax over all experts then top-k (Qwen3-MoE; `route_norm` renormalises
the k weights), or sigmoid scores with top-k chosen on score + `expert_bias` and weights from the unbiased
scores, renormalised and scaled (DeepSeek-V3's auxiliary-loss-free balancing). `tokens_per_expert`
counts what each expert received since the last bias update, for the update and for load metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEArgs:
    dim: int  # model width D
    hidden_dim: int  # each expert's SwiGLU hidden size H
    n_experts: int  # routed experts E
    top_k: int  # experts per token
    n_shared_experts: int = 0  # always-on experts (one SwiGLU of n_shared x H)
    score_func: str = "softmax"  # softmax | sigmoid
    route_norm: bool = False  # renormalise the k weights of a token to sum to 1
    route_scale: float = 1.0  # multiply the routing weights (DeepSeek-V3: 2.5 for 671B)
    bias_update_speed: float = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3: 1e-3); 0 = off


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w1, w3 (E, H, D), w2 (E, D, H)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (N, D) sorted by expert, counts[e] rows each -> (N, D). A loop of matmuls: correct on every
        device (a grouped-matmul kernel is a drop-in for CUDA later)."""
        outputs = []
        for e, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0] == 0:
                continue
            hidden = F.silu(chunk @ self.w1[e].T) * (chunk @ self.w3[e].T)  # (n_e, H)
            outputs.append(hidden @ self.w2[e].T)  # (n_e, D)
        return torch.cat(outputs) if outputs else x.new_zeros(x.shape)

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=std)


class Router(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (weights (N, k), expert ids (N, k)). The bias only changes which experts are chosen."""
        a = self.args
        logits = self.gate(x).float()  # (N, E)
        scores = torch.sigmoid(logits) if a.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        chosen = torch.topk(scores + expert_bias, a.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, chosen)
        if a.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * a.route_scale, chosen


class MoE(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        if args.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func={args.score_func!r}: softmax or sigmoid")
        self.args = args
        self.router = Router(args)
        self.experts = GroupedExperts(args.dim, args.hidden_dim, args.n_experts)
        self.shared_experts = None
        if args.n_shared_experts:
            self.shared_experts = GroupedExperts(args.dim, args.hidden_dim * args.n_shared_experts, 1)
        self.register_buffer("expert_bias", torch.zeros(args.n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        weights, chosen = self.router(flat, self.expert_bias)  # (N, k) each
        order = torch.argsort(chosen.flatten(), stable=True)  # slots sorted by expert
        counts = torch.bincount(chosen.flatten(), minlength=self.args.n_experts)
        with torch.no_grad():
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        token_of_slot = order // self.args.top_k  # (N k,) the token each sorted slot belongs to
        routed = self.experts(flat[token_of_slot], counts.tolist())  # (N k, D)
        routed = routed * weights.flatten()[order].unsqueeze(-1).to(routed.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of_slot, routed)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, [flat.shape[0]])
        return out.view(B, T, D)

    def update_expert_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): experts that got fewer tokens than the mean get a
        higher bias, by `bias_update_speed` per call. Pass counts summed over data-parallel ranks to keep
        the ranks' biases equal; the local counts are reset."""
        counts = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if self.args.bias_update_speed > 0:
            with torch.no_grad():
                self.expert_bias += self.args.bias_update_speed * torch.sign(counts.mean() - counts)
        self.tokens_per_expert.zero_()

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, mean=0.0, std=std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
