"""Bad data and tokenizer files: each one is a ConfigError that names the file (and the record where it is
known), the cause and a fix; a refused corpus leaves no tokenizer in the cache; launch.py exits 2 without a
traceback. Every file is real, written in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from helpers import TINY, run_launch

from pretrain.config import ConfigError, DataConfig, ModelConfig
from pretrain.data.dataset import TokenWindowLoader
from pretrain.data.sources import iter_texts, open_text_stream
from pretrain.data.tokenizer import SENTENCEPIECE_TRAINER_OPTIONS, _pieces_the_trainer_keeps, build_tokenizer

GOOD = [f"Document {i}: the river runs past the mill, and the train to town leaves at {i} o'clock." for i in range(40)]


def write_jsonl(path, records: list, tail: bytes = b"") -> str:
    """One JSON object per line (bare strings become {"text": ...}), then `tail` as raw bytes."""
    lines = [json.dumps(r if isinstance(r, dict) else {"text": r}) for r in records]
    path.write_bytes("".join(line + "\n" for line in lines).encode() + tail)
    return str(path)


def write_bad_file(tmp_path, kind: str) -> str:
    """A file of `kind` that a user could hand us by mistake."""
    junk = random.Random(0).randbytes(4000)
    if kind == "binary.jsonl":
        path = tmp_path / "binary.jsonl"
        path.write_bytes(junk)
    elif kind == "malformed.jsonl":  # record 41 lacks its closing brace
        return write_jsonl(tmp_path / "malformed.jsonl", GOOD, b'{"text": "no closing brace"\n')
    elif kind == "latin1.jsonl":  # record 41 is Latin-1
        return write_jsonl(tmp_path / "latin1.jsonl", GOOD, '{"text": "caf\xe9"}\n'.encode("latin-1"))
    elif kind == "binary.txt":
        path = tmp_path / "binary.txt"
        path.write_bytes(junk)
    elif kind == "latin1.txt":
        path = tmp_path / "latin1.txt"
        path.write_bytes("\n\n".join(GOOD).encode() + "\n\nun caf\xe9 cr\xe8me\n".encode("latin-1"))
    elif kind == "corrupt.parquet":
        path = tmp_path / "corrupt.parquet"
        path.write_bytes(junk)
    elif kind == "truncated.jsonl.gz":
        path = tmp_path / "truncated.jsonl.gz"
        whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in GOOD * 20).encode())
        path.write_bytes(whole[: len(whole) // 2])
    return str(path)


def local(files: list[str], tmp_path, **options) -> DataConfig:
    return DataConfig(path="local", data_files=files, cache_dir=str(tmp_path / "cache"), **options)


def refused(data: DataConfig, *expected: str, model: ModelConfig | None = None) -> str:
    """build_tokenizer(data) raises a ConfigError whose message holds `expected` and a fix; nothing is cached."""
    with pytest.raises(ConfigError) as caught:
        build_tokenizer(data, model or ModelConfig(vocab_size=512))
    message = str(caught.value)
    assert "Fix:" in message and "\n" not in message, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    folder = os.path.join(data.cache_dir, "tokenizers")
    assert not os.path.isdir(folder) or not [f for f in os.listdir(folder) if not f.endswith(".lock")]
    return message


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("binary.jsonl", ["record 1: is not valid JSON Lines"]),
        ("malformed.jsonl", ["record 41: is not valid JSON Lines"]),
        ("latin1.jsonl", ["record 41: is not UTF-8 text (cannot decode byte 0xe9)", "iconv"]),
        ("binary.txt", ["is not UTF-8 text"]),
        ("latin1.txt", ["is not UTF-8 text (cannot decode byte 0xe9)"]),
        ("corrupt.parquet", ["cannot be read as parquet"]),
        ("truncated.jsonl.gz", ["truncated or corrupt gzip file"]),
    ],
)
def test_unreadable_file_is_named_with_its_cause(tmp_path, kind, expected):
    path = write_bad_file(tmp_path, kind)
    refused(local([path], tmp_path), f"data file {path}", *expected)


@pytest.mark.parametrize("value, shown", [(7, "holds int 7, not a string"), (["a", "b"], "holds list ['a', 'b']")])
def test_text_that_is_not_a_string(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "values.jsonl", [{"text": value}] * 3)
    refused(local([path], tmp_path), f"data file {path}, record 1: data.text_field='text' {shown}")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*GOOD[:5], {"text": value}])
    refused(local([mixed], tmp_path), f"data file {mixed}, record 6: data.text_field='text' holds")


def test_missing_text_field_while_the_tokenizer_is_trained(tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": t} for t in GOOD])
    refused(local([path], tmp_path), f"data file {path}: data.text_field='text' is not a column", "['body']")


def write_hf_tokenizer(directory, specials: list[str]) -> str:
    """A small byte-level BPE tokenizer.json, made with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(GOOD, trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def test_missing_text_field_with_an_explicit_tokenizer(tmp_path):
    tokenizer = build_tokenizer(
        DataConfig(), ModelConfig(vocab_size=512, hf_assets_path=write_hf_tokenizer(tmp_path / "tok", ["</s>"]))
    )
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": t} for t in GOOD])
    with pytest.raises(ConfigError, match=rf"data file {body}: data.text_field='text' is not a column.*Fix:"):
        TokenWindowLoader(local([body], tmp_path), tokenizer, 16, 1, 1).next_step()
    # good text in the first file; the second lacks the field: the message names the second one
    good = write_jsonl(tmp_path / "a_good.jsonl", GOOD)
    other = write_jsonl(tmp_path / "b_other.jsonl", [{"body": t} for t in GOOD])
    loader = TokenWindowLoader(local([str(tmp_path / "*.jsonl")], tmp_path), tokenizer, 16, 1, 1)
    with pytest.raises(ConfigError, match=rf"data file {other}: its columns differ.*Fix:"):
        for _ in range(100):
            loader.next_step()
    assert good != other


def test_the_bad_one_of_several_files_is_named(tmp_path):
    first = write_jsonl(tmp_path / "part-0.jsonl", GOOD)
    second = write_bad_file(tmp_path, "malformed.jsonl")
    data = local([first, second], tmp_path)
    with pytest.raises(ConfigError, match=rf"^data file {second}: is not valid JSON Lines"):
        list(iter_texts(open_text_stream(data), data))


def test_unreadable_file_without_streaming(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    path = write_bad_file(tmp_path, "malformed.jsonl")
    refused(local([path], tmp_path, streaming=False), f"data file {path}: is not valid JSON Lines")


def test_corrupt_tokenizer_json(tmp_path):
    directory = tmp_path / "assets"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", ')
    refused(DataConfig(), f"{directory / 'tokenizer.json'} is not a readable tokenizer.json",
            model=ModelConfig(vocab_size=512, hf_assets_path=str(directory)))
    write_hf_tokenizer(directory, ["</s>"])
    (directory / "tokenizer_config.json").write_bytes(b'{"eos_token": "</s>", ')
    refused(DataConfig(), f"{directory / 'tokenizer_config.json'} is not valid JSON",
            model=ModelConfig(vocab_size=512, hf_assets_path=str(directory)))


def test_tokenizer_json_without_an_end_of_text_token(tmp_path):
    directory = write_hf_tokenizer(tmp_path / "no_eos", [])
    refused(DataConfig(), "tokenizer.json: cannot find an end-of-text token",
            model=ModelConfig(vocab_size=512, hf_assets_path=directory))


def test_one_long_line_trains_the_tokenizer(tmp_path):
    """The trainer drops sentences over max_sentence_length bytes: a corpus of one 1 MB line used to leave it
    nothing and was reported as a vocabulary too small. It is cut at spaces now, and trains."""
    words = random.Random(0).choices(["river", "mill", "town", "train", "naïve", "café", "1984", "the"], k=150_000)
    line = " ".join(words)
    path = write_jsonl(tmp_path / "one_long_document.jsonl", [line])
    tokenizer = build_tokenizer(local([path], tmp_path), ModelConfig(vocab_size=512))
    assert tokenizer.decode(tokenizer.encode(line[:5000])) == line[:5000]
    assert len(tokenizer.encode("the river")) < len("the river")  # it learned merges from the long line


def test_long_lines_are_cut_into_pieces_the_trainer_keeps():
    limit = SENTENCEPIECE_TRAINER_OPTIONS["max_sentence_length"]
    for line in ["word " * 20_000, "é" * 50_000, "short line", "x" * 4096]:
        pieces = list(_pieces_the_trainer_keeps(line))
        assert "".join(pieces) == line
        assert all(0 < len(p.encode()) <= limit for p in pieces)
    assert all(p.startswith(" ") for p in list(_pieces_the_trainer_keeps("word " * 20_000))[1:])  # cut at spaces


@pytest.mark.slow
def test_launch_exits_2_without_a_traceback_on_bad_files(tmp_path):
    cache = tmp_path / "cache"
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "tokenizer.json").write_bytes(random.Random(0).randbytes(500))
    cases = {
        "latin1_txt": ([f"data.data_files=['{write_bad_file(tmp_path, 'latin1.txt')}']"], "latin1.txt: is not UTF-8"),
        "numbers": (
            [f"data.data_files=['{write_jsonl(tmp_path / 'numbers.jsonl', [{'text': 1}, {'text': 2}])}']"],
            "numbers.jsonl, record 1: data.text_field='text' holds int 1",
        ),
        "corrupt_tokenizer": (
            [f"data.data_files=['{write_jsonl(tmp_path / 'good.jsonl', GOOD)}']", f"model.hf_assets_path={assets}"],
            "tokenizer.json is not a readable tokenizer.json",
        ),
    }
    for name, (overrides, expected) in cases.items():
        args = [*TINY, "training.steps=1", "data=local", *overrides, f"data.cache_dir={cache}", f"job.name={name}"]
        proc = run_launch(args, cwd=tmp_path)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr and expected in proc.stderr, f"{name}:\n{proc.stderr[-3000:]}"
        assert "Fix:" in proc.stderr
    assert not [f for f in os.listdir(cache / "tokenizers") if not f.endswith(".lock")]  # nothing trained
