"""torch.compile per transformer block (fullgraph), so compiled code composes with FSDP (each
block is one FSDP unit, its collectives stay outside the graph), TP (DTensor traced inside) and
PP (each stage compiles its own blocks). `Module.compile` keeps parameter names unchanged, so
checkpoints of compiled and eager runs are interchangeable."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pretrain.config import CompileConfig


def apply_compile(blocks: nn.ModuleDict, cfg: "CompileConfig") -> None:
    for block in blocks.values():
        block.compile(backend=cfg.backend, fullgraph=True)


def enable_async_tp(tp_mesh) -> None:
    """Micro-pipelined TP: inductor fuses each all-gather/reduce-scatter with its matmul and overlaps
    them through symmetric memory (CUDA only; checked in feature_checks and on the device)."""
    from pretrain.config import ConfigError

    if tp_mesh.device_type != "cuda":
        raise ConfigError(
            "parallelism.enable_async_tensor_parallel=true needs CUDA, but this rank runs on "
            f"{tp_mesh.device_type}. Fix: set parallelism.enable_async_tensor_parallel=false."
        )
    torch._inductor.config._micro_pipeline_tp = True
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    with warnings.catch_warnings():  # newer torch needs no registration and says so; torch 2.11 does
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
