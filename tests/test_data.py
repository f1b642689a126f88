"""Data: embedded corpus, tokenizers, data sources, the token-window loader (sharding, resume) and hub downloads.

Everything runs on the real libraries (datasets, sentencepiece, tokenizers, huggingface_hub). The hub is
never reached: its tests run in a subprocess with HF_HUB_OFFLINE=1, so they fail fast and the same everywhere.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from helpers import compose

from pretrain.config import ConfigError, DataConfig, ModelConfig, resolve, validate_data
from pretrain.config.held_out import held_out_data
from pretrain.data.dataset import TokenWindowLoader
from pretrain.data.embedded import embedded_documents, embedded_split
from pretrain.data.sources import open_text_stream
from pretrain.data.tokenizer import HFTokenizer, build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512
SEQ_LEN = 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pretrain_cache"))


@pytest.fixture(scope="module")
def embedded(cache_dir) -> DataConfig:
    return DataConfig(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tokenizer(embedded):
    """A 512-piece BPE trained once on the embedded corpus, shared by the module."""
    return build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB))


def reference_windows(documents: list[str], tokenizer, count: int, seq_len: int = SEQ_LEN) -> list[list[int]]:
    """The first `count` windows, packed the plain way: concatenate [BOS] + doc + [EOS], cut every seq_len + 1."""
    stream: list[int] = []
    for doc in documents:
        stream += [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
        if len(stream) >= count * (seq_len + 1):
            break
    return [stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)] for i in range(count)]


def next_global_step(loaders: list[TokenWindowLoader]) -> list[list[int]]:
    """One step of every dp rank, reassembled into the global batch (window k at its index); checks
    that the ranks' windows are disjoint and together complete."""
    dp_degree, local = len(loaders), loaders[0].local_batch_size
    windows: list = [None] * loaders[0].global_batch_size
    for rank, loader in enumerate(loaders):
        micro_batches = loader.next_step()
        assert len(micro_batches) == loader.accumulation_steps
        for micro, (inputs, labels) in enumerate(micro_batches):
            assert inputs.dtype == labels.dtype == torch.long
            assert inputs.shape == labels.shape == (local, loader.seq_len)
            assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
            for row, (x, y) in enumerate(zip(inputs.tolist(), labels.tolist(), strict=True)):
                k = micro * local * dp_degree + rank * local + row
                assert windows[k] is None, f"window {k} handed out twice"
                windows[k] = x + [y[-1]]
    assert None not in windows, "some windows of the step went to no rank"
    return windows


def make_loaders(data, tokenizer, dp_degree: int, local: int, global_batch: int) -> list[TokenWindowLoader]:
    return [
        TokenWindowLoader(data, tokenizer, SEQ_LEN, local, global_batch, dp_rank=rank, dp_degree=dp_degree)
        for rank in range(dp_degree)
    ]


def write_jsonl_gz(path, texts: list[str], field: str = "text") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({field: text, "url": f"https://example.com/{i}"}) + "\n")


def test_embedded_corpus_is_real_prose_in_a_fixed_order():
    docs = embedded_documents()
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
    assert docs is embedded_documents()  # cached in-process
    assert any("assert" in d and "statement" in d for d in docs[:100])  # the language reference topics come first
    assert len(set(docs)) == len(docs)


def test_embedded_corpus_cache_on_disk_gives_the_same_documents(tmp_path):
    built = embedded_documents(str(tmp_path))  # parses the standard library, writes the cache
    (cache_file,) = tmp_path.glob("embedded_corpus_*.json")
    assert json.loads(cache_file.read_text()) == built == embedded_documents()
    # read back from the file, past the in-process cache (clearing that cache would cost the tests after
    # this one a parse of the standard library, ~5 s)
    assert embedded_documents.__wrapped__(str(tmp_path)) == built


# -- tokenizers ---------------------------------------------------------------------------------------


