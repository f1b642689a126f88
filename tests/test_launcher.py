"""The local launcher with real processes: a rank that dies takes the run down (no hang), a user
error found inside the ranks is reported once with its fix, and the embedded default trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, TINY, read_metrics, run_launch

pytestmark = pytest.mark.multiprocess


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_rank_stops_the_whole_run(tmp_path, cache_dir):
    args = [
        *TINY, "parallelism=fsdp", "cluster.nproc_per_node=2", "training.steps=100000",
        "training.local_batch_size=2", "checkpoint.enable=false", f"data.cache_dir={cache_dir}", "job.name=kill",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = tmp_path / "outputs" / "kill" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never reached step 3"
        time.sleep(0.5)
    # the launcher's children are the two ranks (spawned): kill one mid-step
    ranks = [p for p in _children(proc.pid) if "spawn" in open(f"/proc/{p}/cmdline").read()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=60)  # a hang fails here
    assert proc.returncode not in (0, None)
    assert time.time() - killed_at < 60
    assert "SIGKILL" in stderr and "training failed on rank" in stderr
    assert all(not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split()[2] == "Z" for p in ranks)


def test_user_error_inside_ranks_is_one_clear_message(tmp_path, cache_dir):
    # the tokenizer is trained inside the ranks; 300 pieces cannot hold the corpus's characters
    args = [
        *TINY, "parallelism=fsdp", "cluster.nproc_per_node=2", "model.vocab_size=300", f"data.cache_dir={cache_dir}",
    ]
    proc = run_launch(args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 2
    assert "model.vocab_size" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_embedded_default_learns(tmp_path, cache_dir):
    """The README's main job, shortened: the default config on one process, loss falls from ~ln(V)."""
    proc = run_launch(["training.steps=20", f"data.cache_dir={cache_dir}", "metrics.enable_aim=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "outputs" / "default")
    assert abs(rows[0]["loss"] - 7.62) < 0.8  # ln(2048) = 7.62 at initialisation
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "memory_gib", "elapsed_s"):
        assert key in rows[-1]
    assert rows[-1]["tokens_per_s"] > 0 and 0 < rows[-1]["mfu"] < 100
    assert "step   20 | loss" in proc.stdout
    assert (tmp_path / "outputs" / "default" / "checkpoint" / "step-20" / "train_state.json").exists()
    assert (tmp_path / "outputs" / "default" / "config.yaml").exists()
