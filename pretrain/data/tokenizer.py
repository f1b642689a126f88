"""Tokenizers: one small interface, two engines (SentencePiece `.model`, HF `tokenizers` `tokenizer.json`).

`build_tokenizer` resolves, in this order:
  1. `model.hf_assets_path`: a directory holding tokenizer.json (or a sentencepiece tokenizer.model);
  2. `data.tokenizer_path`: a .model file, a tokenizer.json, or a directory holding one;
  3. otherwise a byte-fallback BPE sentencepiece model with `model.vocab_size` pieces, trained on the
     first few MB of the training corpus and cached under `<data.cache_dir>/tokenizers/`.
With a token store (data.format=tokenized), 3. is the copy of the trained tokenizer the store holds; whichever is
used must be the tokenizer the store was made with (`check_store_tokenizer`).
The tokenizer's vocabulary must fit the embedding (`model.vocab_size`); BOS/EOS are added by the data
loader, never by `encode`. A tokenizer file that cannot be used, or a corpus that cannot be trained on, is a
ConfigError naming the file; a failed training leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
from abc import ABC, abstractmethod

import sentencepiece as spm
from filelock import FileLock
from tokenizers import Tokenizer as RustTokenizer

from pretrain.config import DataConfig, ModelConfig
from pretrain.data.embedded import HOLDOUT_EVERY
from pretrain.data.sources import iter_texts, open_text_stream, resolve_local_files
from pretrain.data.token_store import TOKENIZER_DIR, check_store_tokenizer, read_manifest
from pretrain.errors import ConfigError
from pretrain.log import logger

TOKENIZER_SAMPLE_CHARS = 3_000_000  # characters of the corpus the trained tokenizer sees (~1-3 s to train)

# Options of the trained tokenizer. They are part of the cache key: changing one retrains.
SENTENCEPIECE_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # any text encodes: characters outside the vocabulary become byte pieces, never <unk>
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",  # keep text as is (NFKC would make decode(encode(x)) != x)
    remove_extra_whitespaces=False,  # keep indentation and double spaces (code, tables)
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    max_sentence_length=16384,  # bytes; the trainer drops longer sentences, so _TrainingSample cuts long lines
    shuffle_input_sentence=False,  # with input_sentence_size=0 (all lines) training is deterministic
    input_sentence_size=0,
    hard_vocab_limit=False,  # a small corpus may give fewer pieces than asked; never more
    num_threads=2,  # fixed, so every machine trains the same model
)


class Tokenizer(ABC):
    """What the data loader needs: ids for text and the two document-boundary ids."""

    vocab_size: int  # embedding rows this tokenizer needs: max id + 1
    bos_id: int
    eos_id: int
    source: str  # the file it was loaded from (for logs)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens included)."""


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise ConfigError(
                f"{model_file} is not a sentencepiece model ({e}). (Llama 3's tokenizer.model is a tiktoken file.) "
                "Fix: point at a tokenizer.json or the directory holding one."
            ) from None
        self.source = model_file
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(
                f"sentencepiece model {model_file} has no BOS or EOS piece "
                f"(bos_id={self.bos_id}, eos_id={self.eos_id}). Fix: use a model trained with both."
            )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


