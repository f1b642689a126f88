"""Llama 4 <-> Hugging Face `Llama4ForCausalLM` (the text model, config model_type llama4_text): parameter names,
the fused expert layout, config.json.

Names (ours -> HF), beyond Llama's attention, norms, embedding and output (pretrain/models/common/hf.py):
    layers.N.feed_forward.w1 / w3 / w2.weight   model.layers.N.feed_forward.gate_proj / up_proj / down_proj.weight
    layers.N.moe.router.gate.weight   (X, D)    model.layers.N.feed_forward.router.weight
    layers.N.moe.shared_experts.w1 / w3 / w2    model.layers.N.feed_forward.shared_expert.gate_proj / up_proj /
                                      (1, H, D) / (1, D, H) ours, (H, D) / (D, H) theirs      down_proj.weight
    layers.N.moe.experts.w1 + w3      (X, H, D) model.layers.N.feed_forward.experts.gate_up_proj (X, D, 2H): the
                                                transposed gate weights, then the up weights, on the last dim
    layers.N.moe.experts.w2           (X, D, H) model.layers.N.feed_forward.experts.down_proj (X, H, D), transposed
    layers.N.moe.expert_bias          (X,)      none: Llama 4 routes without a bias (zero on import; export
                                                refuses a non-zero one)
(X experts of hidden size H.) The hub stores the experts fused, as the modules hold them (transformers loads them
as they are), so two of our tensors make one of theirs: `hf_keys_needed` names the fused tensor for both.

No row permutation: transformers' Llama 4 rotates adjacent pairs of each head (complex numbers), as we do.
The hub's Llama-4-Scout/Maverick folders are Llama4ForConditionalGeneration (text and vision): their text
weights are named language_model.model.*; this adapter reads and writes the text model's own names.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pretrain.config.model import ffn_hidden_dim, is_moe_layer, is_nope_layer, layer_window
from pretrain.models.common import hf as llama_hf
from pretrain.models.common.hf_moe import MoEStateDictAdapter, hf_layer, layer_key

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
    **{f"feed_forward.{ours}.weight": f"feed_forward.{hf}.weight" for ours, hf in _SWIGLU.items()},
    **{f"moe.shared_experts.{ours}": f"feed_forward.shared_expert.{hf}.weight" for ours, hf in _SWIGLU.items()},
    "moe.router.gate.weight": "feed_forward.router.weight",
}
_SHARED = tuple(f"moe.shared_experts.{w}" for w in _SWIGLU)
_FUSED = {"moe.experts.w1": "gate_up_proj", "moe.experts.w3": "gate_up_proj", "moe.experts.w2": "down_proj"}


def _shared_to_hf(key: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return value[0] if layer_key(key)[1] in _SHARED else value  # our one shared expert, stacked as (1, ...)


def _shared_from_hf(key: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return value.unsqueeze(0) if layer_key(key)[1] in _SHARED else value


def _not_ours(hf_key: str, cfg: ModelConfig) -> bool:
    return hf_key.endswith("rotary_emb.inv_freq")


_ADAPTER = MoEStateDictAdapter(  # everything but the routed experts
    "Llama 4",
    _LAYER_KEYS,
    bias_has_no_hf_tensor=lambda cfg: True,
    no_bias_reason="Hugging Face Llama 4 routes without a bias",
    to_hf_value=_shared_to_hf,
    from_hf_value=_shared_from_hf,
    skips_hf_key=_not_ours,
)


# ----------------------------------------------------------------------------- the fused routed experts
def _is_fused(key: str) -> bool:
    return layer_key(key)[1] in _FUSED


def _fused_hf_key(key: str) -> str:
    layer, name = layer_key(key)
    return f"model.layers.{layer}.feed_forward.experts.{_FUSED[name]}"


def _is_fused_hf(hf_key: str) -> bool:
    return hf_layer(hf_key) is not None and hf_key.rsplit(".", 2)[-2:] in (
        ["experts", "gate_up_proj"], ["experts", "down_proj"])


def _ours_of_fused(hf_key: str) -> list[str]:
    layer = hf_layer(hf_key)
    names = ("w1", "w3") if hf_key.endswith("gate_up_proj") else ("w2",)
    return [f"layers.{layer}.moe.experts.{w}" for w in names]


def to_hf_key(key: str) -> str:
    """Our name -> the HF name (the fused tensor for a routed expert weight). KeyError for names HF lacks."""
    return _fused_hf_key(key) if _is_fused(key) else _ADAPTER.to_hf_key(key)


def from_hf_key(hf_key: str) -> str:
    """HF name -> ours (the gate weights, w1, for the fused gate_up_proj). KeyError for names we do not know."""
    return _ours_of_fused(hf_key)[0] if _is_fused_hf(hf_key) else _ADAPTER.from_hf_key(hf_key)


def hf_keys_needed(keys: Iterable[str], cfg: ModelConfig) -> dict[str, str | list[str]]:
    """For our tensor names (e.g. one pipeline stage's), the HF tensor each is read from; experts.w1 and w3 are
    both read from the layer's gate_up_proj. An expert bias is left out: it stays zero."""
    keys = list(keys)
    needed: dict[str, str | list[str]] = {key: _fused_hf_key(key) for key in keys if _is_fused(key)}
    needed.update(_ADAPTER.hf_keys_needed([key for key in keys if not _is_fused(key)], cfg))
    return needed


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF tensors (same dtype), the routed experts fused. ValueError for a non-zero expert
    bias."""
    out = _ADAPTER.to_hf({k: v for k, v in state_dict.items() if not _is_fused(k)}, cfg)
    for key, value in state_dict.items():
        layer, name = layer_key(key)
        if name == "moe.experts.w1":  # (X, H, D) gate and up -> (X, D, 2H)
            up = state_dict[f"layers.{layer}.moe.experts.w3"]
            out[_fused_hf_key(key)] = torch.cat([value.transpose(1, 2), up.transpose(1, 2)], dim=-1).contiguous()
        elif name == "moe.experts.w2":  # (X, D, H) -> (X, H, D)
            out[_fused_hf_key(key)] = value.transpose(1, 2).contiguous()
    return out


def from_hf(
    hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole model (zero
    expert biases). KeyError names the first HF tensor that is missing."""
    if keys is None:
        rest = {k: v for k, v in hf_state_dict.items() if not _is_fused_hf(k)}
        out = _ADAPTER.from_hf(rest, cfg)
        keys = [key for hf_key in hf_state_dict if _is_fused_hf(hf_key) for key in _ours_of_fused(hf_key)]
    else:
        keys = list(keys)
        out = _ADAPTER.from_hf(hf_state_dict, cfg, [key for key in keys if not _is_fused(key)])
    for key in filter(_is_fused, keys):
        hf_key = _fused_hf_key(key)
        if hf_key not in hf_state_dict:
            raise KeyError(f"the HF checkpoint has no {hf_key!r} (needed for our {key!r})")
        value = hf_state_dict[hf_key]
        if hf_key.endswith("gate_up_proj"):  # (X, D, 2H): the first half is the gate (w1), the second the up (w3)
            gate, up = value.chunk(2, dim=-1)
            value = gate if key.endswith("w1") else up
        out[key] = value.transpose(1, 2).contiguous()
    return out


# ----------------------------------------------------------------------------- config.json
def unsupported(cfg: ModelConfig) -> list[str]:
    """Settings of ours that transformers' Llama 4 cannot express, as "model.<key>=..." lines."""
    problems = []
    if cfg.rope_scaling and cfg.rope_scaling_type != "llama3":
        problems.append(f"model.rope_scaling_type={cfg.rope_scaling_type}: Llama 4 scales RoPE as Llama 3.1 does")
    if cfg.qk_norm and cfg.qk_norm_type != "l2":
        problems.append(f"model.qk_norm_type={cfg.qk_norm_type}: Llama 4's q/k norm is the L2 one after RoPE (l2)")
    if cfg.attention_window == "sliding":
        problems.append("model.attention_window=sliding: Llama 4's windows are chunks (chunked)")
    if cfg.mla.kv_lora_rank:
        problems.append(f"model.mla.kv_lora_rank={cfg.mla.kv_lora_rank}: Llama 4 has no latent attention")
    if cfg.tie_word_embeddings:
        problems.append("model.tie_word_embeddings=true: Llama4ForCausalLM has its own lm_head")
    e = cfg.moe
    if e.n_routed_experts:
        for key, value, want in (("score_func", e.score_func, "sigmoid"), ("n_shared_experts", e.n_shared_experts, 1),
                                 ("route_norm", e.route_norm, False), ("route_scale", e.route_scale, 1.0),
                                 ("n_expert_groups", e.n_expert_groups, 1),
                                 ("score_before_experts", e.score_before_experts, True)):
            if value != want:
                problems.append(f"model.moe.{key}={value}: Llama 4 has {want}")
    return problems


def hf_config(cfg: ModelConfig, dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
    """config.json of the equivalent Llama4ForCausalLM (model_type llama4_text; the keys the hub's text_config
    uses, with the per-layer lists written out). ValueError when the model has a setting Llama 4 cannot express."""
    problems = unsupported(cfg)
    if problems:
        raise ValueError("no Hugging Face Llama 4 equivalent: " + "; ".join(problems))
    config = llama_hf.hf_config(cfg, dtype, max_position_embeddings)  # Llama's keys and its rope_scaling
    for key in ("mlp_bias", "intermediate_size"):
        del config[key]
    L, e = cfg.n_layers, cfg.moe
    config.update({
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "intermediate_size": e.hidden_dim or ffn_hidden_dim(cfg),  # an expert's (and the shared expert's) SwiGLU
        "intermediate_size_mlp": ffn_hidden_dim(cfg),  # the dense layers'
        "num_local_experts": e.n_routed_experts,
        "num_experts_per_tok": e.top_k,
        "interleave_moe_layer_step": e.interleave_step,
        "moe_layers": [i for i in range(L) if is_moe_layer(cfg, i)],
        "router_aux_loss_coef": e.aux_loss_coeff,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_qk_norm": cfg.qk_norm,
        "no_rope_layer_interval": cfg.nope_layer_interval or L + 1,
        "no_rope_layers": [int(not is_nope_layer(cfg, i)) for i in range(L)],  # 1 = a RoPE layer
        "attention_chunk_size": cfg.attention_window_size if cfg.attention_window == "chunked" else None,
        "layer_types": ["chunked_attention" if layer_window(cfg, i)[0] == "chunked" else "full_attention"
                        for i in range(L)],
        "attn_temperature_tuning": cfg.attn_temperature_tuning,
        "floor_scale": cfg.attn_floor_scale,
        "attn_scale": cfg.attn_scale,
        "initializer_range": 0.02,
    })
    return config


def _theirs(hf: dict) -> dict:
    """A config.json's values with transformers' Llama4TextConfig defaults and derived lists filled in (the hub's
    text_config leaves several out), read from a whole Llama4ForConditionalGeneration config too."""
    hf = dict(hf.get("text_config") or hf)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    L = hf.get("num_hidden_layers", 48)
    filled = {"num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
              "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "use_qk_norm": True,
              "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "attn_temperature_tuning": True,
              "floor_scale": 8192, "attn_scale": 0.1, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
              "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": L, "num_attention_heads": 40}
    filled.update({k: v for k, v in hf.items() if v is not None or k == "attention_chunk_size"})
    step, every = filled["interleave_moe_layer_step"], filled["no_rope_layer_interval"]
    filled["moe_layers"] = hf.get("moe_layers") or list(range(step - 1, L, step))
    filled["no_rope_layers"] = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(L)]
    filled["attn_temperature_tuning"] = bool(filled["attn_temperature_tuning"])  # the hub writes 4 for true
    filled["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    filled["rope"] = rope
    return filled


_LABELS = {  # config.json key -> what of ours sets it
    "hidden_size": "model.dim", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "num_key_value_heads": "model.n_kv_heads", "head_dim": "model.head_dim", "vocab_size": "model.vocab_size",
    "rms_norm_eps": "model.norm_eps", "rope_theta": "model.rope_theta",
    "tie_word_embeddings": "model.tie_word_embeddings",
    "intermediate_size": "model.moe.hidden_dim", "intermediate_size_mlp": "model.ffn_hidden_dim",
    "num_local_experts": "model.moe.n_routed_experts", "num_experts_per_tok": "model.moe.top_k",
    "moe_layers": "model.moe.interleave_step / n_dense_layers", "use_qk_norm": "model.qk_norm",
    "no_rope_layers": "model.nope_layer_interval", "attention_chunk_size": "model.attention_window_size",
    "attn_temperature_tuning": "model.attn_temperature_tuning", "floor_scale": "model.attn_floor_scale",
    "attn_scale": "model.attn_scale",
}


def config_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    """How an HF config.json (Llama4ForCausalLM's, or a Llama4ForConditionalGeneration's text_config) disagrees with
    our model config, as "<ours> gives <hf key>=<value> but config.json has <hf key>=<theirs>" lines; [] when they
    describe the same network. Reads the rope keys of transformers 4 (rope_scaling) and 5 (rope_parameters)."""
    problems = unsupported(cfg)
    if problems:
        return problems
    ours, theirs = hf_config(cfg), _theirs(hf)
    checks = [k for k in _LABELS if k not in ("intermediate_size", "intermediate_size_mlp")]
    if cfg.moe.n_routed_experts:
        checks.append("intermediate_size")
    if len(ours["moe_layers"]) < cfg.n_layers:  # the dense SwiGLU's size matters only where one is used
        checks.append("intermediate_size_mlp")
    if not cfg.attn_temperature_tuning:
        checks = [k for k in checks if k not in ("floor_scale", "attn_scale")]
    for key in checks:
        want, got = ours[key], theirs.get(key)
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want):
            continue
        if got != want:
            problems.append(f"{_LABELS[key]} gives {key}={want} but config.json has {key}={got}")
    return problems + _rope_mismatches(theirs["rope"], cfg)


def _rope_mismatches(rope: dict, cfg: ModelConfig) -> list[str]:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if (kind == "llama3") != cfg.rope_scaling:
        return [f"model.rope_scaling={cfg.rope_scaling} but config.json's rope type is {kind!r}"]
    if not cfg.rope_scaling:
        return []
    problems = []
    for our_key, hf_key in (("rope_scaling_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                            ("rope_high_freq_factor", "high_freq_factor"),
                            ("rope_original_max_seq_len", "original_max_position_embeddings")):
        if float(rope.get(hf_key, float("nan"))) != float(getattr(cfg, our_key)):
            problems.append(f"model.{our_key}={getattr(cfg, our_key)} but config.json has {hf_key}={rope.get(hf_key)}")
    return problems
