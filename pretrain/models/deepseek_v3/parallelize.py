"""How DeepSeek-V3 is parallelized: the tensor-parallel plan of multi-head latent attention (and of the
dense SwiGLU blocks, the common decoder's). The order (TP, MoE parallelism, CP, AC, compile, FSDP) and the MoE
layers' tensor and expert parallelism are shared by every decoder family: pretrain/distributed/parallelize.py
applies the plan below with them.

MLA under TP: the up-projections that make heads (wq or wq_b, wkv_b) are column-parallel and wo is
row-parallel, so each rank holds H / tp whole heads. The low-rank down-projections (wq_a, wkv_a) and the
latent norms (q_norm, kv_norm) are small and shared by all heads: every rank runs them on the whole
(all-gathered) sequence, with weights replicated over the tp mesh (DTensors, like the rest, for FSDP and
gradient clipping).

Their gradients must be the full ones on every rank. What enters wq_b or wkv_b gets it already: the
column-parallel input's backward sums the heads' partial gradients over tp. The shared rope key k_r
does not pass through a column-parallel layer: it goes from wkv_a's output straight into this rank's
heads, so each rank holds the gradient of its own heads only. `ReplicateOnTP(sum_grad_of_last=R)`
sums the gradient of those last R output columns over tp in backward (an all-reduce of (B, T, R)), so
wkv_a's weight gradient, and the input's, are complete and equal on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel

from pretrain.models.common.tp_plan import tp_plan_ffn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class ReplicateOnTP(ParallelStyle):
    """A module computed in full on every tp rank: parameters become Replicate DTensors, a local (or
    Replicate DTensor) input is used as it is, the output is a local tensor. The output's gradient is
    taken as complete on every rank, except its last `sum_grad_of_last` columns, whose gradient is
    summed over the tp ranks in backward (they feed head-sharded computation directly)."""

    def __init__(self, sum_grad_of_last: int = 0):
        super().__init__()
        self.sum_grad_of_last = sum_grad_of_last

    @staticmethod
    def _input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(
            x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            for x in inputs
        )

    def _output(self, module: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        n = self.sum_grad_of_last
        if not n:
            return out.to_local()
        whole, tail = out.to_local().split([out.shape[-1] - n, n], dim=-1)
        # identity forward; backward: the rank's partial gradient of the tail -> summed over tp
        tail = DTensor.from_local(tail, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))
        return torch.cat([whole, tail], dim=-1)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, input_fn=self._input, output_fn=self._output)


def tp_plan_attention(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """MLA heads split over TP ranks (wq / wq_b and wkv_b column-parallel, wo row-parallel), the low-rank
    projections and latent norms replicated, the attention norm sequence-parallel."""
    attention = block.attention
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wkv_a": ReplicateOnTP(sum_grad_of_last=attention.rope_dim),  # its tail is the shared rope key
        "attention.kv_norm": ReplicateOnTP(),
        "attention.wkv_b": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1)),
    }
    if attention.q_lora_rank:
        plan.update(
            {"attention.wq_a": ReplicateOnTP(), "attention.q_norm": ReplicateOnTP(), "attention.wq_b": colwise()}
        )
    else:
        plan["attention.wq"] = colwise()
    return plan


def tp_plan_block(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """Attention as above; the feed-forward as in every family (Llama's SwiGLU plan in a dense block)."""
    return {
        **tp_plan_attention(block, colwise, rowwise, prepare_input),
        **tp_plan_ffn(block, colwise, rowwise, prepare_input),
    }
