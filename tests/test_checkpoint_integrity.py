"""Checkpoints that know what they hold: the record of the model, tokenizer and data a step was made from (a
resume with other ones is refused, naming each key), checksums of every file (a damaged step is refused, naming
the file and the step), broken latest steps that stop the run instead of being skipped and deleted, and the lr
schedule after training.steps is raised.

Two quick tests check the record and the checksums on their own. For the rest, one small launched run (steps 5
and 10) is copied for each case. Most cases load in this process through the CheckpointManager, as the Trainer
builds it; two are launched (the exit code of a broken latest step, the lr of the first step after raising
training.steps) and one runs on two gloo ranks (each hashes its own shards; both refuse a shard damaged on the
other)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil

import pytest
from helpers import TINY, compose, read_metrics, run_launch, run_on_ranks

from pretrain.checkpoint import convert
from pretrain.checkpoint.integrity import MANIFEST, hash_files, verify_folder, write_manifest
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.provenance import differences, made_from
from pretrain.checkpoint.state import TRAIN_STATE, complete_steps
from pretrain.components.optim import build_lr_scheduler, build_optimizer, lr_factor
from pretrain.config import resolve
from pretrain.data.dataset import TokenWindowLoader
from pretrain.data.tokenizer import build_tokenizer
from pretrain.errors import ConfigError
from pretrain.models import get_model_spec

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP on one process: intended

RUN = [*TINY, "checkpoint.interval=5"]  # saves step-5 and step-10


@pytest.fixture(scope="module")
def base(launch_once):
    return launch_once(RUN)[0]


@pytest.fixture
def copy_run(base, tmp_path):
    """copy_run(name) -> a copy of the base run at <tmp>/outputs/<name>, for launch.py with job.name=<name>."""

    def copy(name: str = "run"):
        return shutil.copytree(base, tmp_path / "outputs" / name)

    return copy


def manager(run_dir, cache_dir, *overrides: str) -> CheckpointManager:
    """The checkpoint manager of the run the Trainer would build for RUN + overrides, on this process."""
    job = resolve(compose([*RUN, f"data.cache_dir={cache_dir}", *overrides]), run_dir=str(run_dir))
    t = job.training
    model = get_model_spec(job.model.name).build_model(job.model, t.seq_len)
    optimizer = build_optimizer(model, job.optimizer)
    scheduler = build_lr_scheduler(optimizer, job.lr_scheduler, t.steps)
    loader = TokenWindowLoader(job.data, build_tokenizer(job.data, job.model), t.seq_len, t.local_batch_size,
                               t.global_batch_size)
    return CheckpointManager(job.checkpoint, str(run_dir), [model], optimizer, scheduler, loader, True, job=job)


def refusal(run_dir, cache_dir, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        manager(run_dir, cache_dir, *overrides).load()
    return str(caught.value)


@contextlib.contextmanager
def warnings_logged():
    """The pretrain logger's warnings (whatever its handlers and propagation), as a list of messages."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("pretrain")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- quick: the parts on their own
def test_the_record_tells_another_model_from_the_same_one_spelled_otherwise():
    def record(*overrides):
        return made_from(resolve(compose([*TINY, *overrides])))

    base = record()
    same = record("model.head_dim=16", "model.ffn_hidden_dim=192", "model.flavor=renamed", "optimizer.lr=1",
                  "training.steps=99", "training.seq_len=64", "model.moe.aux_loss_coeff=0.01")
    assert differences(base, same, data=True) == []
    assert differences(record("model.n_kv_heads=4"), record("model.n_kv_heads=null"), data=True) == []  # 4 heads
    assert differences(base, record("model.multiple_of=64"), data=True) == []  # ffn_hidden_dim 192 either way
    other = record("model.n_heads=8", "model.n_kv_heads=4", "model.rope_theta=10000", "data.text_field=body")
    assert differences(base, other, data=False) == [
        ("model.n_heads", 4, 8), ("model.n_kv_heads", 2, 4), ("model.rope_theta", 500000.0, 10000.0)]
    assert differences(base, other, data=True)[-1] == ("data.text_field", "text", "body")


