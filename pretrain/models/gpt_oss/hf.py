"""GPT-OSS <-> Hugging Face `GptOssForCausalLM`: parameter names, the RoPE row order, the fused experts,
config.json.

Names (ours -> HF), beyond Llama's (pretrain/models/common/hf.py) and the fused experts'
(pretrain/models/common/hf_moe.py: gate_up_proj (X, D, 2H) with gate and up interleaved, its bias, down_proj,
its bias):
    layers.N.attention.w{q,k,v,o}.bias  model.layers.N.self_attn.{q,k,v,o}_proj.bias
    layers.N.attention.sinks   (H,)     model.layers.N.self_attn.sinks
    layers.N.moe.router.gate.weight     model.layers.N.mlp.router.weight (X, D), .bias (X,)
    layers.N.moe.expert_bias   (X,)     none: GPT-OSS chooses experts without a balancing bias (zero on import;
                                        export refuses a non-zero one)

RoPE: ours rotates adjacent pairs of each head, HF's halves (rotate_half), so the rows of wq and wk are
reordered within each head, and so are their biases (a bias is one more column of those rows).

The hub's files (openai/gpt-oss-20b, -120b) hold the experts in MXFP4 (`*_blocks`, `*_scales`, and a
quantization_config in config.json): they are refused with the way to a bf16 copy, never read as they are.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pretrain.config.model import head_dim, layer_window
from pretrain.models.common import hf as llama_hf
from pretrain.models.common.hf_moe import MoEStateDictAdapter
from pretrain.models.common.rope import yarn_mscale

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
    **{f"attention.w{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkvo"},
    "attention.sinks": "self_attn.sinks",
    "moe.router.gate.weight": "mlp.router.weight",
    "moe.router.gate.bias": "mlp.router.bias",
}
MXFP4_FIX = ("Fix: dequantize it to bf16 first: load it with transformers (GptOssForCausalLM.from_pretrained(path, "
             "quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)) and save_pretrained the result.")


# ----------------------------------------------------------------------------- RoPE row order
_ROTATED = {  # our tensors whose rows RoPE pairs up -> whether they are k's (kv heads)
    "attention.wq.weight": False, "attention.wq.bias": False, "attention.wk.weight": True, "attention.wk.bias": True,
}


def _reorder(key: str, value: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
    """wq/wk rows and their biases between our adjacent pairs and HF's halves within each head."""
    name = key.split(".", 2)[-1]  # after "layers.N."
    if not key.startswith("layers.") or name not in _ROTATED:
        return value
    permute = llama_hf.interleaved_to_half if to_hf else llama_hf.half_to_interleaved
    heads = (cfg.n_kv_heads or cfg.n_heads) if _ROTATED[name] else cfg.n_heads
    rows = value.reshape(value.shape[0], -1)  # a bias as a one-column matrix
    return permute(rows, heads, head_dim(cfg)).reshape(value.shape)


# ----------------------------------------------------------------------------- names and tensors
_ADAPTER = MoEStateDictAdapter(
    "GPT-OSS",
    _LAYER_KEYS,
    bias_has_no_hf_tensor=lambda cfg: True,
    no_bias_reason="Hugging Face GPT-OSS chooses experts without a balancing bias",
    to_hf_value=lambda key, value, cfg: _reorder(key, value, cfg, to_hf=True),
    from_hf_value=lambda key, value, cfg: _reorder(key, value, cfg, to_hf=False),
    skips_hf_key=lambda hf_key, cfg: hf_key.endswith("rotary_emb.inv_freq"),
    fused_experts=True,
)
to_hf_key = _ADAPTER.to_hf_key
from_hf_key = _ADAPTER.from_hf_key
hf_keys_needed = _ADAPTER.hf_keys_needed
to_hf = _ADAPTER.to_hf


