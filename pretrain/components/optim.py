"""Optimizer and learning-rate schedule (warm-up, stable, decay: torchtitan's option names)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import LRSchedulerConfig, OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[cfg.implementation]
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name]
    return cls(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **impl,
    )


def lr_factor(step: int, cfg: LRSchedulerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (LambdaLR's counter)."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = total_steps - warmup if cfg.decay_ratio is None else round(total_steps * cfg.decay_ratio)
    decay_start = total_steps - decay_steps
    if step < warmup:  # linear, starting above zero so the first step moves
        return (step + 1) / (warmup + 1)
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    if cfg.decay_type == "linear":
        fall = progress
    elif cfg.decay_type == "sqrt":
        fall = math.sqrt(progress)
    else:  # cosine
        fall = 0.5 * (1.0 - math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * (1.0 - fall)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRSchedulerConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg, total_steps=total_steps))
