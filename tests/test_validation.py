"""Validation: the held-out split of the embedded corpus, the section's checks, and the held-out loss of real runs
against a plain computation. Parity of the held-out loss across layouts is checked where each layout's runs are
(test_parallel_parity, test_context_parallel, test_pipeline, test_moe_families); resumes in
test_checkpoint_resume and test_parallel_parity; the default run in test_launcher."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, compose, run_launch, val_losses

from pretrain.components.loss import cross_entropy_sum
from pretrain.config import ConfigError, ModelConfig, resolve
from pretrain.config.held_out import held_out_data
from pretrain.data.embedded import HOLDOUT_EVERY, embedded_documents, embedded_split
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import build_tokenizer
from pretrain.models import get_model_spec


def test_the_embedded_corpus_holds_out_one_document_in_a_hundred(cache_dir):
    documents = embedded_documents(str(cache_dir))
    train, held_out = embedded_split(documents, "train"), embedded_split(documents, "validation")
    assert held_out == [documents[i] for i in range(HOLDOUT_EVERY - 1, len(documents), HOLDOUT_EVERY)]
    assert len(train) + len(held_out) == len(documents) and not set(train) & set(held_out)
    with pytest.raises(ConfigError, match="splits train, validation, not 'test'"):
        embedded_split(documents, "test")


def test_the_default_run_validates_on_the_held_out_split():
    job = resolve(compose([]))
    assert job.validation.enable and job.validation.freq == 30
    held_out = held_out_data(job)
    assert (held_out.path, held_out.split, held_out.shuffle) == ("embedded", "validation", False)
    other = ["validation.path=json", "validation.data_files=[/etc/hostname]", "validation.split=other"]
    assert (job.data.split, held_out_data(resolve(compose(other))).split) == ("train", "other")
    assert not resolve(compose(["data=local", "data.data_files=[/etc/hostname]"])).validation.enable


@pytest.mark.parametrize("overrides, message", [
    (["validation.freq=0"], "validation.freq=0"),
    (["validation.steps=0"], "validation.steps=0"),
    (["validation.local_batch_size=-1"], "validation.local_batch_size=-1"),
    (["validation.format=csv"], "validation.format"),
    (["validation.split="], "validation.split=''"),
    (["validation.split=test"], "validation.split='test': the embedded corpus has the splits train, validation"),
    (["data.split=test"], "data.split='test'"),
    (["validation.seq_len=512"], "validation.seq_len=512 is longer than training.seq_len=256"),
    (["parallelism=fsdp_cp", "cluster.nproc_per_node=4", "validation.seq_len=130"],
     "validation.seq_len=130 is not divisible by 4"),
    (["parallelism=fsdp_pp", "cluster.nproc_per_node=2", "model.n_layers=4", "validation.local_batch_size=4"],
     "pipeline's stages and schedule are built for training's 8 x 256"),
    (["data=local", "data.data_files=[/etc/hostname]", "validation.enable=true"],
     "validation.data_files='\\[/data/valid-\\*.jsonl\\]'"),
    (["data=tokenized", "data.path=/nonexistent", "validation.enable=true"], "set validation.path=DIR"),
    (["validation.path=/nonexistent/valid", "validation.format=tokenized"], "validation.path='/nonexistent/valid'"),
    (["validation.path=json", "validation.data_files=[/nonexistent/*.jsonl]"], "validation.data_files entry"),
])
def test_bad_validation_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(compose(overrides))


# -- real runs --------------------------------------------------------------------------------------

# lr 0: the weights stay those of the seeded init, which the test builds again, so the held-out loss can be
# computed here the plain way. 16 windows of 32 tokens: 2 batches of 8.
FROZEN = [*TINY, "optimizer.lr=0", "training.steps=2", "training.local_batch_size=8", "checkpoint.enable=false",
          "validation.enable=true", "validation.freq=2", "validation.steps=2"]


def plain_held_out_loss(job, cache_dir) -> float:
    """Mean cross-entropy of the seeded initial model over the first 16 windows of the held-out documents."""
    tokenizer = build_tokenizer(job.data, job.model)
    stream: list[int] = []
    for doc in embedded_split(embedded_documents(str(cache_dir)), "validation"):
        stream += [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
        if len(stream) >= 16 * 33:
            break
    windows = torch.tensor(stream[: 16 * 33]).view(16, 33)
    torch.manual_seed(job.training.seed)
    model = get_model_spec(job.model.name).build_model(job.model, job.training.seq_len)
    model.init_weights()
    with torch.no_grad():
        return (cross_entropy_sum(model(windows[:, :-1]), windows[:, 1:]) / windows[:, 1:].numel()).item()


@pytest.mark.slow
def test_held_out_loss_from_a_stream_and_a_store_is_the_plain_mean(tmp_path, cache_dir):
    args = [*FROZEN, f"data.cache_dir={cache_dir}"]
    proc = run_launch([*args, "job.name=stream"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    streamed = val_losses(tmp_path / "outputs" / "stream")
    job = resolve(compose(args))
    # fp32 forward over the same 16 windows, summed in another order (2 batches): float rounding only
    assert sorted(streamed) == [2] and streamed[2] == pytest.approx(plain_held_out_loss(job, cache_dir), rel=1e-6)

    # the held-out split prepared into a token store with the run's tokenizer: the very same windows
    tokenizer = build_tokenizer(job.data, job.model)
    store = str(tmp_path / "held_out_store")
    held_out = held_out_data(job)
    held_out.tokenizer_path = tokenizer.source
    prepare(held_out, ModelConfig(vocab_size=job.model.vocab_size), store, progress=False)
    proc = run_launch([*args, "job.name=store", f"validation.path={store}", "validation.format=tokenized"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert val_losses(tmp_path / "outputs" / "store") == streamed

    # a held-out file shorter than one batch is refused at start, not at the first validation
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short to fill one batch."}) + "\n")
    proc = run_launch([*args, "job.name=short", "validation.path=json", f"validation.data_files=[{short}]"],
                      cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "fewer tokens than one validation batch of 8 x 32 tokens" in proc.stderr
    assert "Fix: lower validation.local_batch_size" in proc.stderr
