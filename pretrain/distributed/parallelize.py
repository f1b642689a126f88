"""The order every decoder family is parallelized in, as torchtitan applies it: tensor parallel (the
family's block plan; sequence-parallel norms; vocab-sharded output for loss parallel), the MoE layers'
tensor and expert parallelism, context parallel, activation checkpointing, per-block compile, then FSDP2
with the blocks as units (experts as their own units on the expert mesh) and the root last.

A family supplies `block_plan(block, colwise, rowwise, prepare_input) -> {module name: ParallelStyle}`
for the modules of one block it wants sharded over TP (attention and a dense feed-forward); a MoE
feed-forward (an `moe` attribute) is handled here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from pretrain.components.float8 import float8_tp_styles
from pretrain.config.features import compiles_model
from pretrain.distributed.activation_checkpoint import apply_ac
from pretrain.distributed.compile import apply_compile, enable_async_tp
from pretrain.distributed.context_parallel import apply_context_parallel
from pretrain.distributed.expert_parallel import apply_moe_parallel, shard_experts
from pretrain.distributed.fsdp import apply_fsdp
from pretrain.distributed.tensor_parallel import apply_tp_plan

if TYPE_CHECKING:
    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims

BlockPlan = Callable[[nn.Module, type, type, type], dict]


def tp_plan_root(loss_parallel: bool) -> dict:
    """Embedding and output: vocab-sharded; activations between blocks are sharded on the sequence."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,  # a DTensor for loss_parallel's cross-entropy
        ),
    }


def parallelize_decoder(model: nn.Module, dims: ParallelDims, job: JobConfig, block_plan: BlockPlan) -> nn.Module:
    """Apply the job's parallelism to a decoder (or one pipeline stage of it) in place; returns it."""
    blocks = list(model.layers.values())
    if dims.tp_enabled:
        tp_mesh = dims.mesh("tp")
        apply_tp_plan(model, tp_mesh, tp_plan_root(not job.parallelism.disable_loss_parallel))
        styles = float8_tp_styles(job.float8)
        for block in blocks:
            apply_tp_plan(block, tp_mesh, block_plan(block, *styles))
        if model.cfg.tie_word_embeddings and model.output is not None and model.tok_embeddings is not None:
            model.output.weight = model.tok_embeddings.weight  # both are vocab-sharded on dim 0: re-tie
        if job.parallelism.enable_async_tensor_parallel and not job.dry_run:  # a dry run's mesh is on the CPU:
            enable_async_tp(tp_mesh)  # the config was checked (TP > 1, compiled, not cluster.device=cpu)
    for block in blocks:
        if getattr(block, "moe", None) is not None:
            apply_moe_parallel(block.moe, dims)
    if dims.cp_enabled:
        apply_context_parallel(model, dims, job)
    apply_ac(model.layers, job.activation_checkpoint)
    if compiles_model(job):
        apply_compile(model.layers, job.compile)
    if dims.fsdp_enabled:
        shard_experts(blocks, dims, job)
        apply_fsdp(model, blocks, dims.fsdp_mesh(), job.training, job.parallelism)
    return model
