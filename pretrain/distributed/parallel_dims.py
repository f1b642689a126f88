"""ParallelDims: parallel degrees -> validated layout -> one DeviceMesh.

Mesh dimensions, outermost first: dp_replicate, dp_shard (pp, cp and tp join them as they are
implemented). Derived views: `dp` (data loading and loss: dp_replicate x dp_shard, flattened) and the
FSDP mesh (dp_shard, or dp_replicate x dp_shard as HSDP). Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import ParallelismConfig

# Degrees that a later version implements; until then they are refused before launch.
_NOT_YET = ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    # filled by build_mesh(): the world mesh, and its flattened data-parallel view (the ranks that
    # see different data: the loader shards over them and the loss averages over them)
    world_mesh: "DeviceMesh | None" = field(default=None, repr=False)
    flat_dp_mesh: "DeviceMesh | None" = field(default=None, repr=False)

    @classmethod
    def from_config(cls, p: "ParallelismConfig", world_size: int) -> "ParallelDims":
        from pretrain.config import ConfigError

        for key in _NOT_YET:
            if getattr(p, key) != 1:
                raise ConfigError(
                    f"parallelism.{key}={getattr(p, key)} is not supported yet (only data parallelism: "
                    f"FSDP and HSDP). Fix: set parallelism.{key}=1."
                )
        rep, shard = p.data_parallel_replicate_degree, p.data_parallel_shard_degree
        if rep < 1 or shard == 0 or shard < -1:
            raise ConfigError(
                f"parallelism.data_parallel_replicate_degree={rep} must be >= 1 and "
                f"parallelism.data_parallel_shard_degree={shard} must be >= 1 or -1 (the rest). "
                "Fix: use positive degrees, or -1 for the shard degree."
            )
        if shard == -1:
            if world_size % rep:
                raise ConfigError(
                    f"world size {world_size} (cluster.nproc_per_node) is not divisible by "
                    f"parallelism.data_parallel_replicate_degree={rep}. "
                    f"Fix: choose a replicate degree that divides {world_size}."
                )
            shard = world_size // rep
        if rep * shard != world_size:
            raise ConfigError(
                f"parallel degrees do not fill the world: data_parallel_replicate_degree={rep} x "
                f"data_parallel_shard_degree={shard} = {rep * shard}, but the world size is {world_size} "
                f"(cluster.nproc_per_node). Fix: make the product {world_size}, e.g. "
                "parallelism.data_parallel_shard_degree=-1."
            )
        return cls(dp_replicate=rep, dp_shard=shard, world_size=world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    def build_mesh(self, device_type: str) -> "DeviceMesh | None":
        """The world's DeviceMesh; None for a single process. Both dp dimensions are always
        present (size 1 allowed) so HSDP with shard degree 1 is plain replication."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
        self.world_mesh = mesh
        self.flat_dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        return mesh

    def fsdp_mesh(self, mesh: "DeviceMesh") -> "DeviceMesh":
        """FSDP's mesh: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP."""
        return mesh[("dp_replicate", "dp_shard")] if self.dp_replicate_enabled else mesh["dp_shard"]
