"""Llama 3 <-> Hugging Face `LlamaForCausalLM`: parameter names, the RoPE row order of wq/wk, config.json.

Names (ours -> HF):
    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.w{q,k,v,o}.weight   model.layers.N.self_attn.{q,k,v,o}_proj.weight
    layers.N.feed_forward.w1/w3/w2.weight  model.layers.N.mlp.gate_proj/up_proj/down_proj.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (absent from HF files when embeddings are tied)

RoPE: our model rotates adjacent pairs (2i, 2i+1) of each head (complex numbers, Meta's layout); HF
rotates (i, i + E/2) ("rotate_half"). The same attention results when the rows of wq and wk are
reordered within each head: our row 2i goes to HF row i, our row 2i+1 to HF row i + E/2.
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pretrain.config.model import ffn_hidden_dim, head_dim

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_LAYER_KEYS = {  # ours (after "layers.N.") -> HF (after "model.layers.N.")
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEYS_BACK = {hf: ours for ours, hf in _LAYER_KEYS.items()}
_TOP_KEYS_BACK = {hf: ours for ours, hf in _TOP_KEYS.items()}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- names
def to_hf_key(key: str) -> str:
    """Our parameter name -> the HF name. KeyError for a name that has no HF counterpart."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = _OURS_LAYER.match(key)
    if match and match.group(2) in _LAYER_KEYS:
        return f"model.layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}"
    raise KeyError(f"{key!r} has no Hugging Face Llama counterpart")


def from_hf_key(hf_key: str) -> str:
    """HF parameter name -> ours. KeyError for a name we do not know (e.g. rotary inv_freq buffers)."""
    if hf_key in _TOP_KEYS_BACK:
        return _TOP_KEYS_BACK[hf_key]
    match = _HF_LAYER.match(hf_key)
    if match and match.group(2) in _LAYER_KEYS_BACK:
        return f"layers.{match.group(1)}.{_LAYER_KEYS_BACK[match.group(2)]}"
    raise KeyError(f"{hf_key!r} is not a Llama parameter we know")


def hf_keys_needed(keys: Iterable[str], cfg: ModelConfig) -> dict[str, str]:
    """For our parameter names (e.g. one pipeline stage's), the HF tensor each is read from.
    With tied embeddings the output projection is read from the embedding (HF files omit lm_head)."""
    needed = {}
    for key in keys:
        if key == "output.weight" and cfg.tie_word_embeddings:
            needed[key] = _TOP_KEYS["tok_embeddings.weight"]
        else:
            needed[key] = to_hf_key(key)
    return needed


# ----------------------------------------------------------------------------- RoPE row order
def _head_dims(cfg: ModelConfig, key: str) -> tuple[int, int]:
    """(heads, head_dim) of the projection named by `key` (wq/q_proj or wk/k_proj)."""
    E = head_dim(cfg)
    is_k = ".wk." in key or ".k_proj." in key
    return (cfg.n_kv_heads or cfg.n_heads) if is_k else cfg.n_heads, E


def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of each head from pairs (2i, 2i+1) to halves (i, i + E/2): ours -> HF. w: (H*E, D)."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`: HF -> ours. w: (H*E, D)."""
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _is_rotated(key: str) -> bool:
    return key.endswith(
        ("attention.wq.weight", "attention.wk.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight")
    )


# ----------------------------------------------------------------------------- tensors
def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF tensors (same dtype). lm_head is left out when embeddings are tied."""
    out = {}
    for key, value in state_dict.items():
        if key == "output.weight" and cfg.tie_word_embeddings:
            continue
        if _is_rotated(key):
            value = interleaved_to_half(value, *_head_dims(cfg, key))
        out[to_hf_key(key)] = value
    return out


def from_hf(
    hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole model.
    KeyError names the first HF tensor that is missing."""
    if keys is None:
        keys = [from_hf_key(k) for k in hf_state_dict if k != "lm_head.weight" or not cfg.tie_word_embeddings]
        if cfg.tie_word_embeddings and "tok_embeddings.weight" in keys:
            keys.append("output.weight")
    out = {}
    for key, hf_key in hf_keys_needed(keys, cfg).items():
        if hf_key not in hf_state_dict:
            raise KeyError(f"the HF checkpoint has no {hf_key!r} (needed for our {key!r})")
        value = hf_state_dict[hf_key]
        if _is_rotated(hf_key):
            value = half_to_interleaved(value, *_head_dims(cfg, hf_key))
        out[key] = value
    return out


