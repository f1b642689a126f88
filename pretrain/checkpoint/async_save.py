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
    def __init__(self, mode: str):
        self.group = dist.new_group(backend="gloo")  # every rank, in the same order: built with the manager
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

    def save(self, state_dict: dict[str, Any], path: str, on_written: Optional[Callable[[], None]]) -> Future:
        """Start writing `state_dict` to `path`; the returned future completes after `on_written` ran."""
        options = {"async_stager": self.stager} if self.stager is not None else {}
        response = dcp.async_save(state_dict, checkpoint_id=path, process_group=self.group, **options)
        written = getattr(response, "upload_completion", response)  # newer torch returns an AsyncSaveResponse
        done: Future = Future()

        def finish(future: Future) -> None:
            try:
                future.result()
                if on_written is not None:
                    on_written()
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
