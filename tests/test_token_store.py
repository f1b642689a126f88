"""Token stores: `python -m pretrain.data.prepare` and TokenStoreLoader, against the streaming loader.

The store gives the very windows TokenWindowLoader cuts from the same source and tokenizer (embedded, JSON Lines,
parquet); shuffling is a permutation per epoch, the same for every data-parallel layout, and resumes mid-epoch
exactly; prepare does nothing the second time and an interrupted one is never taken for a store; a store made with
another tokenizer, a damaged one and one too small for a global batch are refused with the path and a fix.
Everything is real: files in tmp_path, the real datasets / sentencepiece / tokenizers, real processes in the slow
tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import LOSS_RTOL, REPO, TINY, compose, losses, read_metrics, run_launch

from pretrain.config import ConfigError, DataConfig, ModelConfig, resolve
from pretrain.data.dataset import TokenWindowLoader, build_loader
from pretrain.data.embedded import embedded_documents
from pretrain.data.prepare import prepare
from pretrain.data.shuffle import WindowOrder
from pretrain.data.store_loader import TokenStoreLoader
from pretrain.data.token_store import TokenStore
from pretrain.data.tokenizer import build_tokenizer

VOCAB = 512
SEQ_LEN = 32


@pytest.fixture(scope="module")
def embedded(cache_dir) -> DataConfig:
    return DataConfig(cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return build_tokenizer(embedded, ModelConfig(vocab_size=VOCAB))


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory, embedded) -> str:
    out = str(tmp_path_factory.mktemp("stores") / "embedded")
    prepare(embedded, ModelConfig(vocab_size=VOCAB), out, progress=False)
    return out


def corpus(cache_dir) -> list[str]:
    """The embedded corpus, from the session's cache (parsed once: parsing the standard library takes seconds)."""
    return embedded_documents(str(cache_dir))


def small_docs(cache_dir) -> list[str]:
    """~200 short documents of real prose, with an empty one (skipped by both loaders)."""
    docs = [d[:300] for d in corpus(cache_dir)[100:300]]
    docs[5] = ""
    return docs


