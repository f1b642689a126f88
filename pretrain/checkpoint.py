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
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.config import CheckpointConfig, ConfigError
from pretrain.distributed.fsdp import DTYPES
from pretrain.log import logger

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state.json"
# optimizer state as "state.<param name>.<key>": independent of how parameters are grouped or placed
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class TrainState:
    """What the loop needs besides weights to continue exactly where it stopped."""

    step: int = 0
    tokens_seen: int = 0  # tokens of the global batch, summed over steps
    elapsed_s: float = 0.0  # training wall time over all previous attempts


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete checkpoint in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, TRAIN_STATE)) and os.path.isfile(os.path.join(path, ".metadata")):
            steps.append(int(match.group(1)))
    return sorted(steps)


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
    ):
        self.cfg = cfg
        self.folder = os.path.join(run_dir, cfg.folder)
        # one module over this rank's parts: its names are "<part index>.<full model name>"
        self.parts = nn.ModuleList(model_parts)
        self.optimizer, self.lr_scheduler, self.dataloader = optimizer, lr_scheduler, dataloader
        self.is_rank0 = is_rank0

    # ----------------------------------------------------------------- save
    def should_save(self, step: int, last_step: int) -> bool:
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def save(self, state: TrainState, last: bool = False, seed: bool = False) -> None:
        """Save this step; `seed`: the initial weights only, in their own dtype (checkpoint.create_seed_checkpoint)."""
        start = time.perf_counter()
        final = os.path.join(self.folder, f"step-{state.step}")
        partial = final + ".partial"
        model_only = seed or (last and self.cfg.last_save_model_only)
        if self.is_rank0:
            if os.path.exists(partial):  # left over from a save that was interrupted
                shutil.rmtree(partial)
            os.makedirs(self.folder, exist_ok=True)
        dist.barrier()
        dcp.save(self._state_dict(model_only, export=not seed), checkpoint_id=partial)
        if self.is_rank0:
            meta = {
                "train_state": vars(state),
                "model_only": model_only,
                "lr_scheduler": None if model_only else self.lr_scheduler.state_dict(),
                "dataloader": None if model_only else self.dataloader.state_dict(),
            }
            _write_json(os.path.join(partial, TRAIN_STATE), meta)
            if os.path.exists(final):  # an older save of the same step is replaced whole
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.folder)
            self._purge()
        dist.barrier()
        logger.info(f"checkpoint: saved step {state.step} to {final} in {time.perf_counter() - start:.1f}s")

    def _state_dict(self, model_only: bool, export: bool = True) -> dict[str, Any]:
        model_sd = self._model_state_dict()[1]
        if model_only:
            dtype = DTYPES[self.cfg.export_dtype] if export else None
            return {"model": {k: v.to(dtype) if dtype else v for k, v in model_sd.items()}}
        return {"model": model_sd, "optimizer": self._optimizer_state_dict()[1]}

    def _model_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the parts' own state dict, the same values under the full model's names)."""
        own = get_model_state_dict(self.parts)
        return own, {_drop_name_at(key, 0): value for key, value in own.items()}

    def _optimizer_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the flattened optimizer state of the parts, the same under the full model's names)."""
        own = get_optimizer_state_dict(self.parts, self.optimizer, options=FLAT)
        return own, {_drop_name_at(key, 1): value for key, value in own.items()}

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
            return self._initial_load()
        steps = complete_steps(self.folder)
        if self.cfg.create_seed_checkpoint:
            if steps:
                raise ConfigError(
                    f"checkpoint.create_seed_checkpoint=true but {self.folder} already holds steps {steps}; the seed "
                    "goes into an empty folder. Fix: use a new job.name, or delete that checkpoint folder."
                )
            return self._initial_load()  # the seed holds the initial weights: those of initial_load_path if set
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint in {self.folder} "
                    f"(complete steps: {steps or 'none'}). Fix: use one of them, or -1 for the latest."
                )
            step = self.cfg.load_step
        elif not steps:
            return self._initial_load()
        else:
            step = steps[-1]
        path = os.path.join(self.folder, f"step-{step}")
        with open(os.path.join(path, TRAIN_STATE)) as f:
            meta = json.load(f)
        try:
            dcp.FileSystemReader(path).read_metadata()
        except Exception as e:
            raise ConfigError(
                f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Fix: delete that folder to resume "
                "from the previous checkpoint, or pick one with checkpoint.load_step."
            ) from None
        fix = "Fix: use the model config it was saved with, or start a new run (another job.name)."
        state = self._restore(path, meta, set(self.cfg.exclude_from_loading), f"checkpoint {path}", fix)
        return state

    def _restore(self, path: str, meta: dict, excluded: set[str], what: str, fix: str) -> TrainState:
        """Load a DCP step folder (its train_state.json already read into `meta`) into the live objects."""
        load_optimizer = "optimizer" not in excluded and not meta["model_only"]
        own_model, model_sd = self._model_state_dict()
        state_dict = {"model": model_sd}
        if load_optimizer:
            own_optimizer, state_dict["optimizer"] = self._optimizer_state_dict()
        try:
            dcp.load(state_dict, checkpoint_id=path)
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            raise ConfigError(f"{what} does not match this model/optimizer: {e}. {fix}") from None
        # back to the parts' own names (DCP loaded in place, or replaced the non-tensor values)
        loaded = {key: state_dict["model"][_drop_name_at(key, 0)] for key in own_model}
        set_model_state_dict(self.parts, loaded, options=StateDictOptions(strict=True))
        if load_optimizer:
            loaded = {key: state_dict["optimizer"][_drop_name_at(key, 1)] for key in own_optimizer}
            set_optimizer_state_dict(self.parts, self.optimizer, loaded, options=FLAT)
        if meta["model_only"]:
            excluded |= {"lr_scheduler", "dataloader"}
        if "lr_scheduler" not in excluded:
            self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if "dataloader" not in excluded:
            self.dataloader.load_state_dict(meta["dataloader"])
        state = TrainState() if "train_state" in excluded else TrainState(**meta["train_state"])
        logger.info(f"checkpoint: resumed from {path} (step {state.step}; not loaded: {sorted(excluded) or 'nothing'})")
        return state

    # ----------------------------------------------------------------- initial load
    def _initial_load(self) -> TrainState:
        """A fresh start from checkpoint.initial_load_path: an HF folder (initial_load_in_hf), or a DCP step
        folder: its model weights (initial_load_model_only), or everything in it, as a resume would."""
        path = os.path.expanduser(self.cfg.initial_load_path)
        if not path:
            return TrainState()
        key = f"checkpoint.initial_load_path={self.cfg.initial_load_path!r}"
        if not os.path.isdir(path):
            raise ConfigError(
                f"{key} is not a directory. Fix: point it at a checkpoint step folder (<run_dir>/checkpoint/step-N) "
                "or, with checkpoint.initial_load_in_hf=true, at a Hugging Face model folder; or set it to ''."
            )
        is_dcp = os.path.isfile(os.path.join(path, ".metadata"))
        from pretrain import hf_io

        if self.cfg.initial_load_in_hf:
            if not hf_io.is_hf_dir(path):
                hint = " It is a DCP checkpoint: set checkpoint.initial_load_in_hf=false." if is_dcp else ""
                raise ConfigError(
                    f"{key} with checkpoint.initial_load_in_hf=true holds no config.json with "
                    f"{hf_io.INDEX} or {hf_io.SINGLE_FILE}.{hint} Fix: point it at a Hugging Face model folder."
                )
            self._load_hf(path, key)
            return TrainState()
        if not is_dcp:
            hint = ""
            if hf_io.is_hf_dir(path):
                hint = " It is a Hugging Face folder: add checkpoint.initial_load_in_hf=true."
            elif complete_steps(os.path.join(path, "checkpoint")):
                latest = complete_steps(os.path.join(path, "checkpoint"))[-1]
                hint = f" It looks like a run directory: use {os.path.join(path, 'checkpoint', f'step-{latest}')}."
            raise ConfigError(f"{key} is not a DCP checkpoint (no .metadata).{hint} Fix: point it at a step folder.")
        try:
            dcp.FileSystemReader(path).read_metadata()
        except Exception as e:
            raise ConfigError(
                f"{key} is unreadable ({type(e).__name__}: {e}). Fix: point it at a complete step folder."
            ) from None
        fix = (f"Fix: use the model config it was saved with (its run's config.yaml), or another {key.split('=')[0]}.")
        if self.cfg.initial_load_model_only:
            own_model, model_sd = self._model_state_dict()
            state_dict = {"model": model_sd}
            try:
                dcp.load(state_dict, checkpoint_id=path)
            except (Exception, CheckpointException) as e:
                raise ConfigError(f"{key}: its model does not match this one: {e}. {fix}") from None
            loaded = {k: state_dict["model"][_drop_name_at(k, 0)] for k in own_model}
            set_model_state_dict(self.parts, loaded, options=StateDictOptions(strict=True))
            logger.info(f"checkpoint: initial model weights from {path}")
            return TrainState()
        meta_path = os.path.join(path, TRAIN_STATE)
        if not os.path.isfile(meta_path):
            raise ConfigError(
                f"{key} has no {TRAIN_STATE}, so only its weights can be taken. "
                "Fix: checkpoint.initial_load_model_only=true."
            )
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["model_only"]:
            raise ConfigError(
                f"{key} holds model weights only, but checkpoint.initial_load_model_only=false asks for the optimizer "
                "and training state too. Fix: checkpoint.initial_load_model_only=true."
            )
        return self._restore(path, meta, set(self.cfg.exclude_from_loading), key, fix)

    def _load_hf(self, path: str, key: str) -> None:
        from pretrain import hf_io
        from pretrain.models import get_model_spec

        model_cfg = self.parts[0].cfg  # the model's own config (every family's model keeps it)
        spec = get_model_spec(model_cfg.name)
        if spec.hf_adapter is None:
            raise ConfigError(f"{key}: model family {spec.name!r} has no Hugging Face adapter. Fix: convert it to DCP.")
        problems = spec.hf_adapter.config_mismatches(hf_io.read_config(path), model_cfg)
        if problems:
            raise ConfigError(
                f"{key} holds another model than this run's: {'; '.join(problems)}. Fix: set the model.* keys to "
                "match its config.json (or pick the model option it was made from)."
            )
        try:
            hf_io.load_hf_into(list(self.parts), path, spec, model_cfg)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{key}: {e}. Fix: check that the folder holds this model's weights.") from None
        logger.info(f"checkpoint: initial model weights from the Hugging Face folder {path}")


def _drop_name_at(key: str, position: int) -> str:
    """Remove one dotted component: the part index. ("0.layers.1.w", 0) -> "layers.1.w";
    ("state.0.layers.1.w.exp_avg", 1) -> "state.layers.1.w.exp_avg"."""
    names = key.split(".")
    del names[position]
    return ".".join(names)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