# ----------------------------------------------------------------------------- config.json
def ffn_hidden_size(cfg: ModelConfig) -> int:
    """The SwiGLU hidden size exactly as model.FeedForward computes it (HF's intermediate_size)."""
    return ffn_hidden_dim(cfg)


def default_max_position_embeddings(cfg: ModelConfig) -> int:
    """The context the RoPE frequencies were made for: the original length, times the factor when scaled."""
    scale = cfg.rope_scaling_factor if cfg.rope_scaling else 1.0
    return int(cfg.rope_original_max_seq_len * scale)


def hf_config(cfg: ModelConfig, dtype: str = "bfloat16", max_position_embeddings: int | None = None) -> dict:
    """config.json of the equivalent `LlamaForCausalLM` (the keys transformers 4.x and 5.x both read)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": head_dim(cfg),
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": max_position_embeddings or default_max_position_embeddings(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    return config


def config_mismatches(hf: dict, cfg: ModelConfig) -> list[str]:
    """How an HF config.json disagrees with our model config, as "model.<key>=<ours> but config.json
    <hf key>=<theirs>" lines; [] when they describe the same network. Reads the rope keys of
    transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    ours = hf_config(cfg)
    checks = [  # (our key, HF key)
        ("dim", "hidden_size"),
        ("n_layers", "num_hidden_layers"),
        ("n_heads", "num_attention_heads"),
        ("n_kv_heads", "num_key_value_heads"),
        ("vocab_size", "vocab_size"),
        ("multiple_of / ffn_dim_multiplier", "intermediate_size"),
        ("tie_word_embeddings", "tie_word_embeddings"),
        ("norm_eps", "rms_norm_eps"),
        ("dim / n_heads", "head_dim"),
    ]
    theirs = dict(hf)
    theirs.setdefault("num_key_value_heads", theirs.get("num_attention_heads"))
    theirs.setdefault("tie_word_embeddings", False)
    if theirs.get("head_dim") is None and theirs.get("hidden_size") and theirs.get("num_attention_heads"):
        theirs["head_dim"] = theirs["hidden_size"] // theirs["num_attention_heads"]
    rope = dict(theirs.get("rope_parameters") or theirs.get("rope_scaling") or {})
    theirs["rope_theta"] = rope.get("rope_theta", theirs.get("rope_theta"))
    problems = []
    for our_key, hf_key in checks:
        want, got = ours[hf_key], theirs.get(hf_key)
        if isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * abs(want):
            continue
        if got != want:
            problems.append(f"model.{our_key} gives {hf_key}={want} but config.json has {hf_key}={got}")
    if theirs["rope_theta"] is not None and abs(float(theirs["rope_theta"]) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
        problems.append(f"model.rope_theta={cfg.rope_theta} but config.json has rope_theta={theirs['rope_theta']}")
    scaled = rope.get("rope_type", rope.get("type", "default")) == "llama3"
    if scaled != cfg.rope_scaling:
        kind = rope.get("rope_type", rope.get("type", "default"))
        problems.append(f"model.rope_scaling={cfg.rope_scaling} but config.json's rope type is {kind!r}")
    elif scaled:
        for our_key, hf_key in (
            ("rope_scaling_factor", "factor"),
            ("rope_low_freq_factor", "low_freq_factor"),
            ("rope_high_freq_factor", "high_freq_factor"),
            ("rope_original_max_seq_len", "original_max_position_embeddings"),
        ):
            if float(rope.get(hf_key, float("nan"))) != float(getattr(cfg, our_key)):
                problems.append(
                    f"model.{our_key}={getattr(cfg, our_key)} but config.json has {hf_key}={rope.get(hf_key)}"
                )
    return problems
