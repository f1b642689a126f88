"""Parameter and FLOPs counts as torchtitan defines them, so MFU compares across projects."""

from __future__ import annotations

from torch import nn

from pretrain.config.model import ModelConfig, head_dim, layer_window
from pretrain.models.common.moe import MoE


def count_params(model: nn.Module) -> int:
    """Parameters, counting a tied weight once (works on the meta device)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def inactive_expert_params(model: nn.Module) -> int:
    """Routed-expert parameters a token does not use: (1 - top_k / E) of every MoE layer's routed experts."""
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (module.args.n_experts - module.args.top_k) // module.args.n_experts
    return inactive


def attended_keys(cfg: ModelConfig, seq_len: int) -> int:
    """Keys per query summed over the layers, counted as torchtitan counts a causal layer (every query
    against the whole sequence, T): a chunked or sliding layer computes only its window's scores, so it
    counts min(window, T). For a model without windows this is layers x T."""
    total = 0
    for layer_id in range(cfg.n_layers):
        kind, size = layer_window(cfg, layer_id)
        total += seq_len if kind == "causal" else min(size, seq_len)
    return total


def decoder_flops(
    model: nn.Module, cfg: ModelConfig, seq_len: int, qk_head_dim: int | None = None, v_head_dim: int | None = None
) -> tuple[int, float]:
    """torchtitan's definition: 6 x active non-embedding params (forward + backward matmuls; a MoE layer
    counts its top-k routed experts, not all E) + 6 x layers x heads x (qk + v head widths) x seq_len
    (attention scores and values, forward + backward; 12 x L x H x E x T when q, k and v share E). A layer
    with a chunked or sliding window counts its window instead of T (`attended_keys`).
    Returns (all parameters, FLOPs per token)."""
    n_params = count_params(model)
    qk, v = qk_head_dim or head_dim(cfg), v_head_dim or head_dim(cfg)
    active = n_params - inactive_expert_params(model) - model.tok_embeddings.weight.numel()
    flops = 6 * active + 6 * cfg.n_heads * (qk + v) * attended_keys(cfg, seq_len)
    return n_params, float(flops)
