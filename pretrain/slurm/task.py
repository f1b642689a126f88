"""What every SLURM task runs: the rank environment, the device, the preemption handler, then the
same `pretrain.train.main(job)` as a local run. One task per device; no torchrun inside the job."""

from __future__ import annotations

import os
import traceback

from pretrain.config import JobConfig

ERROR_FILE = "error.txt"  # in the run directory: the traceback of the first rank that raised


class SlurmTask:
    def __init__(self, job: JobConfig):
        self.job = job

    def __call__(self) -> int:
        # lazy: unpickled on the node, imported from the code snapshot now on sys.path
        import submitit

        from pretrain import preemption

        # MASTER_ADDR (first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cluster = self.job.cluster
        if not cluster.gpus_per_node:
            cluster.device = "cpu"  # a CPU-only job: gloo, even on a node with GPUs
        os.environ.setdefault("OMP_NUM_THREADS", str(cluster.cpus_per_task))
        preemption.install()  # in front of submitit's SIGUSR2 handler, which it calls after checkpointing
        if dist_env.rank == 0:
            # lazy: unpickled on the node, imported from the code snapshot now on sys.path
            import pretrain

            code = os.path.dirname(os.path.dirname(os.path.abspath(pretrain.__file__)))
            print(f"rank 0 of {dist_env.world_size}; code snapshot {code}; run dir {self.job.job.run_dir}", flush=True)

        # lazy: from the snapshot, like the imports above
        from pretrain.train import main  # cuda:LOCAL_RANK or CPU, process group from the environment

        try:
            main(self.job)
        except Exception:
            record_error(self.job.job.run_dir, dist_env.rank, traceback.format_exc())
            raise
        return dist_env.rank


def record_error(run_dir: str, rank: int, trace: str) -> None:
    """Keep the first failing rank's traceback in the run directory (for the sweep report)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ERROR_FILE), "x") as f:
            f.write(f"rank {rank}\n{trace}")
    except OSError:  # another rank was first, or the directory is not writable: the job log has it
        pass
