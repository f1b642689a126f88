"""Model families. Each maps a family name to the module whose `build_spec()` returns its ModelSpec.

Kept import-light (no torch) so config validation can list the families, and what each supports,
before launch.
"""

FAMILIES = {
    "llama3": "pretrain.models.llama3",
    "qwen3": "pretrain.models.qwen3",
    "deepseek_v3": "pretrain.models.deepseek_v3",
}

# model-section features each family implements; a config asking another family for them is refused
FEATURES = {
    "llama3": {"rope_llama3"},
    "qwen3": {"qk_norm", "moe"},
    "deepseek_v3": {"moe", "mla", "rope_yarn"},
}


# features a family cannot do without
REQUIRED = {"deepseek_v3": {"mla": "model.mla.kv_lora_rank > 0 (multi-head latent attention)"}}


def requested_features(m) -> dict[str, str]:
    """The features a model config asks for -> the key that asks (for the error message)."""
    wanted = {}
    if m.rope_scaling:
        wanted[f"rope_{m.rope_scaling_type}"] = f"model.rope_scaling_type={m.rope_scaling_type}"
    if m.qk_norm:
        wanted["qk_norm"] = "model.qk_norm=true"
    if m.moe.n_routed_experts:
        wanted["moe"] = f"model.moe.n_routed_experts={m.moe.n_routed_experts}"
    if m.mla.kv_lora_rank:
        wanted["mla"] = f"model.mla.kv_lora_rank={m.mla.kv_lora_rank}"
    return wanted


def get_model_spec(name: str):
    """The ModelSpec of a family (imports the family's module, and torch with it)."""
    import importlib

    return importlib.import_module(FAMILIES[name]).build_spec()
