"""The `model` section of the config: one schema for every family (Llama 3, Qwen3, DeepSeek-V3), with
nested sections for the Mixture-of-Experts feed-forward (`model.moe`) and multi-head latent attention
(`model.mla`). A family reads the fields it uses; `validate_model` checks them before launch.

No torch import: a bad value fails before any process starts.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pretrain.errors import ConfigError, check_choice, check_positive

FAMILIES_PACKAGE = "pretrain.models"  # a family "x" is the package pretrain.models.x, whose SPEC describes it
WINDOW_KINDS = ("causal", "chunked", "sliding")  # which earlier keys a layer's queries see (models/common/masks.py)
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")  # model.moe.activation (models/common/moe.py)


@dataclass
class MoEConfig:
    n_routed_experts: int = 0  # routed experts per MoE layer; 0 = a dense model (every layer a SwiGLU)
    n_shared_experts: int = 0  # always-on experts beside the routed ones (one SwiGLU of n_shared x hidden_dim)
    top_k: int = 1  # routed experts each token is sent to
    hidden_dim: int = 0  # each expert's SwiGLU hidden size (HF moe_intermediate_size)
    n_dense_layers: int = 0  # the first layers keep a dense SwiGLU (DeepSeek-V3: first_k_dense_replace)
    # every Nth layer (N-1, 2N-1, ...) is MoE, the others dense (Llama 4 Maverick: 2, HF interleave_moe_layer_step)
    interleave_step: int = 1
    score_func: str = "softmax"  # softmax | sigmoid: how router logits become scores
    route_norm: bool = False  # renormalise a token's top-k weights to sum to 1 (HF norm_topk_prob)
    route_scale: float = 1.0  # multiplies the routing weights (DeepSeek-V3 671B: 2.5)
    n_expert_groups: int = 1  # group-limited routing: experts split into this many groups (DeepSeek: 8); 1 = off
    n_limited_groups: int = 1  # groups a token may route to, chosen by their top-2 scores (DeepSeek-V3: 4)
    # auxiliary-loss-free balancing: expert-bias step per optimizer step (DeepSeek-V3: 1e-3); 0 = off
    bias_update_speed: float = 0.0
    # weight of the Switch/Qwen3 balance loss (HF router_aux_loss_coef; Qwen3: 0.001), averaged over MoE layers; 0 = off
    aux_loss_coeff: float = 0.0
    # scale each token by its routing weight before the experts instead of their outputs after (Llama 4)
    score_before_experts: bool = False
    router_bias: bool = False  # a learned bias on the router logits (GPT-OSS: HF mlp.router.bias)
    expert_proj_bias: bool = False  # biases on each expert's projections (GPT-OSS: gate_up_proj_bias, down_proj_bias)
    # swiglu: silu(w1 x) * w3 x | clamped_swiglu (GPT-OSS): g = min(w1 x, limit), u = clamp(w3 x, -limit, limit),
    # g * sigmoid(alpha g) * (u + 1)
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702  # clamped_swiglu: the sigmoid's gain (GPT-OSS: 1.702)
    swiglu_limit: float = 7.0  # clamped_swiglu: the clamp on the gate (above) and the up projection (GPT-OSS: 7.0)


@dataclass
class MLAConfig:
    kv_lora_rank: int = 0  # rank of the joint key/value compression; 0 = not multi-head latent attention
    q_lora_rank: int = 0  # rank of the query compression; 0 = queries projected directly (DeepSeek 16B)
    qk_nope_head_dim: int = 128  # per-head query/key width without RoPE
    qk_rope_head_dim: int = 64  # per-head query/key width that RoPE rotates (the key part is shared by all heads)
    v_head_dim: int = 128  # per-head value width


@dataclass
class ModelConfig:
    name: str = "llama3"  # model family: a package of pretrain/models/ (llama3, qwen3, deepseek_v3)
    flavor: str = "debug"  # preset name within the family (informational; all dims are below)
    dim: int = 256  # hidden size D
    n_layers: int = 6  # transformer blocks
    n_heads: int = 16  # query heads H
    n_kv_heads: Optional[int] = None  # key/value heads for grouped-query attention; null = n_heads
    head_dim: Optional[int] = None  # width of one head E; null = dim / n_heads (Qwen3: 128)
    vocab_size: int = 2048  # embedding rows; must be >= the tokenizer's vocabulary
    # dense SwiGLU hidden size; null = from multiple_of and ffn_dim_multiplier (Llama's rule)
    ffn_hidden_dim: Optional[int] = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the SwiGLU hidden size (8B: 1.3); null = 1
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qk_norm: bool = False  # normalise each head of q and k (the kind: qk_norm_type)
    # rms: an RMSNorm with a weight, before RoPE (Qwen3) | l2: no weight, after RoPE, on RoPE layers only (Llama 4)
    qk_norm_type: str = "rms"
    rope_theta: float = 500000.0  # RoPE base frequency
    rope_scaling: bool = True  # scale the RoPE frequencies for long context (the kind: rope_scaling_type)
    rope_scaling_type: str = "llama3"  # llama3 (Llama 3.1's bands) | yarn (DeepSeek-V3)
    rope_scaling_factor: float = 8.0  # context extension factor (Llama 3.1: 8, DeepSeek-V3 YaRN: 40)
    rope_low_freq_factor: float = 1.0  # llama3 scaling: low-frequency factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: high-frequency factor
    rope_original_max_seq_len: int = 8192  # context length the frequencies were trained for (DeepSeek-V3: 4096)
    rope_yarn_beta_fast: float = 32.0  # yarn: rotations above which a frequency is kept as it is
    rope_yarn_beta_slow: float = 1.0  # yarn: rotations below which a frequency is fully interpolated
    rope_yarn_mscale: float = 1.0  # yarn: attention temperature coefficient (DeepSeek 16B: 0.707)
    # none | chunked (Llama 4: a query sees its own chunk) | sliding (GPT-OSS: the last attention_window_size keys)
    attention_window: str = "none"
    attention_window_size: int = 0  # tokens in a chunk or a sliding window (Llama 4: 8192, GPT-OSS: 128)
    # with a window: every Nth layer (N-1, 2N-1, ...) attends to its whole causal context (Llama 4: 4,
    # GPT-OSS: 2); 0 = every layer windowed
    global_attention_every: int = 0
    # every Nth layer (N-1, 2N-1, ...) has no RoPE (Llama 4: 4, HF no_rope_layer_interval); 0 = RoPE in every layer
    nope_layer_interval: int = 0
    # NoPE layers scale the query at position p by 1 + attn_scale x ln(1 + floor((p + 1) / attn_floor_scale)) (Llama 4)
    attn_temperature_tuning: bool = False
    attn_floor_scale: int = 8192  # temperature tuning: tokens per step of the scale (Llama 4: 8192, HF floor_scale)
    attn_scale: float = 0.1  # temperature tuning: the scale's strength (Llama 4: 0.1, HF attn_scale)
    tie_word_embeddings: bool = False  # share the output projection with the token embedding
    hf_assets_path: str = ""  # directory with an HF tokenizer.json (or tokenizer.model); "" = none
    moe: MoEConfig = field(default_factory=MoEConfig)  # Mixture-of-Experts feed-forward (n_routed_experts > 0)
    mla: MLAConfig = field(default_factory=MLAConfig)  # multi-head latent attention (DeepSeek-V3)


def head_dim(m: ModelConfig) -> int:
    """E: explicit, or dim / n_heads."""
    return m.head_dim or m.dim // m.n_heads


def ffn_hidden_dim(m: ModelConfig) -> int:
    """The dense SwiGLU hidden size: explicit, or Llama's rule (2/3 x 4D, scaled, rounded up to multiple_of)."""
    if m.ffn_hidden_dim is not None:
        return m.ffn_hidden_dim
    hidden = int(2 * 4 * m.dim / 3)
    if m.ffn_dim_multiplier is not None:
        hidden = int(m.ffn_dim_multiplier * hidden)
    return m.multiple_of * ((hidden + m.multiple_of - 1) // m.multiple_of)


def layer_window(m: ModelConfig, layer_id: int) -> tuple[str, int]:
    """(kind, size) of block `layer_id`'s attention mask: ("causal", 0) for a model without windows and for
    its global layers, else (model.attention_window, model.attention_window_size)."""
    if m.attention_window == "none":
        return "causal", 0
    every = m.global_attention_every
    if every and (layer_id + 1) % every == 0:
        return "causal", 0
    return m.attention_window, m.attention_window_size


def is_nope_layer(m: ModelConfig, layer_id: int) -> bool:
    """Whether block `layer_id` attends without RoPE (every model.nope_layer_interval-th layer)."""
    every = m.nope_layer_interval
    return bool(every) and (layer_id + 1) % every == 0


def is_moe_layer(m: ModelConfig, layer_id: int) -> bool:
    """Whether block `layer_id` has a MoE feed-forward."""
    e = m.moe
    return e.n_routed_experts > 0 and layer_id >= e.n_dense_layers and (layer_id + 1) % e.interleave_step == 0


def validate_model(m: ModelConfig) -> None:
    """Rules of the model section; raises ConfigError naming the key and the fix."""
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps", "rope_theta"):
        check_positive(f"model.{key}", getattr(m, key))
    for key in ("ffn_dim_multiplier", "head_dim", "ffn_hidden_dim"):
        if getattr(m, key) is not None:
            check_positive(f"model.{key}", getattr(m, key))
    check_choice("model.rope_scaling_type", m.rope_scaling_type, ("llama3", "yarn"))
    if m.rope_scaling:
        for key in ("rope_scaling_factor", "rope_original_max_seq_len"):
            check_positive(f"model.{key}", getattr(m, key))
        if m.rope_scaling_type == "llama3":
            check_positive("model.rope_low_freq_factor", m.rope_low_freq_factor)
            # equal factors (Llama 4 Scout: 1 and 1) leave no band between: each frequency is kept or divided
            if not m.rope_high_freq_factor >= m.rope_low_freq_factor:
                raise ConfigError(
                    f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be at least "
                    f"model.rope_low_freq_factor={m.rope_low_freq_factor}. Fix: e.g. 4.0 and 1.0 (Llama 3.1)."
                )
        else:
            for key in ("rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_mscale"):
                check_positive(f"model.{key}", getattr(m, key))
            if not m.rope_yarn_beta_fast > m.rope_yarn_beta_slow:
                raise ConfigError(
                    f"model.rope_yarn_beta_fast={m.rope_yarn_beta_fast} must be greater than "
                    f"model.rope_yarn_beta_slow={m.rope_yarn_beta_slow}. Fix: e.g. 32 and 1 (DeepSeek-V3)."
                )
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}. "
            "Fix: choose n_heads that divides dim, or set model.head_dim."
        )
    if m.n_kv_heads is not None and m.n_kv_heads <= 0:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must be > 0. Fix: set it to a divisor of model.n_heads, or null for "
            "n_heads."
        )
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}. "
            "Fix: set n_kv_heads to a divisor of n_heads (or null for n_heads)."
        )
    if head_dim(m) % 2:
        raise ConfigError(f"head width {head_dim(m)} (model.head_dim or dim / n_heads) is odd; RoPE rotates pairs. "
                          "Fix: make it even.")
    _validate_window(m)
    _validate_positions(m)
    _validate_moe(m)
    _validate_mla(m)
    _validate_family(m)


