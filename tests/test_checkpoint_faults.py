"""Checkpoints under stress: background (async) saves, a full disk, a kill in the middle of a save.

The full disk is real: a 4 MiB tmpfs the test mounts (the CI runs as root), holding the run directory.
A complete TINY checkpoint is 2.5 MiB, so the first one fits and the second cannot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY, losses, read_metrics, run_launch

from pretrain.checkpoint.state import complete_steps

pytestmark = pytest.mark.multiprocess

FSDP2 = ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=2"]


def test_async_saves_resume_exactly(tmp_path):
    """Steps 2, 4 and 6 are written in the background while training goes on. Training is unaffected, and
    resuming from the background step 4 continues exactly as the uninterrupted run (a state staged late,
    after later updates, would not)."""
    base = TINY + FSDP2 + ["checkpoint.interval=2", "training.steps=8"]
    whole = run_launch(base + ["job.name=whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = run_launch(base + ["checkpoint.async_mode=async", "job.name=bg"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    log = first.stdout + first.stderr
    assert "step 4 staged" in log and "step 4 written in the background" in log
    run_dir = tmp_path / "outputs" / "bg"
    reference = losses(tmp_path / "outputs" / "whole")
    assert losses(run_dir) == reference
    folder = run_dir / "checkpoint"
    assert complete_steps(str(folder)) == [2, 4, 6, 8]
    for step in (6, 8):  # as if the run had died after step 4's background save
        shutil.rmtree(folder / f"step-{step}")
    again = run_launch(base + ["checkpoint.async_mode=async", "job.name=bg"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step-4 (step 4;" in again.stdout + again.stderr
    assert losses(run_dir) == reference  # steps 5-8 logged again, bitwise the same


def test_pinned_memory_staging_needs_cuda(tmp_path):
    out = run_launch(TINY + ["checkpoint.async_mode=async_with_pinned_mem", "cluster.device=auto"], cwd=tmp_path)
    if out.returncode == 0:
        pytest.skip("a CUDA device is present: pinned staging is allowed here")
    assert out.returncode == 2
    assert "checkpoint.async_mode=async_with_pinned_mem" in out.stderr
    assert "Fix: checkpoint.async_mode=async" in out.stderr


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A run whose step-2 checkpoint fills the disk, then the same command to step 6 with each policy in turn
    (each one leaves the disk as it found it: step-2 alone): {policy: (its output, the last step it logged,
    the complete checkpoints and the folders left after it)}."""
    root = tmp_path_factory.mktemp("full_disk")
    mount = root / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        base = TINY + [f"job.dump_folder={mount}", "checkpoint.interval=2", "job.name=full"]
        run_dir = mount / "full"
        first = run_launch(base + ["training.steps=2"], cwd=root)
        assert first.returncode == 0, first.stderr[-2000:]
        results = {}
        for policy in ("stop", "continue"):
            extra = ["checkpoint.async_mode=async"] if policy == "continue" else []  # the background path fails alike
            out = run_launch(base + ["training.steps=6", f"checkpoint.on_save_error={policy}", *extra], cwd=root)
            folder = run_dir / "checkpoint"
            results[policy] = (
                out, max(m["step"] for m in read_metrics(run_dir)), complete_steps(str(folder)),
                sorted(p.name for p in folder.iterdir()),
            )
        yield results
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_full_disk_keeps_the_previous_checkpoint(policy, full_disk):
    out, last_step, complete, folders = full_disk[policy]
    message = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 3, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "step-2, intact" in message and "Fix:" in message, message
    if policy == "stop":
        assert message.startswith("stopped: checkpoint: saving step 4"), message
        assert last_step == 4  # it stopped there
    else:
        assert "saving step 4" in out.stdout + out.stderr and "the next interval retries" in out.stdout + out.stderr
        assert message.startswith("stopped: checkpoint: saving step 6"), message  # the last save must succeed
        assert last_step == 6  # training went on past the failure
    assert complete == [2]
    assert folders == ["step-2"]  # no partial left behind


def test_a_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    # a bigger model so that a save takes long enough to be caught in the middle
    args = TINY + ["model.dim=256", "model.n_heads=8", "model.n_kv_heads=4", "model.multiple_of=256",
                   "training.steps=8", "checkpoint.interval=2", "job.name=killsave"]
    run_dir = tmp_path / "outputs" / "killsave"
    folder = run_dir / "checkpoint"
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (folder / "step-4.partial").exists():
                os.killpg(proc.pid, signal.SIGKILL)
                caught = sorted(p.name for p in folder.iterdir())
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert caught is not None, "the save of step 4 was not caught in flight"
    assert "step-4.partial" in caught and "step-4" not in caught
    assert complete_steps(str(folder)) == [2]
    again = run_launch(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step-2 (step 2;" in again.stdout + again.stderr  # the resume log line
    assert complete_steps(str(folder))[-1] == 8 and not (folder / "step-4.partial").exists()
