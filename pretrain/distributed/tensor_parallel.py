"""Tensor parallelism: apply a family's plan (module name -> ParallelStyle) to whatever modules a
model (or pipeline stage) still has."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


def apply_tp_plan(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """parallelize_module over the entries of `plan` whose module exists (pipeline stages drop some)."""
    present = {name: style for name, style in plan.items() if _has_module(module, name)}
    if present:
        parallelize_module(module, tp_mesh, present)


def _has_module(root: nn.Module, dotted: str) -> bool:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return False
    return True
