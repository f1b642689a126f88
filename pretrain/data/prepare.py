"""Tokenize a source once into a token store (token_store.py), for runs with data=tokenized.

    python -m pretrain.data.prepare data.path=embedded model.vocab_size=512 --out ~/stores/embedded_512
    python -m pretrain.data.prepare data=local data.data_files='[/data/*.jsonl]' model=llama3_8b \\
        model.hf_assets_path=~/.cache/pretrain/hf/Llama-3.1-8B --out /data/stores/mine --num-proc 16
    python launch.py data=tokenized data.path=~/stores/embedded_512 model.vocab_size=512

The options are launch.py's `data` and `model` overrides (groups and keys), composed by Hydra the same way, so
the store holds exactly the stream a run with those options would tokenize: the same documents in the same order
(empty ones skipped), each wrapped in BOS/EOS by data.bos/data.eos, with the tokenizer build_tokenizer picks.

How it runs: this process reads the documents in order and sends chunks of them to --num-proc worker processes,
which tokenize them; the results come back in order and are appended to the token files. We do not use
`datasets.Dataset.map(num_proc=...)`: it needs a materialised dataset (a streamed hub source would be downloaded
and copied to Arrow first) and writes its results to Arrow cache files that would then be copied into ours, two
extra passes over the data on disk; here the data is read once and written once, for every kind of source, with
at most a few chunks per worker in memory.

Everything is written into DIR.partial, manifest last, then renamed to DIR: an interrupted prepare never leaves a
DIR, and the next prepare starts over from scratch. Re-running with the same inputs (source, tokenizer, BOS/EOS
rules) finds DIR complete and does nothing; with other inputs it refuses to touch DIR. Bad options or input exit
with status 2 and one line `error: ...`.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
from filelock import FileLock

from pretrain.config import DataConfig, ModelConfig, validate_data
from pretrain.config.compose import compose_config
from pretrain.data.sources import FILE_BUILDERS, iter_texts, open_text_stream, resolve_local_files
from pretrain.data.token_store import (
    FORMAT,
    INDEX,
    MANIFEST,
    PARTIAL_SUFFIX,
    TOKENIZER_DIR,
    VERSION,
    ShardWriter,
    read_manifest,
    token_dtype,
    tokenizer_files,
    tokenizer_sha256,
)
from pretrain.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, tokenizer_cache_key
from pretrain.errors import ConfigError, exit_code_of
from pretrain.files import fsync_dir

CHUNK_CHARS = 1 << 20  # characters of text per task sent to a worker (~1 MB: ~10 ms of pickling, ~0.2 s of work)
TASKS_PER_WORKER = 4  # tasks in flight per worker: enough to keep them busy, little memory
SHARD_TOKENS = 1 << 30  # tokens per file (2 GiB in uint16)
_OVERRIDE_ROOTS = ("data", "model")


def composed_config(overrides: list[str]) -> tuple[DataConfig, ModelConfig]:
    """conf/config.yaml with these data/model overrides, composed by Hydra as launch.py would."""
    # lazy: `--help` and argument errors answer before hydra loads
    from omegaconf import OmegaConf

    bad = [o for o in overrides if "=" not in o or o.split("=")[0].split(".")[0].lstrip("+~") not in _OVERRIDE_ROOTS]
    if bad:
        raise ConfigError(f"option {bad[0]!r} is not a data or model override. Fix: give launch.py's data and model "
                          "options, e.g. data=local data.data_files='[/data/*.jsonl]' model.vocab_size=512.")
    try:
        cfg = compose_config(overrides)
        return OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.model)
    except Exception as e:
        raise ConfigError(f"options {' '.join(overrides)}: {e}. Fix: the data and model options of launch.py "
                          "(`python launch.py --cfg job` shows them).") from None


def source_record(data: DataConfig) -> dict:
    """What the documents of a store came from: enough to tell whether a re-run would read the same ones."""
    path = data.path
    if path not in ("embedded", *FILE_BUILDERS) and os.path.isdir(os.path.expanduser(path)):
        path = os.path.abspath(os.path.expanduser(path))
    return {
        "path": path,
        "config_name": data.config_name,
        "data_files": list(data.data_files),
        "local_files": [[f, os.path.getsize(f)] for f in resolve_local_files(data)],
        "split": data.split,
        "text_field": data.text_field,
        # the embedded corpus is the docstrings of this Python's standard library
        "python": platform.python_version() if data.path == "embedded" else "",
    }


def tokenizer_record(data: DataConfig, model: ModelConfig, tokenizer: Tokenizer) -> dict:
    """What a token store's manifest says of the tokenizer it was made with (`build_tokenizer(data, model)`)."""
    trained = not (model.hf_assets_path or data.tokenizer_path)
    return {
        "origin": "trained" if trained else ("model.hf_assets_path" if model.hf_assets_path else "data.tokenizer_path"),
        "source": tokenizer.source,
        "cache_key": tokenizer_cache_key(data, model.vocab_size) if trained else "",
        "model_vocab_size": model.vocab_size,  # with the corpus, what names a trained tokenizer
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sha256": tokenizer_sha256(tokenizer),
    }


