"""Qwen3 <-> Hugging Face `Qwen3ForCausalLM` (dense) and `Qwen3MoeForCausalLM` (MoE): parameter names,
the RoPE row order, the expert layout, config.json.

Names (ours -> HF), beyond Llama's (pretrain/models/common/hf.py) and the experts' (pretrain/models/common/hf_moe.py):
    layers.N.attention.{q,k}_norm.weight  (E,)      model.layers.N.self_attn.{q,k}_norm.weight
    layers.N.moe.router.gate.weight       (X, D)    model.layers.N.mlp.gate.weight
    layers.N.moe.expert_bias              (X,)      none: Qwen3 routes without a bias (zero on import; export refuses
                                                    a non-zero one)
(X experts.) The stacked experts map to the hub's per-expert tensors as hf_moe.py describes.

RoPE: as for Llama, the rows of wq and wk are reordered within each head (ours: adjacent pairs; HF:
halves, rotate_half). q_norm and k_norm scale the head dimension before RoPE, so their (E,) weights
take the same reordering.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.config.model import head_dim, is_moe_layer
from pretrain.models.common import hf as llama_hf
from pretrain.models.common.hf_moe import MoEStateDictAdapter

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}


# ----------------------------------------------------------------------------- RoPE row order
_Q_ROWS = ("attention.wq.weight", "self_attn.q_proj.weight")
_K_ROWS = ("attention.wk.weight", "self_attn.k_proj.weight")
_QK_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")


def _reorder(key: str, value: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
    """wq/wk rows, and the q/k norm weights, between our adjacent pairs and HF's halves within each head."""
    permute = llama_hf.interleaved_to_half if to_hf else llama_hf.half_to_interleaved
    E = head_dim(cfg)
    if key.endswith(_QK_NORMS):  # one (E,) weight, reordered like the rows of one head
        return permute(value.reshape(E, 1), 1, E).reshape(E)
    if key.endswith(_Q_ROWS):
        return permute(value, cfg.n_heads, E)
    if key.endswith(_K_ROWS):
        return permute(value, cfg.n_kv_heads or cfg.n_heads, E)
    return value


# ----------------------------------------------------------------------------- names and tensors
_ADAPTER = MoEStateDictAdapter(
    "Qwen3",
    _LAYER_KEYS,
    bias_has_no_hf_tensor=lambda cfg: True,
    no_bias_reason="Hugging Face Qwen3-MoE routes without a bias",
    to_hf_value=lambda key, value, cfg: _reorder(key, value, cfg, to_hf=True),
    from_hf_value=lambda key, value, cfg: _reorder(key, value, cfg, to_hf=False),
)
to_hf_key = _ADAPTER.to_hf_key
from_hf_key = _ADAPTER.from_hf_key
expert_hf_keys = _ADAPTER.expert_hf_keys
hf_keys_needed = _ADAPTER.hf_keys_needed
to_hf = _ADAPTER.to_hf
from_hf = _ADAPTER.from_hf


# ----------------------------------------------------------------------------- config.json
def _is_moe(cfg: ModelConfig) -> bool:
    return cfg.moe.n_routed_experts > 0


def unsupported(cfg: ModelConfig) -> list[str]:
    """Settings of ours that transformers' Qwen3 models cannot express, as "model.<key>=..." lines."""
    problems = []
    if cfg.rope_scaling:
        problems.append("model.rope_scaling=true: Qwen3 here runs plain RoPE (set it to false)")
    if cfg.mla.kv_lora_rank:
        problems.append(f"model.mla.kv_lora_rank={cfg.mla.kv_lora_rank}: Qwen3 has no latent attention")
    if _is_moe(cfg):
        e = cfg.moe
        for key, value, want in (("score_func", e.score_func, "softmax"), ("n_shared_experts", e.n_shared_experts, 0),
                                 ("route_scale", e.route_scale, 1.0), ("n_expert_groups", e.n_expert_groups, 1)):
            if value != want:
                problems.append(f"model.moe.{key}={value}: Qwen3-MoE has {want}")
    return problems


def hf_config(cfg: ModelConfig, dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
    """config.json of the equivalent Qwen3ForCausalLM, or Qwen3MoeForCausalLM when model.moe has experts
    (the keys the hub's files use; transformers 4.51+ and 5.x read them). ValueError when the model
    has a setting Qwen3 cannot express."""
    problems = unsupported(cfg)
    if problems:
        raise ValueError("no Hugging Face Qwen3 equivalent: " + "; ".join(problems))
    config = llama_hf.hf_config(cfg, dtype, max_position_embeddings)  # the keys Llama shares (plain RoPE)
    del config["mlp_bias"]
    config.update({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
        "initializer_range": 0.02,
    })
    if _is_moe(cfg):
        e = cfg.moe
        config.update({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": e.n_routed_experts,
            "num_experts_per_tok": e.top_k,
            "moe_intermediate_size": e.hidden_dim,
            "norm_topk_prob": e.route_norm,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.n_layers) if not is_moe_layer(cfg, i)],
            "router_aux_loss_coef": e.aux_loss_coeff,
            "output_router_logits": False,
        })
    return config


def _hf_value(hf: dict, key: str):
    """A config.json value, with transformers' defaults and the key names of both versions filled in."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    width, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    defaults = {
        "num_key_value_heads": heads,
        "head_dim": width // heads if width and heads else None,
        "tie_word_embeddings": False,
        "rope_theta": rope.get("rope_theta"),
        "num_experts": hf.get("num_local_experts"),  # transformers 5's name
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
    }
    value = hf.get(key)
    return defaults.get(key) if value is None else value


def config_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    """How an HF config.json disagrees with our model config, as "model.<key> gives <hf key>=<ours> but
    config.json has <hf key>=<theirs>" lines; [] when they describe the same network. Reads the keys of
    transformers 4 (rope_theta, num_experts) and 5 (rope_parameters, num_local_experts)."""
    problems = unsupported(cfg)
    if problems:
        return problems
    ours = hf_config(cfg)
    checks = [  # (what of ours sets it, HF key)
        ("model.moe.n_routed_experts", "model_type"), ("model.dim", "hidden_size"),
        ("model.n_layers", "num_hidden_layers"), ("model.n_heads", "num_attention_heads"),
        ("model.n_kv_heads", "num_key_value_heads"), ("model.head_dim", "head_dim"), ("model.vocab_size", "vocab_size"),
        ("model.norm_eps", "rms_norm_eps"), ("model.rope_theta", "rope_theta"),
        ("model.tie_word_embeddings", "tie_word_embeddings"), ("full attention in every layer", "use_sliding_window"),
    ]
    if not _is_moe(cfg) or ours["mlp_only_layers"]:  # the dense SwiGLU's size matters only where one is used
        checks.append(("model.ffn_hidden_dim", "intermediate_size"))
    if _is_moe(cfg):
        checks += [
            ("model.moe.n_routed_experts", "num_experts"), ("model.moe.top_k", "num_experts_per_tok"),
            ("model.moe.hidden_dim", "moe_intermediate_size"), ("model.moe.route_norm", "norm_topk_prob"),
            ("a MoE feed-forward in every layer", "decoder_sparse_step"),
            ("model.moe.n_dense_layers", "mlp_only_layers"),
        ]
    for label, hf_key in checks:
        want, got = ours[hf_key], _hf_value(hf, hf_key)
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want):
            continue
        if got != want:
            problems.append(f"{label} gives {hf_key}={want} but config.json has {hf_key}={got}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"model.rope_scaling=false (plain RoPE) but config.json's rope type is {kind!r}")
    return problems
