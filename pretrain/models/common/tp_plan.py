"""Tensor-parallel plans for the common decoder's block: attention heads and SwiGLU hidden units split over
the TP ranks. A plan is `(block, colwise, rowwise, prepare_input) -> {module name: ParallelStyle}` (the style
classes come in, so float8 can swap in its own); families combine these parts into their block plan, and
pretrain/distributed/parallelize.py applies it, with the rest of the layout, in the order every family shares."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel


def tp_plan_attention(colwise: type, rowwise: type, prepare_input: type) -> dict:
    """Attention heads split over TP ranks, its norm sequence-parallel. The styles are torch's, or
    torchao's float8 ones (which cast to float8 before the collectives)."""
    return {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1)),
    }


def tp_plan_feed_forward(colwise: type, rowwise: type, prepare_input: type) -> dict:
    """SwiGLU hidden units split over TP ranks, its norm sequence-parallel."""
    return {
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1)),
        "feed_forward.w3": colwise(),
    }


def tp_plan_ffn(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """The feed-forward half of any family's block: a dense block splits its SwiGLU hidden units; a MoE
    block keeps only its sequence-parallel ffn_norm here (pretrain/distributed/parallelize.py shards the
    experts)."""
    if getattr(block, "moe", None) is not None:
        return {"ffn_norm": SequenceParallel()}
    return tp_plan_feed_forward(colwise, rowwise, prepare_input)


def tp_plan_block(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """The common decoder's block (Llama 3): grouped-query attention, then the feed-forward."""
    return {**tp_plan_attention(colwise, rowwise, prepare_input), **tp_plan_ffn(block, colwise, rowwise, prepare_input)}
