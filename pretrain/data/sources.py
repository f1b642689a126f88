"""Where documents come from: the embedded corpus, local files (json, parquet, text, csv, arrow, by
extension), or a hub dataset (or a local directory laid out like one), all read through HF `datasets` as one
stream of documents in a fixed order. The tokenizer trains on it and the loader packs it.

`datasets` is imported when a stream is opened: it takes seconds, and config validation and the tokenizer
cache key must not pay for it.

Bad input (a binary or non-UTF-8 file, broken JSON Lines, a corrupt parquet or .gz, text that is not a string,
a missing text column) becomes one ConfigError naming the file, the cause and a fix: `open_text_stream` and
`iter_texts` translate what the readers raise, so every consumer of a stream gets the same messages.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pretrain.config import DataConfig
from pretrain.config.schema import FILE_BUILDERS
from pretrain.data.embedded import embedded_documents, embedded_split
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    import datasets

_BUILDER_BY_SUFFIX = {  # data.path=local: the builder of each file extension; longer suffixes first
    ".jsonl.gz": "json", ".json.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
    ".txt.gz": "text", ".txt": "text", ".csv": "csv", ".arrow": "arrow",
}


def open_text_stream(data: DataConfig) -> datasets.IterableDataset:
    """The documents of `data` in a fixed order, as an HF IterableDataset of dicts holding `data.text_field`."""
    # lazy: datasets takes seconds to import; config checks of data paths must not wait for it
    import datasets

    # its readers log a bad file before raising; the ConfigError of _bad_input_as_config_error says it once
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    text_column = data.text_field
    if data.path == "embedded":
        text_column = "text"
        stream = datasets.Dataset.from_dict({"text": embedded_split(embedded_documents(data.cache_dir), data.split)})
    elif data.path in FILE_BUILDERS:
        builder = _builder_for(data)
        options = {}
        if builder == "text":
            text_column = "text"
            options["sample_by"] = "paragraph"  # a document per blank-line-separated paragraph, not per line
        files = [os.path.expanduser(f) for f in data.data_files]
        with _bad_input_as_config_error(data):  # parquet footers are read here; with streaming=false, all files
            stream = datasets.load_dataset(  # the files are the split: data_files as {split: files}
                builder, data_files={data.split: files}, split=data.split, streaming=data.streaming, **options
            )
    else:
        with _bad_input_as_config_error(data):
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
            data_files={data.split: list(data.data_files)} if data.data_files else None,  # the files are the split
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


def iter_texts(stream: datasets.IterableDataset, data: DataConfig, from_start: bool = True) -> Iterator[str]:
    """The text of each document of `stream`, in order ("" for an empty or missing one). Unreadable input and
    a text that is not a string raise ConfigError naming the file (and the record, when this pass started at
    the beginning of a single JSON Lines file), the cause and a fix.

    from_start: the stream starts at its beginning, not at a resumed state (record numbers count from 1).
    """
    field = data.text_field
    records = 0  # records read by this pass
    with _bad_input_as_config_error(data, stream, lambda: records if from_start else None):
        for example in stream:
            records += 1
            if field not in example:
                raise ConfigError(
                    f"{_where(data, stream)}: data.text_field={field!r} is not a column (columns: "
                    f"{sorted(example)[:10]}). Fix: set data.text_field to the column that holds the text."
                )
            text = example[field]
            if not isinstance(text, str) and text is not None:
                raise ConfigError(
                    f"{_where(data, stream, records if from_start else None)}: data.text_field={field!r} holds "
                    f"{type(text).__name__} {_short(repr(text))}, not a string. Fix: store each document's text as "
                    "a string in that field, or set data.text_field to the column that holds the text."
                )
            yield text or ""


@contextlib.contextmanager
def _bad_input_as_config_error(
    data: DataConfig,
    stream: datasets.IterableDataset | None = None,
    records_read: Callable[[], int | None] | None = None,
):
    """Turns what unreadable input raises while `data` is opened or read into a ConfigError naming the file.
    records_read: the records of this pass read so far, when they count from the file's start (for the record
    number)."""
    read_errors = _read_errors()  # here, not in the except clause: a stream closed at exit must import nothing
    try:
        yield
    except read_errors as e:
        error = _unreadable(data, e, stream, records_read() if records_read else None)
        if error is None:  # datasets' wrapper of something that is not bad input: a bug
            raise
        raise error from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What unreadable input raises inside `datasets`: pyarrow's parsers (JSON Lines, parquet, csv), the
    UTF-8 decoder, gzip on a truncated or mislabelled .gz, datasets' cast of a file whose columns differ from
    the first file's, and its wrapper of them (streaming=false). Anything else is a bug and keeps its traceback."""
    # lazy: callers have imported datasets (and so pyarrow) already; this module must not at import time
    import datasets
    import pyarrow

    return (
        pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, pyarrow.ArrowNotImplementedError, UnicodeDecodeError,
        EOFError, gzip.BadGzipFile, zlib.error, datasets.table.CastError, datasets.exceptions.DatasetGenerationError,
    )


