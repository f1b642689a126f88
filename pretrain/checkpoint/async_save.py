"""Background checkpoint writes (`checkpoint.async_mode`): DCP's async_save stages a copy of the state
(on CPU, or through pinned host memory from CUDA) and writes it from a background thread while
training goes on. Its collectives run on a process group of their own, so they never interleave
with the training thread's. When the write is done, rank 0 finishes the step (JSON, rename, purge
of old steps) in that same background thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from pretrain.errors import ConfigError


class AsyncSaver:
    def __init__(self, mode: str, group: Optional[dist.ProcessGroup]):
        self.group = group  # gloo, of its own (built with the manager); None for a lone process
        self.stager = None
        if mode == "async_with_pinned_mem":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "checkpoint.async_mode=async_with_pinned_mem stages GPU tensors through pinned host memory, "
                    "but this rank has no CUDA device. Fix: checkpoint.async_mode=async."
                )

            self.stager = DefaultStager(
                StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                               use_non_blocking_copy=True)
            )

    def save(
        self, state_dict: dict[str, Any], path: str, on_written: Callable[[Optional[BaseException]], None]
    ) -> Future:
        """Start writing `state_dict` to `path`; then, in the background, `on_written(the write's error or None)`
        on every rank (it may run collectives on self.group: every rank calls it, failed or not). The returned
        future completes after it ran, with its exception if it raised."""
        options = {"async_stager": self.stager} if self.stager is not None else {}
        response = dcp.async_save(state_dict, checkpoint_id=path, process_group=self.group, **options)
        written = getattr(response, "upload_completion", response)  # newer torch returns an AsyncSaveResponse
        done: Future = Future()

        def finish(future: Future) -> None:
            try:
                on_written(future.exception())
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                done.set_exception(e)
            else:
                done.set_result(None)

        written.add_done_callback(finish)
        return done

    @staticmethod
    def result(future: Future) -> Optional[BaseException]:
        """Wait for a save; its error, or None."""
        try:
            future.result()
        except BaseException as e:
            return e
        return None
