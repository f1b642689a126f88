"""Start the run: in this process for one rank, else one process per device on this machine through
torch.distributed's elastic launcher (the engine behind torchrun). `cluster=slurm` submits to SLURM
instead (pretrain/slurm/: one task per device, each running the same `train.main`)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pretrain import preemption
from pretrain.config import JobConfig
from pretrain.errors import EXIT_HALTED, EXIT_USER_ERROR, ConfigError, RunStopped, TrainingHalted
from pretrain.rundir import HELD_ENV, RunLock, remove_if_created
from pretrain.train import main

STOPPED_FILE = "stopped.txt"  # in the error folder: a rank stopped by a signal, after its checkpoint


def launch(job: JobConfig) -> int:
    """Run `pretrain.train.main(job)` on every rank; returns the exit code for the shell."""
    # launch.py reaches this only with hydra.mode=RUN; the usual path is the Hydra launcher
    if job.cluster.name == "slurm":
        return submit_to_slurm(job)
    lock = RunLock(job.job.run_dir)  # one live run per run directory, held here for every local rank
    try:
        lock.acquire()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    os.environ[HELD_ENV] = os.path.abspath(job.job.run_dir)
    code = 1
    try:
        if job.cluster.nproc_per_node == 1:
            code = _run_here(job)
        else:
            with tempfile.TemporaryDirectory(prefix="pretrain-errors-") as error_dir:
                code = _launch_local_processes(job, error_dir)
        return code
    finally:
        os.environ.pop(HELD_ENV, None)
        if code == EXIT_USER_ERROR:  # refused before it wrote anything: the folders Hydra made for it go
            remove_if_created(job.job.run_dir, lock_files=True)
        lock.release()


def _run_here(job: JobConfig) -> int:
    """The one rank, in this process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    preemption.install_local("single")
    try:
        main(job)
    except TrainingHalted as e:  # the run stopped itself (non-finite loss, failed save)
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_HALTED
    except ConfigError as e:  # a user error found at run time (data, tokenizer, checkpoint)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"stopped by {signal.Signals(e.exit_code - 128).name} {e}", file=sys.stderr)
        return e.exit_code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return 0


def run_rank(job: JobConfig, error_dir: str, lock_held_for: str, launcher_pid: int) -> None:
    """One rank started by the elastic launcher: a user error or a halt leaves its message in `error_dir`
    and exits with its own code, so the launcher reports it once, without a traceback. A stop on a signal
    leaves its message too, and exits 0: no rank is a failure the launcher would end the others for."""
    preemption.install_local("rank", launcher_pid)
    os.environ[HELD_ENV] = lock_held_for  # the launcher holds the run directory's lock for every rank
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(error_dir, f"pid-{rank}"), "w") as f:  # how the launcher tells a killed rank apart
        f.write(str(os.getpid()))
    try:
        main(job)
    except (ConfigError, TrainingHalted) as e:
        with open(os.path.join(error_dir, f"rank-{rank}.txt"), "w") as f:
            f.write(str(e))
        sys.exit(EXIT_USER_ERROR if isinstance(e, ConfigError) else EXIT_HALTED)
    except RunStopped as e:
        if rank == "0":
            with open(os.path.join(error_dir, STOPPED_FILE), "w") as f:
                f.write(str(e))
        if not preemption.alive(launcher_pid):  # the elastic wrapper would wait forever for it to read our result
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_HALTED)


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
        # each rank forks from a server process that has imported torch and our modules once, instead of
        # every rank importing them again (seconds per rank); no CUDA is initialised before the fork
        start_method="forkserver",
    )
    multiprocessing.set_forkserver_preload(["pretrain.train"])  # no effect once this process's server runs
    signals = _PassSignalsOn()
    held = os.environ[HELD_ENV]  # an argument, not the environment: the server's is that of its start
    try:
        signals.run(lambda: elastic_launch(config, entrypoint=run_rank)(job, error_dir, held, os.getpid()), nproc)
    except ChildFailedError as e:
        if signals.received:
            stopped = ("the ranks were ended at once, without a checkpoint; the same command resumes from the "
                       "last complete one")
            print(f"stopped by {signals.received[0].name}: {stopped}.", file=sys.stderr)
            return 128 + signals.received[0]
        for rank in sorted(e.failures):  # every rank stops at the same step: the lowest one that said why
            code, path = e.failures[rank].exitcode, os.path.join(error_dir, f"rank-{rank}.txt")
            if code in (EXIT_USER_ERROR, EXIT_HALTED) and os.path.isfile(path):
                with open(path) as f:
                    print(
                        f"{'error' if code == EXIT_USER_ERROR else 'stopped'} (rank {rank}): {f.read()}",
                        file=sys.stderr,
                    )
                return code
        killed = signals.killed_ranks(error_dir)  # the cause, when the first failure the agent saw is its effect
        cause = "".join(f"rank {rank} was killed by {name}; " for rank, name in killed.items())
        print(f"error: training failed on rank(s) {sorted({*e.failures, *killed})}: {cause}\n{e.format_msg()}",
              file=sys.stderr)
        return 1
    stopped = os.path.join(error_dir, STOPPED_FILE)
    if os.path.isfile(stopped):
        signum = signals.received[0] if signals.received else signal.SIGTERM
        with open(stopped) as f:
            print(f"stopped by {signum.name} {f.read()}", file=sys.stderr)
        return 128 + signum
    return 0