# Document-boundary tokens of common HF tokenizers, tried when tokenizer_config.json does not name them.
_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_KNOWN_EOS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_json: str):
        try:
            self._tok = RustTokenizer.from_file(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for every file it cannot parse
            raise ConfigError(
                f"{tokenizer_json} is not a readable tokenizer.json ({e}). Fix: download it again "
                "(python -m pretrain.data.download --repo-id ...), or point at another tokenizer."
            ) from None
        self.source = tokenizer_json
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may be sparse (Qwen)
        self.bos_id, self.eos_id = self._boundary_ids(os.path.dirname(tokenizer_json))

    def _boundary_ids(self, directory: str) -> tuple[int, int]:
        named = _tokens_named_in_config(os.path.join(directory, "tokenizer_config.json"))
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        bos = named.get("bos_token") or next((t for t in _KNOWN_BOS if t in specials), None)
        eos = named.get("eos_token") or next((t for t in _KNOWN_EOS if t in specials), None)
        if eos is None:
            raise ConfigError(
                f"{self.source}: cannot find an end-of-text token (no eos_token in tokenizer_config.json and none of "
                f"{', '.join(_KNOWN_EOS)} among its special tokens {sorted(specials)[:8]}). "
                "Fix: add the tokenizer_config.json of the model, or use a tokenizer that has one."
            )
        bos = bos or eos  # Qwen-style: one <|endoftext|> separates documents
        ids = self._tok.token_to_id(bos), self._tok.token_to_id(eos)
        if None in ids:
            raise ConfigError(
                f"{self.source}: BOS {bos!r} or EOS {eos!r} is not in the vocabulary. Fix: name tokens it has as "
                "bos_token / eos_token in the tokenizer_config.json beside it, or use another tokenizer."
            )
        return ids

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: Llama 3's post-processor would prepend <|begin_of_text|>; the loader adds BOS itself
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _tokens_named_in_config(path: str) -> dict[str, str]:
    """bos_token / eos_token of an HF tokenizer_config.json (a string or {"content": ...}); {} if absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}). Fix: download it again with the tokenizer, or remove it to use "
            "the tokenizer's own special tokens."
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object. Fix: download it again with the tokenizer, or remove it.")
    named = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            named[key] = value
    return named


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json, a sentencepiece .model, or a directory holding one (tokenizer.json preferred)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer path {path} does not exist. Fix: check data.tokenizer_path / "
                          "model.hf_assets_path.")
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise ConfigError(
            f"{path} holds neither tokenizer.json nor tokenizer.model. Fix: download them "
            "(python -m pretrain.data.download --repo-id ...) or point at another directory."
        )
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def build_tokenizer(data: DataConfig, model: ModelConfig) -> Tokenizer:
    """The run's tokenizer (see the module docstring for the order). Raises ValueError if it does not fit the model."""
    if model.hf_assets_path:
        tokenizer, origin = load_tokenizer(model.hf_assets_path), "model.hf_assets_path"
    elif data.tokenizer_path:
        tokenizer, origin = load_tokenizer(data.tokenizer_path), "data.tokenizer_path"
    elif data.format == "tokenized":
        tokenizer, origin = _trained_tokenizer_of_store(data, model.vocab_size), "trained, kept in the token store"
    else:
        tokenizer, origin = _trained_tokenizer(data, model.vocab_size), "trained on the corpus"
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"The tokenizer {tokenizer.source} ({origin}) has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={model.vocab_size}. Fix: set model.vocab_size >= {tokenizer.vocab_size}, "
            "or use a smaller tokenizer."
        )
    if data.format == "tokenized":
        manifest = read_manifest(data.path)
        check_store_tokenizer(os.path.expanduser(data.path), manifest, tokenizer, data)
    return tokenizer


# -- the tokenizer of a token store -----------------------------------------------------------------------------
def _trained_tokenizer_of_store(data: DataConfig, vocab_size: int) -> Tokenizer:
    """A run on a token store without a tokenizer of its own: the trained tokenizer the store was made with, from
    the copy in the store, if the run's model.vocab_size would have trained it (the corpus is the store's)."""
    path = os.path.expanduser(data.path)
    record = read_manifest(path).get("tokenizer", {})
    if record.get("origin") != "trained":
        raise ConfigError(
            f"Token store {path} was made with the tokenizer of {record.get('origin')}={record.get('source')!r}, and "
            "this run names none (it would use a tokenizer trained on the corpus). Fix: set that option to the same "
            f"tokenizer, or data.tokenizer_path={os.path.join(path, TOKENIZER_DIR)} (the store's copy)."
        )
    if record.get("model_vocab_size") != vocab_size:
        raise ConfigError(
            f"Token store {path} was made with a tokenizer trained for "
            f"model.vocab_size={record.get('model_vocab_size')}, but this run has model.vocab_size={vocab_size}, "
            f"whose tokenizer would be another. Fix: run with model.vocab_size={record.get('model_vocab_size')}, or "
            f"prepare a store for this size: `python -m pretrain.data.prepare <data options> "
            f"model.vocab_size={vocab_size} --out NEW_DIR`."
        )
    return load_tokenizer(os.path.join(path, TOKENIZER_DIR))


