"""Llama 3 <-> Hugging Face `LlamaForCausalLM`: the common decoder's name map and config.json
(pretrain/models/common/hf.py), which are Llama's."""

from pretrain.models.common.hf import config_mismatches, from_hf, hf_config, hf_keys_needed, to_hf

__all__ = ["config_mismatches", "from_hf", "hf_config", "hf_keys_needed", "to_hf"]
