"""Model families. A family is a package here (llama3, qwen3, deepseek_v3) whose `__init__.py` defines
SPEC, its ModelSpec; `common/` holds what they share. Importing a family package imports no torch."""

from pretrain.config.model import family_names, family_spec
from pretrain.models.common.spec import ModelSpec


def get_model_spec(name: str) -> ModelSpec:
    """The ModelSpec of the family `name` (ConfigError for an unknown one)."""
    return family_spec(name)


__all__ = ["ModelSpec", "family_names", "get_model_spec"]