def test_trained_tokenizer_is_cached_and_encodes_any_text(embedded, tokenizer, cache_dir):
    models = [f for f in os.listdir(os.path.join(cache_dir, "tokenizers")) if f.endswith(".model")]
    assert models == [os.path.basename(tokenizer.source)]
    mtime = os.stat(tokenizer.source).st_mtime_ns
    again = build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB))
    assert again.source == tokenizer.source and os.stat(tokenizer.source).st_mtime_ns == mtime  # loaded, not retrained
    text = "def f(x):\n\t  return x  # naïve 😀 ∑ ü\x00\n"
    assert again.encode(text) == tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback + identity normalisation: lossless
    assert tokenizer.vocab_size <= VOCAB and tokenizer.bos_id != tokenizer.eos_id
    assert tokenizer.bos_id not in tokenizer.encode("Hello world")


def _build_in_subprocess(data: DataConfig, queue) -> None:
    tok = build_tokenizer(data, ModelConfig(vocab_size=400))
    queue.put((tok.encode("Concurrent ranks agree."), os.stat(tok.source).st_ino))


@pytest.mark.slow
def test_ranks_training_at_once_train_once_and_agree(tmp_path):
    texts = [d[:2000] for d in embedded_documents()[:80]]
    write_jsonl_gz(str(tmp_path / "docs.jsonl.gz"), texts)
    data = DataConfig(path="local", data_files=[str(tmp_path / "docs.jsonl.gz")], cache_dir=str(tmp_path / "cache"))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_build_in_subprocess, args=(data, queue)) for _ in range(3)]
    for p in ranks:
        p.start()
    results = [queue.get(timeout=120) for _ in ranks]
    for p in ranks:
        p.join()
    folder = tmp_path / "cache" / "tokenizers"
    models = sorted(f for f in os.listdir(folder) if not f.endswith(".lock"))
    assert len(models) == 1 and models[0].endswith(".model")  # no partial files left behind
    final_inode = os.stat(folder / models[0]).st_ino
    assert all(ids == results[0][0] for ids, _ in results)
    assert all(inode == final_inode for _, inode in results)  # a second training would have replaced the file