def test_checksums_find_a_flipped_bit_a_truncation_and_a_missing_file(tmp_path):
    assert verify_folder(str(tmp_path)) == (False, [])  # no checksums.json: nothing to verify against
    (tmp_path / "a.distcp").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (tmp_path / "b.distcp").write_bytes(b"b" * 100)
    write_manifest(str(tmp_path), hash_files(str(tmp_path), ["a.distcp", "b.distcp"]))
    assert verify_folder(str(tmp_path)) == (True, [])
    flip_a_byte(tmp_path / "a.distcp")
    (tmp_path / "b.distcp").write_bytes(b"b" * 10)
    assert verify_folder(str(tmp_path)) == (True, ["b.distcp has 10 bytes where 100 were written (truncated)"])
    (tmp_path / "b.distcp").write_bytes(b"b" * 100)
    assert verify_folder(str(tmp_path)) == (
        True, ["a.distcp does not match the checksum written with it (changed since the save)"])
    (tmp_path / "a.distcp").unlink()
    assert verify_folder(str(tmp_path)) == (True, ["a.distcp is missing"])


# ----------------------------------------------------------------------------- what a checkpoint was made from
@pytest.mark.slow  # reads the launched run
def test_resume_refuses_another_model_tokenizer_or_data_naming_each_key(copy_run, cache_dir, tmp_path):
    run = copy_run()
    latest = run / "checkpoint" / "step-10"
    # fewer layers (the last would be dropped) and twice the heads in the same tensor shapes
    message = refusal(run, cache_dir, "model.n_layers=1", "model.n_heads=8", "model.n_kv_heads=4")
    assert f"checkpoint {latest} was made from another model than this run's" in message
    for key, old, new in (("model.n_layers", 2, 1), ("model.n_heads", 4, 8), ("model.n_kv_heads", 2, 4)):
        assert f"{key}: {old} in the checkpoint, {new} now" in message, message
    assert "model.n_layers=2 model.n_heads=4 model.n_kv_heads=2" in message  # the old values, ready to paste
    assert f"checkpoint.initial_load_path={latest}" in message

    # another tokenizer with the same vocabulary size limit: a tiny BPE of our own
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["some text to learn a few merges from"] * 8,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    message = refusal(run, cache_dir, f"data.tokenizer_path={tmp_path / 'tokenizer.json'}")
    assert "tokenizer: sha256 " in message and "(trained on the corpus: " in message, message
    assert f"(data.tokenizer_path: {tmp_path / 'tokenizer.json'}) now" in message

    # other data, read with the very tokenizer the run trained (so only the data differs)
    made_from = json.loads((latest / TRAIN_STATE).read_text())["made_from"]
    trained = made_from["tokenizer"]["source"].split(": ", 1)[1]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} of other data"}) + "\n" for i in range(50)))
    new_data = ["data.path=local", f"data.data_files=['{docs}']", f"data.tokenizer_path={trained}"]
    message = refusal(run, cache_dir, *new_data)
    assert "was made from other data than this run's" in message and "tokenizer" not in message.split("Fix:")[0]
    assert 'data.path: "embedded" in the checkpoint, "local" now' in message
    assert f'data.data_files: [] in the checkpoint, ["{docs}"] now' in message
    assert "checkpoint.exclude_from_loading=[dataloader]" in message
    # ... which is the way to take new data on purpose: weights, optimizer and step kept, the stream from its start
    cm = manager(run, cache_dir, *new_data, "checkpoint.exclude_from_loading=[dataloader]")
    assert cm.load().step == 10 and cm.live.dataloader.windows_consumed == 0

    # what does not change the meaning of the weights or of the data position keeps resuming
    safe = ["optimizer.lr=1e-3", "training.steps=30", "metrics.log_freq=5", "training.seq_len=64",
            "training.local_batch_size=2", "model.flavor=renamed", "checkpoint.keep_latest_k=1"]
    cm = manager(run, cache_dir, *safe)
    assert cm.load().step == 10 and cm.live.dataloader.windows_consumed == 40


