"""Checkpoints on real runs: exact resume (twice), keep_latest_k, interrupted saves ignored, a corrupt
checkpoint refused clearly, and Aim holding one run across resumes (read back through Aim's API), the held-out
loss included (measured once per step across resumes)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import TINY, aim_metric, read_metrics, run_launch, val_losses

pytestmark = pytest.mark.slow  # every test here reads runs launched through launch.py

RUN = [*TINY, "training.steps=20", "checkpoint.interval=5", "metrics.enable_aim=true",
       "validation.enable=true", "validation.freq=5", "validation.steps=2"]


def ckpt_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def last_losses(run_dir) -> dict[int, float]:
    """step -> loss, the latest line winning (a resumed run logs its steps again)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir):
    """One uninterrupted run, "straight"; the resume test goes on from a copy of it, the corrupt-checkpoint
    test from the run itself."""
    root = tmp_path_factory.mktemp("resume")
    reference = [*RUN, "job.name=straight", f"data.cache_dir={cache_dir}", "checkpoint.keep_latest_k=2"]
    proc = run_launch(reference, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_exact_resume_twice_and_keep_latest_k(workdir, cache_dir):
    straight = last_losses(workdir / "outputs" / "straight")
    assert sorted(straight) == list(range(1, 21))
    assert ckpt_dirs(workdir / "outputs" / "straight") == ["step-15", "step-20"]  # keep_latest_k=2 purged 5 and 10
    # the same command under another name: a copy of the run directory (its Aim run included)
    args = [*RUN, "job.name=resumed", f"data.cache_dir={cache_dir}", "checkpoint.keep_latest_k=2"]
    run_dir = workdir / "outputs" / "resumed"
    shutil.copytree(workdir / "outputs" / "straight", run_dir)

    # Resume 1: lose the last checkpoint; the same command resumes from step 15 and redoes 16..20.
    shutil.rmtree(run_dir / "checkpoint" / "step-20")
    proc = run_launch(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-15" in proc.stdout
    # Resume 2: a save interrupted mid-write (a .partial folder) is ignored; a step folder without DCP metadata
    # stops the run unless checkpoint.fall_back_on_broken_step passes over it with a warning (and keeps it):
    # resume from the complete step-15 again.
    shutil.rmtree(run_dir / "checkpoint" / "step-20")
    (run_dir / "checkpoint" / "step-20.partial").mkdir()
    (run_dir / "checkpoint" / "step-25").mkdir()
    (run_dir / "checkpoint" / "step-25" / "train_state.json").write_text(json.dumps({"half": "written"}))
    proc = run_launch([*args, "checkpoint.fall_back_on_broken_step=true"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-15" in proc.stdout
    assert "step-25 is broken (it has no .metadata)" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoint" / "step-25" / "train_state.json").exists()

    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 21)) + list(range(16, 21)) * 2
    resumed = last_losses(run_dir)
    # Deterministic CPU run, same data position, same optimizer state: bitwise equal.
    assert resumed == straight
    # The held-out loss of step 15 was measured before its checkpoint was saved: the resumed runs measure 20 only
    assert [m["step"] for m in read_metrics(run_dir) if "val_loss" in m] == [5, 10, 15, 20, 20, 20]
    assert val_losses(run_dir) == val_losses(workdir / "outputs" / "straight")


def test_aim_holds_one_run_across_resumes(workdir):
    import aim

    run_dir = workdir / "outputs" / "resumed"
    run_hash = (run_dir / "aim_run_hash").read_text().strip()
    steps, values = aim_metric(str(workdir / "outputs"), run_hash, "loss")
    aim_losses = dict(zip(steps, values))
    assert sorted(aim_losses) == list(range(1, 21))
    assert aim_losses == pytest.approx(last_losses(run_dir), rel=1e-6)
    steps, values = aim_metric(str(workdir / "outputs"), run_hash, "val_loss")
    assert dict(zip(steps, values)) == pytest.approx(val_losses(run_dir), rel=1e-6)
    assert steps == [5, 10, 15, 20]
    run = aim.Run(run_hash, repo=str(workdir / "outputs"), read_only=True)
    assert run["hparams"]["model"]["dim"] == 64


def test_corrupt_checkpoint_is_refused_clearly(workdir, cache_dir):
    run_dir = workdir / "outputs" / "straight"
    latest = run_dir / "checkpoint" / "step-20"
    (latest / ".metadata").write_bytes(b"not a checkpoint")
    args = [*RUN, "job.name=straight", f"data.cache_dir={cache_dir}", "training.steps=25"]
    proc = run_launch(args, cwd=workdir)
    assert proc.returncode != 0
    assert "step-20" in proc.stderr and "Fix:" in proc.stderr
    assert not (run_dir / "checkpoint" / "step-25").exists()
