"""Profiling: torch.profiler traces and CUDA memory snapshots, every `profile_freq` steps, into the run directory.

  <run_dir>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json          open in Perfetto / chrome://tracing
  <run_dir>/<save_memory_snapshot_folder>/iteration_<step>/rank<r>_memory_snapshot.pickle
                                                                              drop on pytorch.org/memory_viz

Each trace window is `profiler_warmup` steps of warm-up then `profiler_active` recorded steps,
ending on a multiple of profile_freq. A run that dies of CUDA out-of-memory dumps a last snapshot
into iteration_<step>_exit/.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional

import torch

from pretrain import torch_compat
from pretrain.log import logger

if TYPE_CHECKING:
    from pretrain.config import ProfilingConfig

MAX_SNAPSHOT_ENTRIES = 100_000  # allocator events kept in the ring buffer


class StepProfiler:
    """Traces and snapshots on their schedule; `step()` once after every training step."""

    def __init__(self, cfg: ProfilingConfig, run_dir: str, rank: int, device: torch.device, start_step: int):
        self.cfg, self.rank, self.step_num = cfg, rank, start_step
        self.trace_dir = os.path.join(run_dir, cfg.save_traces_folder)
        self.snapshot_dir = os.path.join(run_dir, cfg.save_memory_snapshot_folder)
        self.torch_profiler: Optional[torch.profiler.profile] = None
        self.snapshots = cfg.enable_memory_snapshot and device.type == "cuda"
        if cfg.enable_memory_snapshot and not self.snapshots:
            logger.warning("profiling.enable_memory_snapshot: memory snapshots record the CUDA allocator; "
                           f"this run is on {device.type}, so none are written")
        if cfg.enable_profiling:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            wait = cfg.profile_freq - cfg.profiler_warmup - cfg.profiler_active
            self.torch_profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait, warmup=cfg.profiler_warmup, active=cfg.profiler_active),
                on_trace_ready=self._save_trace,
                record_shapes=True,
            )
            # windows stay aligned to the step count across resumes
            torch_compat.resume_profiler_schedule(self.torch_profiler, start_step)
            logger.info(f"profiling: a trace every {cfg.profile_freq} steps into {self.trace_dir}")
        if self.snapshots:
            torch_compat.record_memory_history(MAX_SNAPSHOT_ENTRIES)
            logger.info(f"profiling: a CUDA memory snapshot every {cfg.profile_freq} steps into {self.snapshot_dir}")

    def _save_trace(self, prof: torch.profiler.profile) -> None:
        folder = os.path.join(self.trace_dir, f"iteration_{prof.step_num}")
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        prof.export_chrome_trace(os.path.join(folder, f"rank{self.rank}_trace.json"))
        logger.info(f"profiling: trace of step {prof.step_num} written in {time.perf_counter() - start:.1f}s")

    def dump_snapshot(self, name: str) -> None:
        folder = os.path.join(self.snapshot_dir, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle"), "wb") as f:
            pickle.dump(torch_compat.memory_snapshot(), f)

    def step(self) -> None:
        self.step_num += 1
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        if self.snapshots and self.step_num % self.cfg.profile_freq == 0:
            self.dump_snapshot(f"iteration_{self.step_num}")


@contextlib.contextmanager
def profile_steps(
    cfg: ProfilingConfig, run_dir: str, rank: int, device: torch.device, start_step: int
) -> Iterator[StepProfiler]:
    profiler = StepProfiler(cfg, run_dir, rank, device, start_step)
    try:
        if profiler.torch_profiler is not None:
            profiler.torch_profiler.start()
        yield profiler
    except torch.OutOfMemoryError:
        if profiler.snapshots:
            profiler.dump_snapshot(f"iteration_{profiler.step_num}_exit")
        raise
    finally:
        if profiler.torch_profiler is not None:
            profiler.torch_profiler.stop()
        if profiler.snapshots:
            torch_compat.stop_memory_history()
