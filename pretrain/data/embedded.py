"""The embedded default corpus: real English that ships with every Python install, so the default run needs no download.

Two sources, both read as text (nothing is imported from the standard library's modules):
the topics of `pydoc_data.topics` (the language reference behind `help()`, ~465 KB) and the
module/class/function docstrings of the standard library's .py files (~2-3 MB). The order is
deterministic for a given Python version: topics by name, then files by sorted path.

It has two splits: `validation`, a fixed 1 in HOLDOUT_EVERY documents (the 100th, the 200th, ...), held out
for the validation loss, and `train`, the others.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig

from pretrain.config.schema import EMBEDDED_SPLITS
from pretrain.errors import ConfigError

HOLDOUT_EVERY = 100  # every 100th document is in the validation split, the others in train
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-liners ("Return x."), poor prose
# tests are not prose; pydoc_data is already in as topics (and is 750 KB of source to parse)
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@functools.cache
def embedded_documents(cache_dir: str | None = None) -> list[str]:
    """Every document of the corpus, in a fixed order, duplicates dropped. Parsing the standard library
    takes ~1.5-4 s on one core, once per process, or once per Python install with `cache_dir` (every
    rank of a run would parse it otherwise). The list is shared between callers: do not mutate it."""
    if cache_dir is None:
        return _build()
    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{MIN_DOCSTRING_CHARS}".encode()).hexdigest()
    path = os.path.join(os.path.expanduser(cache_dir), f"embedded_corpus_{key[:16]}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass  # not built yet, or a torn file: build it
    documents = _build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(documents, f)
    os.replace(tmp, path)  # atomic: ranks building at once write the same content
    return documents


def embedded_split(documents: list[str], split: str) -> list[str]:
    """The documents of `split` (train | validation) of the embedded corpus, in corpus order."""
    if split == "validation":
        return documents[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY]
    if split == "train":
        return [doc for i, doc in enumerate(documents, start=1) if i % HOLDOUT_EVERY]
    raise ConfigError(
        f"The embedded corpus has the splits {', '.join(EMBEDDED_SPLITS)}, not {split!r}. Fix: data.split=train (and "
        "validation.split=validation)."
    )


def _build() -> list[str]:
    return list(dict.fromkeys(_reference_topics() + _stdlib_docstrings()))  # dict keeps first occurrences in order


def _reference_topics() -> list[str]:
    # lazy: a large module, read only when the embedded corpus is built
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def _stdlib_python_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]  # prune in place: os.walk skips them
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".py"))
    return sorted(paths)


def _stdlib_docstrings() -> list[str]:
    documents = []
    for path in _stdlib_python_files():
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # lib2to3 fixtures and the like: not our business
        for node in _documented_nodes(tree):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                documents.append(doc)
    return documents


def _documented_nodes(tree: ast.Module):
    """Module, classes and functions in source order. Visits statements only: ast.walk would also
    visit every expression node and take twice as long."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED_NODES):
            yield node
        stack.extend(reversed([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]))
