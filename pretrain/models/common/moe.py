"""Mixture-of-Experts feed-forward layer shared by the model families (plain nn.Module, no distributed code).

    x (B, T, D) -> router scores (N, E) -> top-k experts per token -> tokens sorted by expert ->
    each expert's SwiGLU on its tokens (grouped weights) -> weighted sum back per token (+ shared experts)

GPT-OSS adds a bias to the router logits (`router_bias`; softmax over all E then renormalising the top k
equals its softmax over the top-k logits), biases on the experts' projections (`expert_proj_bias`), and a
clamped SwiGLU (`activation`, `glu` below).

Routing as the families use it: softmax over all experts then top-k (Qwen3-MoE; `route_norm` renormalises
the k weights), or sigmoid scores with top-k chosen on score + `expert_bias` and weights from the unbiased
scores, renormalised and scaled (DeepSeek-V3's auxiliary-loss-free balancing). Group-limited routing
(DeepSeek) first keeps the `n_limited_groups` groups of experts whose best two scores sum highest.
`tokens_per_expert` counts what each expert received since the last bias update, for the update and
for load metrics. An optional auxiliary balance loss adds its gradient in backward without changing
the output (so it works inside pipeline stages too).

Expert parallelism wraps `experts` from outside (pretrain/distributed/expert_parallel.py): it sees the
sorted tokens and the per-expert counts, exchanges them between ranks, and runs the local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import torch_compat
from pretrain.models.common.sharded import local_part


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
    n_expert_groups: int = 1  # group-limited routing: experts in this many groups; 1 = off
    n_limited_groups: int = 1  # groups a token may use
    bias_update_speed: float = 0.0  # auxiliary-loss-free balancing step (DeepSeek-V3: 1e-3); 0 = off
    aux_loss_coeff: float = 0.0  # auxiliary balance loss weight; 0 = off
    score_before_experts: bool = False  # weight each token's input to an expert, not the expert's output (Llama 4)
    router_bias: bool = False  # a learned bias on the router logits (GPT-OSS)
    expert_proj_bias: bool = False  # biases on the experts' projections (GPT-OSS)
    activation: str = "swiglu"  # swiglu | clamped_swiglu (GPT-OSS; `glu` below)
    swiglu_alpha: float = 1.702  # clamped_swiglu: the sigmoid's gain
    swiglu_limit: float = 7.0  # clamped_swiglu: the clamp on the gate and the up projection

    @classmethod
    def from_config(cls, cfg) -> MoEArgs:
        """From a ModelConfig's `moe` section."""
        e = cfg.moe
        return cls(
            dim=cfg.dim, hidden_dim=e.hidden_dim, n_experts=e.n_routed_experts, top_k=e.top_k,
            n_shared_experts=e.n_shared_experts, score_func=e.score_func, route_norm=e.route_norm,
            route_scale=e.route_scale, n_expert_groups=e.n_expert_groups, n_limited_groups=e.n_limited_groups,
            bias_update_speed=e.bias_update_speed, aux_loss_coeff=e.aux_loss_coeff,
            score_before_experts=e.score_before_experts, router_bias=e.router_bias,
            expert_proj_bias=e.expert_proj_bias, activation=e.activation, swiglu_alpha=e.swiglu_alpha,
            swiglu_limit=e.swiglu_limit,
        )


def _use_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch's grouped matmul: CUDA, bf16, Hopper or newer, 16-byte aligned rows. (On CPU it has a forward but
    no backward in torch 2.13, so the loop runs there.)"""
    if not (torch_compat.grouped_mm_available() and x.is_cuda and x.dtype == torch.bfloat16):
        return False
    aligned = all(w.dtype == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)
    return aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)


def glu(gate: torch.Tensor, up: torch.Tensor, args: MoEArgs) -> torch.Tensor:
    """The experts' gated unit on (n, H) projections: SwiGLU silu(gate) * up, or GPT-OSS's clamped variant,
    gate clamped from above and up on both sides at `swiglu_limit`, then gate * sigmoid(alpha gate) * (up + 1)."""
    if args.activation == "clamped_swiglu":
        gate = gate.clamp(max=args.swiglu_limit)
        up = up.clamp(-args.swiglu_limit, args.swiglu_limit)
        return gate * torch.sigmoid(args.swiglu_alpha * gate) * (up + 1)
    return F.silu(gate) * up


class GroupedExperts(nn.Module):
    """E gated experts as stacked weights: w1, w3 (E, H, D), w2 (E, D, H); with `expert_proj_bias`, biases
    b1, b3 (E, H) and b2 (E, D): expert e maps x to w2[e] glu(w1[e] x + b1[e], w3[e] x + b3[e]) + b2[e]."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, args: MoEArgs | None = None):
        super().__init__()
        self.args = args or MoEArgs(dim, hidden_dim, n_experts, top_k=1)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        if self.args.expert_proj_bias:
            self.b1 = nn.Parameter(torch.empty(n_experts, hidden_dim))
            self.b2 = nn.Parameter(torch.empty(n_experts, dim))
            self.b3 = nn.Parameter(torch.empty(n_experts, hidden_dim))
        else:
            self.b1 = self.b2 = self.b3 = None
        # b2 is added to each expert's output here; when tensor parallelism splits the hidden units, each rank's
        # output is a partial sum, and the bias is added once after the sum (pretrain/distributed/expert_parallel.py
        # turns this off and does it)
        self.add_output_bias = True

    def output_bias(self, counts: torch.Tensor, n_rows: int) -> torch.Tensor:
        """b2 of each row's expert: (N, D) for N rows sorted by expert, counts (E,) rows each."""
        return local_part(self.b2).repeat_interleave(counts, dim=0, output_size=n_rows)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D) sorted by expert, counts (E,) rows each -> (N, D). Under expert or tensor parallelism
        the weights are this rank's experts (and hidden units), and x holds the tokens sent to them."""
        w1, w2, w3 = local_part(self.w1), local_part(self.w2), local_part(self.w3)
        b1, b3 = (local_part(self.b1), local_part(self.b3)) if self.b1 is not None else (None, None)
        if _use_grouped_mm(x, w1, w2, w3):
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            gate = torch_compat.grouped_mm(x, w1.transpose(-2, -1), offsets)  # (N, H)
            up = torch_compat.grouped_mm(x, w3.transpose(-2, -1), offsets)
            if b1 is not None:
                gate = gate + b1.repeat_interleave(counts, dim=0, output_size=x.shape[0])
                up = up + b3.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            out = torch_compat.grouped_mm(glu(gate, up, self.args), w2.transpose(-2, -1), offsets).type_as(x)
        else:
            outputs = []
            for e, chunk in enumerate(torch.split(x, counts.tolist())):
                if chunk.shape[0] == 0:
                    continue
                gate, up = chunk @ w1[e].T, chunk @ w3[e].T  # (n_e, H)
                if b1 is not None:
                    gate, up = gate + b1[e], up + b3[e]
                outputs.append(glu(gate, up, self.args) @ w2[e].T)  # (n_e, D)
            if not outputs:  # no token for these experts (possible under expert parallelism): the input and the
                # weights still get a (zero) gradient, so every rank's backward runs the same collectives
                return x.new_zeros(x.shape) + 0.0 * (x.sum() + sum(local_part(p).sum() for p in self.parameters()))
            out = torch.cat(outputs)
        if self.b2 is not None and self.add_output_bias:
            out = out + self.output_bias(counts, x.shape[0])
        return out

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=std)
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)


