"""Float8 training through torchao (interface; filled in by the float8 implementation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

if TYPE_CHECKING:
    from pretrain.config import Float8Config


def convert_to_float8(model: nn.Module, cfg: "Float8Config", device_type: str) -> None:
    """Swap the model's eligible nn.Linear for torchao's Float8Linear, in place; no-op when disabled."""
    if cfg.enable:
        raise NotImplementedError("float8")


def float8_tp_styles(cfg: "Float8Config") -> tuple[type, type, type]:
    """(colwise, rowwise, prepare-input) TP styles: torchao's float8 ones for the tensorwise recipe."""
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def precompute_float8_scales(model_parts: list[nn.Module], cfg: "Float8Config") -> None:
    """After each optimizer step: one fused amax for all float8 weights (FSDP float8 all-gather)."""
