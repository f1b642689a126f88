"""What the Hydra launcher of `cluster=slurm` does with a batch of points (the plugin class itself
must live in the `hydra_plugins` package: pretrain/slurm/plugins/hydra_plugins/, installed as
hydra_plugins.pretrain_slurm_launcher).

Where hydra-submitit-launcher would pickle Hydra and compose each point on the node, this composes
and validates every point here, before anything is queued, and ships each point's resolved
JobConfig with a snapshot of the code (submission.py). Resources come from `cluster.*` of each
point, so they can be swept too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from pretrain.slurm.points import hydra_points, sweep_dir_of
from pretrain.slurm.submission import submit_points


def launch_points(config_loader: Any, config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
    points = hydra_points(config_loader, config, job_overrides)
    # checked here at full scale, nothing is queued
    if points and all(p.job is not None and p.job.dry_run for p in points):
        # lazy: a sweep that only queues jobs never builds a model
        from pretrain.dry_run import dry_run

        for p in points:
            dry_run(p.job)
        return [JobReturn(overrides=p.overrides, status=JobStatus.COMPLETED) for p in points]
    code = submit_points(points, sweep_dir_of(config), is_sweep=len(points) > 1)
    if code == 2:  # refused, nothing queued: take back what Hydra wrote for the sweep
        _remove_sweep_leftovers(sweep_dir_of(config))
    if code:
        raise SystemExit(code)  # the reason is printed already; Hydra's traceback would only hide it
    return [
        JobReturn(overrides=p.overrides, status=JobStatus.COMPLETED, _return_value=p.extra.get("job_id"))
        for p in points
    ]


def _remove_sweep_leftovers(sweep_dir: str) -> None:
    """Hydra's multirun.yaml, then the directories that are left empty (never the working directory)."""
    leftover = os.path.join(sweep_dir, "multirun.yaml")
    if os.path.isfile(leftover):
        os.remove(leftover)
    path = os.path.abspath(sweep_dir)
    while os.path.isdir(path) and not os.listdir(path) and path not in (os.getcwd(), "/"):
        os.rmdir(path)
        path = os.path.dirname(path)