def from_hf(
    hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole model
    (zero expert biases). KeyError names the first HF tensor that is missing; ValueError refuses MXFP4 experts."""
    for hf_key in hf_state_dict:
        if hf_key.endswith(("_blocks", "_scales")):
            raise ValueError(f"{hf_key} is part of an MXFP4-quantized checkpoint, which is not read as it is. "
                             f"{MXFP4_FIX}")
    return _ADAPTER.from_hf(hf_state_dict, cfg, keys)


# ----------------------------------------------------------------------------- config.json
def unsupported(cfg: ModelConfig) -> list[str]:
    """Settings of ours that transformers' GptOss cannot express, as "model.<key>=..." lines."""
    e, problems = cfg.moe, []
    wants = (("score_func", "softmax"), ("route_norm", True), ("router_bias", True), ("expert_proj_bias", True),
             ("activation", "clamped_swiglu"), ("n_shared_experts", 0), ("route_scale", 1.0), ("n_expert_groups", 1),
             ("n_dense_layers", 0), ("interleave_step", 1), ("score_before_experts", False))
    for key, want in wants:
        if getattr(e, key) != want:
            problems.append(f"model.moe.{key}={getattr(e, key)}: GPT-OSS has {want}")
    if cfg.attention_window == "chunked":
        problems.append("model.attention_window=chunked: GPT-OSS's windows slide")
    if cfg.rope_scaling and cfg.rope_yarn_mscale != 1.0:
        problems.append(f"model.rope_yarn_mscale={cfg.rope_yarn_mscale}: GPT-OSS's attention factor is "
                        "0.1 ln(factor) + 1")
    if cfg.tie_word_embeddings:
        problems.append("model.tie_word_embeddings=true: GPT-OSS has its own output head")
    return problems


def _layer_types(cfg: ModelConfig) -> list[str]:
    return [f"{'full' if layer_window(cfg, i)[0] == 'causal' else 'sliding'}_attention" for i in range(cfg.n_layers)]


def _rope(cfg: ModelConfig) -> dict:
    if not cfg.rope_scaling:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": cfg.rope_yarn_beta_fast, "beta_slow": cfg.rope_yarn_beta_slow, "truncate": False}


def hf_config(cfg: ModelConfig, dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
    """config.json of the equivalent GptOssForCausalLM (the hub's keys, with transformers 5's rope_parameters
    beside its rope_scaling). ValueError when the model has a setting GPT-OSS cannot express."""
    problems = unsupported(cfg)
    if problems:
        raise ValueError("no Hugging Face GPT-OSS equivalent: " + "; ".join(problems))
    e, rope = cfg.moe, _rope(cfg)
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": cfg.dim,
        "intermediate_size": e.hidden_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "head_dim": head_dim(cfg),
        "num_local_experts": e.n_routed_experts, "num_experts_per_tok": e.top_k, "experts_per_token": e.top_k,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "swiglu_alpha": e.swiglu_alpha, "swiglu_limit": e.swiglu_limit,
        "sliding_window": cfg.attention_window_size if cfg.attention_window == "sliding" else None,
        "layer_types": _layer_types(cfg), "attention_bias": True, "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings or llama_hf.default_max_position_embeddings(cfg),
        "initial_context_length": cfg.rope_original_max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling else None, "rope_parameters": rope,
        "tie_word_embeddings": False, "router_aux_loss_coef": e.aux_loss_coeff, "output_router_logits": False,
        "initializer_range": 0.02, "torch_dtype": dtype,
    }


# what transformers' GptOssConfig assumes when a config.json leaves a key out
_DEFAULTS = {"num_key_value_heads": None, "head_dim": 64, "sliding_window": 128, "tie_word_embeddings": False,
             "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "num_experts_per_tok": 4}
_LABELS = {  # the model.* keys behind each config.json key, for the messages
    "hidden_size": "model.dim", "intermediate_size": "model.moe.hidden_dim", "num_hidden_layers": "model.n_layers",
    "num_attention_heads": "model.n_heads", "num_key_value_heads": "model.n_kv_heads", "head_dim": "model.head_dim",
    "num_local_experts": "model.moe.n_routed_experts", "num_experts_per_tok": "model.moe.top_k",
    "vocab_size": "model.vocab_size", "rms_norm_eps": "model.norm_eps", "swiglu_alpha": "model.moe.swiglu_alpha",
    "swiglu_limit": "model.moe.swiglu_limit", "sliding_window": "model.attention_window_size",
    "layer_types": "model.attention_window / global_attention_every",
    "tie_word_embeddings": "model.tie_word_embeddings",
}


def config_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    """How an HF config.json disagrees with our model config, as "<ours> gives <hf key>=<value> but config.json
    has <hf key>=<theirs>" lines; [] when they describe the same network."""
    problems = unsupported(cfg)
    if hf.get("quantization_config"):
        problems.append(f"config.json has a quantization_config ({hf['quantization_config'].get('quant_method')}): "
                        f"MXFP4 experts are not read. {MXFP4_FIX}")
    if problems:
        return problems
    ours = hf_config(cfg)
    theirs = {**_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k == "sliding_window"}}
    theirs.setdefault("num_local_experts", hf.get("num_experts"))
    if theirs["num_key_value_heads"] is None:
        theirs["num_key_value_heads"] = theirs.get("num_attention_heads")
    if "layer_types" not in hf and theirs.get("num_hidden_layers"):  # transformers' default: sliding, full, ...
        theirs["layer_types"] = [f"{'sliding' if (i + 1) % 2 else 'full'}_attention"
                                 for i in range(theirs["num_hidden_layers"])]
    checks = list(_LABELS)
    if "sliding_attention" not in ours["layer_types"]:  # the window's size matters only where one is used
        checks.remove("sliding_window")
    for hf_key in checks:
        want, got = ours[hf_key], theirs.get(hf_key)
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want):
            continue
        if got != want:
            problems.append(f"{_LABELS[hf_key]} gives {hf_key}={want} but config.json has {hf_key}={got}")
    if theirs.get("model_type") != "gpt_oss":
        problems.append(f"config.json has model_type={theirs.get('model_type')!r}, not 'gpt_oss'")
    return problems + _rope_mismatches(hf, cfg)


