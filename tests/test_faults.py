"""Runs that survive faults: a non-finite loss, a rank killed with SIGKILL, a rank that hangs.

Every fault here is real: a learning rate that blows the weights up, `kill -9` of a rank process,
SIGSTOP of a rank (a hang the collective timeout must end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, losses, read_metrics, run_launch

from pretrain.checkpoint.state import complete_steps

pytestmark = pytest.mark.multiprocess

# one Adam step at lr 1e30 without clipping makes the weights ~1e30; the next gradient norm is NaN
BLOW_UP = ["optimizer.lr=1e30", "lr_scheduler.warmup_steps=0", "training.max_norm=0", "checkpoint.interval=1"]


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    state = torch.load(out, weights_only=True)
    return dict(state["model"])


def test_nonfinite_stops_without_saving_the_bad_step(tmp_path):
    out = run_launch(TINY + BLOW_UP + ["training.steps=6", "job.name=nan"], cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("stopped: step 2:") and "the last checkpoint is step 1" in message, message
    assert "Traceback" not in out.stderr
    run_dir = tmp_path / "outputs" / "nan"
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["step-1"]  # nothing of step 2


def test_nonfinite_skip_drops_the_updates_and_keeps_training(tmp_path):
    out = run_launch(TINY + BLOW_UP + ["training.steps=4", "training.on_nonfinite=skip", "job.name=skip"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "outputs" / "skip"
    assert [m["nonfinite_steps"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]
    # steps 2-4 were all dropped: the weights of step 4 are those of step 1, finite
    first, last = _weights(run_dir / "checkpoint" / "step-1"), _weights(run_dir / "checkpoint" / "step-4")
    assert first.keys() == last.keys() and first
    for key in first:
        assert torch.isfinite(last[key]).all() and torch.equal(first[key], last[key]), key


def _worker_pids(launcher_pid: int) -> list[int]:
    """The rank processes the launcher started, in start order: forked by its multiprocessing fork server
    (a child of the launcher whose command line names the forkserver)."""
    children: dict[int, list[tuple[int, bytes]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append((int(entry.name), cmdline))
    servers = [pid for pid, cmdline in children.get(launcher_pid, []) if b"forkserver" in cmdline]
    return sorted(pid for server in servers for pid, _ in children.get(server, []))


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(m["step"] >= step for m in read_metrics(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


FOUR_RANKS = TINY + [
    "parallelism=fsdp", "cluster.nproc_per_node=4", "training.local_batch_size=2", "training.steps=14",
    "checkpoint.interval=4", "training.gc_freq=0",
]


@pytest.mark.parametrize(
    "fault,sig,extra",
    [
        # a dead rank: the launcher sees the process exit and stops the others
        ("kill", signal.SIGKILL, []),
        # a hung rank: the others' collectives time out (comm.train_timeout_seconds), then the run stops
        ("hang", signal.SIGSTOP, ["comm.train_timeout_seconds=5"]),
    ],
)
def test_a_dead_or_hung_rank_ends_the_run_and_the_rerun_resumes_exactly(fault, sig, extra, tmp_path):
    """The killed rank is also the local launcher's test: the whole run stops, with one clear message."""
    reference = run_launch(FOUR_RANKS + ["job.name=whole"], cwd=tmp_path) if fault == "kill" else None
    args = FOUR_RANKS + extra + [f"job.name={fault}"]
    run_dir = tmp_path / "outputs" / fault
    proc = _start(args, tmp_path)
    try:
        _wait_for_step(run_dir, 6, proc)  # past the step-4 checkpoint, in the middle of training
        workers = _worker_pids(proc.pid)
        assert len(workers) == 4, workers
        os.kill(workers[1], sig)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 60, f"the run took {elapsed:.0f}s to stop after one rank was {fault}ed"
    assert "error" in stderr and "Traceback" not in stderr.splitlines()[-1], stderr[-2000:]
    if fault == "kill":  # the launcher names the rank and the signal, and leaves no rank running
        assert "SIGKILL" in stderr and "training failed on rank" in stderr, stderr[-2000:]
        for pid in workers:  # gone, or a zombie the launcher has not reaped yet
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    assert 4 in complete_steps(str(run_dir / "checkpoint"))  # the rerun resumes from the last complete one

    again = run_launch(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = losses(run_dir)
    assert max(resumed) == 14
    if reference is not None:
        assert reference.returncode == 0, reference.stderr[-2000:]
        # same layout, same data position, same weights and optimizer state: bitwise the same losses
        assert resumed == losses(tmp_path / "outputs" / "whole")