def family_names() -> list[str]:
    """The model families this installation has (the packages of pretrain/models/ but `common`)."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg and m.name != "common")


def family_spec(name: str) -> Any:
    """The ModelSpec of the family `name`, loaded by name as Hydra loads a `_target_`: config knows no family,
    and a family package imports no torch. A built-in family is a bare name (`qwen3`: pretrain.models.qwen3); a
    family of the user's is the dotted name of any importable module that defines SPEC (`my_lab.tiny_moe`).
    ConfigError for a name that is neither."""
    if re.fullmatch(r"[A-Za-z_]\w*", name):
        module = f"{FAMILIES_PACKAGE}.{name}"
        try:
            return importlib.import_module(module).SPEC
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    elif re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name):
        return _outside_family_spec(name)
    raise ConfigError(f"model.name={name!r} is not one of {', '.join(family_names())}. Fix: set model.name to one of "
                      "them, or to the dotted name of a module of yours that defines SPEC (docs/adding_a_model.md).")


def _outside_family_spec(name: str) -> Any:
    """The SPEC of the module `name`, a family defined outside this package."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not name.startswith(f"{e.name}.") and e.name != name:
            raise  # the module exists and imports something missing: its own error says what
        raise ConfigError(
            f"model.name={name!r}: no module {name} can be imported ({e}). Fix: install the package that holds it, or "
            "put the folder above it on the import path (PYTHONPATH=/path/to/project python launch.py ...), or use "
            f"a built-in family: {', '.join(family_names())}."
        ) from None
    spec = getattr(module, "SPEC", None)
    if not all(hasattr(spec, key) for key in ("model", "tp_plan", "flops", "features", "required")):
        raise ConfigError(
            f"model.name={name!r}: module {name} ({module.__file__}) defines no SPEC = ModelSpec(...) (from "
            f"pretrain.models import ModelSpec); its SPEC is {spec!r:.60}. Fix: define it as docs/adding_a_model.md "
            "shows."
        )
    return spec


