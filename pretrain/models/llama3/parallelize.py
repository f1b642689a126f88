"""How Llama 3 is parallelized, in the order torchtitan applies it: tensor parallel (with sequence
parallel norms and an optional vocab-sharded loss; float8 styles when float8 is on), context
parallel, activation checkpointing, per-block compile, then FSDP2 with the transformer blocks as
units and the root last. The machinery lives in pretrain/distributed/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from pretrain.distributed.activation_checkpoint import apply_ac
from pretrain.distributed.compile import apply_compile, enable_async_tp
from pretrain.distributed.fsdp import apply_fsdp
from pretrain.distributed.tensor_parallel import apply_tp_plan
from pretrain.feature_checks import compiles_model
from pretrain.float8 import float8_tp_styles

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


def tp_plan_block(colwise: type, rowwise: type, prepare_input: type) -> dict:
    """Attention heads and FFN hidden units split over TP ranks; norms run sequence-parallel.
    The styles are torch's, or torchao's float8 ones (which cast to float8 before the collectives)."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1)),
        "feed_forward.w3": colwise(),
    }


def parallelize_llama(model: "Transformer", dims: "ParallelDims", job: "JobConfig") -> "Transformer":
    if dims.tp_enabled:
        tp_mesh = dims.mesh("tp")
        apply_tp_plan(model, tp_mesh, tp_plan_root(not job.parallelism.disable_loss_parallel))
        block_plan = tp_plan_block(*float8_tp_styles(job.float8))
        for block in model.layers.values():
            apply_tp_plan(block, tp_mesh, block_plan)
        if model.cfg.tie_word_embeddings and model.output is not None and model.tok_embeddings is not None:
            model.output.weight = model.tok_embeddings.weight  # both are vocab-sharded on dim 0: re-tie
        if job.parallelism.enable_async_tensor_parallel:
            enable_async_tp(tp_mesh)
    if dims.cp_enabled:
        from pretrain.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, dims, job)
    apply_ac(model.layers, job.activation_checkpoint)
    if compiles_model(job):
        apply_compile(model.layers, job.compile)
    if dims.fsdp_enabled:
        apply_fsdp(model, list(model.layers.values()), dims.fsdp_mesh(), job.training, job.parallelism)
    return model