def _inputs(manifest: dict) -> dict:
    """The parts of a manifest that decide the store's content."""
    tokenizer = manifest.get("tokenizer", {})
    return {"version": manifest.get("version"), "source": manifest.get("source"), "bos": manifest.get("bos"),
            "eos": manifest.get("eos"), "tokenizer": (tokenizer.get("origin"), tokenizer.get("sha256"))}


def prepare(data: DataConfig, model: ModelConfig, out: str, num_proc: int = 1, progress: bool = True,
            shard_tokens: int = SHARD_TOKENS) -> dict:
    """Makes the token store `out` of `data` with the run's tokenizer (or finds it made); returns its manifest."""
    if data.format != "text":
        raise ConfigError(f"data.format={data.format!r}: prepare reads text. Fix: give the options of the source to "
                          "tokenize (e.g. data=local data.data_files=...), not data=tokenized.")
    if num_proc < 1:
        raise ConfigError(f"--num-proc {num_proc} must be >= 1. Fix: e.g. --num-proc {os.cpu_count() or 1}.")
    validate_data(data)
    tokenizer = build_tokenizer(data, model)
    dtype = token_dtype(tokenizer.vocab_size)
    planned = {"format": FORMAT, "version": VERSION, "dtype": dtype, "bos": data.bos, "eos": data.eos,
               "source": source_record(data), "tokenizer": tokenizer_record(data, model, tokenizer)}
    out = os.path.abspath(os.path.expanduser(out))
    found = _finished(out, planned)
    if found is not None:
        return found
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with FileLock(out + ".lock"):  # two prepares of one store: the second waits, then finds it made
        found = _finished(out, planned)
        if found is not None:
            return found
        partial = out + PARTIAL_SUFFIX
        if os.path.exists(partial):
            print(f"removing {partial}, left by a prepare that did not finish", file=sys.stderr)
            shutil.rmtree(partial)
        os.makedirs(os.path.join(partial, TOKENIZER_DIR))
        _copy_tokenizer(tokenizer, os.path.join(partial, TOKENIZER_DIR))
        started = time.perf_counter()
        writer = ShardWriter(partial, dtype, shard_tokens)
        documents = _tokenize(data, tokenizer, writer, dtype, num_proc, progress, desc=os.path.basename(out))
        files = writer.close()
        tokens = sum(f["tokens"] for f in files)
        if not tokens:
            shutil.rmtree(partial)
            raise ConfigError(f"data.path={data.path!r} has no document with text in data.text_field="
                              f"{data.text_field!r}. Fix: set data.text_field to the column that holds the text.")
        seconds = time.perf_counter() - started
        manifest = {**planned, "tokens": tokens, "documents": documents, "files": len(files),
                    "prepare_seconds": round(seconds, 3), "num_proc": num_proc}
        _write_json(os.path.join(partial, INDEX), {"dtype": dtype, "files": files})
        _write_json(os.path.join(partial, MANIFEST), manifest)  # last: a store without it is not complete
        if os.path.isdir(out):
            os.rmdir(out)  # an empty directory (_finished refused anything else)
        os.replace(partial, out)
        fsync_dir(os.path.dirname(out))
    print(f"wrote {out}: {documents:,} documents, {tokens:,} {dtype} tokens in {len(files)} file(s), "
          f"{tokens / seconds:,.0f} tokens/s with {num_proc} process(es)")
    return manifest


def _finished(out: str, planned: dict) -> dict | None:
    """The manifest of `out` if it is the store `planned` describes; None if `out` is absent or an empty directory."""
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return None
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        raise ConfigError(f"--out {out} exists and is not a token store (no {MANIFEST}). Fix: choose another --out, "
                          "or delete it.")
    manifest = read_manifest(out)
    if _inputs(manifest) != _inputs(planned):
        differ = [k for k, v in _inputs(planned).items() if _inputs(manifest)[k] != v]
        raise ConfigError(f"--out {out} holds a token store of other inputs ({', '.join(differ)} differ). Fix: choose "
                          "another --out, or delete it to make it again.")
    print(f"{out} is up to date: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens")
    return manifest


