"""DeepSeek-V3 <-> Hugging Face `DeepseekV3ForCausalLM` (sigmoid routing: V3, Moonlight) or, for softmax
routing, `DeepseekV2ForCausalLM` (DeepSeek-V2-Lite's shape): parameter names, the expert layout, config.json.

Names (ours -> HF), beyond Llama's (embedding, norms, output, attention.wq / wo, dense feed_forward):
    layers.N.attention.wq_a / q_norm / wq_b     model.layers.N.self_attn.q_a_proj / q_a_layernorm / q_b_proj
    layers.N.attention.wkv_a / kv_norm / wkv_b  model.layers.N.self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj
    layers.N.moe.router.gate.weight   (X, D)    model.layers.N.mlp.gate.weight
    layers.N.moe.expert_bias          (X,)      model.layers.N.mlp.gate.e_score_correction_bias (V3; V2 has none:
                                                zero on import, export refuses a non-zero one)
    layers.N.moe.experts.w1 / w3      (X, H, D) model.layers.N.mlp.experts.{0..X-1}.gate_proj / up_proj.weight, (H, D)
    layers.N.moe.experts.w2           (X, D, H) model.layers.N.mlp.experts.{0..X-1}.down_proj.weight, (D, H) each
    layers.N.moe.shared_experts.w1 / w3 / w2    model.layers.N.mlp.shared_experts.gate_proj / up_proj / down_proj.weight
                                      (1, S, D) / (1, D, S) ours, (S, D) / (D, S) theirs; S = n_shared x H
The stacked routed experts map to the hub's per-expert tensors as pretrain/models/common/hf_moe.py describes.

No row permutation: both models rotate adjacent pairs of the rope dimensions (config.json says
rope_interleave=true; transformers' DeepseekV2 always does).

The hub's DeepSeek-V3 / R1 folders hold more than the network: the multi-token-prediction module is
stored as one extra layer (model.layers.61.*, i.e. layers >= num_hidden_layers); importing the whole
folder skips those keys (they are not part of the model trained here). The weights there are float8 with
`*.weight_scale_inv` block scales: they are refused with a pointer to a bf16 conversion, never cast.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pretrain.config.model import ffn_hidden_dim, is_moe_layer
from pretrain.models.common import hf as llama_hf
from pretrain.models.common.hf_moe import MoEStateDictAdapter, hf_layer, layer_key

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_ATTENTION = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
              "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj"}
_SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
    **{f"attention.{ours}.weight": f"self_attn.{hf}.weight" for ours, hf in _ATTENTION.items()},
    **{f"moe.shared_experts.{ours}": f"mlp.shared_experts.{hf}.weight" for ours, hf in _SWIGLU.items()},
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias": "mlp.gate.e_score_correction_bias",
}
_SHARED = tuple(f"moe.shared_experts.{w}" for w in _SWIGLU)
FP32_KEYS = ("e_score_correction_bias",)  # save_hf keeps the routing bias in fp32, as the hub does
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FIX = ("Fix: convert the folder to bf16 first (DeepSeek's inference/fp8_cast_bf16.py in the DeepSeek-V3 "
           "repository dequantizes it), or use a bf16 copy of the checkpoint.")


def is_v2(cfg: ModelConfig) -> bool:
    """Softmax routing: transformers' DeepseekV2 is the equivalent (DeepseekV3 always routes by sigmoid)."""
    return cfg.moe.n_routed_experts > 0 and cfg.moe.score_func == "softmax"


# ----------------------------------------------------------------------------- names and tensors
def _is_mtp(hf_key: str, cfg: ModelConfig) -> bool:
    """A tensor of the multi-token-prediction module the hub stores as layer num_hidden_layers and after."""
    layer = hf_layer(hf_key)
    return layer is not None and layer >= cfg.n_layers


def _not_ours(hf_key: str, cfg: ModelConfig) -> bool:
    """What a whole-folder import skips: the MTP layers and rotary buffers."""
    return _is_mtp(hf_key, cfg) or hf_key.endswith("rotary_emb.inv_freq")


