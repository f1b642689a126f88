"""Layer 4: the SLURM path against a real single-node SLURM on localhost (tests/slurm/cluster.sh).

`python launch.py cluster=slurm_cpu ...` exactly as a user types it: a 2-task FSDP job (CPU, gloo)
runs to completion; a sweep completes and its report lists the points; `scontrol requeue` and a
preemption signal mid-run resume from checkpoints to the same final loss; a task that raises is a
failed job with its error; requests SLURM can never run are refused before anything is queued.

The cluster: the one SLURM_CONF names (CI starts it in .ci/run), else one started here when this
runs as root. Elsewhere these tests skip and say why; with CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, losses, read_metrics, run_launch

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "cluster.sh"
SLURM = ["cluster=slurm_cpu", "cluster.partition=debug", "parallelism=fsdp"]  # 2 CPU tasks, gloo
# Long enough (about 0.1 s a step on 2 cores) to be interrupted twice between checkpoints.
LONG_RUN = ["training.steps=60", "training.local_batch_size=16", "training.seq_len=64", "checkpoint.interval=10"]


def _sinfo_works(env: dict) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for launch.py with a running SLURM, or a skip that says why there is none."""
    env = dict(os.environ)
    if env.get("SLURM_CONF") and _sinfo_works(env):
        yield env
        return
    started_dir = None
    reason = ""
    if os.geteuid() != 0:
        reason = "not root: tests/slurm/cluster.sh installs Debian's SLURM packages and runs the daemons as root"
    elif shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        reason = "no SLURM installed and no apt-get to install it"
    else:
        started_dir = os.environ.get("PRETRAIN_SLURM_DIR", "/tmp/pretrain-slurm")
        out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", started_dir], capture_output=True, text=True)
        env["SLURM_CONF"] = os.path.join(started_dir, "etc", "slurm.conf")
        if out.returncode != 0 or not _sinfo_works(env):
            reason = f"tests/slurm/cluster.sh start failed:\n{out.stderr[-2000:]}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM tests must run in CI, but no SLURM could be started: {reason}")
        pytest.skip(f"no local SLURM: {reason}")
    try:
        yield env
    finally:
        if started_dir:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", started_dir], capture_output=True)


def launch(args: list[str], cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_launch(args, cwd=cwd, timeout=timeout, env=env)


def jobs_named(name: str, env: dict) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=env, capture_output=True, text=True)
    return out.stdout.split()


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launch.py ended while waiting for {what}: {proc.communicate()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(slurm_env, tmp_path_factory, cache_dir):
    """An uninterrupted 2-task FSDP run through SLURM: the run directory and the launcher's output."""
    root = tmp_path_factory.mktemp("slurm_reference")
    proc = launch([*TINY, *SLURM, *LONG_RUN, f"data.cache_dir={cache_dir}", "job.name=straight"], root, slurm_env)
    return root / "outputs" / "straight", proc


def test_two_task_fsdp_job_completes(reference):
    run_dir, proc = reference
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted 1 SLURM job(s) to partition debug (1 node(s) x 2 task(s))" in proc.stdout
    assert "completed" in proc.stdout and "follow: squeue -j" in proc.stdout
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 61))
    assert (run_dir / "checkpoint" / "step-60" / "train_state.json").exists()
    assert (run_dir / "config.yaml").exists()
    # the run directory is the one a local run would use: no cluster in its name, no override subdir
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [".submitit", "checkpoint"]
    # every task ran the code snapshot taken at submission, not the checkout
    (submission,) = (run_dir / ".submitit").iterdir()
    log = next(submission.glob("*/*_0_log.out")).read_text()
    assert f"code snapshot {submission / 'code'}" in log
    assert "world_size=2" in log and "on cpu" in log
    assert (submission / "code" / "pretrain" / "train.py").exists()


def test_requeue_and_preemption_resume_to_the_same_loss(reference, slurm_env, tmp_path, cache_dir):
    """`scontrol requeue` (SLURM ends the job: SIGTERM), then SIGUSR2 (preemption / time limit: submitit
    requeues): each time every rank finishes its step and checkpoints, and the job resumes from there."""
    reference_dir, _ = reference
    run_dir = tmp_path / "outputs" / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *TINY, *SLURM, *LONG_RUN,
         f"data.cache_dir={cache_dir}", "job.name=interrupted"],
        cwd=tmp_path, env={**slurm_env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: metric_lines(run_dir) >= 5, 180, "step 5", proc)
        (job_id,) = jobs_named("interrupted", slurm_env)
        subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, check=True)
        log = next((run_dir / ".submitit").glob(f"*/{job_id}/{job_id}_0_log.out"))
        # the requeued attempt trains again (signals sent while it starts would kill it before submitit's handlers)
        wait_until(lambda: log.read_text().count("training from step") >= 2, 180, "the requeued attempt", proc)
        lines = metric_lines(run_dir)
        wait_until(lambda: metric_lines(run_dir) >= lines + 2, 60, "two more steps", proc)
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_env, check=True)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", "interrupted"], env=slurm_env)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    text = log.read_text()
    assert "received SIGTERM" in text and "received SIGUSR2" in text
    assert "Requeued job" in text  # submitit's handler ran after ours
    resumed = [
        int(line.split("step-")[1].split()[0]) for line in text.splitlines() if "checkpoint: resumed from" in line
    ]
    assert len(resumed) == 2 and 5 <= resumed[0] < resumed[1] < 60, text[-3000:]  # the steps where the signals came
    straight, interrupted = losses(reference_dir), losses(run_dir)
    assert sorted(interrupted) == list(range(1, 61))
    assert interrupted == pytest.approx(straight, rel=1e-6)  # same trajectory, same final loss