def _rope_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    kind = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if theta is not None and abs(float(theta) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
        problems.append(f"model.rope_theta={cfg.rope_theta} but config.json has rope_theta={theta}")
    if (kind == "yarn") != cfg.rope_scaling:
        return problems + [f"model.rope_scaling={cfg.rope_scaling} but config.json's rope type is {kind!r}"]
    if not cfg.rope_scaling:
        return problems
    for our_key, hf_key in (("rope_scaling_factor", "factor"),
                            ("rope_original_max_seq_len", "original_max_position_embeddings"),
                            ("rope_yarn_beta_fast", "beta_fast"), ("rope_yarn_beta_slow", "beta_slow")):
        if float(rope.get(hf_key) or float("nan")) != float(getattr(cfg, our_key)):
            problems.append(f"model.{our_key}={getattr(cfg, our_key)} but config.json has {hf_key}={rope.get(hf_key)}")
    if rope.get("truncate", True):  # transformers rounds the ramp's ends unless told not to
        problems.append(f"config.json's yarn truncate={rope.get('truncate', True)}: GPT-OSS here keeps the ramp's "
                        "ends fractional (truncate=false)")
    factor = rope.get("attention_factor")
    if factor is not None and abs(factor - yarn_mscale(cfg.rope_scaling_factor)) > 1e-6:
        problems.append(f"config.json has attention_factor={factor}; ours is {yarn_mscale(cfg.rope_scaling_factor)}")
    if rope.get("mscale") or rope.get("mscale_all_dim"):
        problems.append("config.json's yarn sets mscale / mscale_all_dim: GPT-OSS here uses 0.1 ln(factor) + 1")
    return problems