def _shared_to_hf(key: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return value[0] if layer_key(key)[1] in _SHARED else value  # one shared SwiGLU of n_shared x H units


def _shared_from_hf(key: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return value.unsqueeze(0) if layer_key(key)[1] in _SHARED else value


_ADAPTER = MoEStateDictAdapter(
    "DeepSeek-V3",
    _LAYER_KEYS,
    bias_has_no_hf_tensor=is_v2,
    no_bias_reason="transformers' DeepseekV2 (softmax routing) has no expert bias",
    to_hf_value=_shared_to_hf,
    from_hf_value=_shared_from_hf,
    skips_hf_key=_not_ours,
)
to_hf_key = _ADAPTER.to_hf_key
from_hf_key = _ADAPTER.from_hf_key
expert_hf_keys = _ADAPTER.expert_hf_keys
hf_keys_needed = _ADAPTER.hf_keys_needed
to_hf = _ADAPTER.to_hf


def _refuse_float8(hf_state_dict: dict[str, torch.Tensor]) -> None:
    for hf_key, value in hf_state_dict.items():
        if hf_key.endswith("weight_scale_inv") or value.dtype in _FLOAT8:
            raise ValueError(f"{hf_key} is part of a float8 checkpoint ({value.dtype}, block-scaled by "
                             f"*.weight_scale_inv tensors), which is not read as it is. {FP8_FIX}")


def from_hf(
    hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole model
    (MTP layers skipped; zero expert biases under softmax routing). KeyError names the first HF tensor
    that is missing; ValueError refuses float8 weights."""
    _refuse_float8(hf_state_dict)
    return _ADAPTER.from_hf(hf_state_dict, cfg, keys)


# ----------------------------------------------------------------------------- config.json
def unsupported(cfg: ModelConfig) -> list[str]:
    """Settings of ours that transformers' DeepseekV3 / DeepseekV2 cannot express, as "model.<key>" lines."""
    e, problems = cfg.moe, []
    if e.n_routed_experts and not e.n_shared_experts:
        problems.append("model.moe.n_shared_experts=0: transformers' DeepSeek MoE always has a shared expert")
    if is_v2(cfg):
        if e.route_norm:
            problems.append("model.moe.route_norm=true with score_func=softmax: DeepseekV2 does not renormalise")
        if e.n_expert_groups > 1:
            problems.append(f"model.moe.n_expert_groups={e.n_expert_groups} with score_func=softmax: DeepseekV2 "
                            "scores a group by its best expert, this model (as DeepSeek-V3) by its best two")
    return problems


def _rope(cfg: ModelConfig) -> dict | None:
    if not cfg.rope_scaling:
        return None
    return {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": cfg.rope_yarn_beta_fast, "beta_slow": cfg.rope_yarn_beta_slow,
            # one value for both: the attention temperature, and cos/sin left unscaled (their ratio, 1)
            "mscale": cfg.rope_yarn_mscale, "mscale_all_dim": cfg.rope_yarn_mscale}


def hf_config(cfg: ModelConfig, dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
    """config.json of the equivalent DeepseekV3ForCausalLM, or DeepseekV2ForCausalLM under softmax routing
    (the keys of the hub's files; transformers 5 reads them). ValueError when the model has a setting
    transformers cannot express."""
    problems = unsupported(cfg)
    if problems:
        raise ValueError("no Hugging Face DeepSeek equivalent: " + "; ".join(problems))
    a, e = cfg.mla, cfg.moe
    dense_layers = sum(not is_moe_layer(cfg, i) for i in range(cfg.n_layers))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": cfg.dim, "intermediate_size": ffn_hidden_dim(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": max_position_embeddings or llama_hf.default_max_position_embeddings(cfg),
        "rope_theta": cfg.rope_theta, "rope_scaling": _rope(cfg), "rope_interleave": True,
        "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank or None, "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "first_k_dense_replace": dense_layers, "n_routed_experts": e.n_routed_experts,
        "n_shared_experts": e.n_shared_experts, "num_experts_per_tok": e.top_k, "moe_intermediate_size": e.hidden_dim,
        "routed_scaling_factor": e.route_scale, "norm_topk_prob": e.route_norm, "n_group": e.n_expert_groups,
        "topk_group": e.n_limited_groups, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 0, "torch_dtype": dtype,
    }
    if is_v2(cfg):
        config.update({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                       "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False})
        config.pop("rope_interleave")
    return config


# what transformers assumes when a config.json leaves a key out (DeepseekV3Config / DeepseekV2Config defaults)
_DEFAULTS = {
    "deepseek_v3": {"tie_word_embeddings": False, "q_lora_rank": 1536, "n_shared_experts": 1,
                    "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
                    "routed_scaling_factor": 2.5, "rope_interleave": True},
    "deepseek_v2": {"tie_word_embeddings": False, "q_lora_rank": 1536, "n_shared_experts": 2,
                    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0},
}
# the model.* keys behind each config.json key, for the messages
_LABELS = {
    "model_type": "model.moe.score_func (sigmoid: deepseek_v3, softmax: deepseek_v2)", "hidden_size": "model.dim",
    "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads", "vocab_size": "model.vocab_size",
    "rms_norm_eps": "model.norm_eps", "tie_word_embeddings": "model.tie_word_embeddings",
    "intermediate_size": "model.ffn_hidden_dim", "rope_interleave": "RoPE on adjacent pairs",
    **{k: f"model.mla.{k}" for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                     "v_head_dim")},
    "n_routed_experts": "model.moe.n_routed_experts", "n_shared_experts": "model.moe.n_shared_experts",
    "num_experts_per_tok": "model.moe.top_k", "moe_intermediate_size": "model.moe.hidden_dim",
    "first_k_dense_replace": "model.moe.n_dense_layers", "routed_scaling_factor": "model.moe.route_scale",
    "n_group": "model.moe.n_expert_groups", "topk_group": "model.moe.n_limited_groups",
    "norm_topk_prob": "model.moe.route_norm",
}


def _hf_rope(hf: dict) -> dict:
    """The rope section of either transformers version (4: rope_theta + rope_scaling, 5: rope_parameters)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta"))
    rope["kind"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def config_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    """How an HF config.json disagrees with our model config, as "<ours> gives <hf key>=<value> but
    config.json has <hf key>=<theirs>" lines; [] when they describe the same network."""
    problems = unsupported(cfg)
    if hf.get("quantization_config"):
        problems.append(f"config.json has a quantization_config ({hf['quantization_config'].get('quant_method')}): "
                        f"float8 weights are not read. {FP8_FIX}")
    if problems:
        return problems
    ours = hf_config(cfg)
    checks = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim"]
    if ours["first_k_dense_replace"]:  # the dense SwiGLU's size matters only where one is used
        checks.append("intermediate_size")
    if cfg.moe.n_routed_experts:
        checks += ["n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group"]
        checks += [] if is_v2(cfg) else ["norm_topk_prob", "rope_interleave"]
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        problems.append(f"config.json has num_key_value_heads={hf['num_key_value_heads']}; MLA has one key per head")
    defaults = _DEFAULTS.get(hf.get("model_type"), {})
    for hf_key in checks:
        want, got = ours[hf_key], hf.get(hf_key, defaults.get(hf_key))
        if hf_key in ("n_group", "topk_group") and got is None:  # DeepseekV2 writes null for no groups
            got = 1
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want):
            continue
        if got != want:
            problems.append(f"{_LABELS[hf_key]} gives {hf_key}={want} but config.json has {hf_key}={got}")
    return problems + _rope_mismatches(_hf_rope(hf), cfg)


def _rope_mismatches(rope: dict, cfg: ModelConfig) -> list[str]:
    problems = []
    if rope["rope_theta"] is not None and abs(float(rope["rope_theta"]) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
        problems.append(f"model.rope_theta={cfg.rope_theta} but config.json has rope_theta={rope['rope_theta']}")
    if (rope["kind"] == "yarn") != cfg.rope_scaling:
        return problems + [f"model.rope_scaling={cfg.rope_scaling} but config.json's rope type is {rope['kind']!r}"]
    if not cfg.rope_scaling:
        return problems
    for our_key, hf_key in (("rope_scaling_factor", "factor"),
                            ("rope_original_max_seq_len", "original_max_position_embeddings"),
                            ("rope_yarn_beta_fast", "beta_fast"), ("rope_yarn_beta_slow", "beta_slow"),
                            ("rope_yarn_mscale", "mscale"), ("rope_yarn_mscale", "mscale_all_dim")):
        if float(rope.get(hf_key) or float("nan")) != float(getattr(cfg, our_key)):
            problems.append(f"model.{our_key}={getattr(cfg, our_key)} but config.json has {hf_key}={rope.get(hf_key)}")
    return problems
