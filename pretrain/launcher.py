"""Start the run: in this process for one rank, else one process per device on this machine through
torch.distributed's elastic launcher (the engine behind torchrun). `cluster=slurm` submits to SLURM
instead (pretrain/slurm/: one task per device, each running the same `train.main`)."""

from __future__ import annotations

import logging
import os
import sys
import uuid

from pretrain.config import ConfigError, JobConfig, TrainingHalted


def launch(job: JobConfig) -> int:
    """Run `pretrain.train.main(job)` on every rank; returns the exit code for the shell."""
    if job.cluster.name == "slurm":  # launch.py reaches this only with hydra.mode=RUN; the usual path is the Hydra launcher
        return submit_to_slurm(job)
    nproc = job.cluster.nproc_per_node
    if nproc == 1:
        from pretrain.train import main

        try:
            main(job)
        except TrainingHalted as e:  # the run stopped itself (non-finite loss)
            print(f"stopped: {e}", file=sys.stderr)
            return 3
        except ConfigError as e:  # a user error found at run time (data, tokenizer, checkpoint)
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pretrain.train import main

    # torchelastic's agent logs every worker failure with its own traceback; we print one summary below
    # (the failed rank's full traceback included, except for user errors that carry their fix).
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if job.cluster.device != "cuda" and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"pretrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` does
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=main)(job)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        halted = message.partition("TrainingHalted: ")[2]
        if halted:  # every rank stops at the same step; the first failure tells why
            print(f"stopped (rank {rank}): {halted}", file=sys.stderr)
            return 3
        user_error = message.partition("ConfigError: ")[2]
        if user_error:  # a user error found at run time: the message says how to fix it
            print(f"error (rank {rank}): {user_error}", file=sys.stderr)
            return 2
        print(f"error: training failed on rank(s) {sorted(e.failures)}:\n{e.format_msg()}", file=sys.stderr)
        return 1
    return 0


def submit_to_slurm(job: JobConfig) -> int:
    """One job on SLURM, validated already; blocking or not as `cluster.blocking` says."""
    from pretrain.slurm.points import Point
    from pretrain.slurm.submission import submit_points

    job.job.run_dir = os.path.abspath(job.job.run_dir)
    point = Point(index=0, overrides=[], run_dir=job.job.run_dir, job=job)
    return submit_points([point], job.job.run_dir, is_sweep=False)