def tokenizer_cache_key(data: DataConfig, vocab_size: int) -> str:
    """Names the trained tokenizer after everything that changes it: corpus source and files, text field,
    vocab size, sentencepiece version and trainer options."""
    facts = {
        "path": data.path if data.path == "embedded" else _absolute_if_local(data.path),
        "config_name": data.config_name,
        "data_files": list(data.data_files),
        "local_files": [(f, os.path.getsize(f)) for f in resolve_local_files(data)],
        "split": data.split,
        "text_field": data.text_field,
        "vocab_size": vocab_size,
        "sample_chars": TOKENIZER_SAMPLE_CHARS,
        "sample_version": 2,  # what _TrainingSample hands the trainer; 2: long lines cut to fit, the sample cut exactly
        "sentencepiece": spm.__version__,
        "options": SENTENCEPIECE_TRAINER_OPTIONS,
        # the embedded corpus is the docstrings of this Python's standard library, less its validation split
        "python": platform.python_version() if data.path == "embedded" else "",
        "embedded_holdout": HOLDOUT_EVERY if data.path == "embedded" else 0,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in (data.name or "corpus"))
    return f"{readable}_bpe{vocab_size}_{digest}"


def _absolute_if_local(path: str) -> str:
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else path


def _trained_tokenizer(data: DataConfig, vocab_size: int) -> SentencePieceTokenizer:
    """Train once, then load from the cache. Safe when every rank calls it at once: the first one to take
    the file lock trains, the others wait and load; the model is written under a temporary name and renamed."""
    folder = os.path.join(os.path.expanduser(data.cache_dir), "tokenizers")
    os.makedirs(folder, exist_ok=True)
    model_file = os.path.join(folder, tokenizer_cache_key(data, vocab_size) + ".model")
    if not os.path.isfile(model_file):
        with FileLock(model_file + ".lock"):
            if not os.path.isfile(model_file):  # another process may have trained it while we waited
                proto = _train_sentencepiece(data, vocab_size)
                partial = f"{model_file}.{os.getpid()}.partial"
                with open(partial, "wb") as f:
                    f.write(proto)
                os.replace(partial, model_file)  # atomic: readers see no file or the whole file
                logger.info("trained a %d-piece BPE tokenizer on data.path=%s -> %s", vocab_size, data.path, model_file)
    return SentencePieceTokenizer(model_file)


def _train_sentencepiece(data: DataConfig, vocab_size: int) -> bytes:
    model = io.BytesIO()
    sample = _TrainingSample(data)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            vocab_size=vocab_size,
            minloglevel=2,
            **SENTENCEPIECE_TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        if sample.error is not None:  # reading the corpus failed; sentencepiece reports it as a RuntimeError
            raise sample.error from None
        if sample.sentences == 0:
            raise ConfigError(
                f"data.path={data.path!r} has no text in data.text_field={data.text_field!r} to train the tokenizer "
                "on. Fix: set data.text_field to the column that holds the text, or give data.tokenizer_path."
            ) from None
        if "Vocabulary size is smaller than required_chars" not in str(e):
            raise
        raise ConfigError(
            f"Cannot train a {vocab_size}-piece tokenizer on data.path={data.path}: a byte-fallback BPE needs 256 byte "
            "pieces + 3 specials + the corpus's characters. Fix: raise model.vocab_size (e.g. 512 or more)."
        ) from None
    return model.getvalue()


class _TrainingSample:
    """The trainer's sentences: the non-blank lines of the first TOKENIZER_SAMPLE_CHARS characters of the corpus,
    lines longer than the trainer takes cut at spaces. Keeps the ConfigError that reading the corpus raised,
    which sentencepiece would turn into a bare RuntimeError."""

    def __init__(self, data: DataConfig):
        self.data = data
        self.sentences = 0  # handed to the trainer so far
        self.error: ConfigError | None = None

    def __iter__(self):
        try:
            yield from self._sentences()
        except ConfigError as e:
            self.error = e
            raise

    def _sentences(self):
        chars = 0
        for text in iter_texts(open_text_stream(self.data), self.data):
            for line in text.split("\n"):
                if not line.strip():
                    continue
                for sentence in _pieces_the_trainer_keeps(line[: TOKENIZER_SAMPLE_CHARS - chars]):
                    self.sentences += 1
                    yield sentence
                chars += len(line)
                if chars >= TOKENIZER_SAMPLE_CHARS:
                    return


def _pieces_the_trainer_keeps(line: str):
    """`line` cut at spaces into pieces of at most max_sentence_length bytes: the trainer drops longer ones, so a
    corpus of one long line would leave it nothing. A stretch without a space is cut where it must be."""
    step = SENTENCEPIECE_TRAINER_OPTIONS["max_sentence_length"] // 4  # characters: UTF-8 takes at most 4 bytes each
    start = 0
    while len(line) - start > step:
        end = line.rfind(" ", start + 1, start + step + 1)
        end = end if end > start else start + step
        yield line[start:end]
        start = end
    yield line[start:]
