"""The SLURM path without a cluster: the cluster presets compose and validate, requests that can never
run are refused before anything is queued, run directories never name the cluster, the code snapshot
is what a task imports, the preemption hook checkpoints and chains to the previous handler, the
sweep definitions use existing keys, and the report turns a sweep directory into md + csv + png."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF, REPO, TINY, compose_full, resolve_full, run_launch

from pretrain import preemption
from pretrain.config import ClusterConfig, ConfigError
from pretrain.slurm.points import MAX_DIR_NAME_BYTES, point_dir_name
from pretrain.slurm.request import sbatch_flags, submitit_parameters
from pretrain.slurm.submission import describe_trace

PRESETS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml") if p.stem != "local")


@pytest.mark.parametrize("preset", PRESETS)
def test_cluster_presets_compose_validate_and_select_the_slurm_launcher(preset):
    cfg = compose_full([f"cluster={preset}", "cluster.partition=p", "parallelism=fsdp"])
    assert cfg.hydra.mode.name == "MULTIRUN"  # cluster=slurm submits without -m
    assert cfg.hydra.launcher._target_.endswith("PretrainSlurmLauncher")
    job = resolve_full(cfg)
    c = job.cluster
    assert c.name == "slurm" and job.world_size == c.nodes * c.nproc_per_node
    assert c.gpus_per_node in (0, c.nproc_per_node)


def test_site_presets_only_change_resources():
    base = resolve_full(compose_full(["cluster=slurm", "cluster.partition=p", "parallelism=fsdp"]))
    for preset in PRESETS:
        job = resolve_full(compose_full([f"cluster={preset}", "cluster.partition=p", "parallelism=fsdp"]))
        job.training.global_batch_size = base.training.global_batch_size  # derived: local batch x data-parallel degree
        assert dataclasses.replace(job, cluster=base.cluster) == base, preset


def test_run_directory_names_never_mention_the_cluster():
    cfg = compose_full(["cluster=slurm_cpu", "cluster.partition=debug", "cluster.nodes=1", "training.steps=5"])
    assert cfg.hydra.job.override_dirname == "training.steps=5"
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {f"cluster.{f.name}" for f in dataclasses.fields(ClusterConfig)} | {"cluster"} <= excluded


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster=slurm", "cluster.partition=p", "cluster.nproc_per_node=4"], "one task per GPU"),
        (["cluster=slurm", "cluster.partition=p", "cluster.device=cpu"],
         "cluster.device=cpu but cluster.gpus_per_node=8"),
        (["cluster=slurm_cpu", "cluster.partition=p", "cluster.device=cuda"],
         "cluster.device=cuda but cluster.gpus_per_node=0"),
        (["cluster=slurm_cpu", "cluster.partition=p", "cluster.signal_delay_s=3600"], "cluster.signal_delay_s=3600"),
        (["cluster=slurm_cpu", "cluster.partition=p", "+cluster.extra_sbatch.ntasks-per-node=4"],
         "cluster.nproc_per_node already sets"),
        (["cluster.nodes=2"], "cluster=local runs on this machine only"),
        (["cluster.name=pbs"], "cluster.name='pbs' is not one of"),
        (["cluster=slurm_cpu", "cluster.partition=p", "cluster.nproc_per_node=3", "parallelism=hsdp"], "world size 3"),
    ],
)
def test_impossible_cluster_requests_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match="Fix:") as err:
        resolve_full(compose_full(overrides))
    assert message in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallelism=tp", "parallelism.tensor_parallel_degree=4"], "the world size is 2"),  # 4 TP ranks, 2 tasks
        (["cluster.nodes=2", "parallelism=hsdp", "parallelism.data_parallel_replicate_degree=3"], "world size 4"),
        (["cluster.gpus_per_node=2", "cluster.device=cpu"], "cluster.device=cpu but"),
    ],
)
def test_refused_before_anything_is_queued(tmp_path, overrides, message):
    """Validation runs before any SLURM command, so this holds with or without a cluster."""
    args = [*TINY, "cluster=slurm_cpu", "cluster.partition=debug", *overrides, "job.name=refused"]
    proc = run_launch(args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Fix:" in proc.stderr and "nothing was submitted" in proc.stderr
    assert "submitted" not in proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "refused" / ".submitit").exists()


def test_submitit_parameters_and_sbatch_flags_of_a_gpu_preset():
    job = resolve_full(compose_full([
        "cluster=site_example_h100", "cluster.nodes=4", "cluster.account=proj", "+cluster.extra_sbatch.exclusive=true",
        "parallelism=fsdp",
    ]))
    params = submitit_parameters(job.cluster, "run")
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["slurm_partition"] == "h100" and params["slurm_constraint"] == "h100"
    assert params["slurm_account"] == "proj"
    assert params["slurm_setup"] == ["export NCCL_DEBUG=WARN"] and params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert params["slurm_additional_parameters"] == {"exclusive": True} and "mem_gb" not in params
    flags = sbatch_flags(job.cluster)
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--time=1440",
                 "--partition=h100", "--account=proj", "--constraint=h100", "--exclusive"):
        assert flag in flags


@pytest.mark.slow
def test_a_task_imports_the_snapshot_not_the_checkout(tmp_path):
    import functools
    import importlib

    import cloudpickle

    from pretrain.slurm.snapshot import SnapshotEntry, pickled_by_value, take_snapshot

    code = take_snapshot(str(tmp_path / "code"))
    with open(os.path.join(code, "pretrain", "__init__.py"), "a") as f:
        f.write("\nSNAPSHOT_MARK = 'taken at submission'\n")  # an edit that only the snapshot has
    payload = cloudpickle.dumps(functools.partial(importlib.import_module, "pretrain"))
    with pickled_by_value():
        (tmp_path / "call.pkl").write_bytes(cloudpickle.dumps((SnapshotEntry(code), payload)))
    script = (
        "import pickle, sys\n"
        "entry, payload = pickle.load(open(sys.argv[1], 'rb'))\n"
        "assert not any(m.startswith('pretrain') for m in sys.modules), 'unpickling imported the checkout'\n"
        "module = entry(payload)\n"
        "print(module.SNAPSHOT_MARK, module.__file__)\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path / "call.pkl")]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["taken", "at", "submission"]
    assert out.stdout.split()[-1] == os.path.join(code, "pretrain", "__init__.py")


class FakeCheckpoint:
    def __init__(self, folder: Path):
        self.folder, self.saved = str(folder), []
        self.cfg = type("Cfg", (), {"enable": True})()

    def save(self, state, blocking=False):
        self.saved.append((state.step, blocking))
        os.makedirs(os.path.join(self.folder, f"step-{state.step}"))

    def wait(self):  # no background save in flight here
        pass


@pytest.fixture
def signal_handlers():
    """Whatever the test installs is undone: the previous SIGTERM/SIGUSR2 handlers and the module's state."""
    saved = {s: signal.getsignal(s) for s in preemption.HANDLED}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    preemption._previous_handlers.clear()
    preemption._received.clear()


