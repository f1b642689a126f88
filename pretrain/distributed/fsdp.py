"""FSDP2 (`fully_shard`): each block is one unit, the root last; HSDP when the mesh is 2-D."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import ParallelismConfig, TrainingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def param_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype:
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


@dataclass
class FsdpUnitOptions:
    mp_policy: MixedPrecisionPolicy
    policy: str  # parallelism.fsdp_reshard_after_forward

    def placement(self, mesh: DeviceMesh):
        """shard_placement_fn: a stacked-expert weight (E, H, D) with fewer experts than FSDP shards (a shared
        expert is one) is sharded on H, else the whole weight would sit on the first ranks."""
        shards = mesh.size(mesh.ndim - 1)

        def place(param: nn.Parameter):
            return Shard(1) if param.ndim == 3 and param.shape[0] < shards else None

        return place

    def reshard(self, index: int, n_blocks: int) -> bool:
        """Whether block `index` frees its gathered params after forward. With "default" the last block
        keeps them: they are needed again first in backward."""
        return {"always": True, "never": False}.get(self.policy, index < n_blocks - 1)


def fsdp_unit_options(mesh: DeviceMesh, training: TrainingConfig, parallelism: ParallelismConfig) -> FsdpUnitOptions:
    device = torch.device(mesh.device_type)
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype(training, device), reduce_dtype=DTYPES[training.mixed_precision_reduce]
    )
    return FsdpUnitOptions(mp, parallelism.fsdp_reshard_after_forward)


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
) -> None:
    options = fsdp_unit_options(mesh, training, parallelism)
    for i, block in enumerate(blocks):
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=options.mp_policy,
            reshard_after_forward=options.reshard(i, len(blocks)),
            shard_placement_fn=options.placement(mesh),
        )
    fully_shard(model, mesh=mesh, mp_policy=options.mp_policy, reshard_after_forward=options.policy == "always")
