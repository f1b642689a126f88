"""The training loss: summed token cross-entropy. Callers divide by the tokens of the whole
optimizer step, so micro-batches, pipeline micro-batches and data-parallel ranks add up to the
per-token mean of the global batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pretrain.distributed.compile import with_async_inputs_resolved

if TYPE_CHECKING:
    from pretrain.config import CompileConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> sum of the B x T token losses, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def build_loss_fn(compile_cfg: CompileConfig, loss_parallel: bool = False) -> LossFn:
    """The loss, compiled when compile.components has "loss". Not under loss parallel: its
    vocab-sharded cross-entropy is a DTensor op handler that dynamo does not trace (the compiled
    graph would reduce only this rank's vocabulary shard). Logits that arrive as a not-yet-waited
    collective output (TP's gathered logits) are waited eagerly first, keeping their gradient path
    (see pretrain/distributed/compile.py)."""
    if compile_cfg.enable and "loss" in compile_cfg.components and not loss_parallel:
        return with_async_inputs_resolved(torch.compile(cross_entropy_sum, backend=compile_cfg.backend))
    return cross_entropy_sum


def per_step_loss(loss_fn: LossFn, tokens_per_step: int) -> LossFn:
    """sum(CE) / tokens of this rank's optimizer step (the pipeline schedules' loss function)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, labels) / tokens_per_step

    return loss
