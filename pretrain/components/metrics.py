"""Training metrics: throughput/MFU arithmetic, memory, and the rank-0 logger (console, jsonl, Aim, TensorBoard).

Outputs of one run, all in `job.run_dir` except the Aim repo:
  metrics.jsonl   one JSON object per logged step, appended across restarts
                  (after a resume from an older checkpoint a step can appear twice: the last line wins)
  aim_run_hash    the Aim run of this run directory, so a resumed job appends to the same Aim run
  tb/             TensorBoard events, when metrics.enable_tensorboard
  wandb_run_id    the W&B run of this run directory, when metrics.enable_wandb (wandb_sink.py); wandb/ its files
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
import uuid
from typing import Any, Optional

import torch

from pretrain.components.peak_flops import peak_flops, peak_flops_for_name  # noqa: F401  (re-exported)
from pretrain.components.wandb_sink import WandbRun
from pretrain.config import JobConfig
from pretrain.errors import ConfigError
from pretrain.log import logger

GIB = 1024**3
JSONL_FILE = "metrics.jsonl"
AIM_HASH_FILE = "aim_run_hash"


def throughput(tokens: int, seconds: float, flops_per_token: float, peak: float) -> dict[str, float]:
    """Per-device tokens/s, achieved TFLOP/s and MFU (percent of `peak` FLOP/s), torchtitan's definitions."""
    tokens_per_s = tokens / seconds
    flops = tokens_per_s * flops_per_token
    return {"tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "mfu": 100.0 * flops / peak}


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA caching-allocator reserved bytes, or the CPU peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB


def cuda_memory_stats(device: torch.device) -> dict[str, float]:
    """Extra CUDA allocator peaks and counters for the metrics dict; empty off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {
        "memory_active_gib": stats.get("active_bytes.all.peak", 0) / GIB,
        "memory_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        "num_alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "num_ooms": float(stats.get("num_ooms", 0)),
    }


def _aim_lock_holder(repo_dir: str, run_hash: str) -> Optional[tuple[int, int]]:
    """(machine id, pid) written in the Aim lock of a run, None when the run is not locked.

    Aim 3.29 writes `<machine>-<pid>-<time>` into `.aim/locks/<hash>.softlock` and deletes it on close.
    """
    path = os.path.join(repo_dir, ".aim", "locks", f"{run_hash}.softlock")
    try:
        with open(path) as f:
            machine, pid, *_ = f.read().split("-")
        return int(machine), int(pid)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return (-1, -1)  # locked by a holder we cannot read


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_aim_run(job: JobConfig) -> Any:
    """Create the Aim run of this run directory, or reopen it when `aim_run_hash` names one."""
    # lazy: aim takes seconds to import and loads only when metrics.enable_aim
    import aim

    repo_dir = os.path.abspath(os.path.expanduser(job.metrics.aim_repo or job.job.dump_folder))
    os.makedirs(repo_dir, exist_ok=True)
    if not aim.Repo.exists(repo_dir):
        aim.Repo.from_path(repo_dir, init=True)  # what `aim init --repo <dir>` does
    repo = aim.Repo.from_path(repo_dir)
    kwargs = dict(repo=repo, system_tracking_interval=None, log_system_params=False, capture_terminal_logs=False)
    hash_file = os.path.join(job.job.run_dir, AIM_HASH_FILE)
    run_hash = ""
    if os.path.exists(hash_file):
        with open(hash_file) as f:
            run_hash = f.read().strip()
    if run_hash and not repo.run_exists(run_hash):
        logger.warning(f"Aim run {run_hash} (from {hash_file}) is not in the Aim repo {repo_dir}; starting a new Aim "
                       "run")
        run_hash = ""
    if run_hash:
        holder = _aim_lock_holder(repo_dir, run_hash)
        if holder is not None and holder[0] == uuid.getnode() and holder[1] != os.getpid() and _pid_alive(holder[1]):
            raise ConfigError(
                f"Aim run {run_hash} of {job.job.run_dir} is held by the live process {holder[1]}: "
                f"another job with job.name={job.job.name} is running. Fix: stop it, or use another job.name."
            )
        if holder is not None:  # the previous job died (preempted, killed, other node) without closing it
            logger.info(f"Aim run {run_hash}: taking over the lock left by the previous job")
        run = aim.Run(run_hash, experiment=job.job.name, force_resume=holder is not None, **kwargs)
    else:
        run = aim.Run(experiment=job.job.name, **kwargs)
        tmp = f"{hash_file}.tmp"
        with open(tmp, "w") as f:
            f.write(run.hash + "\n")
        os.replace(tmp, hash_file)
    run.name = job.job.name
    if job.job.description:
        run.description = job.job.description
    run["hparams"] = dataclasses.asdict(job)  # re-written on resume: the latest config wins
    return run


def close_aim_run(run: Any) -> None:
    """Close the run (frees its lock), then index it so read-only readers see it without `aim up`.

    Aim 3.29 read-only access (Run(read_only=True), Repo.query_metrics) reads `.aim/meta/index`, which
    only `aim up` or an explicit index fills; indexing a closed run takes milliseconds.
    """
    repo, run_hash = run.repo, run.hash
    run.close()
    try:
        # lazy: only when a stale index lock is taken over
        from aim.sdk.index_manager import RepoIndexManager

        RepoIndexManager.get_index_manager(repo).index(run_hash)
    except Exception as e:  # best effort: a running `aim up` holds the index and indexes the run itself
        logger.debug(f"Aim run {run_hash} not indexed now ({e}); `aim up` will index it")


def _tensorboard_writer(log_dir: str) -> Any:
    try:
        # lazy: tensorboard is optional and loads only when metrics.enable_tensorboard
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"metrics.enable_tensorboard=true needs the tensorboard package ({e}). "
            'Fix: pip install -e ".[tensorboard]" (or pip install tensorboard), or set '
            "metrics.enable_tensorboard=false."
        ) from None
    return SummaryWriter(log_dir=log_dir)


def format_line(step: int, values: dict[str, float], step_width: int = 6) -> str:
    """One aligned console line for a logged step."""
    v = values
    return (
        f"step {step:>{step_width}d} | loss {v['loss']:7.4f} | gnorm {v['grad_norm']:7.3f} | lr {v['lr']:.2e}"
        f" | tok/s {v['tokens_per_s']:>9,.0f} | TFLOP/s {v['tflops']:7.2f} | MFU {v['mfu']:5.1f}%"
        f" | mem {v['memory_gib']:6.2f} GiB"
        + (f" | experts {v['moe_min_load']:.2f}-{v['moe_max_load']:.2f}x" if "moe_max_load" in v else "")
        + (f" | val loss {v['val_loss']:7.4f} ppl {v['val_perplexity']:.4g}" if "val_loss" in v else "")
    )


class MetricsLogger:
    """Rank-0 sink for per-step metrics; with enabled=False (the other ranks) every method does nothing."""

    def __init__(self, job: JobConfig, enabled: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._aim_run = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir = job.job.run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._step_width = max(4, len(str(job.training.steps)))
        try:
            if job.metrics.enable_tensorboard:
                self._tb = _tensorboard_writer(os.path.join(run_dir, "tb"))
            if job.metrics.enable_aim:
                self._aim_run = open_aim_run(job)
                logger.info(f"Aim run {self._aim_run.hash}: aim up --repo {self._aim_run.repo.root_path}")
            if job.metrics.enable_wandb:
                self._wandb = WandbRun(job)
            self._jsonl = open(os.path.join(run_dir, JSONL_FILE), "a")
        except BaseException:
            self.close()  # release what was opened (the Aim lock above all)
            raise

    @property
    def aim_run_hash(self) -> Optional[str]:
        return self._aim_run.hash if self._aim_run is not None else None

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self._wandb.id if self._wandb is not None else None

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record one step: needs loss, grad_norm, lr, tokens_per_s, tflops, mfu, memory_gib (extra keys welcome)."""
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in values.items()}  # tensors/ints -> float; Aim refuses mixed types
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **numbers}) + "\n")
        self._jsonl.flush()
        logger.info(format_line(step, numbers, self._step_width))
        if self._aim_run is not None:
            self._aim_run.track(numbers, step=step)  # one atomic write for all names
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step)

    def log_text(self, msg: str) -> None:
        if self.enabled:
            logger.info(msg)

    def close(self) -> None:
        """Flush and release everything; closing the Aim run frees its lock so a resumed job can reopen it."""
        if self._aim_run is not None:
            close_aim_run(self._aim_run)
            self._aim_run = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