class Router(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.n_experts, bias=args.router_bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> scores (N, E) in fp32."""
        logits = self.gate(x).float()
        return torch.sigmoid(logits) if self.args.score_func == "sigmoid" else torch.softmax(logits, dim=-1)

    def select(self, scores: torch.Tensor, expert_bias: torch.Tensor) -> torch.Tensor:
        """The k experts (N, k) of each token, on biased scores, within the token's best groups."""
        a = self.args
        biased = scores + expert_bias
        if a.n_expert_groups > 1:
            groups = biased.unflatten(-1, (a.n_expert_groups, -1))  # (N, G, E/G)
            group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            best = group_score.topk(a.n_limited_groups, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, best, True)
            biased = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
        return torch.topk(biased, a.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (weights (N, k), expert ids (N, k)). The bias only changes which experts are chosen."""
        weights, chosen, _ = self.route(x, expert_bias)
        return weights, chosen

    def route(self, x: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (N, k), expert ids (N, k), scores (N, E))."""
        a = self.args
        scores = self.scores(x)
        chosen = self.select(scores, expert_bias)
        weights = scores.gather(-1, chosen)
        if a.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * a.route_scale, chosen, scores


class _AddAuxLoss(torch.autograd.Function):
    """Returns x unchanged; in backward, `aux` receives gradient `scale`, as if scale x aux were added to
    the loss. The layer's output is untouched, so the loss function needs no extra input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


def balance_loss(scores: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The Switch / Qwen3-MoE load-balancing loss over a batch of N tokens: E x sum_e (slots routed to e / N)
    x (mean score of e, scores normalised over the experts). top_k when perfectly balanced, up to E x top_k
    when every token goes to the same experts."""
    N = chosen.shape[0]
    routed = torch.bincount(chosen.flatten(), minlength=n_experts).float() / N
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return n_experts * (routed * P).sum()


class MoE(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        if args.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func={args.score_func!r}: softmax or sigmoid")
        if args.activation not in ("swiglu", "clamped_swiglu"):
            raise ValueError(f"activation={args.activation!r}: swiglu or clamped_swiglu")
        self.args = args
        self.router = Router(args)
        self.experts = GroupedExperts(args.dim, args.hidden_dim, args.n_experts, args)
        self.shared_experts = None
        if args.n_shared_experts:
            self.shared_experts = GroupedExperts(args.dim, args.hidden_dim * args.n_shared_experts, 1, args)
        # the training loop sets this to 1 / (MoE layers x micro-batches per step): the balance loss is then
        # averaged over the layers and the step's micro-batches, as the cross-entropy is
        self.aux_loss_scale = 1.0
        self.register_buffer("expert_bias", torch.zeros(args.n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        weights, chosen, scores = self.router.route(flat, self.expert_bias)  # (N, k) (N, k) (N, E)
        order = torch.argsort(chosen.flatten(), stable=True)  # slots sorted by expert
        counts = torch.bincount(chosen.flatten(), minlength=self.args.n_experts)
        if not flat.is_meta:  # (a shape-inference pass on the meta device counts nothing)
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        token_of_slot = order // self.args.top_k  # (N k,) the token each sorted slot belongs to
        slot_weights = weights.flatten()[order].unsqueeze(-1)  # (N k, 1)
        if self.args.score_before_experts:
            routed = self.experts(flat[token_of_slot] * slot_weights.to(flat.dtype), counts)  # (N k, D)
        else:
            routed = self.experts(flat[token_of_slot], counts)
            routed = routed * slot_weights.to(routed.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of_slot, routed)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, counts.new_full((1,), flat.shape[0]))
        if self.args.aux_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            aux = balance_loss(scores, chosen, self.args.n_experts)
            out = _AddAuxLoss.apply(out, aux, self.args.aux_loss_coeff * self.aux_loss_scale)
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
        if self.router.gate.bias is not None:
            nn.init.zeros_(self.router.gate.bias)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
