"""ModelSpec: what the trainer needs to know about a model family, in one record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import nn

from pretrain.model_config import head_dim

if TYPE_CHECKING:
    from pretrain.config import JobConfig, ModelConfig
    from pretrain.distributed.parallel_dims import ParallelDims


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # (model config, max sequence length) -> model, built on the current default device (meta for big runs)
    build_model: Callable[["ModelConfig", int], nn.Module]
    # applies the family's parallelism plan (TP, CP, FSDP) in place and returns the model
    parallelize: Callable[[nn.Module, "ParallelDims", "JobConfig"], nn.Module]
    # (model, config, seq_len) -> (parameter count, training FLOPs per token)
    params_and_flops: Callable[[nn.Module, "ModelConfig", int], tuple[int, float]]
    # Hugging Face state-dict adapter (a module or object), None if the family has none. It provides
    # to_hf(state_dict, cfg) / from_hf(hf_state_dict, cfg, keys=None) on full tensors, hf_config(cfg, dtype)
    # -> config.json, hf_keys_needed(our keys, cfg) -> {our key: HF key, or a list of HF keys for stacked experts},
    # optional FP32_KEYS (HF name suffixes exported in fp32) and config_mismatches(config.json, cfg)
    hf_adapter: Optional[Any] = None


def count_params(model: nn.Module) -> int:
    """Parameters, counting a tied weight once (works on the meta device)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def inactive_expert_params(model: nn.Module) -> int:
    """Routed-expert parameters a token does not use: (1 - top_k / E) of every MoE layer's routed experts."""
    from pretrain.models.moe import MoE

    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (module.args.n_experts - module.args.top_k) // module.args.n_experts
    return inactive


def decoder_flops(
    model: nn.Module, embedding: nn.Embedding, cfg: "ModelConfig", seq_len: int,
    qk_head_dim: int | None = None, v_head_dim: int | None = None,
) -> tuple[int, float]:
    """torchtitan's definition: 6 x active non-embedding params (forward + backward matmuls; a MoE layer
    counts its top-k routed experts, not all E) + 6 x layers x heads x (qk + v head widths) x seq_len
    (attention scores and values, forward + backward; 12 x L x H x E x T when q, k and v share E).
    Returns (all parameters, FLOPs per token)."""
    n_params = count_params(model)
    qk, v = qk_head_dim or head_dim(cfg), v_head_dim or head_dim(cfg)
    active = n_params - inactive_expert_params(model) - embedding.weight.numel()
    flops = 6 * active + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq_len
    return n_params, float(flops)


def dense_transformer_flops(model: nn.Module, embedding: nn.Embedding, cfg: "ModelConfig", seq_len: int) -> tuple[int, float]:
    """decoder_flops for a dense model with one head width."""
    return decoder_flops(model, embedding, cfg, seq_len)