def _copy_tokenizer(tokenizer: Tokenizer, folder: str) -> None:
    """The tokenizer's files under the names load_tokenizer looks for, so runs need no corpus to rebuild it."""
    for file in tokenizer_files(tokenizer):
        if file.endswith(".json"):
            name = "tokenizer_config.json" if file != tokenizer.source else "tokenizer.json"
        else:
            name = "tokenizer.model"
        shutil.copyfile(file, os.path.join(folder, name))


def _chunks(data: DataConfig) -> Iterator[list[str]]:
    """The documents with text, in order, in lists of about CHUNK_CHARS characters."""
    texts, chars = [], 0
    for text in iter_texts(open_text_stream(data), data):
        if not text:  # as TokenWindowLoader: an empty document is skipped, not packed as a lone [BOS, EOS]
            continue
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield texts
            texts, chars = [], 0
    if texts:
        yield texts


def _tokenize(data: DataConfig, tokenizer: Tokenizer, writer: ShardWriter, dtype: str, num_proc: int,
              progress: bool, desc: str) -> int:
    """Tokenizes every chunk (in worker processes when num_proc > 1) and writes the tokens in order."""
    # lazy: the progress bar is the only use
    from tqdm import tqdm

    bos = [tokenizer.bos_id] if data.bos else []
    eos = [tokenizer.eos_id] if data.eos else []
    documents = tokens = 0
    bar = tqdm(desc=f"prepare {desc}", unit=" docs", disable=not progress, file=sys.stderr)
    if num_proc == 1:
        _init_worker(tokenizer, bos, eos, dtype)
        results = map(_encode_chunk, _chunks(data))
        executor = None
    else:
        # spawn: fresh interpreters, whatever threads this one started (datasets, the tokenizer trainer)
        executor = _executor(tokenizer.source, bos, eos, dtype, num_proc)
        results = _in_order(executor, _chunks(data), num_proc * TASKS_PER_WORKER)
    try:
        for chunk_tokens, chunk_documents in results:
            writer.write(chunk_tokens)
            documents += chunk_documents
            tokens += len(chunk_tokens)
            bar.update(chunk_documents)
            bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens", refresh=False)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return documents


def _executor(source: str, bos: list[int], eos: list[int], dtype: str, num_proc: int):
    # lazy: only num_proc > 1 needs it
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(source, bos, eos, dtype))


def _in_order(executor, chunks: Iterator[list[str]], in_flight: int):
    """executor.map(_encode_chunk, chunks) that reads `chunks` only `in_flight` tasks ahead (map reads them all)."""
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(executor.submit(_encode_chunk, chunk))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_worker: tuple | None = None  # (tokenizer, bos, eos, dtype) of this process


def _init_worker(tokenizer: Tokenizer | str, bos: list[int], eos: list[int], dtype: str) -> None:
    global _worker
    _worker = (load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer, bos, eos, dtype)
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker outlives a prepare killed with SIGKILL (it waits on its queue forever): it leaves once orphaned."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, int]:
    """The tokens of `texts`, each wrapped in BOS/EOS, concatenated; and how many documents they were."""
    tokenizer, bos, eos, dtype = _worker
    ids: list[int] = []
    for text in texts:
        ids += bos
        ids += tokenizer.encode(text)
        ids += eos
    return np.array(ids, dtype=dtype), len(texts)


def _write_json(path: str, value: dict) -> None:
    # lazy: json is only needed here
    import json

    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.data.prepare", description=__doc__.split("\n")[0],
        epilog="Example: python -m pretrain.data.prepare data.path=embedded model.vocab_size=512 --out DIR",
    )
    parser.add_argument("overrides", nargs="*", help="launch.py's data and model options: data=..., data.KEY=VALUE, "
                        "model=..., model.KEY=VALUE")
    parser.add_argument("--out", required=True, help="the store's directory (made; must be new, empty, or this store)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizing processes "
                        "(default: the CPU cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_intermixed_args(argv)  # overrides before and after --out


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 once the store is there, 2 with one line `error: ...` otherwise."""
    args = parse_args(argv)
    return exit_code_of(lambda: prepare(*composed_config(args.overrides), args.out, num_proc=args.num_proc,
                                        progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