def _write_tiny_hf_tokenizer(directory, specials: list[str]) -> None:
    """A small byte-level BPE built with the `tokenizers` library, Llama 3 style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(embedded_documents()[:60], trainer)
    if specials:  # like Llama 3: the post-processor prepends BOS, which encode() must not do
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))


def test_hf_tokenizer_json_from_hf_assets_path(tmp_path, embedded):
    llama_like = tmp_path / "llama_like"
    _write_tiny_hf_tokenizer(llama_like, ["<|begin_of_text|>", "<|end_of_text|>"])
    tok = build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB, hf_assets_path=str(llama_like)))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)
    text = "Hello  world,\n\tnaïve 😀"
    assert tok.bos_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text

    qwen_like = tmp_path / "qwen_like"
    _write_tiny_hf_tokenizer(qwen_like, ["<|endoftext|>"])
    tok = build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB, hf_assets_path=str(qwen_like)))
    assert tok.bos_id == tok.eos_id == 0  # one separator serves both ends

    no_specials = tmp_path / "no_specials"
    _write_tiny_hf_tokenizer(no_specials, [])
    with pytest.raises(ValueError, match="end-of-text token"):
        build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB, hf_assets_path=str(no_specials)))


def test_tokenizer_larger_than_the_model_is_refused(embedded, tokenizer, tmp_path):
    data = DataConfig(tokenizer_path=tokenizer.source, cache_dir=embedded.cache_dir)
    with pytest.raises(ValueError, match=rf"has {tokenizer.vocab_size} tokens but model.vocab_size=300"):
        build_tokenizer(data, ModelConfig(vocab_size=300))
    too_small_to_train = DataConfig(cache_dir=embedded.cache_dir)  # its corpus is cached there: no parse
    with pytest.raises(ValueError, match="raise model.vocab_size"):
        build_tokenizer(too_small_to_train, ModelConfig(vocab_size=200))


# -- data sources -------------------------------------------------------------------------------------


def test_c4_config_reads_a_local_directory_laid_out_like_the_hub(tmp_path, tokenizer):
    docs = [d[:400] for d in embedded_documents()[200:206]]
    write_jsonl_gz(str(tmp_path / "en" / "c4-train.00000-of-01024.json.gz"), docs[:3])
    write_jsonl_gz(str(tmp_path / "en" / "c4-train.00001-of-01024.json.gz"), docs[3:])
    write_jsonl_gz(str(tmp_path / "en" / "c4-validation.00000-of-00008.json.gz"), ["not training data"])
    job = resolve(compose(["data=c4", f"data.path={tmp_path}"]))
    data = job.data
    validate_data(data)
    assert [example["text"] for example in open_text_stream(data)] == docs
    loader = TokenWindowLoader(data, tokenizer, SEQ_LEN, 2, 4)
    assert next_global_step([loader]) == reference_windows(docs, tokenizer, 4)
    # the preset measures the validation loss on c4's own validation files, read from the same directory
    assert job.validation.enable
    assert [example["text"] for example in open_text_stream(held_out_data(job))] == ["not training data"]


PARAGRAPHS = ["First document, one line.", "Second document\nspans two lines.", "Third: naïve café ∑."]


def _write_local(tmp_path, kind: str) -> str:
    if kind == "json":
        path = tmp_path / "docs.json"
        path.write_text("".join(json.dumps({"content": t}) + "\n" for t in PARAGRAPHS), encoding="utf-8")
    elif kind == "jsonl.gz":
        path = tmp_path / "docs.jsonl.gz"
        write_jsonl_gz(str(path), PARAGRAPHS, field="content")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"content": PARAGRAPHS, "id": [1, 2, 3]}), str(path))
    else:
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")  # documents = paragraphs
    return str(path)


@pytest.mark.parametrize("kind", ["json", "jsonl.gz", "parquet", "txt"])
def test_local_files_builder_from_extension(tmp_path, kind):
    data = DataConfig(path="local", data_files=[_write_local(tmp_path, kind)], text_field="content")
    validate_data(data)
    texts = [example["content"] for example in open_text_stream(data)]
    assert [t.rstrip("\n") for t in texts] == PARAGRAPHS  # the last paragraph of a .txt keeps the file's final newline


def test_local_files_explicit_builder_and_wrong_field(tmp_path, tokenizer):
    data = DataConfig(path="json", data_files=[_write_local(tmp_path, "json")], text_field="content")
    assert [example["content"] for example in open_text_stream(data)] == PARAGRAPHS
    wrong_field = DataConfig(path="json", data_files=data.data_files, text_field="body")
    with pytest.raises(ConfigError, match="data.text_field='body' is not a column"):
        TokenWindowLoader(wrong_field, tokenizer, SEQ_LEN, 1, 1).next_step()


@pytest.mark.slow
def test_unreachable_hub_says_so_and_suggests_a_local_directory(tmp_path):
    script = (
        "from pretrain.config import ConfigError, DataConfig\n"
        "from pretrain.data.sources import open_text_stream\n"
        "try:\n"
        "    open_text_stream(DataConfig(path='allenai/c4', data_files=['en/c4-train.*-of-01024.json.gz']))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "data.path='allenai/c4'" in result.stdout and "local directory laid out like the hub" in result.stdout


# -- the token-window loader --------------------------------------------------------------------------


def test_packing_matches_plain_concatenation(tokenizer, embedded):
    loader = TokenWindowLoader(embedded, tokenizer, SEQ_LEN, 4, 8)
    windows = next_global_step([loader]) + next_global_step([loader])
    assert windows == reference_windows(embedded_split(embedded_documents(), "train"), tokenizer, 16)


@pytest.mark.parametrize("dp_degree,local", [(2, 4), (4, 2), (4, 4)])
def test_dp_shards_are_disjoint_and_complete(tokenizer, embedded, dp_degree, local):
    """Every layout hands out the single-process windows: each exactly once, at the same step."""
    global_batch = 16
    single = make_loaders(embedded, tokenizer, 1, 4, global_batch)  # 4 micro-batches per step
    sharded = make_loaders(embedded, tokenizer, dp_degree, local, global_batch)
    for _ in range(3):
        assert next_global_step(sharded) == next_global_step(single)


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # the checkpoint stores it as JSON


def _resumed_run(data, tokenizer, layouts: list[tuple[int, int, int]], global_batch: int) -> list[list[int]]:
    """Runs the phases (dp_degree, local_batch_size, steps) one after another, each phase a fresh set of
    loaders restored from the JSON state that the previous phase saved."""
    windows, state = [], None
    for dp_degree, local, steps in layouts:
        loaders = make_loaders(data, tokenizer, dp_degree, local, global_batch)
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(_roundtrip(state))
        for _ in range(steps):
            windows += next_global_step(loaders)
        states = [_roundtrip(loader.state_dict()) for loader in loaders]
        assert all(s == states[0] for s in states)  # the state is global: every rank saves the same
        state = states[-1]
    return windows


def _multi_file_corpus(tmp_path) -> DataConfig:
    docs = [d[:150] for d in embedded_documents()[300:312]]
    for shard in range(3):
        write_jsonl_gz(str(tmp_path / f"part-{shard}.jsonl.gz"), docs[shard * 4 : shard * 4 + 4])
    return DataConfig(path="local", data_files=[str(tmp_path / "part-*.jsonl.gz")])


@pytest.mark.parametrize("corpus", ["embedded", "multi_file_small"])
def test_resume_twice_equals_uninterrupted(tmp_path, tokenizer, embedded, corpus):
    """Resume across dp layouts (1 -> 2 -> 4 ranks) is token-exact; the small corpus wraps into later epochs."""
    data = embedded if corpus == "embedded" else _multi_file_corpus(tmp_path)
    straight = make_loaders(data, tokenizer, 1, 8, 8)
    expected = [w for _ in range(12) for w in next_global_step(straight)]
    if corpus == "multi_file_small":
        assert straight[0].epoch >= 3  # the resumes below happen in later epochs, mid-epoch
    resumed = _resumed_run(data, tokenizer, [(1, 8, 5), (2, 2, 4), (4, 1, 3)], global_batch=8)
    assert resumed == expected
    assert straight[0].state_dict()["windows_consumed"] == 12 * 8


def test_state_saved_before_the_first_step_and_empty_data(tmp_path, tokenizer, embedded):
    fresh = TokenWindowLoader(embedded, tokenizer, SEQ_LEN, 2, 2)
    state = _roundtrip(fresh.state_dict())
    assert state == {"epoch": 0, "dataset": None, "buffer": [], "windows_consumed": 0}
    used = TokenWindowLoader(embedded, tokenizer, SEQ_LEN, 2, 2)
    used.next_step()
    used.load_state_dict(state)  # back to the start, mid-iteration
    assert next_global_step([used]) == next_global_step([fresh])
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no document with text"):
        TokenWindowLoader(DataConfig(path="local", data_files=[str(empty)]), tokenizer, SEQ_LEN, 1, 1).next_step()


# -- hub downloads ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_download_offline_exits_1_with_one_line_and_hides_the_token(tmp_path):
    secret = "hf_DoNotPrintThis0123456789"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2", HF_TOKEN=secret)
    command = [sys.executable, "-m", "pretrain.data.download", "--repo-id", "meta-llama/Llama-3.1-8B"]
    command += ["--local-dir", str(tmp_path / "llama"), "--token", secret]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the Hugging Face hub") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and secret not in result.stdout + result.stderr
