"""What a point asks SLURM for: `cluster.*` -> submitit's parameters, and a dry run of the request.

`check_request()` runs `sbatch --test-only` with the same resources before anything is queued, so
a request the cluster can never satisfy (more CPUs or GPUs per node than a node has, an unknown
partition or feature, too many nodes) is refused with SLURM's reason and the keys to change,
instead of waiting in the queue forever.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from pretrain.config import ClusterConfig
from pretrain.errors import ConfigError

# Each task sees all GPUs of its node (cuda:LOCAL_RANK picks one); a task that dies ends the step,
# so the other ranks do not wait in a collective until their timeout.
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def submitit_parameters(c: ClusterConfig, job_name: str) -> dict[str, Any]:
    """Keyword arguments for `submitit.AutoExecutor.update_parameters`."""
    params: dict[str, Any] = {
        "name": job_name,
        "nodes": c.nodes,
        "tasks_per_node": c.nproc_per_node,
        "cpus_per_task": c.cpus_per_task,
        "timeout_min": c.timeout_min,
        "slurm_signal_delay_s": c.signal_delay_s,
        "slurm_srun_args": list(SRUN_ARGS),
    }
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb:
        params["mem_gb"] = c.mem_gb
    for key in ("partition", "account", "qos", "constraint"):  # "" = the cluster's default
        if getattr(c, key):
            params[f"slurm_{key}"] = getattr(c, key)
    if c.setup:
        params["slurm_setup"] = list(c.setup)
    if c.extra_sbatch:
        params["slurm_additional_parameters"] = dict(c.extra_sbatch)
    return params


def sbatch_flags(c: ClusterConfig) -> list[str]:
    """The sbatch options of the request, as `sbatch` takes them on its command line."""
    flags = [
        f"--nodes={c.nodes}",
        f"--ntasks-per-node={c.nproc_per_node}",
        f"--cpus-per-task={c.cpus_per_task}",
        f"--time={c.timeout_min}",
    ]
    if c.gpus_per_node:
        flags.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.mem_gb:
        flags.append(f"--mem={c.mem_gb}G")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            flags.append(f"--{key}={getattr(c, key)}")
    for key, value in c.extra_sbatch.items():
        flags.append(f"--{str(key).replace('_', '-')}" + ("" if value is True else f"={value}"))
    return flags


def require_slurm_commands() -> None:
    missing = [cmd for cmd in ("sbatch", "srun", "sacct", "squeue") if shutil.which(cmd) is None]
    if missing:
        raise ConfigError(
            f"cluster=slurm needs SLURM's commands on PATH; missing: {', '.join(missing)}. "
            "Fix: submit from a SLURM login node, or use cluster=local."
        )


def partitions_summary() -> str:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%P: %D nodes, %c CPUs, %m MB, gres %G, features %f"],
        capture_output=True, text=True, timeout=30,
    )
    return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip()) or "(sinfo shows none)"


def check_request(c: ClusterConfig) -> None:
    """Ask SLURM whether it could ever run this request (`sbatch --test-only`); nothing is queued."""
    require_slurm_commands()
    flags = sbatch_flags(c)
    try:
        out = subprocess.run(
            ["sbatch", "--test-only", *flags, "--wrap", "true"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            "sbatch --test-only did not answer in 60 s. Fix: check the cluster (`sinfo`, `squeue`)."
        ) from None
    if out.returncode != 0:
        reason = " ".join(line.strip() for line in (out.stderr + out.stdout).splitlines() if line.strip())
        raise ConfigError(
            f"SLURM refuses the request {' '.join(flags)}: {reason}. Partitions here: {partitions_summary()}. "
            "Fix: change cluster.partition, cluster.nproc_per_node / gpus_per_node, cluster.cpus_per_task, "
            "cluster.mem_gb, cluster.nodes or cluster.constraint to fit a node of the partition."
        )