def requested_features(m: ModelConfig) -> dict[str, str]:
    """The features a model config asks for -> the key that asks (for the error message)."""
    wanted = {}
    if m.rope_scaling:
        wanted[f"rope_{m.rope_scaling_type}"] = f"model.rope_scaling_type={m.rope_scaling_type}"
    if m.qk_norm:
        l2 = m.qk_norm_type == "l2"
        wanted["qk_l2_norm" if l2 else "qk_norm"] = "model.qk_norm_type=l2" if l2 else "model.qk_norm=true"
    if m.nope_layer_interval:
        wanted["nope_layers"] = f"model.nope_layer_interval={m.nope_layer_interval}"
    if m.attn_temperature_tuning:
        wanted["attn_temperature_tuning"] = "model.attn_temperature_tuning=true"
    if m.moe.n_routed_experts:
        wanted["moe"] = f"model.moe.n_routed_experts={m.moe.n_routed_experts}"
    if m.attention_window != "none":
        wanted[f"{m.attention_window}_attention"] = f"model.attention_window={m.attention_window}"
    if m.mla.kv_lora_rank:
        wanted["mla"] = f"model.mla.kv_lora_rank={m.mla.kv_lora_rank}"
    return wanted


def _validate_family(m: ModelConfig) -> None:
    """What the config asks of the family against what its spec says it implements."""
    spec = family_spec(m.name)
    wanted = requested_features(m)
    for feature, what in spec.required.items():
        if feature not in wanted:
            raise ConfigError(f"model.name={m.name} needs {what}. Fix: start from one of its presets "
                              f"(model={m.name}_...).")
    for feature, key in wanted.items():
        if feature not in spec.features:
            has = ", ".join(n for n in family_names() if feature in family_spec(n).features)
            raise ConfigError(
                f"{key}: the {m.name} family does not implement it (families that do: {has or 'none'}). "
                f"Fix: use one of those families (model=...), or turn it off for model.name={m.name}."
            )


