"""Preemption, requeue and time limits: finish the step, write a checkpoint, then stop so SLURM or
submitit can requeue the job, which resumes from that checkpoint.

Two signals reach the tasks of a SLURM job:
  SIGUSR2  `cluster.signal_delay_s` seconds before the time limit (`--signal=USR2@N`), or from a
           preempting scheduler / `scancel --signal=USR2 JOBID`. submitit's handler requeues the job.
  SIGTERM  SLURM is ending the job now: `scontrol requeue`, preemption with PreemptMode=REQUEUE,
           `scancel`, the time limit itself. SLURM requeues (or cancels) it; submitit's handler only
           logs it. SIGKILL follows after the cluster's KillWait.
`install()` puts a handler in front of submitit's for both: it only records the signal. After each
optimizer step the loop calls `checkpoint_and_requeue_if_signalled`, which

  1. agrees across ranks on what was received (one tiny all-reduce per step, only when installed),
     so every rank stops after the same step;
  2. saves a checkpoint of that step (unless the loop just saved it);
  3. calls the handlers that were installed before (submitit's): for SIGUSR2, global rank 0
     re-pickles the job, runs `scontrol requeue` (a time limit counts against
     `cluster.max_num_timeout`) and exits;
  4. stops every rank without a result, so the job is never reported finished while it is requeued.

The requeued job starts from the same pickle, finds the checkpoint in its run directory and resumes,
so its loss trajectory is the one of an uninterrupted run.

Local runs (`install_local`): Ctrl-C (SIGINT) or SIGTERM lets every rank finish its step; the run then
checkpoints and stops with RunStopped (exit 130 or 143), and the same command resumes. A second signal
ends the process at once (its handler is back to the default after the first). With several local
processes the launching process hears the signal and passes it on to its ranks as SIGTERM (they ignore
SIGINT, so a Ctrl-C at the terminal reaches each rank once); a rank whose launcher is gone stops too.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from pretrain.errors import RunStopped
from pretrain.log import logger

REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's default preemption/timeout signal (it asks for --signal=USR2@N)
STOP_SIGNAL = signal.SIGTERM  # SLURM ends the job (requeue, preemption, cancel, time limit)
HANDLED = (STOP_SIGNAL, REQUEUE_SIGNAL)  # in the order their previous handlers are called

_previous_handlers: dict[int, Any] = {}  # signal -> what was installed before us (submitit's handlers)
_received: set[int] = set()
_local: dict[str, Any] = {}  # local runs: {"role": "single" | "rank", "parent": the launcher's pid}


def install() -> None:
    """Record SIGTERM and SIGUSR2 instead of acting at once; call from the main thread of each task."""
    _received.clear()
    for signum in HANDLED:
        _previous_handlers[signum] = signal.signal(signum, _record_signal)


def install_local(role: str, launcher_pid: int = 0) -> None:
    """Local runs, from the main thread: "single" (the one process) handles SIGINT and SIGTERM; "rank" (one of
    the launcher's processes, `launcher_pid`) handles SIGTERM and ignores SIGINT, which its launcher passes on."""
    _received.clear()
    _local.update(role=role, launcher=launcher_pid)
    if role == "rank":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _record_local_signal)
    else:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _record_local_signal)


def _record_local_signal(signum: int, frame: Any) -> None:
    _received.add(signum)
    # one process: a second signal ends it at once. A rank ignores the rest: a SIGTERM sent to the whole process
    # group reaches it twice (directly and through its launcher), and a second Ctrl-C makes the launcher SIGKILL it
    signal.signal(signum, signal.SIG_IGN if _local.get("role") == "rank" else signal.SIG_DFL)
    logger.warning(f"received {signal.Signals(signum).name}: finishing this step, checkpointing, then stopping "
                   "(send it again to stop at once, without a checkpoint)")


def _record_signal(signum: int, frame: Any) -> None:
    _received.add(signum)
    logger.warning(f"received {signal.Signals(signum).name}: checkpointing after this step, then stopping")


def received_on_any_rank() -> list[int]:
    """The handled signals that any rank received (collective when more than one rank)."""
    if not _previous_handlers and not _local:
        return []
    # lazy: install() runs in the SLURM task before torch is imported
    import torch
    import torch.distributed as dist

    if _local.get("role") == "rank" and not alive(_local["launcher"]):
        _received.add(signal.SIGTERM)  # the launcher is gone (the fork server, our parent, may live on), and the lock
    handled = (signal.SIGINT, *HANDLED)
    flags = [1 if s in _received else 0 for s in handled]
    if dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor(flags, dtype=torch.int32)  # CPU: gloo, or the cpu half of cuda:nccl,cpu:gloo
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        flags = agreed.tolist()
    return [s for s, flag in zip(handled, flags) if flag]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (not gone, not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user now has that pid
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # dead, not yet reaped by its parent
    except (OSError, IndexError):
        return True  # no /proc: the signal test above is all there is


def checkpoint_and_requeue_if_signalled(checkpoint: Any, state: Any) -> None:
    """The training loop's hook, after each step. `checkpoint` is the CheckpointManager, `state` its TrainState."""
    received = received_on_any_rank()
    if not received:
        return
    # lazy: install() runs in the SLURM task before torch is imported
    import torch.distributed as dist

    if not checkpoint.cfg.enable:
        logger.warning("checkpoint.enable=false: nothing is saved; the run starts again from step 0")
    else:
        checkpoint.wait()  # a background save of this very step may be in flight
        if not os.path.isdir(os.path.join(checkpoint.folder, f"step-{state.step}")):
            checkpoint.save(state, blocking=True)
    if _local:
        if dist.is_initialized():
            dist.barrier()  # every rank's part of the checkpoint is written
        saved = (f"checkpoint step-{state.step} is in {checkpoint.folder}; run the same command to resume from it"
                 if checkpoint.cfg.enable else "checkpoint.enable=false, so nothing was saved")
        raise RunStopped(f"after step {state.step}: {saved}.", received[0])
    exit_error: Optional[BaseException] = None
    for signum in received:
        previous = _previous_handlers.get(signum)
        if callable(previous):
            try:
                previous(signum, None)  # submitit: logs SIGTERM; on SIGUSR2 rank 0 requeues, then exits
            except BaseException as e:  # SystemExit after the requeue, or the reason it could not requeue
                exit_error = exit_error or e
    if dist.is_initialized():
        dist.barrier()  # no rank leaves before rank 0 has requeued the job
    if exit_error is not None:
        raise exit_error
    names = "+".join(signal.Signals(s).name for s in received)
    raise SystemExit(f"stopped after step {state.step} (checkpointed) on {names}")
