"""Activation checkpointing (interface; filled in by the AC implementation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from pretrain.config import ActivationCheckpointConfig


def apply_ac(blocks: nn.ModuleDict, cfg: "ActivationCheckpointConfig") -> None:
    """Wrap the transformer blocks in place according to cfg.mode; no-op for mode=none."""
    if cfg.mode != "none":
        raise NotImplementedError("activation checkpointing")
