"""Shared test helpers: compose configs in-process, run launch.py as a user would, read metrics, compare
our logits with transformers'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A model small enough that several processes on 2 cores finish 10 steps in seconds.
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.multiple_of=32",
    "training.seq_len=32",
    "training.local_batch_size=4",
    "training.steps=10",
    "training.deterministic=true",
    "lr_scheduler.warmup_steps=2",
    "optimizer.lr=3e-3",
    "metrics.log_freq=1",
    "metrics.enable_aim=false",
]


# Our model against transformers' in fp32 (each test file says what it measured): logits within this
# fraction of their largest magnitude, and launched runs' losses within this relative difference.
LOGIT_TOL = 1e-5
LOSS_RTOL = 1e-5


def compose(overrides: list[str]):
    """The composed DictConfig for these overrides, as launch.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def run_launch(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` in `cwd`, with output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def aim_metric(repo_dir: str, run_hash: str, name: str) -> tuple[list[int], list[float]]:
    """Read one metric back through Aim's own read-only API."""
    import aim
    from aim.storage.context import Context

    run = aim.Run(run_hash, repo=repo_dir, read_only=True)
    metric = run.get_metric(name, Context({}))
    assert metric is not None, f"Aim run {run_hash} has no metric {name!r}"
    steps, (values, *_) = metric.data.items_list()
    return list(steps), list(values)


def logits(model, tokens):
    """Logits of our model or of a transformers one (no gradients)."""
    import torch

    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def relative_error(ours, theirs) -> float:
    """The largest |difference| as a fraction of the largest |logit| of ours."""
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def assert_logits_close(ours, theirs) -> float:
    scale = ours.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGIT_TOL * scale, f"max |diff| {diff:.3g} > {LOGIT_TOL} x max |logit| {scale:.3g}"
    return diff / scale
