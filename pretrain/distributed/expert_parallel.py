"""Tensor and expert parallelism of a MoE layer (pretrain/models/common/moe.py), applied from outside the model.

Tensor parallel (the experts' hidden units split over tp, as torchtitan's expert-TP = TP):
    block input (B, T/tp, D), sequence-sharded --all-gather--> every tp rank routes the same tokens
    router: replicated weight; experts: w1, w3 split on H, w2 on H (each rank computes a partial sum)
    expert output --all-reduce over tp--> combine (replicated) --> this rank's sequence shard out
  The all-reduce sits right after the experts so that everything the routing weights touch is
  replicated: the router's gradient is then the same on every tp rank, as its Replicate weight says.
  In backward the experts' input gradient is a partial sum too: it is all-reduced on the way in.
  Expert biases (GPT-OSS): b1, b3 split with their hidden units; the output bias b2 is replicated over tp and
  added after the all-reduce, once (added on every rank before it, it would count tp times).

Expert parallel (experts split over the ep mesh, E / ep per rank; tokens travel to their experts):
    tokens sorted by global expert, counts (E,) --all-to-all of counts--> what each rank will receive
    --all-to-all of tokens (autograd)--> rows grouped (source rank, local expert) --regroup--> sorted by
    local expert --> local experts --> inverse regroup --all-to-all back--> the rank's own slots
  Every stacked expert tensor, biases included, is split on dim 0: a bias travels with its expert.
  Both compose: with EP and TP the tokens are exchanged within each tp rank's ep group.

FSDP then shards the experts over the FSDP ranks that hold the same experts (dp_mod_ep), with the
gradient divided by all data ranks (the experts' gradients gather every ep rank's tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

from pretrain.distributed.fsdp import fsdp_unit_options

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims

# the hidden dimension of each stacked expert tensor, split over tp: w1, w3 (E, H, D); w2 (E, D, H); biases b1,
# b3 (E, H). The output bias b2 (E, D) has none: it is replicated over tp and added once, after the sum
_HIDDEN_DIM = {"w1": 1, "w3": 1, "w2": 2, "b1": 1, "b3": 1, "b2": None}


def _expert_partition(ep: bool, tp: bool):
    """partition_fn of distribute_module: experts on dim 0 over ep, hidden units over tp."""

    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            hidden = _HIDDEN_DIM[param_name]
            on_tp = [Shard(hidden) if hidden is not None else Replicate()] if tp else []
            placements = ([Shard(0)] if ep else []) + on_tp
            dist_param = nn.Parameter(distribute_tensor(param, mesh, placements))
            module.register_parameter(param_name, dist_param)

    return partition


class _ExpertExchange:
    """input_fn / output_fn of the experts module: the all-to-all dispatch over ep and the tp
    gradient/output reductions. A forward's routing plan is kept between its two hooks."""

    def __init__(self, ep_mesh: DeviceMesh | None, tp_mesh: DeviceMesh | None):
        self.ep_group = ep_mesh.get_group() if ep_mesh is not None else None
        self.tp_mesh = tp_mesh
        self.plans: list[tuple] = []
        self.local_counts: list[torch.Tensor] = []  # under tp, the rows of each local expert, for the output bias

    # the exchanges have data-dependent sizes and call c10d collectives: they run eagerly between the
    # compiled parts of a compiled block
    @torch.compiler.disable
    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, counts = inputs  # x (N, D) sorted by global expert; counts (E,)
        if self.ep_group is not None:
            x, counts = self._send_to_experts(x, counts)
        if self.tp_mesh is not None:  # forward: as is; backward: sum the tp ranks' partial input gradients
            x = DTensor.from_local(x, self.tp_mesh, (Replicate(),), run_check=False).to_local(
                grad_placements=(Partial(),)
            )
            if getattr(module, "b2", None) is not None:
                self.local_counts.append(counts)
        return x, counts

    @torch.compiler.disable
    def combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        if self.tp_mesh is not None:  # each tp rank holds a partial sum over its hidden units
            out = (
                DTensor.from_local(out, self.tp_mesh, (Partial(),), run_check=False)
                .redistribute(placements=(Replicate(),))
                .to_local()
            )
            if getattr(module, "b2", None) is not None:  # the output bias, once (replicated over tp)
                out = out + module.output_bias(self.local_counts.pop(), out.shape[0])
        if self.ep_group is not None:
            out = self._return_from_experts(out)
        return out

    def _send_to_experts(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ep = dist.get_world_size(self.ep_group)
        n_local = counts.numel() // ep
        received = torch.empty_like(counts)  # received[s * n_local + e]: rows source s sends to local expert e
        dist.all_to_all_single(received, counts, group=self.ep_group)
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = received.view(ep, n_local).sum(1).tolist()
        x = all_to_all_single(
            x.new_empty(sum(recv_splits), x.shape[1]), x.contiguous(), recv_splits, send_splits, group=self.ep_group
        )
        # rows arrive grouped by (source, local expert); the experts want them grouped by local expert
        expert_of_row = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(received)
        order = torch.argsort(expert_of_row, stable=True)
        self.plans.append((order, send_splits, recv_splits))
        return x[order], received.view(ep, n_local).sum(0)

    def _return_from_experts(self, out: torch.Tensor) -> torch.Tensor:
        order, send_splits, recv_splits = self.plans.pop()
        unsorted = torch.empty_like(out).index_copy(0, order, out)  # back to (source, local expert) order
        return all_to_all_single(
            out.new_empty(sum(send_splits), out.shape[1]), unsorted, send_splits, recv_splits, group=self.ep_group
        )


def _tp_replicated(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Parameters replicated on the tp mesh, local tensors in and out (the router's gate)."""

    def inputs_to_dtensor(mod, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, (Replicate(),), run_check=False) for t in inputs)

    def outputs_to_local(mod, out, mesh):
        return out.to_local()

    distribute_module(module, tp_mesh, input_fn=inputs_to_dtensor, output_fn=outputs_to_local)


def apply_moe_parallel(moe: nn.Module, dims: ParallelDims) -> None:
    """TP and/or EP for one MoE layer, in place; nothing without either."""
    tp_mesh = dims.mesh("tp") if dims.tp_enabled else None
    ep_mesh = dims.mesh("ep") if dims.ep_enabled else None
    if tp_mesh is None and ep_mesh is None:
        return
    if tp_mesh is not None:
        # the layer sees whole sequences: gather the sequence-parallel input, hand back this rank's shard
        parallelize_module(
            moe,
            tp_mesh,
            PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            ),
        )
        _tp_replicated(moe.router.gate, tp_mesh)
        for experts in (moe.experts, moe.shared_experts):
            if experts is not None:  # the hook below adds the output bias after the sum over tp, not each rank
                experts.add_output_bias = False
        if moe.shared_experts is not None:
            exchange = _ExpertExchange(None, tp_mesh)
            distribute_module(
                moe.shared_experts, tp_mesh, _expert_partition(ep=False, tp=True), exchange.dispatch, exchange.combine
            )
    experts_mesh = dims.mesh("ep_tp") if (ep_mesh is not None and tp_mesh is not None) else ep_mesh or tp_mesh
    exchange = _ExpertExchange(ep_mesh, tp_mesh)
    distribute_module(
        moe.experts,
        experts_mesh,
        _expert_partition(ep=ep_mesh is not None, tp=tp_mesh is not None),
        exchange.dispatch,
        exchange.combine,
    )


def shard_experts(blocks: list[nn.Module], dims: ParallelDims, job: JobConfig) -> None:
    """Under EP, each MoE layer's experts become their own FSDP unit on the expert FSDP mesh (before
    the blocks are wrapped, so the blocks' units leave them out). Without EP the experts are ordinary
    block parameters."""
    if not dims.ep_enabled:
        return

    mesh = dims.expert_fsdp_mesh()
    options = fsdp_unit_options(mesh, job.training, job.parallelism)
    for i, block in enumerate(blocks):
        moe = getattr(block, "moe", None)
        if moe is None:
            continue
        n_local = moe.experts.w1.to_local().shape[0]
        # FSDP shards dim 0 (experts) unless there are fewer local experts than FSDP ranks
        shard_dim = 0 if n_local % mesh.size(mesh.ndim - 1) == 0 else 1
        experts = moe.experts
        fully_shard(
            experts,
            mesh=mesh,
            reshard_after_forward=options.reshard(i, len(blocks)),
            mp_policy=options.mp_policy,
            shard_placement_fn=lambda p, d=shard_dim: Shard(d),
        )
        # every data rank's tokens reached these experts: average over all of them, not over the expert FSDP ranks
        experts.set_gradient_divide_factor(float(dims.dp_replicate * dims.dp_shard * dims.cp))
        # gloo has no pre-multiplied sum: reduce with SUM, then divide. (Not on a mesh of one rank: there
        # FSDP skips the collective and already divides, and would divide twice.)
        if mesh.device_type == "cpu" and mesh.size() > 1:
            experts.set_force_sum_reduction_for_comms(True)
