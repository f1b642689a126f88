"""A token store: a source tokenized once (`python -m pretrain.data.prepare`), read by global index.

    DIR/
      manifest.json       what the store is: format version, token dtype, token and document counts, the source,
                          the tokenizer's identity, the BOS/EOS rules. Written last: a store without it is not complete
      index.json          the token files in stream order, with their token counts
      tokens-00000.bin    fixed-width tokens (uint16 when the vocabulary fits, else uint32), native byte order;
      tokens-00001.bin    the files concatenated are the stream TokenWindowLoader packs: [BOS] + doc + [EOS], ...
      tokenizer/          a copy of the tokenizer the store was made with (tokenizer.model, or tokenizer.json and
                          its tokenizer_config.json), so a run needs no corpus to rebuild it

`prepare` writes everything into DIR.partial and renames it to DIR once the manifest is in: DIR either does not
exist or is complete. Opening checks what can be checked without reading the tokens: the manifest and index
parse, every file is there with the size the index gives (a truncated or half-copied store), the counts agree.
Content is not checksummed (reading 100s of GB at every start would cost more than it saves).

Imports no torch: prepare's worker processes and config checks stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.config import DataConfig
    from pretrain.data.tokenizer import Tokenizer

FORMAT = "pretrain-token-store"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
PARTIAL_SUFFIX = ".partial"  # prepare writes DIR.partial, then renames it to DIR
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int) -> str:
    """The narrowest fixed width that holds every id of a vocabulary of `vocab_size` ids."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(number: int) -> str:
    return f"tokens-{number:05d}.bin"


def _prepare_again(path: str, first: str = "") -> str:
    return (
        f"Fix: {first}run `python -m pretrain.data.prepare <the data and model options it was made with> --out {path}` "
        "again (delete the directory first)."
    )


