"""How Llama 3 is parallelized, in the order torchtitan applies it: tensor parallel (with sequence
parallel norms and an optional vocab-sharded loss), context parallel, then FSDP2 with the
transformer blocks as units and the root last. The machinery lives in pretrain/distributed/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from pretrain.distributed.fsdp import apply_fsdp
from pretrain.distributed.tensor_parallel import apply_tp_plan

if TYPE_CHECKING:
    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.models.llama3.model import Transformer


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


def tp_plan_block() -> dict:
    """Attention heads and FFN hidden units split over TP ranks; norms run sequence-parallel."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }


def parallelize_llama(model: "Transformer", dims: "ParallelDims", job: "JobConfig") -> "Transformer":
    if dims.tp_enabled:
        tp_mesh = dims.mesh("tp")
        apply_tp_plan(model, tp_mesh, tp_plan_root(not job.parallelism.disable_loss_parallel))
        for block in model.layers.values():
            apply_tp_plan(block, tp_mesh, tp_plan_block())
        if model.cfg.tie_word_embeddings and model.output is not None and model.tok_embeddings is not None:
            model.output.weight = model.tok_embeddings.weight  # both are vocab-sharded on dim 0: re-tie
    if dims.cp_enabled:
        from pretrain.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, dims, job)
    if dims.fsdp_enabled:
        apply_fsdp(model, list(model.layers.values()), dims.fsdp_mesh(), job.training, job.parallelism)
    return model