def write_source(folder, kind: str, tokenizer) -> DataConfig:
    """The small documents as a JSON Lines or parquet file, read with the embedded corpus's tokenizer (trained in
    the session's cache, where the corpus is cached too)."""
    docs = small_docs(os.path.dirname(os.path.dirname(tokenizer.source)))
    os.makedirs(folder, exist_ok=True)
    if kind == "jsonl":
        path = os.path.join(folder, "docs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.path.join(folder, "docs.parquet")
        pq.write_table(pa.table({"body": docs}), path, row_group_size=50)
    return DataConfig(path="local", data_files=[path], text_field="body", tokenizer_path=tokenizer.source,
                      cache_dir=os.path.join(folder, "cache"))


def store_of(store: str, **options) -> DataConfig:
    return DataConfig(path=store, format="tokenized", **options)


def global_step(loaders) -> list[list[int]]:
    """One step of every dp rank, reassembled into the global batch (window k at its index k)."""
    dp_degree, local = len(loaders), loaders[0].local_batch_size
    windows: list = [None] * loaders[0].global_batch_size
    for rank, loader in enumerate(loaders):
        for micro, (inputs, labels) in enumerate(loader.next_step()):
            assert inputs.shape == labels.shape == (local, SEQ_LEN) and inputs.dtype == torch.long
            assert torch.equal(inputs[:, 1:], labels[:, :-1])
            for row, (x, y) in enumerate(zip(inputs.tolist(), labels.tolist())):
                k = (micro * dp_degree + rank) * local + row
                assert windows[k] is None
                windows[k] = x + [y[-1]]
    assert None not in windows
    return windows


def store_loaders(data, tokenizer, dp_degree: int, local: int, global_batch: int) -> list[TokenStoreLoader]:
    return [
        TokenStoreLoader(data, tokenizer, SEQ_LEN, local, global_batch, rank, dp_degree) for rank in range(dp_degree)
    ]


def refused(call, *expected: str) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "Fix:" in message, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# -- the same windows as the streaming loader -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedded", "jsonl", "parquet"])
def test_store_gives_the_streaming_windows(tmp_path, kind, embedded, tokenizer, embedded_store, cache_dir):
    if kind == "embedded":
        source, store = embedded, embedded_store
    else:  # small files, written in files of 1000 tokens: windows cross file boundaries
        source, store = write_source(tmp_path / "src", kind, tokenizer), str(tmp_path / "store")
        manifest = prepare(source, ModelConfig(vocab_size=VOCAB), store, progress=False, shard_tokens=1000)
        # the empty document is skipped, as the streaming loader skips it
        assert manifest["files"] > 5 and manifest["documents"] == len(small_docs(cache_dir)) - 1
        assert manifest["dtype"] == "uint16"
    run = store_of(store, shuffle=False, tokenizer_path=source.tokenizer_path)
    streaming = TokenWindowLoader(source, tokenizer, SEQ_LEN, 4, 8)
    stored = build_loader(run, build_tokenizer(run, ModelConfig(vocab_size=VOCAB)), SEQ_LEN, 4, 8)
    assert isinstance(stored, TokenStoreLoader)
    steps = stored.windows_per_epoch // 8  # the whole first epoch
    for _ in range(min(steps, 40)):
        assert global_step([stored]) == global_step([streaming])
    if kind != "embedded":  # the whole store is the whole stream
        docs = [d for d in small_docs(cache_dir) if d]
        whole = [t for d in docs for t in [tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id]]
        assert TokenStore(store).read(0, len(whole)).tolist() == whole and TokenStore(store).tokens == len(whole)


# -- shuffling ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tokenizer) -> str:
    folder = tmp_path_factory.mktemp("small")
    source = write_source(folder / "src", "jsonl", tokenizer)
    prepare(source, ModelConfig(vocab_size=VOCAB), str(folder / "store"), progress=False)
    return str(folder / "store")


def test_window_order_is_a_permutation_per_epoch():
    for count in (1, 2, 5, 64, 1000, 4097):
        order = WindowOrder(count, shuffle=True, seed=7)
        epochs = [order.windows(np.arange(e * count, (e + 1) * count)) for e in range(3)]
        for windows in epochs:
            assert sorted(windows.tolist()) == list(range(count))
        if count >= 64:
            assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(count))
            assert not np.array_equal(epochs[0], WindowOrder(count, shuffle=True, seed=8).windows(np.arange(count)))
    in_order = WindowOrder(10, shuffle=False, seed=7).windows(np.arange(25)).tolist()
    assert in_order == [*range(10), *range(10), 0, 1, 2, 3, 4]


def test_shuffle_is_the_same_under_every_layout(small_store, tokenizer):
    """The global batch of each step is the same set of windows for 1, 2 and 4 ranks (with accumulation), over more
    than an epoch; each epoch visits every window once; epochs differ."""
    run = store_of(small_store, shuffle=True, seed=3, tokenizer_path=tokenizer.source)
    single = store_loaders(run, tokenizer, 1, 8, 8)
    count = single[0].windows_per_epoch
    steps = count // 8 + 3  # into the second epoch
    expected = [global_step(single) for _ in range(steps)]
    for dp_degree, local in [(2, 2), (4, 2), (4, 1)]:
        loaders = store_loaders(run, tokenizer, dp_degree, local, 8)
        assert [global_step(loaders) for _ in range(steps)] == expected, (dp_degree, local)
    store, window = TokenStore(small_store), SEQ_LEN + 1
    visited = single[0].order.windows(np.arange(steps * 8)).tolist()  # window ids by global position
    assert [store.read(w * window, window).tolist() for w in visited] == [w for step in expected for w in step]
    assert sorted(visited[:count]) == list(range(count))  # epoch 0: each window once
    assert visited[:count] != list(range(count))  # in a shuffled order
    assert visited[count:] != visited[: len(visited) - count]  # epoch 1 starts in another order


def _json(state: dict) -> dict:
    return json.loads(json.dumps(state))  # as the checkpoint stores it