def test_sweep_completes_and_report_lists_points(slurm_env, tmp_path, cache_dir):
    """Batch size x FSDP degree on one task per job (the two jobs share the node); the points whose
    degree does not fit the world are skipped. Non-blocking: job ids and logs printed, then return;
    the report reads the finished sweep."""
    args = [
        "-m", *TINY, *SLURM, "cluster.nproc_per_node=1", f"data.cache_dir={cache_dir}", "job.name=sweep",
        "cluster.blocking=false", "training.local_batch_size=2,4", "parallelism.data_parallel_shard_degree=1,2",
    ]
    proc = launch(args, tmp_path, slurm_env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a shard degree of 2 does not fit a world of 1: skipped before anything was queued
    assert "skipping 2 of 4 points" in proc.stdout and "data_parallel_shard_degree=2: parallel degrees" in proc.stdout
    assert "submitted 2 SLURM job(s)" in proc.stdout and "follow: squeue -j" in proc.stdout
    assert "cancel: scancel" in proc.stdout and "log: " in proc.stdout
    wait_until(lambda: not jobs_named("sweep", slurm_env), 200, "the sweep's jobs")

    sweep_dir = tmp_path / "outputs" / "sweep"
    report = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "report.py"), str(sweep_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr
    markdown = (sweep_dir / "report.md").read_text()
    assert "4 points: 2 completed, 2 skipped" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(table) == 2 and all("data_parallel_shard_degree=1`" in line for line in table)
    assert any("local_batch_size=2 " in line for line in table) and any("local_batch_size=4 " in line for line in table)
    assert "data_parallel_shard_degree=2`: parallel degrees" in markdown and "Fix:" in markdown
    rows = (sweep_dir / "report.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("rank,point,status,tokens_per_s,mfu,memory_gib")
    assert (sweep_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["queued", "skipped", "queued", "skipped"]


def test_failing_task_is_a_failed_job_with_its_error(slurm_env, tmp_path, cache_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    args = [  # no partition: the cluster's default one
        *TINY, "cluster=slurm_cpu", "parallelism=fsdp", "data=local", f"data.data_files=[{bad}]",
        f"data.cache_dir={cache_dir}", "job.name=bad",
    ]
    proc = launch(args, tmp_path, slurm_env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "to partition (the default)" in proc.stdout
    assert "failed: task" in proc.stderr and "raised" in proc.stderr
    assert "ConfigError" in proc.stderr and "is not valid JSON Lines" in proc.stderr  # the task's own error
    assert "log: " in proc.stderr and "_log.err" in proc.stderr
    assert "0 of 1 job(s) completed, 1 failed" in proc.stdout
    assert "is not valid JSON Lines" in (tmp_path / "outputs" / "bad" / "error.txt").read_text()


def _job_count(env: dict, name: str) -> int:
    """Jobs of this name SLURM ever accepted (by name: other tests' records reach sacct late)."""
    out = subprocess.run(
        ["sacct", "-a", "-X", "-n", "-S", "2000-01-01", "--name", name, "-o", "JobID"],
        env=env, capture_output=True, text=True,
    )
    return len(out.stdout.split())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.partition=nosuch"], "invalid partition"),
        (["cluster.nproc_per_node=4"], "More processors requested than permitted"),  # the node has 2 CPUs
        (["cluster.nodes=2", "parallelism.data_parallel_replicate_degree=2"], "allocation failure"),  # one node here
    ],
)
def test_request_slurm_cannot_run_is_refused_before_submission(slurm_env, tmp_path, overrides, message):
    proc = launch([*TINY, *SLURM, *overrides, "job.name=refused"], tmp_path, slurm_env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "SLURM refuses the request" in proc.stderr and message in proc.stderr
    assert "Partitions here: debug" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "outputs" / "refused" / ".submitit").exists()
    assert _job_count(slurm_env, "refused") == 0 and not jobs_named("refused", slurm_env)
