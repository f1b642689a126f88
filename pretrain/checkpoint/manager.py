"""Checkpoints: DCP (torch.distributed.checkpoint) folders `step-N` in <run_dir>/<checkpoint.folder>.

A step folder holds the model and optimizer as DCP shards (resharded on load to any layout) and
`train_state.json` (step, lr schedule, data position): plain JSON, so loading never unpickles.
A save is written into `step-N.partial` and renamed to `step-N` only when every rank has finished
and the JSON and the checksums of every file (integrity.py) are on disk, so an interrupted save is never taken
as the latest.

What is loaded is checked first: a `step-N` folder that is incomplete or whose files do not match their
checksums stops the run naming the step and the previous complete one (or, with
checkpoint.fall_back_on_broken_step, is passed over with a warning); a checkpoint made from another model,
tokenizer or data than this run's (provenance.py) is refused naming each key. Nothing that is not a complete
checkpoint is ever deleted: the purge of keep_latest_k removes complete steps whose files are all there at their
written size, and a broken `step-N` that a save of the same step would replace is moved aside as
`step-N.broken`.

Names are those of the full model whatever the layout: a rank's model parts (pipeline stages) are
disjoint pieces of it, and the optimizer state is saved flattened per parameter name, so a checkpoint
saved with pipeline stages loads without them and back. A seed checkpoint (`step-0`, weights only)
starts a run in any layout from the same initial weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint import integrity
from pretrain.checkpoint.async_save import AsyncSaver
from pretrain.checkpoint.initial_load import initial_load
from pretrain.checkpoint.provenance import differences, made_from, refusal, schedule_record
from pretrain.checkpoint.resume import StepChecks
from pretrain.checkpoint.state import TRAIN_STATE, LiveState, TrainState, complete_steps, missing_files
from pretrain.config import CheckpointConfig, JobConfig
from pretrain.distributed.fsdp import DTYPES
from pretrain.errors import ConfigError, TrainingHalted
from pretrain.files import fsync_dir
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
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        # gloo, of its own (every rank builds it here, in the same order): the background save's collectives, the
        # checksum lists gathered after a save and the verification of a load. Never two at once: a save first
        # waits for the background one.
        self.group = dist.new_group(backend="gloo") if cfg.enable and distributed else None
        background = cfg.enable and cfg.async_mode != "disabled"
        self.async_saver = AsyncSaver(cfg.async_mode, self.group) if background else None
        self.pending, self.pending_step = None, 0  # the background save in flight
        self._made_from: Optional[dict] = None  # what this run's checkpoints are made from (job given), once
        self.steps = StepChecks(cfg, self.folder, self._gather, self.rank, self.world_size, is_rank0)
        self._kept_told: set[int] = set()  # steps the purge leaves in place, said once

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
                "made_from": self.made_from(),  # what it was made from: checked on resume (provenance.py)
                "schedule": None if self.job is None else schedule_record(self.job),
            })
            state_dict = self._state_dict(model_only, export=not seed)
            if self.async_saver is not None and not (last or seed or blocking):

                def finish(write_error: Optional[BaseException]) -> None:  # background thread, every rank
                    error = self._written(partial, final, meta, write_error)
                    if error is not None:
                        raise error

                self.pending = self.async_saver.save(state_dict, partial, finish)
                self.pending_step = state.step
                logger.info(f"checkpoint: step {state.step} staged in {time.perf_counter() - start:.1f}s, "
                            "writing in the background")
                return
            try:
                dcp.save(state_dict, checkpoint_id=partial)
            except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
                error = e
            error = self._written(partial, final, meta, error)
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

    def made_from(self) -> Optional[dict]:
        """What this run's checkpoints are made from (provenance.py); None without the run's config."""
        if self._made_from is None and self.job is not None:
            self._made_from = made_from(self.job)
        return self._made_from

    def _written(self, partial: str, final: str, meta: str, error: Optional[BaseException]) -> Optional[BaseException]:
        """Every rank, once DCP has written the step or failed: each hashes the shard files it wrote (still in the
        page cache), rank 0 gathers the lists and finishes the step. Returns this rank's error."""
        own: Any = None
        if error is None:
            try:
                own = integrity.hash_files(partial, integrity.own_files(partial, self.rank))
            except OSError as e:
                error = e
        gathered = self._gather(own if error is None else f"rank {self.rank}: {_short_reason(error)}")
        if error is not None or not self.is_rank0:
            return error
        failed = [g for g in gathered if isinstance(g, str)]
        if failed:
            return RuntimeError(failed[0])
        hashes = {name: entry for part in gathered for name, entry in part.items()}
        return self._on_rank0(self._finish, partial, final, meta, hashes)

    def _finish(self, partial: str, final: str, meta: str, hashes: dict[str, dict]) -> None:
        """Rank 0, once every rank's shards and DCP's metadata are written: the JSON, the checksums of every file,
        then the rename that makes the step visible, then the purge of old steps."""
        data = meta.encode()
        with open(os.path.join(partial, TRAIN_STATE), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        rest = [n for n in os.listdir(partial) if n not in hashes and n not in (TRAIN_STATE, integrity.MANIFEST)]
        hashes = {**hashes, **integrity.hash_files(partial, rest), TRAIN_STATE: integrity.bytes_checksum(data)}
        integrity.write_manifest(partial, hashes)
        if os.path.exists(final):
            self._replace(final)
        os.replace(partial, final)
        self.steps.damaged.discard(int(os.path.basename(final).split("-")[1]))  # if it was, it is replaced
        fsync_dir(self.folder)
        self._purge()

    def _replace(self, final: str) -> None:
        """An older save of the same step (the run went back with load_step or a fall-back): deleted when it is an
        intact checkpoint, else moved aside, never deleted."""
        has_checksums, problems = integrity.verify_folder(final)
        why = missing_files(final) or "; ".join(problems) or (None if has_checksums else "it has no checksums")
        if why is None:
            shutil.rmtree(final)
            return
        aside, n = final + ".broken", 1
        while os.path.exists(aside):
            n += 1
            aside = f"{final}.broken{n}"
        os.replace(final, aside)
        logger.warning(f"checkpoint: {final} was not an intact checkpoint ({why}); it is kept as {aside}. "
                       "Delete it once you no longer need it.")

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
        """Delete the complete steps beyond the newest keep_latest_k, only those with checksums and every file at
        its written size (not re-read: that would cost a full read per save). A folder that is not a complete
        checkpoint, one without checksums (an older version's) and one found broken at load are kept."""
        if self.cfg.keep_latest_k <= 0:
            return
        kept = []
        for step in complete_steps(self.folder)[: -self.cfg.keep_latest_k]:
            path = os.path.join(self.folder, f"step-{step}")
            try:
                files = integrity.read_manifest(path)
            except ValueError:
                files = None
            if step in self.steps.damaged or files is None or integrity.size_problems(path, files):
                kept.append(step)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if set(kept) - self._kept_told:
            self._kept_told |= set(kept)
            logger.info(f"checkpoint: keep_latest_k leaves steps {kept} in place: they cannot be verified "
                        "(no checksums, or broken). Delete them yourself when they are not needed.")

    # ----------------------------------------------------------------- load
    def load(self) -> TrainState:
        """Restore the chosen checkpoint into the live objects. A run without a checkpoint of its own starts
        from checkpoint.initial_load_path when set, else from its fresh initialisation."""
        if not self.cfg.enable:
            return initial_load(self.cfg, self.live, self._check_initial)
        steps = complete_steps(self.folder)
        if self.cfg.create_seed_checkpoint:
            if steps:
                raise ConfigError(
                    f"checkpoint.create_seed_checkpoint=true but {self.folder} already holds steps {steps}; the seed "
                    "goes into an empty folder. Fix: use a new job.name, or delete that checkpoint folder."
                )
            # the seed holds the initial weights: those of initial_load_path if set
            return initial_load(self.cfg, self.live, self._check_initial)
        step, meta = self.steps.choose()
        if step is None:
            return initial_load(self.cfg, self.live, self._check_initial)
        path = os.path.join(self.folder, f"step-{step}")
        excluded = set(self.cfg.exclude_from_loading)
        self._check_made_from(path, meta, excluded)
        fix = "Fix: use the model config it was saved with, or start a new run (another job.name)."
        state = self.live.restore(path, meta, excluded, f"checkpoint {path}", fix)
        self._report_lr(meta, state.step)
        return state

    def _check_made_from(self, path: str, meta: dict, excluded: set[str], initial_key: str = "") -> None:
        """Refuse a checkpoint made from another model, tokenizer or data (when its data position is loaded)."""
        saved, now = meta.get("made_from"), self.made_from()
        if saved is None or now is None:
            return
        data = not meta["model_only"] and "dataloader" not in excluded
        found = differences(saved, now, data)
        if found:
            raise ConfigError(refusal(path, found, initial_key))

    def _check_initial(self, path: str, key: str, meta: Optional[dict]) -> None:
        """checkpoint.initial_load_path's DCP folder: its files against their checksums, and, when more than its
        weights is taken (`meta` given), what it was made from."""
        self.steps.check_initial(path, key)
        if meta is not None:
            self._check_made_from(path, meta, set(self.cfg.exclude_from_loading), key)

    def _report_lr(self, meta: dict, step: int) -> None:
        """One line when this run's schedule gives the next step another lr than the saved schedule did."""
        if self.live.next_lr is None or not self.is_rank0:
            return
        before, after = self.live.next_lr
        if math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-12):
            return
        was, now = meta.get("schedule") or {}, schedule_record(self.job) if self.job is not None else {}
        changed = [f"{key} {was[key]} -> {now[key]}" for key in now if key in was and was[key] != now[key]]
        logger.warning(
            f"checkpoint: the lr schedule follows this run's config{' (' + ', '.join(changed) + ')' if changed else ''}"
            f": step {step + 1} trains at lr {after:.3g}, where the checkpoint's schedule gave {before:.3g}."
        )

    def _gather(self, value: Any) -> list:
        """`value` of every rank, in rank order, on every rank (a gloo collective of the manager's own group)."""
        if self.group is None or self.world_size == 1:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered


def _short_reason(error: BaseException) -> str:
    """One line for a failed save: DCP's CheckpointException carries each rank's exception and traceback."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {error}"
