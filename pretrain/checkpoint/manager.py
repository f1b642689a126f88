"""Checkpoints: DCP (torch.distributed.checkpoint) folders `step-N` in <run_dir>/<checkpoint.folder>.

A step folder holds the model and optimizer as DCP shards (resharded on load to any layout) and
`train_state.json` (step, lr schedule, data position): plain JSON, so loading never unpickles.
A save is written into `step-N.partial` and renamed to `step-N` only when every rank has finished
and the JSON is on disk, so an interrupted save is never taken as the latest.

Names are those of the full model whatever the layout: a rank's model parts (pipeline stages) are
disjoint pieces of it, and the optimizer state is saved flattened per parameter name, so a checkpoint
saved with pipeline stages loads without them and back. A seed checkpoint (`step-0`, weights only)
starts a run in any layout from the same initial weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint.async_save import AsyncSaver
from pretrain.checkpoint.initial_load import initial_load
from pretrain.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.checkpoint.state import TRAIN_STATE, LiveState, TrainState, complete_steps
from pretrain.config import CheckpointConfig, JobConfig
from pretrain.distributed.fsdp import DTYPES
from pretrain.errors import ConfigError, TrainingHalted
from pretrain.log import logger


class CheckpointManager:
    """Saves every `interval` steps and at the end; loads the latest (or `load_step`) on start."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str,
        model_parts: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        dataloader: Any,
        is_rank0: bool,
        job: JobConfig | None = None,
    ):
        self.cfg = cfg
        self.job = job  # the whole run's config: what a checkpoint records about the run that wrote it
        self.folder = os.path.join(run_dir, cfg.folder)
        self.live = LiveState(model_parts, optimizer, lr_scheduler, dataloader)
        self.is_rank0 = is_rank0
        self.async_saver = AsyncSaver(cfg.async_mode) if cfg.enable and cfg.async_mode != "disabled" else None
        self.pending, self.pending_step = None, 0  # the background save in flight

    # ----------------------------------------------------------------- save
    def should_save(self, step: int, last_step: int) -> bool:
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def save(self, state: TrainState, last: bool = False, seed: bool = False, blocking: bool = False) -> None:
        """Save this step; `seed`: the initial weights only, in their own dtype (checkpoint.create_seed_checkpoint).
        With checkpoint.async_mode the write goes on in the background (the last save, a seed and a
        `blocking` save, before a requeue, are written before returning). A failed save leaves the previous
        checkpoint as the latest and stops the run, or, with on_save_error=continue, is retried at the
        next interval; a failed last save always stops it."""
        self.wait()  # the previous background save is finished (or has failed) before the next starts
        start = time.perf_counter()
        final = os.path.join(self.folder, f"step-{state.step}")
        partial = final + ".partial"
        model_only = seed or (last and self.cfg.last_save_model_only)
        error = self._on_rank0(self._prepare, partial)
        if self._all_ok(error):
            # the JSON is captured now: training moves the schedule and the data position on meanwhile
            meta = json.dumps({
                "train_state": vars(state),
                "model_only": model_only,
                "lr_scheduler": None if model_only else self.live.lr_scheduler.state_dict(),
                "dataloader": None if model_only else self.live.dataloader.state_dict(),
            })
            state_dict = self._state_dict(model_only, export=not seed)
            if self.async_saver is not None and not (last or seed or blocking):
                finish = (lambda: self._finish(partial, final, meta)) if self.is_rank0 else None
                self.pending = self.async_saver.save(state_dict, partial, finish)
                self.pending_step = state.step
                logger.info(f"checkpoint: step {state.step} staged in {time.perf_counter() - start:.1f}s, "
                            "writing in the background")
                return
            try:
                dcp.save(state_dict, checkpoint_id=partial)
            except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
                error = e
            else:
                error = self._on_rank0(self._finish, partial, final, meta)
        if not self._all_ok(error):
            self._failed(state.step, error, final=last or seed or blocking)
            return
        logger.info(f"checkpoint: saved step {state.step} to {final} in {time.perf_counter() - start:.1f}s")

    def wait(self) -> None:
        """Block until the background save (if any) is on disk; apply the failure policy if it failed."""
        if self.pending is None:
            return
        pending, step = self.pending, self.pending_step
        self.pending = None
        error = self.async_saver.result(pending)
        if self._all_ok(error):
            logger.info(f"checkpoint: step {step} written in the background")
        else:
            self._failed(step, error, final=False)

    def _prepare(self, partial: str) -> None:
        if os.path.exists(partial):  # left over from a save that was interrupted
            shutil.rmtree(partial)
        os.makedirs(self.folder, exist_ok=True)

    def _finish(self, partial: str, final: str, meta: str) -> None:
        """Rank 0, once every rank's shards and DCP's metadata are written: the JSON, then the rename that
        makes the step visible, then the purge of old steps."""
        with open(os.path.join(partial, TRAIN_STATE), "w") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # an older save of the same step is replaced whole
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.folder)
        self._purge()

    def _on_rank0(self, fn, *args) -> BaseException | None:
        """Run fn on rank 0; its exception (disk full, no permission) is returned, not raised."""
        if not self.is_rank0:
            return None
        try:
            fn(*args)
        except (Exception, CheckpointException) as e:
            return e
        return None

    def _all_ok(self, error: BaseException | None) -> bool:
        """True when no rank has an error: every rank takes the same branch after a save."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        dist.all_reduce(flag)  # a CPU tensor: gloo (alone, or the cpu half of "cuda:nccl,cpu:gloo")
        return flag.item() == 0

    def _failed(self, step: int, error: BaseException | None, final: bool) -> None:
        if self.is_rank0:
            shutil.rmtree(os.path.join(self.folder, f"step-{step}.partial"), ignore_errors=True)
        steps = complete_steps(self.folder)
        kept = f"the latest checkpoint is still step-{steps[-1]}, intact" if steps else "there is no earlier checkpoint"
        why = _short_reason(error) if error is not None else "it failed on another rank"
        message = f"checkpoint: saving step {step} into {self.folder} failed ({why}); {kept}."
        if final or self.cfg.on_save_error == "stop":
            raise TrainingHalted(
                f"{message} Fix: free disk space or fix the permissions of {self.folder}, then rerun (it resumes "
                "from the latest checkpoint)" + ("." if final else "; or checkpoint.on_save_error=continue to keep "
                                                 "training and retry at the next interval.")
            )
        logger.error(f"{message} Training goes on and the next interval retries (checkpoint.on_save_error=continue).")

    def _state_dict(self, model_only: bool, export: bool = True) -> dict[str, Any]:
        model_sd = self.live.model_state_dict()[1]
        if model_only:
            dtype = DTYPES[self.cfg.export_dtype] if export else None
            return {"model": {k: v.to(dtype) if dtype else v for k, v in model_sd.items()}}
        return {"model": model_sd, "optimizer": self.live.optimizer_state_dict()[1]}

    def _purge(self) -> None:
        if self.cfg.keep_latest_k <= 0:
            return
        for step in complete_steps(self.folder)[: -self.cfg.keep_latest_k]:
            shutil.rmtree(os.path.join(self.folder, f"step-{step}"), ignore_errors=True)

    # ----------------------------------------------------------------- load
    def load(self) -> TrainState:
        """Restore the chosen checkpoint into the live objects. A run without a checkpoint of its own starts
        from checkpoint.initial_load_path when set, else from its fresh initialisation."""
        if not self.cfg.enable:
            return initial_load(self.cfg, self.live)
        steps = complete_steps(self.folder)
        if self.cfg.create_seed_checkpoint:
            if steps:
                raise ConfigError(
                    f"checkpoint.create_seed_checkpoint=true but {self.folder} already holds steps {steps}; the seed "
                    "goes into an empty folder. Fix: use a new job.name, or delete that checkpoint folder."
                )
            # the seed holds the initial weights: those of initial_load_path if set
            return initial_load(self.cfg, self.live)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint in {self.folder} "
                    f"(complete steps: {steps or 'none'}). Fix: use one of them, or -1 for the latest."
                )
            step = self.cfg.load_step
        elif not steps:
            return initial_load(self.cfg, self.live)
        else:
            step = steps[-1]
        path = os.path.join(self.folder, f"step-{step}")
        with open(os.path.join(path, TRAIN_STATE)) as f:
            meta = json.load(f)
        try:
            SafeFileSystemReader(path).read_metadata()
        except Exception as e:
            raise ConfigError(
                f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Fix: delete that folder to resume "
                "from the previous checkpoint, or pick one with checkpoint.load_step."
            ) from None
        fix = "Fix: use the model config it was saved with, or start a new run (another job.name)."
        state = self.live.restore(path, meta, set(self.cfg.exclude_from_loading), f"checkpoint {path}", fix)
        return state

def _short_reason(error: BaseException) -> str:
    """One line for a failed save: DCP's CheckpointException carries each rank's exception and traceback."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {error}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