def read_manifest(path: str) -> dict:
    """The manifest of the token store at `path`; ConfigError if it is not a complete store."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ConfigError(
            f"data.path={path!r} is not a directory, so not a token store. Fix: make one with "
            "`python -m pretrain.data.prepare <data options> --out DIR` and set data.path=DIR, or use data=local / "
            "data=embedded for text."
        )
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        interrupted = path.rstrip("/").endswith(PARTIAL_SUFFIX) or os.path.isdir(path.rstrip("/") + PARTIAL_SUFFIX)
        if interrupted:
            cause = "prepare was interrupted before it finished"
        else:
            cause = "it was not made by prepare, or prepare did not finish"
        raise ConfigError(
            f"{path} is not a complete token store: it has no {MANIFEST} ({cause}). {_prepare_again(path)}"
        )
    manifest = _read_json(manifest_file, path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(
            f"{manifest_file} is not a version-{VERSION} {FORMAT} manifest (format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}). {_prepare_again(path)}"
        )
    return manifest


def _read_json(file: str, store: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file} is unreadable ({type(e).__name__}: {e}): the token store is damaged. "
                          f"{_prepare_again(store)}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file} is not a JSON object: the token store is damaged. {_prepare_again(store)}")
    return value


# -- the tokenizer a store was made with --------------------------------------------------------------------------
def tokenizer_files(tokenizer: Tokenizer) -> list[str]:
    """The files that make `tokenizer`: its file, and for a tokenizer.json the tokenizer_config.json beside it (which
    names BOS/EOS) when there is one."""
    files = [tokenizer.source]
    config = os.path.join(os.path.dirname(tokenizer.source), "tokenizer_config.json")
    if tokenizer.source.endswith(".json") and os.path.isfile(config):
        files.append(config)
    return files


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The identity of a tokenizer: a hash of the content of its files (where they lie does not count)."""
    digest = hashlib.sha256()
    for file in tokenizer_files(tokenizer):
        with open(file, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def check_store_tokenizer(path: str, manifest: dict, tokenizer: Tokenizer, data: DataConfig) -> None:
    """ConfigError unless the token store at `path` was made with `tokenizer` and the BOS/EOS rules of `data`."""
    record = manifest.get("tokenizer", {})
    if record.get("sha256") != tokenizer_sha256(tokenizer):
        raise ConfigError(
            f"Token store {path} was made with another tokenizer than this run's: it holds the ids of "
            f"{record.get('source')!r} ({record.get('origin')}, {record.get('vocab_size')} tokens), this run uses "
            f"{tokenizer.source!r} ({tokenizer.vocab_size} tokens), whose files differ. Fix: run with the store's "
            f"tokenizer (data.tokenizer_path={os.path.join(path, TOKENIZER_DIR)}), or prepare a store with this run's "
            "tokenizer options: `python -m pretrain.data.prepare <data and tokenizer options> --out NEW_DIR`."
        )
    rules = {"data.bos": data.bos, "data.eos": data.eos}
    made = {"data.bos": manifest.get("bos"), "data.eos": manifest.get("eos")}
    if rules != made:
        raise ConfigError(
            f"Token store {path} wraps documents with {made}, this run asks for {rules}. Fix: set "
            f"{' '.join(f'{k}={str(v).lower()}' for k, v in made.items())}, or prepare a store with these rules."
        )


@dataclass
class _Shard:
    name: str
    start: int  # position of its first token in the stream
    tokens: int
    array: np.memmap


class TokenStore:
    """The token stream of a store, memory-mapped: `read(start, count)` copies tokens [start, start + count)."""

    def __init__(self, path: str):
        self.path = os.path.expanduser(path)
        self.manifest = read_manifest(self.path)
        index = _read_json(os.path.join(self.path, INDEX), self.path)
        try:
            self.dtype = DTYPES[self.manifest["dtype"]]
            self.tokens, self.documents = int(self.manifest["tokens"]), int(self.manifest["documents"])
            entries = [(str(e["name"]), int(e["tokens"])) for e in index["files"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{self.path}: {MANIFEST} or {INDEX} lacks a field ({type(e).__name__}: {e}): the "
                              f"token store is damaged. {_prepare_again(self.path)}") from None
        self.shards: list[_Shard] = []
        start = 0
        itemsize = np.dtype(self.dtype).itemsize
        for name, tokens in entries:
            file = os.path.join(self.path, name)
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != tokens * itemsize:
                found = "is missing" if size is None else f"holds {size} bytes"
                raise ConfigError(
                    f"{file} {found}, but {INDEX} gives {tokens} tokens x {itemsize} bytes = {tokens * itemsize}: the "
                    f"token store is truncated or half-copied. {_prepare_again(self.path, 'copy it again whole, or ')}"
                )
            self.shards.append(_Shard(name, start, tokens, np.memmap(file, dtype=self.dtype, mode="r")))
            start += tokens
        if start != self.tokens:
            raise ConfigError(f"{self.path}: {INDEX} lists {start} tokens but {MANIFEST} says {self.tokens}: the token "
                              f"store is damaged. {_prepare_again(self.path)}")
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream, as a new array of the store's dtype."""
        if start < 0 or start + count > self.tokens:
            raise IndexError(f"tokens [{start}, {start + count}) are outside the store's {self.tokens}")
        out = np.empty(count, dtype=self.dtype)
        number = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < count:  # a read crosses into the next file only at a file's end
            shard = self.shards[number]
            offset = start + done - shard.start
            taken = min(count - done, shard.tokens - offset)
            out[done : done + taken] = shard.array[offset : offset + taken]
            done += taken
            number += 1
        return out

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, TOKENIZER_DIR)


class ShardWriter:
    """Appends token arrays to DIR/tokens-NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: str, dtype: str, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, DTYPES[dtype], shard_tokens
        self.files: list[dict] = []  # {"name", "tokens"} of each file, in order
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.files[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self.files[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self._close_current()
        self.files.append({"name": shard_name(len(self.files)), "tokens": 0})
        self._file = open(os.path.join(self.folder, self.files[-1]["name"]), "wb")

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        """Flushes to disk; returns the index entries."""
        self._close_current()
        return self.files