def test_preemption_signal_checkpoints_then_calls_the_previous_handler(tmp_path, signal_handlers):
    called = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))  # stands in for submitit's
    preemption.install()
    checkpoint, state = FakeCheckpoint(tmp_path), type("State", (), {"step": 7})()
    preemption.checkpoint_and_requeue_if_signalled(checkpoint, state)  # nothing received: carry on
    assert checkpoint.saved == [] and called == []
    os.kill(os.getpid(), signal.SIGUSR2)
    with pytest.raises(SystemExit, match="stopped after step 7"):
        preemption.checkpoint_and_requeue_if_signalled(checkpoint, state)
    assert checkpoint.saved == [(7, True)] and called == [signal.SIGUSR2]


def test_stop_signal_after_a_regular_save_does_not_save_twice(tmp_path, signal_handlers):
    preemption.install()
    checkpoint, state = FakeCheckpoint(tmp_path), type("State", (), {"step": 10})()
    checkpoint.save(state)  # the loop's own save of this step
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit, match="SIGTERM"):
        preemption.checkpoint_and_requeue_if_signalled(checkpoint, state)
    assert checkpoint.saved == [(10, False)]


def test_hook_is_a_no_op_when_not_installed(tmp_path):
    preemption.checkpoint_and_requeue_if_signalled(None, None)  # local runs: returns before touching anything


def test_describe_trace_keeps_user_errors_short():
    trace = (
        "Traceback (most recent call last):\n  File x\n"
        "pretrain.config.ConfigError: model.vocab_size=300 is too small. Fix: 512"
    )
    assert describe_trace(trace) == "ConfigError: model.vocab_size=300 is too small. Fix: 512"
    long_trace = "\n".join(f"line {i}" for i in range(100)) + "\nValueError: boom"
    assert describe_trace(long_trace).endswith("ValueError: boom") and "line 10\n" not in describe_trace(long_trace)


