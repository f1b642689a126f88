"""What a checkpoint holds besides the DCP shards, and the live objects it is restored into.

- TrainState: step, tokens and time, kept in `train_state.json` with the lr schedule and the data position.
- Step folders: `step-N` is complete when it has DCP's `.metadata` and `train_state.json`.
- LiveState: this rank's model parts, optimizer, lr schedule and data loader; their state dicts under the full
  model's names (whatever the layout) and the restore of a step folder into them.
"""

from __future__ import annotations

import os
import re
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


def complete_steps(folder: str) -> list[int]:
    """Steps with a complete checkpoint in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if (
            match
            and os.path.isfile(os.path.join(path, TRAIN_STATE))
            and os.path.isfile(os.path.join(path, ".metadata"))
        ):
            steps.append(int(match.group(1)))
    return sorted(steps)


class LiveState:
    """This rank's training objects, as a checkpoint sees them."""

    def __init__(
        self, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler: Any, dataloader: Any
    ):
        # one module over this rank's parts: its names are "<part index>.<full model name>"
        self.parts = nn.ModuleList(model_parts)
        self.optimizer, self.lr_scheduler, self.dataloader = optimizer, lr_scheduler, dataloader

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
            self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if "dataloader" not in excluded:
            self.dataloader.load_state_dict(meta["dataloader"])
        state = TrainState() if "train_state" in excluded else TrainState(**meta["train_state"])
        logger.info(f"checkpoint: resumed from {path} (step {state.step}; not loaded: {sorted(excluded) or 'nothing'})")
        return state

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
