"""Qwen3 <-> Hugging Face `Qwen3ForCausalLM` (dense) and `Qwen3MoeForCausalLM` (MoE): parameter names,
the RoPE row order, the expert layout, config.json.

Names (ours -> HF), beyond Llama's (pretrain/models/llama3/hf.py):
    layers.N.attention.{q,k}_norm.weight  (E,)      model.layers.N.self_attn.{q,k}_norm.weight
    layers.N.moe.router.gate.weight       (X, D)    model.layers.N.mlp.gate.weight
    layers.N.moe.experts.w1               (X, H, D) model.layers.N.mlp.experts.{0..X-1}.gate_proj.weight, (H, D) each
    layers.N.moe.experts.w3               (X, H, D) model.layers.N.mlp.experts.{0..X-1}.up_proj.weight
    layers.N.moe.experts.w2               (X, D, H) model.layers.N.mlp.experts.{0..X-1}.down_proj.weight, (D, H) each
    layers.N.moe.expert_bias              (X,)      none: Qwen3 routes without a bias (zero on import; export refuses
                                                    a non-zero one)
(X experts of hidden size H = moe.hidden_dim.) The per-expert layout is the hub's (and what transformers
writes with save_pretrained); transformers 5 fuses it into (X, 2H, D) / (X, D, H) tensors as it loads.
One of our stacked expert tensors is X of theirs: `hf_keys_needed` maps it to the list of their names,
and `from_hf` stacks them.

RoPE: as for Llama, the rows of wq and wk are reordered within each head (ours: adjacent pairs; HF:
halves, rotate_half). q_norm and k_norm scale the head dimension before RoPE, so their (E,) weights
take the same reordering.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

import torch

from pretrain.model_config import head_dim, is_moe_layer
from pretrain.models.llama3 import hf as llama_hf

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
_LAYER_KEYS_BACK = {hf: ours for ours, hf in _LAYER_KEYS.items()}
_EXPERT_KEYS = {"moe.experts.w1": "gate_proj", "moe.experts.w3": "up_proj", "moe.experts.w2": "down_proj"}
_EXPERT_KEYS_BACK = {hf: ours for ours, hf in _EXPERT_KEYS.items()}
_EXPERT_BIAS = "moe.expert_bias"
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.(\w+)\.weight$")
_EMBEDDING = "model.embed_tokens.weight"


# ----------------------------------------------------------------------------- names
def _layer_key(key: str) -> tuple[str, str]:
    """("N", the name within the block) of a block parameter; ("", key) otherwise."""
    match = _OURS_LAYER.match(key)
    return (match.group(1), match.group(2)) if match else ("", key)


def to_hf_key(key: str) -> str:
    """Our name of a tensor that is one HF tensor -> the HF name. KeyError for the others."""
    layer, name = _layer_key(key)
    if name in _LAYER_KEYS:
        return f"model.layers.{layer}.{_LAYER_KEYS[name]}"
    try:
        return llama_hf.to_hf_key(key)
    except KeyError:
        raise KeyError(f"{key!r} has no single Hugging Face Qwen3 counterpart") from None


def from_hf_key(hf_key: str) -> str:
    """HF name -> ours; an expert's tensor maps to the stacked tensor of its layer. KeyError for names
    we do not know (e.g. rotary inv_freq buffers)."""
    expert = _HF_EXPERT.match(hf_key)
    if expert and expert.group(2) in _EXPERT_KEYS_BACK:
        return f"layers.{expert.group(1)}.{_EXPERT_KEYS_BACK[expert.group(2)]}"
    match = _HF_LAYER.match(hf_key)
    if match and match.group(2) in _LAYER_KEYS_BACK:
        return f"layers.{match.group(1)}.{_LAYER_KEYS_BACK[match.group(2)]}"
    try:
        return llama_hf.from_hf_key(hf_key)
    except KeyError:
        raise KeyError(f"{hf_key!r} is not a Qwen3 parameter we know") from None


def expert_hf_keys(key: str, n_experts: int) -> list[str]:
    """The HF names, expert by expert, of one of our stacked expert tensors (layers.N.moe.experts.w*)."""
    layer, name = _layer_key(key)
    return [f"model.layers.{layer}.mlp.experts.{e}.{_EXPERT_KEYS[name]}.weight" for e in range(n_experts)]


def hf_keys_needed(keys: Iterable[str], cfg: "ModelConfig") -> dict[str, str | list[str]]:
    """For our parameter names (e.g. one pipeline stage's), the HF tensor each is read from: a name, or
    for stacked expert weights the list of per-expert names. With tied embeddings the output
    projection is read from the embedding (HF files omit lm_head). The expert bias is left out: it has
    no HF tensor and stays zero."""
    needed: dict[str, str | list[str]] = {}
    for key in keys:
        name = _layer_key(key)[1]
        if name == _EXPERT_BIAS:
            continue
        if name in _EXPERT_KEYS:
            needed[key] = expert_hf_keys(key, cfg.moe.n_routed_experts)
        elif key == "output.weight" and cfg.tie_word_embeddings:
            needed[key] = _EMBEDDING
        else:
            needed[key] = to_hf_key(key)
    return needed


# ----------------------------------------------------------------------------- RoPE row order
_Q_ROWS = ("attention.wq.weight", "self_attn.q_proj.weight")
_K_ROWS = ("attention.wk.weight", "self_attn.k_proj.weight")
_QK_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")


def _reorder(key: str, value: torch.Tensor, cfg: "ModelConfig", to_hf: bool) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- tensors
def to_hf(state_dict: dict[str, torch.Tensor], cfg: "ModelConfig") -> dict[str, torch.Tensor]:
    """Our full state dict -> HF tensors (same dtype): experts one by one (copies, so that each is its
    own storage in safetensors), lm_head left out when embeddings are tied. ValueError for a non-zero
    expert bias, which Qwen3 cannot express."""
    out = {}
    for key, value in state_dict.items():
        name = _layer_key(key)[1]
        if key == "output.weight" and cfg.tie_word_embeddings:
            continue
        if name == _EXPERT_BIAS:
            if torch.count_nonzero(value):
                raise ValueError(f"{key} is non-zero, and Hugging Face Qwen3-MoE routes without a bias. "
                                 "Fix: train with model.moe.bias_update_speed=0 to export to it.")
            continue
        if name in _EXPERT_KEYS:
            out.update({hf_key: w.clone() for hf_key, w in zip(expert_hf_keys(key, value.shape[0]), value)})
            continue
        out[to_hf_key(key)] = _reorder(key, value, cfg, to_hf=True)
    return out


def _keys_of(hf_state_dict: dict[str, torch.Tensor], cfg: "ModelConfig") -> list[str]:
    """Our names of everything an HF state dict holds (a whole model), the expert biases included."""
    keys = []
    for hf_key in hf_state_dict:
        if hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = from_hf_key(hf_key)
        if key not in keys:
            keys.append(key)
            if _layer_key(key)[1] == "moe.router.gate.weight":
                keys.append(key.replace("router.gate.weight", "expert_bias"))
    if cfg.tie_word_embeddings and "tok_embeddings.weight" in keys:
        keys.append("output.weight")
    return keys


def from_hf(
    hf_state_dict: dict[str, torch.Tensor], cfg: "ModelConfig", keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole model
    (with zero expert biases). KeyError names the first HF tensor that is missing."""
    keys = _keys_of(hf_state_dict, cfg) if keys is None else list(keys)
    needed = hf_keys_needed(keys, cfg)
    out = {}
    for key in keys:
        if key not in needed:  # the expert bias
            out[key] = torch.zeros(cfg.moe.n_routed_experts)
            continue
        sources = needed[key]
        names = [sources] if isinstance(sources, str) else sources
        for hf_key in names:
            if hf_key not in hf_state_dict:
                raise KeyError(f"the HF checkpoint has no {hf_key!r} (needed for our {key!r})")
        if isinstance(sources, str):
            out[key] = _reorder(key, hf_state_dict[sources], cfg, to_hf=False)
        else:
            out[key] = torch.stack([hf_state_dict[hf_key] for hf_key in names])
    return out


# ----------------------------------------------------------------------------- config.json
def _is_moe(cfg: "ModelConfig") -> bool:
    return cfg.moe.n_routed_experts > 0


def unsupported(cfg: "ModelConfig") -> list[str]:
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


def hf_config(cfg: "ModelConfig", dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
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


def config_mismatches(hf: dict, cfg: "ModelConfig") -> list[str]:
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