# ----------------------------------------------------------------------------- checksums
@pytest.mark.slow  # reads the launched run
def test_damaged_files_are_refused_naming_the_file_and_the_step(copy_run, cache_dir, tmp_path, capsys):
    # one float changed in a shard: DCP would load it without a word
    run = copy_run("flipped")
    latest = run / "checkpoint" / "step-10"
    flip_a_byte(latest / "__0_0.distcp")
    message = refusal(run, cache_dir)
    assert message.startswith(f"checkpoint {latest} is broken: __0_0.distcp does not match the checksum"), message
    assert "Fix: resume from the previous complete step with checkpoint.load_step=5" in message
    assert "checkpoint.fall_back_on_broken_step=true" in message
    assert convert.main(["to-torch", str(latest), str(tmp_path / "model.pt")]) == 2  # the converter checks too
    err = capsys.readouterr().err
    assert "step-10' is damaged: __0_0.distcp does not match" in err and not (tmp_path / "model.pt").exists()
    assert manager(run, cache_dir, "checkpoint.load_step=5").load().step == 5  # the advice works

    # a truncated shard: named with its sizes, not taken for another model
    run = copy_run("truncated")
    shard = run / "checkpoint" / "step-10" / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    message = refusal(run, cache_dir)
    assert f"step-10 is broken: __0_0.distcp has {size // 3} bytes where {size} were written (truncated)" in message
    assert "does not match this model" not in message and "checkpoint.load_step=5" in message

    # a truncated train_state.json
    run = copy_run("torn_json")
    meta = run / "checkpoint" / "step-10" / TRAIN_STATE
    meta.write_text(meta.read_text()[:100])
    message = refusal(run, cache_dir)
    assert f"step-10 is broken: {TRAIN_STATE} has 100 bytes" in message and "checkpoint.load_step=5" in message

    # a step saved before checksums existed: its train_state.json is still read with care ...
    run = copy_run("old_torn")
    latest = run / "checkpoint" / "step-10"
    (latest / MANIFEST).unlink()
    (latest / TRAIN_STATE).write_text('{"train_state": {"step"')
    message = refusal(run, cache_dir)
    assert f"step-10 is broken: {TRAIN_STATE} is not readable JSON" in message and "checkpoint.load_step=5" in message

    # ... and an intact one resumes, with one line saying that it cannot be verified
    run = copy_run("old")
    latest = run / "checkpoint" / "step-10"
    (latest / MANIFEST).unlink()
    meta = json.loads((latest / TRAIN_STATE).read_text())
    del meta["made_from"], meta["schedule"]
    (latest / TRAIN_STATE).write_text(json.dumps(meta))
    with warnings_logged() as logged:
        assert manager(run, cache_dir).load().step == 10
    assert any("has no checksums and no record of its model and data" in m for m in logged), logged


# ----------------------------------------------------------------------------- broken latest steps
@pytest.mark.slow  # reads the launched run
def test_an_empty_latest_step_stops_and_the_fall_back_option_warns(copy_run, cache_dir):
    run = copy_run()
    empty = run / "checkpoint" / "step-15"
    empty.mkdir()
    message = refusal(run, cache_dir, "training.steps=20")
    assert message.startswith(f"checkpoint {empty} is broken: it is empty. Nothing was loaded or deleted."), message
    assert "checkpoint.load_step=10" in message
    with warnings_logged() as logged:
        cm = manager(run, cache_dir, "training.steps=20", "checkpoint.fall_back_on_broken_step=true")
        assert cm.load().step == 10
    assert any(f"{empty} is broken (it is empty); resuming from an earlier step" in m for m in logged), logged
    assert empty.is_dir()


@pytest.mark.slow  # reads the launched run
def test_a_latest_step_without_metadata_stops_the_run_with_exit_2_and_is_kept(copy_run, cache_dir, tmp_path):
    run = copy_run("no_metadata")
    latest = run / "checkpoint" / "step-10"
    (latest / ".metadata").unlink()
    kept = sorted(p.name for p in latest.iterdir())
    proc = run_launch([*RUN, "training.steps=15", "job.name=no_metadata", f"data.cache_dir={cache_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {latest} is broken: it has no .metadata."), last
    assert "Fix: resume from the previous complete step with checkpoint.load_step=5" in last
    assert sorted(p.name for p in latest.iterdir()) == kept and complete_steps(str(run / "checkpoint")) == [5]


# ----------------------------------------------------------------------------- the lr schedule
@pytest.mark.slow  # reads the launched run
def test_raising_training_steps_recomputes_the_lr_schedule(copy_run, cache_dir, tmp_path):
    """The schedule is a function of the step and this run's config: the first new step of a finished run trains
    at the lr the new length gives it, with the new peak lr, not at the old schedule's final 0."""
    copy_run("longer")
    args = [*RUN, "training.steps=12", "optimizer.lr=1e-3", "job.name=longer", f"data.cache_dir={cache_dir}"]
    proc = run_launch(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = resolve(compose(args))
    expected = 1e-3 * lr_factor(10, job.lr_scheduler, 12)
    assert expected > 0
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "outputs" / "longer")}
    assert lrs[10] == pytest.approx(3e-3 * lr_factor(9, job.lr_scheduler, 10))  # the first run's own schedule
    assert lrs[11] == pytest.approx(expected) and lrs[12] == pytest.approx(1e-3 * lr_factor(11, job.lr_scheduler, 12))
    log = proc.stdout + proc.stderr
    assert "the lr schedule follows this run's config (training.steps 10 -> 12, optimizer.lr 0.003 -> 0.001)" in log
    assert f"step 11 trains at lr {expected:.3g}, where the checkpoint's schedule gave 0" in log


