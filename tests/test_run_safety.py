"""One live run per run directory, signals that checkpoint locally, and a refused config that removes
nothing of the user's. Real processes and real signals: a run is started, watched through its log, then
signalled, killed or doubled as a user would."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, read_metrics, run_launch

from pretrain.checkpoint.state import complete_steps

pytestmark = pytest.mark.slow

LONG = TINY + ["training.steps=100000", "checkpoint.interval=100000", "metrics.log_freq=1"]


def start(args: list[str], cwd: Path, log: Path, new_group: bool = False) -> subprocess.Popen:
    """launch.py in the background, its output in `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=new_group)


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text()):
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def last_step(log: Path) -> int:
    return int(re.findall(r"step\s+(\d+) \|", log.read_text())[-1])


def test_one_run_per_directory_ctrl_c_checkpoints_and_a_dead_run_is_taken_over(tmp_path, cache_dir):
    args = LONG + ["job.name=live", f"data.cache_dir={cache_dir}"]
    run_dir = tmp_path / "outputs" / "live"
    log = tmp_path / "first.log"
    first = start(args, tmp_path, log)
    wait_for(log, r"step\s+2 \|", first)

    # a second run of the same directory is refused before any work, naming the live one
    second = run_launch(args[:-1] + ["optimizer.lr=5e-4", f"data.cache_dir={cache_dir}"], cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "in use by a live run" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    # Ctrl-C: the step ends, the run checkpoints it and exits 130 with one line saying how to resume
    first.send_signal(signal.SIGINT)
    assert finish(first) == 130, log.read_text()[-3000:]
    out = log.read_text()
    stopped = re.search(r"stopped by SIGINT after step (\d+): checkpoint step-\1 is in .*same command", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert (run_dir / "checkpoint" / f"step-{step}" / ".metadata").is_file()
    assert "Traceback" not in out
    assert {row["step"] for row in read_metrics(run_dir)} == set(range(1, step + 1))  # one curve, no repeats

    # a second Ctrl-C aborts at once; the dead run's lock is free for the next one without a question
    log = tmp_path / "again.log"
    again = start(args, tmp_path, log)
    wait_for(log, rf"resumed from .*step-{step}", again)
    wait_for(log, rf"step\s+{step + 1} \|", again)
    again.send_signal(signal.SIGINT)
    time.sleep(0.5)
    again.send_signal(signal.SIGINT)
    assert finish(again, timeout=30) == -signal.SIGINT  # ended by the signal itself, however far it got
    latest = complete_steps(str(run_dir / "checkpoint"))[-1]  # step's, or one the first signal had time to save
    resumed = run_launch(args[:-1] + [f"training.steps={latest + 2}", f"data.cache_dir={cache_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed from \S*step-{latest}\b", resumed.stderr + resumed.stdout)


def test_two_process_run_stops_on_ctrl_c_at_the_terminal(tmp_path, cache_dir):
    """A terminal's Ctrl-C goes to the whole process group: the launcher and both ranks."""
    args = LONG + ["job.name=pair", "parallelism=fsdp", "cluster.nproc_per_node=2", f"data.cache_dir={cache_dir}"]
    log = tmp_path / "pair.log"
    proc = start(args, tmp_path, log, new_group=True)
    wait_for(log, r"step\s+2 \|", proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert finish(proc) == 130, log.read_text()[-3000:]
    out = log.read_text()
    stopped = re.search(r"stopped by SIGINT after step (\d+): checkpoint step-\1", out)
    assert stopped and "Traceback" not in out, out[-3000:]
    step_dir = tmp_path / "outputs" / "pair" / "checkpoint" / f"step-{stopped.group(1)}"
    state = json.loads((step_dir / "train_state.json").read_text())
    assert state["train_state"]["step"] == int(stopped.group(1)) == last_step(log)


def test_refused_config_leaves_the_users_folders_and_unwritable_dirs_are_refused(tmp_path):
    mine = tmp_path / "scratch" / "myruns"
    mine.mkdir(parents=True)
    out = run_launch([f"job.dump_folder={mine}", "training.steps=0"], cwd=tmp_path)
    assert out.returncode == 2 and "training.steps=0" in out.stderr
    assert mine.is_dir() and not any(mine.iterdir())  # Hydra's run folder went, the user's stayed
    (tmp_path / "a_file").write_text("")
    out = run_launch([f"job.dump_folder={tmp_path / 'a_file' / 'runs'}", "training.steps=3"], cwd=tmp_path)
    assert out.returncode == 2 and "cannot write the run directory" in out.stderr and "job.dump_folder" in out.stderr
    assert "Traceback" not in out.stderr
    # a batch whose activations cannot fit is refused before any data is read, and leaves nothing behind
    out = run_launch([f"job.dump_folder={tmp_path / 'new' / 'runs'}", "training.seq_len=10000000"], cwd=tmp_path)
    assert out.returncode == 2 and "training.seq_len=10000000" in out.stderr and "GiB" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "new").exists()


def test_ranks_whose_launcher_was_killed_checkpoint_and_leave(tmp_path, cache_dir):
    """kill -9 of the launcher alone frees the run directory's lock: its ranks (children of the fork server, which
    outlives it) must not train on beside a new run. They checkpoint their step and exit, the fork server with them."""
    from test_faults import _worker_pids

    args = LONG + ["job.name=orphans", "parallelism=fsdp", "cluster.nproc_per_node=2", f"data.cache_dir={cache_dir}"]
    log = tmp_path / "orphans.log"
    proc = start(args, tmp_path, log)
    wait_for(log, r"step\s+2 \|", proc)
    ranks = _worker_pids(proc.pid)
    assert len(ranks) == 2, ranks
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in ranks), "ranks outlived their launcher"
    assert complete_steps(str(tmp_path / "outputs" / "orphans" / "checkpoint")), log.read_text()[-2000:]
