"""Where documents come from: the embedded corpus, local files (json, parquet, text, csv, arrow, by
extension), or a hub dataset (or a local directory laid out like one), all read through HF `datasets` as one
stream of documents in a fixed order. The tokenizer trains on it and the loader packs it.

`datasets` is imported when a stream is opened: it takes seconds, and config validation and the tokenizer
cache key must not pay for it.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING

from pretrain.config import DataConfig
from pretrain.data.embedded import embedded_documents
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    import datasets

FILE_BUILDERS = ("local", "json", "parquet", "text", "csv", "arrow")  # data.path values that name a file format
_BUILDER_BY_SUFFIX = {  # data.path=local: the builder of each file extension; longer suffixes first
    ".jsonl.gz": "json", ".json.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
    ".txt.gz": "text", ".txt": "text", ".csv": "csv", ".arrow": "arrow",
}


def open_text_stream(data: DataConfig) -> datasets.IterableDataset:
    """The documents of `data` in a fixed order, as an HF IterableDataset of dicts holding `data.text_field`."""
    # lazy: datasets takes seconds to import; config checks of data paths must not wait for it
    import datasets

    text_column = data.text_field
    if data.path == "embedded":
        text_column = "text"
        stream = datasets.Dataset.from_dict({"text": embedded_documents(data.cache_dir)})
    elif data.path in FILE_BUILDERS:
        builder = _builder_for(data)
        options = {}
        if builder == "text":
            text_column = "text"
            options["sample_by"] = "paragraph"  # a document per blank-line-separated paragraph, not per line
        files = [os.path.expanduser(f) for f in data.data_files]
        stream = datasets.load_dataset(builder, data_files=files, split=data.split, streaming=data.streaming, **options)
    else:
        stream = _load_hub_layout(data)
    if isinstance(stream, datasets.Dataset):  # streaming=false or embedded: iterate it the same way
        stream = stream.to_iterable_dataset(num_shards=1)
    if text_column != data.text_field:
        stream = stream.rename_column(text_column, data.text_field)
    return stream


def _load_hub_layout(data: DataConfig):
    """A hub id, or a local directory laid out like the hub repo: the very same load_dataset call."""
    # lazy: datasets takes seconds to import; config checks of data paths must not wait for it
    import datasets

    local_root = os.path.expanduser(data.path)
    is_local = os.path.isdir(local_root)
    try:
        return datasets.load_dataset(
            local_root if is_local else data.path,
            name=data.config_name or None,
            data_files=list(data.data_files) or None,
            split=data.split,
            streaming=data.streaming,
        )
    except (ConnectionError, OSError) as e:  # hub errors (offline, 401/404) derive from these
        if is_local:
            raise
        raise ConfigError(
            f"Cannot open data.path={data.path!r} from the Hugging Face hub: {type(e).__name__}: {e}. "
            "The hub may be unreachable from this machine, or the id wrong or gated. Fix: copy the dataset to a "
            "local directory laid out like the hub repo (for c4: <dir>/en/c4-train.00000-of-01024.json.gz, ...) "
            "and set data.path=<dir>, keeping data.data_files."
        ) from e


def _builder_for(data: DataConfig) -> str:
    if data.path != "local":
        return data.path
    builders = set()
    for pattern in data.data_files:
        builder = next((b for suffix, b in _BUILDER_BY_SUFFIX.items() if pattern.lower().endswith(suffix)), None)
        if builder is None:
            raise ConfigError(
                f"data.data_files entry {pattern!r}: cannot tell the format from its extension. Fix: use "
                f"{', '.join(_BUILDER_BY_SUFFIX)}, or set data.path to json | parquet | text | csv."
            )
        builders.add(builder)
    if len(builders) != 1:
        raise ConfigError(
            f"data.path=local needs data.data_files of one format, got {list(data.data_files)}. "
            "Fix: list files (or globs) of one format, e.g. data.data_files='[/data/*.jsonl]'."
        )
    return builders.pop()


def resolve_local_files(data: DataConfig) -> list[str]:
    """The local files `data` reads, sorted; [] for the embedded corpus and hub ids."""
    if data.path in FILE_BUILDERS:
        root = ""
    elif os.path.isdir(os.path.expanduser(data.path)):
        root = os.path.expanduser(data.path)
    else:
        return []
    patterns = data.data_files or ["**/*"]
    found = {f for p in patterns for f in glob.glob(os.path.join(root, os.path.expanduser(p)), recursive=True)}
    return sorted(os.path.abspath(f) for f in found if os.path.isfile(f))
