"""Weights & Biases tracking (metrics.enable_wandb), rank 0 only, as one W&B run per run directory.

The run's id is kept in `<run dir>/wandb_run_id`: a resumed or requeued job reopens the same W&B run
(`resume="allow"`), so its steps continue the same charts. W&B's own files go to `<run dir>/wandb/`; in offline
mode (metrics.wandb_mode=offline, or WANDB_MODE=offline when the key is unset) each attempt writes an
`offline-run-<time>-<id>` folder there, all with the run's id, and `wandb sync <run dir>/wandb/offline-run-*`
uploads them later, in order, as that one run. Steps are the training steps (`step=`), as torchtitan logs them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pretrain.config import JobConfig
from pretrain.errors import ConfigError
from pretrain.log import logger

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "pretrain"


def wandb_mode(job: JobConfig) -> str:
    """metrics.wandb_mode, else WANDB_MODE, else online."""
    return job.metrics.wandb_mode or os.environ.get("WANDB_MODE") or "online"


def _saved_run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, RUN_ID_FILE)
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read().strip()


def _save_run_id(run_dir: str, run_id: str) -> None:
    path = os.path.join(run_dir, RUN_ID_FILE)
    with open(f"{path}.tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(f"{path}.tmp", path)


class WandbRun:
    """The W&B run of this run directory: created on the first attempt, resumed by every later one."""

    def __init__(self, job: JobConfig):
        try:
            # lazy: wandb is an optional extra and takes a second to import
            import wandb
        except ImportError as e:  # validate() checks it before launch; this is a rank that lacks it
            raise ConfigError(
                f"metrics.enable_wandb=true needs the wandb package ({e}). Fix: pip install -e \".[wandb]\" "
                "(or pip install wandb), or set metrics.enable_wandb=false."
            ) from None
        m, run_dir = job.metrics, job.job.run_dir
        run_id = _saved_run_id(run_dir)  # "" on the first attempt: W&B makes one up
        resumed = bool(run_id)
        mode = wandb_mode(job)
        # no terminal capture, system stats or git/machine records: the console, metrics.jsonl and Aim have those
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                                  save_code=False, disable_git=True, disable_job_creation=True, silent=True)
        try:
            self.run = wandb.init(
                project=m.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=m.wandb_entity or None,
                name=m.wandb_run_name or job.job.name,
                notes=job.job.description or None,
                id=run_id or None,
                resume="allow",
                dir=run_dir,
                mode=mode,
                config=dataclasses.asdict(job),
                settings=settings,
            )
        except Exception as e:  # wandb's errors for a missing login, an unknown entity, no network...
            which = f"the run {run_id}" if run_id else "a run"
            raise ConfigError(
                f"W&B could not start {which} in mode {mode} ({type(e).__name__}: {e}). Fix: `wandb login` "
                "(or WANDB_API_KEY) and check metrics.wandb_entity / metrics.wandb_project; or log locally with "
                "metrics.wandb_mode=offline and upload later with `wandb sync`; or metrics.enable_wandb=false."
            ) from None
        run_id = self.run.id
        if not resumed:
            _save_run_id(run_dir, run_id)
        where = (f"offline, upload with: wandb sync {os.path.join(run_dir, 'wandb', 'offline-run-*')}"
                 if mode == "offline" else getattr(self.run, "url", None) or mode)
        logger.info(f"W&B run {run_id} ({'resumed' if resumed else 'new'}): {where}")

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