def test_shuffled_store_resumes_mid_epoch_under_another_layout(small_store, tokenizer):
    run = store_of(small_store, shuffle=True, seed=1, tokenizer_path=tokenizer.source)
    straight = store_loaders(run, tokenizer, 1, 8, 8)
    count = straight[0].windows_per_epoch
    total = count // 8 + 4
    expected = [global_step(straight) for _ in range(total)]
    # 2 ranks for 5 steps (prefetching ahead), then 4 ranks from the saved state, across the epoch boundary
    first = store_loaders(run, tokenizer, 2, 2, 8)
    got = [global_step(first) for _ in range(5)]
    time.sleep(0.05)  # the background threads run ahead; the state is what was handed out
    states = [_json(loader.state_dict()) for loader in first]
    assert all(s == states[0] for s in states) and states[0]["windows_consumed"] == 5 * 8
    second = store_loaders(run, tokenizer, 4, 1, 8)
    for loader in second:
        loader.load_state_dict(states[0])
    got += [global_step(second) for _ in range(2)]
    for loader in second[2:]:
        loader.close()  # its prepared steps are dropped; it goes on after the last step it handed out
    got += [global_step(second) for _ in range(total - 7)]
    assert got == expected
    assert second[0].epoch == 1
    # another seed or store layout would move the windows: refused, not silently applied
    reseeded = TokenStoreLoader(store_of(small_store, shuffle=True, seed=2, tokenizer_path=tokenizer.source),
                                tokenizer, SEQ_LEN, 8, 8)
    refused(lambda: reseeded.load_state_dict(states[0]), "seed 1 -> 2")
    refused(lambda: reseeded.load_state_dict(TokenWindowLoader(DataConfig(), tokenizer, SEQ_LEN, 8, 8).state_dict()),
            "text stream", small_store)


def test_streaming_prefetch_does_not_move_the_saved_position(embedded, tokenizer):
    """The streaming loader tokenizes ahead in its thread; its state is still the position of what it handed out."""
    ahead = TokenWindowLoader(embedded, tokenizer, SEQ_LEN, 2, 4)
    inline = TokenWindowLoader(DataConfig(cache_dir=embedded.cache_dir, prefetch_steps=0), tokenizer, SEQ_LEN, 2, 4)
    for _ in range(3):
        assert global_step([ahead]) == global_step([inline])
    time.sleep(0.05)
    assert _json(ahead.state_dict()) == _json(inline.state_dict())
    resumed = TokenWindowLoader(embedded, tokenizer, SEQ_LEN, 2, 4)
    resumed.load_state_dict(_json(ahead.state_dict()))
    expected = global_step([inline])
    assert global_step([resumed]) == expected
    ahead.close()  # drops what its thread prepared: the next step is still the one after the last handed out
    assert global_step([ahead]) == expected


# -- prepare: once, and never half -------------------------------------------------------------------------------


