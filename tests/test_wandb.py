"""Weights & Biases tracking with real wandb in offline mode (no network): a run trained, then resumed to more steps,
is one W&B run (one id, resumed) whose offline files hold every step's metrics; the key checks before launch.
The offline files are read back with wandb's own reader of its .wandb logs (`wandb leet inspect --json`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, TINY, compose, read_metrics, run_launch

from pretrain.components.metrics import MetricsLogger
from pretrain.components.wandb_sink import RUN_ID_FILE
from pretrain.config import ConfigError, JobConfig, resolve
from pretrain.config.torchtitan_names import refuse_foreign_spellings

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason='wandb is not installed (pip install -e ".[wandb]"; CI installs it)')


def wandb_env(tmp_path) -> dict[str, str]:
    """wandb's own settings, cache and data folders inside the test's folder; no key, no network."""
    env = {name: str(tmp_path / "wandb_home" / name.lower()) for name in
           ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    return {**env, "WANDB_SILENT": "true"}


def records(wandb_file) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(wandb_file), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- config
def test_keys_are_ours_and_checked_before_launch(monkeypatch):
    refuse_foreign_spellings(["metrics.enable_wandb=true"])  # torchtitan's key is ours as it is
    with pytest.raises(ConfigError, match=r"metrics.wandb_mode='cloud' is not one of online, offline"):
        resolve(compose(["metrics.wandb_mode=cloud"]))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(ConfigError, match=r"metrics.enable_wandb=true needs the wandb package.*"
                                          r"pip install -e \"\.\[wandb\]\""):
        resolve(compose(["metrics.enable_wandb=true"]))


@pytest.mark.slow
def test_launch_without_wandb_exits_2_before_anything_starts(tmp_path):
    hide = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["wandb"] = None  # as if wandb were not installed
        sys.argv = ["launch.py", "metrics.enable_wandb=true", "training.steps=1"]
        runpy.run_path({str(REPO / "launch.py")!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", hide], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'pip install -e ".[wandb]"' in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "default").exists()  # refused before the run directory was made


# ----------------------------------------------------------------------------- a resumed offline run
@needs_wandb
@pytest.mark.slow
def test_a_resumed_run_is_one_wandb_run_holding_every_step(tmp_path, cache_dir):
    args = [*TINY, "metrics.enable_wandb=true", "metrics.wandb_project=tests", "checkpoint.interval=2",
            "job.name=wb", f"data.cache_dir={cache_dir}"]
    env = wandb_env(tmp_path)
    first = run_launch([*args, "training.steps=3", "metrics.wandb_mode=offline"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wb"
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    # the second attempt resumes from step 3 to step 5; offline through WANDB_MODE, as metrics.wandb_mode is unset
    second = run_launch([*args, "training.steps=5"], cwd=tmp_path, env={**env, "WANDB_MODE": "offline"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"W&B run {run_id} (resumed)" in second.stdout
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id

    attempts = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2, os.listdir(run_dir / "wandb")
    logged: dict[int, dict] = {}
    for attempt in attempts:
        found = records(attempt / f"run-{run_id}.wandb")
        (run,) = [r["run"] for r in found if r["type"] == "run"]
        assert run["run_id"] == run_id and run["project"] == "tests" and run["display_name"] == "wb"
        assert run["config"]["update"]["training"]["seq_len"] == 32  # the run's config travels with it
        for r in found:
            if r["type"] == "history":
                logged[r["history"]["step"]["num"]] = r["history"]["item"]
    jsonl = {m["step"]: m for m in read_metrics(run_dir)}
    assert sorted(logged) == sorted(jsonl) == [1, 2, 3, 4, 5]
    for step, values in logged.items():
        assert values["loss"] == pytest.approx(jsonl[step]["loss"], rel=1e-12)
        assert values["tokens_per_s"] == pytest.approx(jsonl[step]["tokens_per_s"], rel=1e-12)


@needs_wandb
def test_online_without_a_login_is_refused_with_the_fixes(tmp_path, monkeypatch):
    for name, value in {**wandb_env(tmp_path), "NETRC": str(tmp_path / "no_netrc"), "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    job = JobConfig()
    job.job.name, job.job.run_dir = "wb", str(tmp_path / "wb")
    job.metrics.enable_aim, job.metrics.enable_wandb, job.metrics.wandb_mode = False, True, "online"  # over the env
    with pytest.raises(ConfigError, match=r"W&B could not start a run in mode online .*Fix: `wandb login`.*"
                                          r"metrics.wandb_mode=offline"):
        MetricsLogger(job, enabled=True)
    assert not (tmp_path / "wb" / RUN_ID_FILE).exists()
