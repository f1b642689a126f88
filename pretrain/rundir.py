"""The run directory: one live run per directory, and nothing removed that a run did not create.

- `RunLock`: an exclusive lock on `<run_dir>/.run.lock` (filelock: an OS lock that dies with its process,
  so a killed run's lock is free at once), with who holds it in `<run_dir>/.run.lock.json`. A second
  run of the same directory is refused before any work, naming the holder. The local launcher takes it
  in the launching process, for every rank (`HELD_ENV` tells its ranks); elsewhere (a SLURM job) global
  rank 0 takes it and the ranks agree on the outcome (`take_run_lock` in the trainer). A requeued SLURM
  job takes its own run over: the old job's tasks are gone, or going, when it starts.
- `CreatedDirs`: a Hydra callback that notes, before Hydra makes the run directory, the nearest folder
  that already existed; a refused config removes only the empty folders below it. It makes the run
  directory itself, so one that cannot be written is refused in one line (Hydra's own attempt would
  end in a traceback).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pretrain.errors import EXIT_USER_ERROR, ConfigError

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.lock.json"
HELD_ENV = "PRETRAIN_RUN_LOCK_HELD"  # set by the local launcher for the ranks it starts
REQUEUE_WAIT_S = 60.0  # a requeued SLURM job waits this long for its previous attempt's tasks to exit


class RunLock:
    """Held from `acquire()` until `release()` or the end of the process."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.lock = FileLock(os.path.join(run_dir, LOCK_FILE))

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the live run that holds it."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            holder = self._holder()
            same_job = holder.get("slurm_job_id") and holder.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID")
            self.lock.acquire(timeout=REQUEUE_WAIT_S if same_job else 0)
        except Timeout:
            holder = self._holder()
            who = ", ".join(f"{key} {holder[key]}" for key in ("host", "pid", "slurm_job_id") if holder.get(key))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
            raise ConfigError(
                f"run directory {self.run_dir} is in use by a live run ({who or 'holder unknown'}; since {since}). "
                "Fix: wait for it to end or stop it; or start this one under another job.name."
            ) from None
        except OSError as e:
            raise ConfigError(
                f"cannot lock the run directory {self.run_dir} ({e.strerror or e}). "
                "Fix: make it writable, or set job.dump_folder to a writable folder."
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        if os.environ.get("SLURM_JOB_ID"):
            holder["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        with open(os.path.join(self.run_dir, HOLDER_FILE), "w") as f:
            json.dump(holder, f)

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release(force=True)

    def _holder(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.run_dir, HOLDER_FILE)) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}


# ----------------------------------------------------------------------------- what Hydra creates
_existed: dict[str, str] = {}  # run directory -> its nearest ancestor that existed before Hydra made it


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def remove_if_created(run_dir: str, lock_files: bool = False) -> None:
    """Remove the empty folders Hydra made for `run_dir` in this invocation, and nothing else. `lock_files`:
    the run's own lock (still held by the caller) goes too when it is all the folder holds."""
    run_dir = os.path.abspath(run_dir)
    stop = _existed.get(run_dir)
    if stop is None:  # not noted: the folder may be the user's own
        return
    if lock_files and os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {LOCK_FILE, HOLDER_FILE}:
        for name in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, name))
    path = run_dir
    while path != stop and path.startswith(stop + os.sep) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        path = os.path.dirname(path)


def _make_writable_dir(run_dir: str) -> None:
    """Make the run directory now (Hydra would, with a traceback when it cannot); one that exists must be writable
    (access(2) also says so for a read-only filesystem). Nothing is written into an existing one: a refused config
    leaves it as it was, to its timestamps."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", run_dir)
    except OSError as e:
        print(
            f"error: cannot write the run directory {run_dir} ({e.strerror or e}: {e.filename or run_dir}). "
            "Fix: set job.dump_folder to a folder you can write.",
            file=sys.stderr,
        )
        sys.exit(EXIT_USER_ERROR)


class CreatedDirs(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._note(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._note(str(config.hydra.sweep.dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In a sweep each point's folder lies under the sweep's: the sweep folder's note covers it."""
        run_dir = config.hydra.runtime.output_dir
        for noted, stop in list(_existed.items()):
            if run_dir.startswith(noted + os.sep):
                _existed[run_dir] = stop

    @staticmethod
    def _note(run_dir: str) -> None:
        existed = _nearest_existing(run_dir)
        _make_writable_dir(run_dir)
        _existed[os.path.abspath(run_dir)] = existed


def agree(ok: bool, message: str) -> None:
    """Raise ConfigError on every rank when any rank failed (collective when a process group is up)."""
    # lazy: the lock and the Hydra callback are used before torch loads; only the trainer agrees across ranks
    import torch
    import torch.distributed as dist

    failed = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed)  # a CPU tensor: gloo, or the cpu half of "cuda:nccl,cpu:gloo"
    if failed.item():
        raise ConfigError(message)


def take_run_lock(run_dir: str, rank: int) -> RunLock | None:
    """The trainer's call, on every rank: rank 0 takes the lock unless the local launcher holds it already."""
    if os.environ.get(HELD_ENV) == os.path.abspath(run_dir):
        return None
    lock, error = None, ""
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except ConfigError as e:
            lock, error = None, str(e)
    agree(not error, error or f"rank 0 could not lock the run directory {run_dir} (its message says why)")
    return lock
