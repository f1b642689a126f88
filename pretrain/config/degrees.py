"""Degrees: the parallel degrees of a layout, checked against the world size, and what follows from them
(the data-parallel degree, which features are on). Plain arithmetic, no torch: validation uses it before
launch, and pretrain/distributed/parallel_dims.py builds the device meshes on it."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.schema import ParallelismConfig
from pretrain.errors import ConfigError


@dataclass
class Degrees:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1

    @classmethod
    def from_config(cls, p: ParallelismConfig, world_size: int) -> Degrees:
        degrees = {
            "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
            "context_parallel_degree": p.context_parallel_degree,
            "tensor_parallel_degree": p.tensor_parallel_degree,
            "pipeline_parallel_degree": p.pipeline_parallel_degree,
        }
        for key, value in {**degrees, "expert_parallel_degree": p.expert_parallel_degree}.items():
            if value < 1:
                raise ConfigError(f"parallelism.{key}={value} must be >= 1. Fix: use 1 to disable it.")
        shard = p.data_parallel_shard_degree
        others = (
            p.data_parallel_replicate_degree
            * p.context_parallel_degree
            * p.tensor_parallel_degree
            * p.pipeline_parallel_degree
        )
        listing = ", ".join(f"{k}={v}" for k, v in degrees.items())
        if shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by the other degrees ({listing}; product {others}), "
                    "so data_parallel_shard_degree=-1 cannot take the rest. Fix: choose degrees whose product "
                    f"divides {world_size}, or change the number of processes."
                )
            shard = world_size // others
        if shard < 1 or shard * others != world_size:
            raise ConfigError(
                f"parallel degrees do not fill the world: data_parallel_shard_degree={shard}, {listing}: product "
                f"{shard * others}, but the world size is {world_size}. Fix: make the product {world_size}, e.g. "
                "parallelism.data_parallel_shard_degree=-1."
            )
        ep, cp = p.expert_parallel_degree, p.context_parallel_degree
        if ep > 1 and (ep % cp or (shard * cp) % ep):
            raise ConfigError(
                f"parallelism.expert_parallel_degree={ep} must be a multiple of context_parallel_degree={cp} and "
                f"divide data_parallel_shard_degree x context_parallel_degree = {shard} x {cp} = {shard * cp}: the "
                "expert ranks are borrowed from the FSDP and CP ranks. Fix: use an expert_parallel_degree that "
                f"divides {shard * cp} (and is a multiple of {cp})."
            )
        return cls(
            ep=ep,
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=shard,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            pp=p.pipeline_parallel_degree,
            world_size=world_size,
        )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP (or HSDP) wraps the model: parameters are sharded or replicated over dp x cp."""
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1
