"""What a checkpoint holds besides the DCP shards, and the live objects it is restored into.

- TrainState: step, tokens and time, kept in `train_state.json` with the lr schedule and the data position.
- Step folders: `step-N` is complete when it has DCP's `.metadata` and `train_state.json`; a folder named so that
  lacks one is broken (an unfinished save cannot be one: it is written as `step-N.partial` and renamed when done).
- LiveState: this rank's model parts, optimizer, lr schedule and data loader; their state dicts under the full
  model's names (whatever the layout) and the restore of a step folder into them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.errors import ConfigError
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


def step_folders(folder: str) -> dict[int, str]:
    """Every folder named `step-N` in `folder`, complete or not: {N: path}."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


def missing_files(path: str) -> str | None:
    """Why the step folder `path` is not a complete checkpoint, or None when it is."""
    names = set(os.listdir(path))
    if not names:
        return "it is empty"
    missing = [name for name in (".metadata", TRAIN_STATE) if name not in names]
    return f"it has no {' and no '.join(missing)}" if missing else None


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete checkpoint in `folder`, oldest first."""
    return sorted(step for step, path in step_folders(folder).items() if missing_files(path) is None)


def incomplete_steps(folder: str) -> dict[int, str]:
    """Folders named `step-N` that are not complete checkpoints: {N: why}."""
    found = {step: missing_files(path) for step, path in step_folders(folder).items()}
    return {step: why for step, why in sorted(found.items()) if why is not None}


def read_train_state(path: str) -> dict:
    """The train_state.json of a step folder, checked to hold what a restore reads. ValueError saying what is
    wrong (not JSON, truncated, keys missing)."""
    file = os.path.join(path, TRAIN_STATE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{TRAIN_STATE} is not readable JSON, it may be truncated ({type(e).__name__}: {e})") from None
    needed = ("train_state", "model_only") + (() if isinstance(meta, dict) and meta.get("model_only") else
                                              ("lr_scheduler", "dataloader"))
    missing = [key for key in needed if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{TRAIN_STATE} lacks {', '.join(missing)}")
    return meta


class LiveState:
    """This rank's training objects, as a checkpoint sees them."""

    def __init__(
        self, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler: Any, dataloader: Any
    ):
        # one module over this rank's parts: its names are "<part index>.<full model name>"
        self.parts = nn.ModuleList(model_parts)
        self.optimizer, self.lr_scheduler, self.dataloader = optimizer, lr_scheduler, dataloader
        # after a restore: (the lr the saved schedule gave the next step, the one this run's schedule gives it)
        self.next_lr: tuple[float, float] | None = None

    def model_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the parts' own state dict, the same values under the full model's names)."""
        own = get_model_state_dict(self.parts)
        return own, {drop_name_at(key, 0): value for key, value in own.items()}

    def optimizer_state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the flattened optimizer state of the parts, the same under the full model's names)."""
        own = get_optimizer_state_dict(self.parts, self.optimizer, options=FLAT)
        return own, {drop_name_at(key, 1): value for key, value in own.items()}

    def load_model(self, path: str, what: str, fix: str) -> None:
        """The model weights of a DCP step folder into the parts (strict: every weight, the same shapes)."""
        self._load(path, load_optimizer=False, mismatch=f"{what}: its model does not match this one", fix=fix)

    def restore(self, path: str, meta: dict, excluded: set[str], what: str, fix: str) -> TrainState:
        """Load a DCP step folder (its train_state.json already read into `meta`) into the live objects."""
        load_optimizer = "optimizer" not in excluded and not meta["model_only"]
        self._load(path, load_optimizer, mismatch=f"{what} does not match this model/optimizer", fix=fix)
        if meta["model_only"]:
            excluded |= {"lr_scheduler", "dataloader"}
        if "lr_scheduler" not in excluded:
            self._restore_schedule(meta["lr_scheduler"])
        if "dataloader" not in excluded:
            self.dataloader.load_state_dict(meta["dataloader"])
        state = TrainState() if "train_state" in excluded else TrainState(**meta["train_state"])
        logger.info(f"checkpoint: resumed from {path} (step {state.step}; not loaded: {sorted(excluded) or 'nothing'})")
        return state

    def _restore_schedule(self, saved: dict) -> None:
        """The saved schedule position (its step count), then the lr of this run's schedule at that step: its
        peak lr (optimizer.lr) and its length (training.steps) are this run's config, whatever the checkpoint's
        run had. Without this, the first step after raising training.steps on a finished run would train at the
        old schedule's final lr (0 for a decay to zero), and a new optimizer.lr would be ignored."""
        peak = list(self.lr_scheduler.base_lrs)  # this run's, set when its schedule was built
        self.lr_scheduler.load_state_dict(saved)
        before = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.base_lrs = peak
        for group, lr in zip(self.optimizer.param_groups, peak):
            group["initial_lr"] = lr
        # step() sets every group's lr from base_lrs and the lambda at last_epoch + 1: one step back first
        self.lr_scheduler.last_epoch -= 1
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore")
            self.lr_scheduler.step()
        self.next_lr = (float(before), float(self.lr_scheduler.get_last_lr()[0]))

    def _load(self, path: str, load_optimizer: bool, mismatch: str, fix: str) -> None:
        own_model, model_sd = self.model_state_dict()
        state_dict = {"model": model_sd}
        if load_optimizer:
            own_optimizer, state_dict["optimizer"] = self.optimizer_state_dict()
        try:
            dcp.load(state_dict, storage_reader=SafeFileSystemReader(path))
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            raise ConfigError(f"{mismatch}: {e}. {fix}") from None
        # back to the parts' own names (DCP loaded in place, or replaced the non-tensor values)
        loaded = {key: state_dict["model"][drop_name_at(key, 0)] for key in own_model}
        set_model_state_dict(self.parts, loaded, options=StateDictOptions(strict=True))
        if load_optimizer:
            loaded = {key: state_dict["optimizer"][drop_name_at(key, 1)] for key in own_optimizer}
            set_optimizer_state_dict(self.parts, self.optimizer, loaded, options=FLAT)


def drop_name_at(key: str, position: int) -> str:
    """Remove one dotted component: the part index. ("0.layers.1.w", 0) -> "layers.1.w";
    ("state.0.layers.1.w.exp_avg", 1) -> "state.layers.1.w.exp_avg"."""
    names = key.split(".")
    del names[position]
    return ".".join(names)
