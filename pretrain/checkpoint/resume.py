"""Which step a resume loads, and the checks it passes first: its files are all there, they match the checksums
written with them (integrity.py), its .metadata reads (safe_reader.py) and so does its train_state.json. The
latest step is the newest folder named `step-N`, complete or not: a broken one stops the run naming it and the
previous complete step, or, with checkpoint.fall_back_on_broken_step, is passed over with a warning. Nothing here
deletes anything.

Every rank runs the same checks, each verifying a share of the files; their answers are gathered so that all
ranks take the same decision and raise the same error."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

from pretrain.checkpoint import integrity
from pretrain.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.checkpoint.state import complete_steps, incomplete_steps, missing_files, read_train_state, step_folders
from pretrain.config import CheckpointConfig
from pretrain.errors import ConfigError
from pretrain.log import logger


class StepChecks:
    def __init__(self, cfg: CheckpointConfig, folder: str, gather: Callable[[Any], list], rank: int,
                 world_size: int, is_rank0: bool):
        self.cfg, self.folder, self.gather = cfg, folder, gather
        self.rank, self.world_size, self.is_rank0 = rank, world_size, is_rank0
        self.damaged: set[int] = set()  # steps passed over as broken: never purged, moved aside if saved again

    def choose(self) -> tuple[Optional[int], Optional[dict]]:
        """(the step to resume from, its train_state.json), checked; (None, None) when the folder holds no step."""
        folders = step_folders(self.folder)
        explicit = self.cfg.load_step >= 0
        if explicit and self.cfg.load_step not in folders:
            raise ConfigError(
                f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint in {self.folder} (complete steps: "
                f"{complete_steps(self.folder) or 'none'}). Fix: use one of them, or -1 for the latest."
            )
        candidates = [self.cfg.load_step] if explicit else sorted(folders, reverse=True)
        for step in candidates:
            problem, meta, has_checksums = self.check(folders[step])
            if problem is None:
                self._warn_unverified(folders[step], meta, has_checksums, step)
                return step, meta
            if explicit or not self.cfg.fall_back_on_broken_step:
                raise ConfigError(self.broken_message(step, problem, explicit))
            self.damaged.add(step)
            if self.is_rank0:
                logger.warning(f"checkpoint: {folders[step]} is broken ({problem}); resuming from an earlier step "
                               "(checkpoint.fall_back_on_broken_step=true). It is kept as it is.")
        if candidates:
            raise ConfigError(
                f"checkpoint: no step in {self.folder} is intact (steps {sorted(folders)}; each is named in a warning "
                "above). Fix: start a new run (another job.name), or move that folder away to start this one afresh."
            )
        return None, None

    def check(self, path: str, step_folder: bool = True) -> tuple[Optional[str], Optional[dict], bool]:
        """(what is wrong with the step folder, or None; its train_state.json; whether it has checksums). Not a
        `step_folder` (checkpoint.initial_load_path): its checksums only."""
        problem, meta, has_checksums = missing_files(path) if step_folder else None, None, False
        if problem is None:
            try:
                files = integrity.read_manifest(path)
            except ValueError as e:
                problem, files = str(e), None
            if files is not None:
                has_checksums = True
                problems = integrity.size_problems(path, files)  # every file: a stat each
                if not problems:  # this rank's share of the files, read through
                    problems = integrity.checksum_problems(path, files, sorted(files)[self.rank :: self.world_size])
                problem = "; ".join(problems) or None
        if problem is None:
            try:  # restricted unpickler: a crafted .metadata is refused here (its checksums may be crafted too)
                SafeFileSystemReader(path).read_metadata()
            except Exception as e:
                problem = f".metadata is unreadable ({type(e).__name__}: {e})"
        if problem is None and step_folder:
            try:
                meta = read_train_state(path)
            except ValueError as e:
                problem = str(e)
            else:
                if not has_checksums and "made_from" in meta:  # written by this version: it had them
                    problem = f"it has no {integrity.MANIFEST} (written with every step, then removed)"
        found = list(dict.fromkeys(p for p in self.gather(problem) if p))  # each once, in rank order
        return ("; ".join(found) or None), meta, has_checksums

    def check_initial(self, path: str, key: str) -> None:
        """checkpoint.initial_load_path's DCP folder against its checksums."""
        problem, _, has_checksums = self.check(path, step_folder=False)
        if problem is not None:
            raise ConfigError(f"{key} is broken: {problem}. Fix: point it at another complete step folder.")
        if not has_checksums and self.is_rank0:
            logger.warning(f"checkpoint: {path} has no checksums (saved by an older version): it is loaded without "
                           "being verified.")

    def broken_message(self, step: int, problem: str, explicit: bool) -> str:
        path = os.path.join(self.folder, f"step-{step}")
        complete = complete_steps(self.folder)
        earlier = [s for s in complete if s < step]
        if explicit:
            fix = f"pick another step with checkpoint.load_step (complete steps: {complete})"
        elif earlier:
            fix = (f"resume from the previous complete step with checkpoint.load_step={earlier[-1]}; or "
                   "checkpoint.fall_back_on_broken_step=true to resume from the newest intact step with a warning")
        else:
            fix = "there is no earlier complete step: start a new run (another job.name)"
        return (f"checkpoint {path} is broken: {problem}. Nothing was loaded or deleted. Fix: {fix}. Move or delete "
                f"step-{step} once you no longer need it (a save of the same step moves it aside as "
                f"step-{step}.broken).")

    def _warn_unverified(self, path: str, meta: dict, has_checksums: bool, step: int) -> None:
        if not self.is_rank0:
            return
        lacks = [what for what, missing in (("checksums", not has_checksums),
                                             ("record of its model and data", "made_from" not in meta)) if missing]
        if lacks:
            logger.warning(f"checkpoint: {path} has no {' and no '.join(lacks)} (saved by an older version): it is "
                           "loaded without being verified.")
        for older, why in incomplete_steps(self.folder).items():
            if older < step and older not in self.damaged:
                logger.warning(f"checkpoint: step-{older} in {self.folder} is not a complete checkpoint ({why}); it "
                               "is kept. Delete it once you no longer need it.")
