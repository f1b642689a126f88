"""Process group and device setup, and the few collectives the loop uses."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pretrain import torch_compat
from pretrain.config import ClusterConfig
from pretrain.errors import ConfigError


def pick_device(cluster: ClusterConfig) -> torch.device:
    """cuda:LOCAL_RANK when asked for (or `auto` and available), else CPU."""
    want_cuda = cluster.device == "cuda" or (cluster.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("cluster.device=cuda but no CUDA device is visible. Fix: cluster.device=cpu or auto.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout_s: int = 600) -> None:
    """nccl (with gloo for CPU-side objects) on CUDA, gloo on CPU. A lone process (no RANK in the
    environment) gets a one-rank group on an in-memory store, so every code path stays the same."""
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def set_cpu_threads(device: torch.device) -> None:
    """Split this machine's cores between the local processes (torchrun's habit), unless set."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def set_collective_timeout(seconds: int, groups: list[dist.ProcessGroup]) -> None:
    """Shorten (or lengthen) the timeout of every collective from now on, on these groups and the
    default one: after the first step a collective that waits this long means a rank died or hung."""
    for group in {id(g): g for g in [dist.group.WORLD, *groups]}.values():
        torch_compat.set_pg_timeout(timedelta(seconds=seconds), group)


def clip_grad_norm_(
    params: list[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Total gradient norm over all ranks (sharded DTensor grads included; with pipeline stages, the
    squared norms of all stages are summed over `pp_group`); clips when max_norm > 0.
    Returns a plain tensor holding the norm before clipping."""
    # DTensor norms reduce over their own mesh; under expert parallelism the experts live on another mesh
    # than the rest, so the squares are summed per mesh, then added (and clipping runs per mesh)
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    squares = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        if isinstance(norm, DTensor):  # a partial norm per shard: full_tensor() reduces it
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if pp_group is not None:  # each pp rank holds other parameters: add the squares
        total = total**2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm > 0:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
