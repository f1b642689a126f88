"""FSDP2 (`fully_shard`): each block is one unit, the root last; HSDP when the mesh is 2-D."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import ParallelismConfig, TrainingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def param_dtype(training: "TrainingConfig", device: torch.device) -> torch.dtype:
    """The compute dtype of parameters: `auto` is bf16 on CUDA and fp32 on CPU (bf16 is slow there),
    and the storage dtype when the parameters are stored in bf16 (training.dtype)."""
    if training.dtype == "bfloat16":
        return torch.bfloat16
    if training.mixed_precision_param == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[training.mixed_precision_param]


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every parameter in `dtype` (full-bf16 training). Parameters only: buffers such as RoPE's
    complex frequencies keep their dtype, and tied weights stay one tensor."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: "DeviceMesh",
    training: "TrainingConfig",
    parallelism: "ParallelismConfig",
) -> None:
    device = torch.device(mesh.device_type)
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype(training, device), reduce_dtype=DTYPES[training.mixed_precision_reduce]
    )
    policy = parallelism.fsdp_reshard_after_forward
    for i, block in enumerate(blocks):
        # "default": the last block's params are needed again first in backward, so keep them
        reshard = {"always": True, "never": False}.get(policy, i < len(blocks) - 1)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always")
