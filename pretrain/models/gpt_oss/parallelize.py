"""How GPT-OSS is parallelized: Llama's attention plan with its biases and sinks, the MoE feed-forward as in
every family. The order (TP, MoE parallelism, CP, AC, compile, FSDP) and the MoE layers' tensor and expert
parallelism (expert biases included) are shared: pretrain/distributed/parallelize.py applies the plan below.

Under TP each rank holds H / tp whole heads: wq, wk, wv are column-parallel, their biases split with their
rows; wo is row-parallel, its bias replicated and added once to the summed output (torch's RowwiseParallel).
The sink logits (H,) belong to the heads: they are split the same way (Shard(0) over tp), so each rank's
attention sees its own heads' sinks, and each sink's gradient comes whole from the rank that holds its head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from pretrain.models.common.tp_plan import tp_plan_attention, tp_plan_ffn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class WithHeadSinks(ParallelStyle):
    """The attention module's style (its input preparation), plus its own (H,) `sinks` split over tp with
    the heads."""

    def __init__(self, inner: ParallelStyle):
        super().__init__()
        self.inner = inner

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = self.inner._apply(module, device_mesh)
        sinks = nn.Parameter(distribute_tensor(module.sinks.data, device_mesh, [Shard(0)]))
        module.register_parameter("sinks", sinks)
        return module


def tp_plan_block(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """Attention heads split over TP ranks with their biases and sinks; the feed-forward as in every family."""
    plan = tp_plan_attention(colwise, rowwise, prepare_input)
    plan["attention"] = WithHeadSinks(
        prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))
    )
    return {**plan, **tp_plan_ffn(block, colwise, rowwise, prepare_input)}