def _validate_window(m: ModelConfig) -> None:
    check_choice("model.attention_window", m.attention_window, ("none",) + WINDOW_KINDS[1:])
    check_positive("model.global_attention_every", m.global_attention_every, allow_zero=True)
    if m.attention_window != "none":
        check_positive("model.attention_window_size", m.attention_window_size)


def _validate_positions(m: ModelConfig) -> None:
    """Llama 4's NoPE layers, their query temperature, and the kind of q/k norm."""
    check_choice("model.qk_norm_type", m.qk_norm_type, ("rms", "l2"))
    check_positive("model.nope_layer_interval", m.nope_layer_interval, allow_zero=True)
    if not m.attn_temperature_tuning:
        return
    check_positive("model.attn_floor_scale", m.attn_floor_scale)
    check_positive("model.attn_scale", m.attn_scale, allow_zero=True)
    if not m.nope_layer_interval:
        raise ConfigError(
            "model.attn_temperature_tuning=true scales the queries of the NoPE layers, and model.nope_layer_interval=0 "
            "leaves none. Fix: set model.nope_layer_interval (Llama 4: 4), or attn_temperature_tuning=false."
        )


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    for key in ("n_routed_experts", "n_shared_experts", "n_dense_layers", "bias_update_speed", "aux_loss_coeff"):
        check_positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
    if not e.n_routed_experts:
        return
    for key in ("top_k", "hidden_dim", "route_scale", "n_expert_groups", "n_limited_groups", "interleave_step"):
        check_positive(f"model.moe.{key}", getattr(e, key))
    check_choice("model.moe.score_func", e.score_func, ("softmax", "sigmoid"))
    check_choice("model.moe.activation", e.activation, EXPERT_ACTIVATIONS)
    if e.activation == "clamped_swiglu":
        for key in ("swiglu_alpha", "swiglu_limit"):
            check_positive(f"model.moe.{key}", getattr(e, key))
    if not any(is_moe_layer(m, i) for i in range(m.n_layers)):
        raise ConfigError(
            f"model.moe.n_dense_layers={e.n_dense_layers} and interleave_step={e.interleave_step} leave no MoE "
            f"layer of model.n_layers={m.n_layers}. Fix: lower them, or model.moe.n_routed_experts=0 for a dense model."
        )
    if e.n_routed_experts % e.n_expert_groups:
        raise ConfigError(
            f"model.moe.n_routed_experts={e.n_routed_experts} is not divisible by model.moe.n_expert_groups="
            f"{e.n_expert_groups}. Fix: use a number of groups that divides the experts (1 turns grouping off)."
        )
    if e.n_limited_groups > e.n_expert_groups:
        raise ConfigError(
            f"model.moe.n_limited_groups={e.n_limited_groups} exceeds model.moe.n_expert_groups={e.n_expert_groups}. "
            "Fix: n_limited_groups <= n_expert_groups."
        )
    reachable = e.n_limited_groups * e.n_routed_experts // e.n_expert_groups
    if e.top_k > reachable:
        raise ConfigError(
            f"model.moe.top_k={e.top_k} is more than the {reachable} experts a token can reach "
            f"(n_routed_experts={e.n_routed_experts}, n_limited_groups={e.n_limited_groups} of "
            f"n_expert_groups={e.n_expert_groups}). Fix: lower top_k or raise n_limited_groups."
        )


def _validate_mla(m: ModelConfig) -> None:
    a = m.mla
    for key in ("kv_lora_rank", "q_lora_rank"):
        check_positive(f"model.mla.{key}", getattr(a, key), allow_zero=True)
    if not a.kv_lora_rank:
        return
    for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        check_positive(f"model.mla.{key}", getattr(a, key))
    if a.qk_rope_head_dim % 2:
        raise ConfigError(f"model.mla.qk_rope_head_dim={a.qk_rope_head_dim} is odd; RoPE rotates pairs. Fix: make it "
                          "even.")
