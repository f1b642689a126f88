"""Start the run: in this process for one rank, else one process per device on this machine through
torch.distributed's elastic launcher (the engine behind torchrun). `cluster=slurm` submits to SLURM
instead (pretrain/slurm/: one task per device, each running the same `train.main`)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pretrain.config import JobConfig
from pretrain.errors import EXIT_HALTED, EXIT_USER_ERROR, ConfigError, TrainingHalted
from pretrain.train import main


def launch(job: JobConfig) -> int:
    """Run `pretrain.train.main(job)` on every rank; returns the exit code for the shell."""
    # launch.py reaches this only with hydra.mode=RUN; the usual path is the Hydra launcher
    if job.cluster.name == "slurm":
        return submit_to_slurm(job)
    if job.cluster.nproc_per_node == 1:
        try:
            main(job)
        except TrainingHalted as e:  # the run stopped itself (non-finite loss, failed save)
            print(f"stopped: {e}", file=sys.stderr)
            return EXIT_HALTED
        except ConfigError as e:  # a user error found at run time (data, tokenizer, checkpoint)
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    with tempfile.TemporaryDirectory(prefix="pretrain-errors-") as error_dir:
        return _launch_local_processes(job, error_dir)


def run_rank(job: JobConfig, error_dir: str) -> None:
    """One rank started by the elastic launcher: a user error or a halt leaves its message in `error_dir`
    and exits with its own code, so the launcher reports it once, without a traceback."""
    try:
        main(job)
    except (ConfigError, TrainingHalted) as e:
        with open(os.path.join(error_dir, f"rank-{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(str(e))
        sys.exit(EXIT_USER_ERROR if isinstance(e, ConfigError) else EXIT_HALTED)


def _launch_local_processes(job: JobConfig, error_dir: str) -> int:
    nproc = job.cluster.nproc_per_node
    # torchelastic's agent logs every worker failure with its own traceback; we print one summary below
    # (the failed rank's full traceback included, except for user errors and halts, which carry their fix).
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
        elastic_launch(config, entrypoint=run_rank)(job, error_dir)
    except ChildFailedError as e:
        for rank in sorted(e.failures):  # every rank stops at the same step: the lowest one that said why
            code, path = e.failures[rank].exitcode, os.path.join(error_dir, f"rank-{rank}.txt")
            if code in (EXIT_USER_ERROR, EXIT_HALTED) and os.path.isfile(path):
                with open(path) as f:
                    print(
                        f"{'error' if code == EXIT_USER_ERROR else 'stopped'} (rank {rank}): {f.read()}",
                        file=sys.stderr,
                    )
                return code
        print(f"error: training failed on rank(s) {sorted(e.failures)}:\n{e.format_msg()}", file=sys.stderr)
        return 1
    return 0


def submit_to_slurm(job: JobConfig) -> int:
    """One job on SLURM, validated already; blocking or not as `cluster.blocking` says."""
    # lazy: submitit and cloudpickle load only for cluster=slurm
    from pretrain.slurm.points import Point
    from pretrain.slurm.submission import submit_points

    job.job.run_dir = os.path.abspath(job.job.run_dir)
    point = Point(index=0, overrides=[], run_dir=job.job.run_dir, job=job)
    return submit_points([point], job.job.run_dir, is_sweep=False)
