"""Composed DictConfig -> validated JobConfig: the one step between Hydra and the run."""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pretrain.config.schema import JobConfig
from pretrain.config.validate import validate
from pretrain.errors import ConfigError


def resolve(cfg: DictConfig, run_dir: Optional[str] = None) -> JobConfig:
    """Composed DictConfig -> validated JobConfig with derived values filled in."""
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key} has no value (???). Fix: set it on the command line, e.g. {e.full_key}=..."
        ) from None
    assert isinstance(job, JobConfig), type(job)
    job.job.run_dir = run_dir or os.path.join(job.job.dump_folder, job.job.name)
    if not job.metrics.aim_repo:
        job.metrics.aim_repo = job.job.dump_folder
    if job.checkpoint.create_seed_checkpoint:
        seed_checkpoint_layout(job)
    validate(job)
    return job


def seed_checkpoint_layout(job: JobConfig) -> None:
    """A seed checkpoint is the full model's initial weights, written by one process: the layout and
    the cluster of the run that will use it do not apply, so the same recipe command works for both."""
    p, c = job.parallelism, job.cluster
    for key in (
        "data_parallel_replicate_degree",
        "data_parallel_shard_degree",
        "tensor_parallel_degree",
        "pipeline_parallel_degree",
        "context_parallel_degree",
        "expert_parallel_degree",
    ):
        setattr(p, key, 1)
    p.pipeline_parallel_schedule, p.module_fqns_per_model_part = "1F1B", None
    c.name, c.nodes, c.nproc_per_node, c.gpus_per_node = "local", 1, 1, 0
    job.training.global_batch_size = -1