class _PassSignalsOn:
    """While the ranks run, Ctrl-C or SIGTERM of this process reaches each rank once, as SIGTERM (they finish
    their step and checkpoint); a second one kills them. The elastic launcher runs in a thread, so it installs
    no handlers of its own (it would end the ranks at once). SIGINT and SIGTERM are ignored while the ranks
    start: the fork server inherits that (were it ended by a signal to the whole process group, its ranks would
    look failed), and so do the ranks, which then take SIGTERM only (a terminal's Ctrl-C, sent to the whole
    group, reaches them through here)."""

    def __init__(self):
        self.received: list[signal.Signals] = []
        self.children: dict[int, multiprocessing.Process] = {}  # pid -> the rank's process, kept to read its exit

    def killed_ranks(self, error_dir: str) -> dict[int, str]:
        """{rank: signal name} for the ranks that a signal other than the launcher's SIGTERM ended (a kill -9, the
        OOM killer): the elastic agent reports only the first failure it sees, often a peer's lost connection."""
        killed = {}
        for name in os.listdir(error_dir):
            if name.startswith("pid-"):
                with open(os.path.join(error_dir, name)) as f:
                    child = self.children.get(int(f.read() or 0))
                code = child.exitcode if child is not None else None
                if code is not None and code < 0 and -code != signal.SIGTERM:
                    killed[int(name[4:])] = signal.Signals(-code).name
        return dict(sorted(killed.items()))

    def run(self, fn, nproc: int) -> None:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:  # the fork server inherits this too: a signal to the whole group must not end it
            signal.signal(s, signal.SIG_IGN)
        outcome: dict = {}

        def target():
            try:
                fn()
            except BaseException as e:  # handed to the calling thread
                outcome["error"] = e

        thread = threading.Thread(target=target, name="elastic-launch", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and len(multiprocessing.active_children()) < nproc and time.monotonic() < deadline:
            time.sleep(0.05)  # the ranks are started with SIGINT ignored
        try:
            for s in previous:
                signal.signal(s, self._pass_on)
            while thread.is_alive():
                self.children.update((c.pid, c) for c in multiprocessing.active_children())
                thread.join(0.2)  # wakes up for the signal handler
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if "error" in outcome:
            raise outcome["error"]

    def _pass_on(self, signum: int, frame) -> None:
        self.received.append(signal.Signals(signum))
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signal.SIGTERM if len(self.received) == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass


def submit_to_slurm(job: JobConfig) -> int:
    """One job on SLURM, validated already; blocking or not as `cluster.blocking` says."""
    # lazy: submitit and cloudpickle load only for cluster=slurm
    from pretrain.slurm.points import Point
    from pretrain.slurm.submission import submit_points

    job.job.run_dir = os.path.abspath(job.job.run_dir)
    point = Point(index=0, overrides=[], run_dir=job.job.run_dir, job=job)
    return submit_points([point], job.job.run_dir, is_sweep=False)
