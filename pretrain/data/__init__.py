"""Data: tokenizers, the embedded corpus, HF `datasets` streams packed into token windows, token stores made once
(`python -m pretrain.data.prepare`) and read by index, hub downloads.

Names are imported lazily so that `python -m pretrain.data.download` and config validation stay light
(no torch, no datasets).
"""

_EXPORTS = {
    "embedded_documents": "pretrain.data.embedded",
    "Tokenizer": "pretrain.data.tokenizer",
    "build_tokenizer": "pretrain.data.tokenizer",
    "load_tokenizer": "pretrain.data.tokenizer",
    "open_text_stream": "pretrain.data.sources",
    "TokenWindowLoader": "pretrain.data.dataset",
    "TokenStoreLoader": "pretrain.data.store_loader",
    "build_loader": "pretrain.data.dataset",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
    # lazy: `pretrain.data` re-exports on first use, so `import pretrain.data.x` stays light
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