def test_prepare_twice_does_nothing_and_keeps_other_stores(tmp_path, tokenizer, capsys):
    source = write_source(tmp_path / "src", "jsonl", tokenizer)
    out = tmp_path / "store"
    first = prepare(source, ModelConfig(vocab_size=VOCAB), str(out), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(source, ModelConfig(vocab_size=VOCAB), str(out), progress=False)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert "is up to date" in capsys.readouterr().out
    other = DataConfig(**{**vars(source), "bos": False})
    refused(lambda: prepare(other, ModelConfig(vocab_size=VOCAB), str(out), progress=False), "other inputs", "bos")
    (tmp_path / "not_a_store").mkdir()
    (tmp_path / "not_a_store" / "notes.txt").write_text("mine")
    refused(lambda: prepare(source, ModelConfig(vocab_size=VOCAB), str(tmp_path / "not_a_store"), progress=False),
            "is not a token store")


def test_an_interrupted_prepare_is_never_taken_for_a_store(tmp_path, tokenizer):
    src = tmp_path / "src"
    source = write_source(src, "jsonl", tokenizer)
    good = open(source.data_files[0]).read()
    # a record that is not text, after the others: prepare stops part-way, as if killed
    with open(source.data_files[0], "a") as f:
        f.write(json.dumps({"body": 12}) + "\n")
    out = tmp_path / "store"
    refused(lambda: prepare(source, ModelConfig(vocab_size=VOCAB), str(out), progress=False), "holds int 12")
    partial = tmp_path / "store.partial"
    assert not out.exists() and partial.is_dir() and not (partial / "manifest.json").exists()
    # neither the missing store nor the partial folder is taken for one: before launch, and when opened
    job = lambda path: resolve(compose(["data=tokenized", f"data.path={path}"]))  # noqa: E731
    refused(lambda: job(out), str(out), "pretrain.data.prepare")
    refused(lambda: job(partial), "has no manifest.json")
    refused(lambda: TokenStore(str(partial)), str(partial), "interrupted")
    # the next prepare starts over from scratch, and the store is whole
    with open(source.data_files[0], "w") as f:
        f.write(good)
    manifest = prepare(source, ModelConfig(vocab_size=VOCAB), str(out), progress=False)
    assert not partial.exists() and TokenStore(str(out)).tokens == manifest["tokens"] > 0


# -- bad stores ---------------------------------------------------------------------------------------------------


def _tiny_hf_tokenizer(directory, documents: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents[:30], trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return os.path.join(directory, "tokenizer.json")


def test_a_store_of_another_tokenizer_is_refused(tmp_path, embedded_store, tokenizer, small_store, cache_dir):
    # made with a tokenizer trained for 512 pieces; this run would train one of 1024
    refused(lambda: build_tokenizer(store_of(embedded_store), ModelConfig(vocab_size=1024)),
            embedded_store, "model.vocab_size=512", "model.vocab_size=1024")
    # this run names another tokenizer file
    other = store_of(embedded_store, tokenizer_path=_tiny_hf_tokenizer(tmp_path / "hf", corpus(cache_dir)))
    refused(lambda: build_tokenizer(other, ModelConfig(vocab_size=VOCAB)), embedded_store, "another tokenizer")
    refused(lambda: TokenStoreLoader(other, build_tokenizer(DataConfig(tokenizer_path=other.tokenizer_path),
                                                            ModelConfig(vocab_size=VOCAB)), SEQ_LEN, 1, 1),
            "another tokenizer")
    # made with an explicit tokenizer, and this run names none
    refused(lambda: build_tokenizer(store_of(small_store), ModelConfig(vocab_size=VOCAB)),
            small_store, "data.tokenizer_path")
    # other BOS/EOS rules than the store's
    refused(lambda: TokenStoreLoader(store_of(embedded_store, eos=False), tokenizer, SEQ_LEN, 1, 1),
            embedded_store, "data.eos=true")
    # the store's own tokenizer needs no corpus and no cache: it is the one in the store
    assert build_tokenizer(store_of(embedded_store, cache_dir=str(tmp_path / "empty")),
                           ModelConfig(vocab_size=VOCAB)).encode("a test") == tokenizer.encode("a test")


def test_a_damaged_store_is_refused(tmp_path, small_store, tokenizer):
    run = lambda path: TokenStoreLoader(store_of(str(path), tokenizer_path=tokenizer.source),  # noqa: E731
                                        tokenizer, SEQ_LEN, 1, 1)
    truncated = tmp_path / "truncated"
    shutil.copytree(small_store, truncated)
    tokens = truncated / "tokens-00000.bin"
    with open(tokens, "r+b") as f:
        f.truncate(tokens.stat().st_size - 10)
    refused(lambda: run(truncated), str(tokens), "truncated or half-copied")
    no_index = tmp_path / "no_index"
    shutil.copytree(small_store, no_index)
    (no_index / "index.json").unlink()
    refused(lambda: run(no_index), "index.json", "damaged")
    half_written = tmp_path / "half_written"
    shutil.copytree(small_store, half_written)
    (half_written / "manifest.json").write_text('{"format": "pretrain-token-st')
    refused(lambda: run(half_written), "manifest.json", "damaged")


def test_a_store_smaller_than_a_global_batch_is_refused(small_store, tokenizer):
    windows = TokenStore(small_store).tokens // (SEQ_LEN + 1)
    run = store_of(small_store, tokenizer_path=tokenizer.source)
    TokenStoreLoader(run, tokenizer, SEQ_LEN, 1, windows)  # exactly one global batch: fine
    refused(lambda: TokenStoreLoader(run, tokenizer, SEQ_LEN, 1, windows + 1), small_store,
            f"{windows} windows", "training.global_batch_size")


def test_shuffle_of_a_text_stream_is_refused():
    refused(lambda: resolve(compose(["data.shuffle=true"])), "data.shuffle=true needs a token store")
    refused(lambda: resolve(compose(["data=tokenized"])), "data.format=tokenized needs data.path")


# -- the command, and a launched run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_command_in_parallel_and_killed(tmp_path, embedded_store, cache_dir):
    """Two worker processes write the very store one process writes; a prepare killed part-way leaves no store."""
    command = [sys.executable, "-m", "pretrain.data.prepare", f"data.cache_dir={cache_dir}",
               f"model.vocab_size={VOCAB}", "--num-proc", "2"]
    proc = subprocess.run([*command, "data.path=embedded", "--out", str(tmp_path / "two")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tokens-00000.bin", "index.json", "tokenizer/tokenizer.model"):
        assert (tmp_path / "two" / name).read_bytes() == open(os.path.join(embedded_store, name), "rb").read()
    # a source of ~20 MB takes seconds: kill it once tokens are being written
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for _ in range(12):
            f.writelines(json.dumps({"text": d}) + "\n" for d in corpus(cache_dir))
    out = tmp_path / "killed"
    killed = subprocess.Popen([*command, "data=local", f"data.data_files=[{big}]", f"data.tokenizer_path="
                               f"{embedded_store}/tokenizer/tokenizer.model", "--out", str(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_file = tmp_path / "killed.partial" / "tokens-00000.bin"
    deadline = time.monotonic() + 60
    while not (first_file.exists() and first_file.stat().st_size) and time.monotonic() < deadline:
        assert killed.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL  # killed, not finished
    assert not out.exists() and not (tmp_path / "killed.partial" / "manifest.json").exists()
    refused(lambda: TokenStore(str(tmp_path / "killed.partial")), "not a complete token store")


@pytest.mark.slow
def test_launched_run_on_a_store_resumes_twice_under_other_layouts(tmp_path, embedded_store, cache_dir):
    """data=tokenized (shuffled) in one process for 12 steps; the same run resumed from step 4 on two FSDP ranks,
    then from step 8 in one process with gradient accumulation, matches it within the layout tolerance."""
    args = [*TINY, "data=tokenized", f"data.path={embedded_store}", f"data.cache_dir={cache_dir}",
            "training.steps=12", "checkpoint.interval=4", "checkpoint.keep_latest_k=0"]
    proc = run_launch([*args, "training.local_batch_size=8", "job.name=straight"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    straight = losses(tmp_path / "outputs" / "straight")
    assert sorted(straight) == list(range(1, 13))
    run_dir = tmp_path / "outputs" / "resharded"
    shutil.copytree(tmp_path / "outputs" / "straight", run_dir)
    for step in (8, 12):
        shutil.rmtree(run_dir / "checkpoint" / f"step-{step}")
    state = json.loads((run_dir / "checkpoint" / "step-4" / "train_state.json").read_text())
    assert state["dataloader"]["windows_consumed"] == 4 * 8 and state["dataloader"]["shuffle"] is True
    layouts = [  # resume 1 from step 4, resume 2 from step 8 (the first resume's own checkpoint)
        ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"],
        ["training.local_batch_size=2", "training.global_batch_size=8"],
    ]
    for resume, layout in enumerate(layouts):
        if resume:
            shutil.rmtree(run_dir / "checkpoint" / "step-12")
        proc = run_launch([*args, *layout, "job.name=resharded"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "step-4" in proc.stdout if resume == 0 else "step-8" in proc.stdout
        first = 5 if resume == 0 else 9
        resumed = {m["step"]: m["loss"] for m in read_metrics(run_dir)[-(13 - first):]}
        assert sorted(resumed) == list(range(first, 13))
        for step in resumed:
            assert resumed[step] == pytest.approx(straight[step], rel=LOSS_RTOL), (resume, step)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 13)) + list(range(5, 13)) + list(range(9, 13))