def test_sweep_point_directory_names_are_one_level_and_short():
    assert point_dir_name("training.steps=5") == "training.steps=5"
    assert point_dir_name("data.path=/data/c4") == "data.path=%2Fdata%2Fc4"
    constant = ",".join(f"model.key_{i}=1" for i in range(20))  # overrides every point shares
    long_a, long_b = f"a=1,{constant}", f"a=2,{constant}"
    name_a, name_b = point_dir_name(long_a, ["a=1"]), point_dir_name(long_b, ["a=2"])
    assert name_a.startswith("a=1~") and name_b.startswith("a=2~")  # what sets the points apart stays readable
    assert len(name_a.encode()) <= MAX_DIR_NAME_BYTES and name_a == point_dir_name(long_a, ["a=1"])
    assert point_dir_name(f"a=1,{constant},b=3", ["a=1"]) != name_a  # the hash covers the whole name
    assert len(point_dir_name("x=" + "y" * 300).encode()) <= MAX_DIR_NAME_BYTES


def sweep_points(name: str, overrides: list[str]) -> list[tuple[list[str], object]]:
    """Each point of a sweep definition: its overrides and its JobConfig (or the ConfigError)."""
    params = compose_full(overrides, config_name=name).hydra.sweeper.params
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    points = []
    for combo in itertools.product(*axes):
        try:
            points.append((list(combo), resolve_full(compose_full([*overrides, *combo], config_name=name))))
        except ConfigError as e:
            points.append((list(combo), e))
    return points


@pytest.mark.slow  # composes and validates every point of every sweep in this process: ~20 s
def test_sweep_definitions_use_existing_keys_and_flag_invalid_points():
    on_8_gpus = ["cluster=slurm", "cluster.partition=p", "parallelism=fsdp"]
    local_only = {"layouts_cpu4"}  # pins cluster.nproc_per_node=4 on this machine
    sweeps = {
        name: sweep_points(name, [] if name in local_only else on_8_gpus)
        for name in sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
    }
    assert {"dp_degrees", "batch_size", "float8"} <= set(sweeps)
    for name, points in sweeps.items():
        valid = [o for o, r in points if not isinstance(r, ConfigError)]
        assert valid, f"sweeps/{name}.yaml: no point validates"
        for overrides, result in points:
            assert not isinstance(result, ConfigError) or "Fix:" in str(result), (name, overrides, result)
    layouts = sweeps["dp_degrees"]
    valid = {" ".join(o) for o, r in layouts if not isinstance(r, ConfigError)}
    for rep, shard in ((1, 8), (2, 4), (4, 2), (8, 1)):  # every pure data-parallel layout of 8
        assert (
            f"parallelism.data_parallel_replicate_degree={rep} parallelism.data_parallel_shard_degree={shard} "
            "parallelism.tensor_parallel_degree=1"
        ) in valid
    assert all(r.world_size == 8 for o, r in layouts if not isinstance(r, ConfigError))
    assert len(valid) < len(layouts)  # the products that are not 8 are flagged


def write_run(run_dir: Path, tokens_per_s: list[float], steps: int, planned: int, error: str = "") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"training:\n  steps: {planned}\n")
    rows = [
        {"step": s, "loss": 5.0 - s / 10, "tokens_per_s": t, "mfu": t / 100, "memory_gib": 1.0 + s / 10}
        for s, t in zip(range(1, steps + 1), tokens_per_s)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if error:
        (run_dir / "error.txt").write_text(f"rank 1\nTraceback (most recent call last):\n  File x\n{error}\n")


@pytest.mark.slow
def test_report_ranks_points_and_lists_failed_and_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "fast", [10.0, 900.0, 1100.0], steps=3, planned=3)
    write_run(sweep / "slow", [10.0, 400.0, 600.0], steps=3, planned=3)
    write_run(sweep / "broken", [10.0], steps=1, planned=3, error="ValueError: boom")
    points = [
        {"label": "b=slow", "run_dir": str(sweep / "slow"), "status": "queued", "error": ""},
        {"label": "b=fast", "run_dir": str(sweep / "fast"), "status": "completed", "error": ""},
        {"label": "b=broken", "run_dir": str(sweep / "broken"), "status": "queued", "error": "", "job_id": "7"},
        {"label": "b=huge", "run_dir": str(sweep / "huge"), "status": "skipped", "error": "too big. Fix: smaller"},
    ]
    (sweep / "sweep.json").write_text(json.dumps({"points": points}))
    command = [sys.executable, str(REPO / "sweeps" / "report.py"), str(sweep)]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    md = (sweep / "report.md").read_text()
    assert "4 points: 2 completed, 1 failed, 1 skipped" in md
    assert "| 1 | `b=fast` | 1,000 | 10.0 | 1.30 | 4.7000 | 3 |" in md  # median of the windows after the first
    assert "| 2 | `b=slow` | 500 |" in md
    assert "- `b=broken`: ValueError: boom (rank 1)" in md and "- `b=huge`: too big. Fix: smaller" in md
    rows = (sweep / "report.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["completed", "completed", "failed", "skipped"]
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
