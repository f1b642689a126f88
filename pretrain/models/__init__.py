"""Model families. Each maps a family name to the module whose `build_spec()` returns its ModelSpec.

Kept import-light (no torch) so config validation can list the families before launch.
"""

FAMILIES = {
    "llama3": "pretrain.models.llama3",
}


def get_model_spec(name: str):
    """The ModelSpec of a family (imports the family's module, and torch with it)."""
    import importlib

    return importlib.import_module(FAMILIES[name]).build_spec()