# ----------------------------------------------------------------------------- two ranks
class Position:
    """A data position as the manager sees a loader: a JSON state."""

    def __init__(self):
        self.windows = 0

    def state_dict(self) -> dict:
        return {"windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        self.windows = state["windows"]


def _save_damage_and_resume(rank: int, world_size: int, folder: str):
    """Each rank holds its own half of a model (as a pipeline stage does), so each writes a shard of its own."""
    import os

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.optim.lr_scheduler import LambdaLR

    from pretrain.checkpoint.state import TrainState
    from pretrain.config import CheckpointConfig

    def build(**cfg):
        torch.manual_seed(rank)
        part = nn.Module()
        setattr(part, ("first", "second")[rank], nn.Linear(16, 16))
        optimizer = torch.optim.AdamW(part.parameters(), lr=1e-3)
        live = (optimizer, LambdaLR(optimizer, lambda step: 1.0), Position())
        return CheckpointManager(CheckpointConfig(interval=1, **cfg), folder, [part], *live, rank == 0), part

    def train_and_save(cm, part, step, **kwargs):
        next(iter(part.children()))(torch.ones(2, 16)).sum().backward()
        cm.live.optimizer.step()
        cm.live.lr_scheduler.step()
        cm.save(TrainState(step=step), **kwargs)

    cm, part = build(async_mode="async", keep_latest_k=2)
    for step in (1, 2, 3):  # 1 and 2 hashed in the background thread; 3 (the last) on the training thread
        train_and_save(cm, part, step, last=step == 3)
    cm.wait()
    ckpt = os.path.join(folder, "checkpoint")
    listed = {step: sorted(json.load(open(os.path.join(ckpt, f"step-{step}", MANIFEST)))["files"]) for step in (2, 3)}
    dist.barrier()
    if rank == 0:  # damage the shard rank 1 wrote; leave an empty folder no save finished
        with open(os.path.join(ckpt, "step-3", "__1_0.distcp"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
        os.mkdir(os.path.join(ckpt, "step-0"))
    dist.barrier()
    try:
        build()[0].load()
        refused = None
    except ConfigError as e:
        refused = str(e)
    cm, part = build(fall_back_on_broken_step=True, keep_latest_k=2)
    resumed = cm.load().step
    for step in (3, 4):
        train_and_save(cm, part, step, blocking=True)
    dist.barrier()
    return listed, refused, resumed, sorted(os.listdir(ckpt))


@pytest.mark.multiprocess
def test_two_ranks_hash_their_own_shards_and_refuse_one_damaged_on_the_other(tmp_path):
    results = run_on_ranks(_save_damage_and_resume, 2, str(tmp_path))
    listed, refused, resumed, folders = results[0]
    assert results[1][1:] == results[0][1:]  # the same decision, the same message on both ranks
    files = [".metadata", "__0_0.distcp", "__1_0.distcp", TRAIN_STATE]
    assert listed == {2: files, 3: files}  # step 2 in the background, step 3 on the training thread
    assert refused.startswith(f"checkpoint {tmp_path}/checkpoint/step-3 is broken: __1_0.distcp does not match")
    assert "checkpoint.load_step=2" in refused
    assert resumed == 2
    # the damaged step-3 was moved aside when step 3 was saved again; keep_latest_k=2 purged step-2 only: the
    # empty step-0 and the damaged step are kept
    assert folders == ["step-0", "step-3", "step-3.broken", "step-4"]