def _unreadable(
    data: DataConfig,
    error: BaseException,
    stream: datasets.IterableDataset | None = None,
    records_read: int | None = None,
) -> ConfigError | None:
    """The ConfigError for `error`, raised while reading `data` after `records_read` records of this pass
    (None: unknown); None for datasets' wrapper of an error that is not bad input."""
    # lazy: only reached once a stream has been opened, so datasets is imported
    import datasets

    if isinstance(error, datasets.exceptions.DatasetGenerationError):
        if not isinstance(error.__cause__, _read_errors()):
            return None
        error = error.__cause__
    builder = _builder_for(data) if data.path in FILE_BUILDERS else ""
    message = str(error).split("\n")[0].removeprefix("JSON parse error: ")
    message = _short(re.sub(r" in row \d+$", "", message))  # pyarrow's row of the block: see `record`
    record = None
    if isinstance(error, UnicodeDecodeError):
        cause = f"is not UTF-8 text (cannot decode byte 0x{error.object[error.start:error.start + 1].hex()})"
        fix = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT), or remove it from data.data_files"
        if builder == "json" and records_read is not None:
            record = records_read + 1  # pyarrow decodes a string when its record is read
    elif isinstance(error, datasets.table.CastError):
        cause = f"its columns differ from the first file's: {error.details()}"
        fix = "give every file of data.data_files the same columns, or list files of one layout only"
    elif isinstance(error, (EOFError, gzip.BadGzipFile, zlib.error)):
        cause = f"is a truncated or corrupt gzip file ({message})"
        fix = "download or compress it again, or remove it from data.data_files"
    elif builder == "json":
        cause = f"is not valid JSON Lines ({message})"
        fix = 'write one JSON object per line, e.g. {"text": "..."}, or remove the file from data.data_files'
        row = re.search(r" in row (\d+)$", str(error))  # the row of the block that failed to parse
        if row and records_read is not None:
            record = records_read + int(row.group(1)) + 1
    else:
        cause = f"cannot be read as {builder} ({message})" if builder else f"cannot be read ({message})"
        fix = "write the file again, or remove it from data.data_files"
    return ConfigError(f"{_where(data, stream, record)}: {cause}. Fix: {fix}.")


def _where(data: DataConfig, stream: datasets.IterableDataset | None = None, record: int | None = None) -> str:
    """The data file being read ("data file F, record N" when both are known), else the best we know."""
    files = _files_in_read_order(data)
    if len(files) > 1:
        shard = _shard_being_read(stream) if stream is not None and stream.n_shards == len(files) else None
        if shard is None or not 0 <= shard < len(files):
            return f"one of the {len(files)} files of data.data_files ({files[0]}, ...)"
        files, record = [files[shard]], None  # the record count spans the files before it
    if not files:
        return f"data.path={data.path!r}"
    return f"data file {files[0]}" + (f", record {record}" if record is not None else "")


def _files_in_read_order(data: DataConfig) -> list[str]:
    """The local files of `data` in the order datasets reads them: pattern by pattern, each one's matches sorted."""
    if data.path == "embedded":
        return []
    root = os.path.expanduser(data.path) if data.path not in FILE_BUILDERS else ""
    if root and not os.path.isdir(root):
        return []  # a hub id
    if not data.data_files:
        return resolve_local_files(data)
    files: list[str] = []
    for pattern in data.data_files:
        matches = sorted(glob.glob(os.path.join(root, os.path.expanduser(pattern)), recursive=True))
        files += [f for f in matches if os.path.isfile(f) and f not in files]
    return files


def _shard_being_read(stream: datasets.IterableDataset) -> int | None:
    """The shard (for streamed local files: the file) `stream` is reading, from its state; None if not known."""
    state, shard = stream.state_dict(), None
    while isinstance(state, dict):  # nested iterables, the outermost first; the innermost reads the files
        shard = state.get("shard_idx", shard)
        state = state.get("examples_iterable")
    return shard if isinstance(shard, int) else None


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
