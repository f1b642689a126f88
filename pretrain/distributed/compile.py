"""torch.compile per transformer block, so compiled code composes with FSDP (each block is one FSDP
unit, its collectives stay outside the graph), TP (DTensor traced inside) and PP (each stage
compiles its own blocks). `Module.compile` keeps parameter names unchanged, so checkpoints of
compiled and eager runs are interchangeable.

Three boundaries between eager and compiled code need care:

- TP hands the first block an `AsyncCollectiveTensor`: the embedding's output reduce-scatter is
  issued with async_op=True and `to_local()` returns the not-yet-waited local shard. torch 2.13
  unwraps such graph inputs with `trigger_wait()` before tracing (older torch traced a wait into the
  graph), which drops their autograd history: the compiled block returns no gradient for its input,
  DTensor's backward materialises a plain zero tensor where it expects a DTensor, and backward fails
  (`'Tensor' object has no attribute '_local_tensor'`; had it not, the embedding would get no
  gradient). So every compiled call first waits such inputs eagerly, through an identity autograd
  node that keeps the history (`resolve_async`; the same on any torch). The block's first op needs
  that input anyway, so no overlap is lost.
- Context-parallel attention issues c10d collectives (and builds a lower-right causal mask) that
  dynamo cannot put in a graph. Blocks with it are compiled without fullgraph, with the attention op
  excluded, so each block becomes two graphs (before and after attention) around the eager op.
- Full activation checkpointing stays eager around the compiled block (see `_compile_target`).
- A MoE layer's experts run eagerly: their batches are sized by the routing (data-dependent shapes,
  and the all-to-all under expert parallelism). Router, attention and norms around them compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain import torch_compat
from pretrain.config import ConfigError
from pretrain.distributed.context_parallel import ContextParallelAttention
from pretrain.models.common.moe import GroupedExperts

if TYPE_CHECKING:
    from pretrain.config import CompileConfig


def apply_compile(blocks: nn.ModuleDict, cfg: CompileConfig) -> None:
    for block in blocks.values():
        has_eager_ops = _exclude_context_parallel_attention(block) | _exclude_experts(block)
        target = _compile_target(block)
        target.compile(backend=cfg.backend, fullgraph=not has_eager_ops)
        torch_compat.wrap_compiled_call(target, with_async_inputs_resolved)


def _compile_target(block: nn.Module) -> nn.Module:
    """The module to compile: the block, or the block inside a policy-free checkpoint wrapper.

    Full checkpointing then stays eager around the compiled block (it keeps the block's input and
    reruns the compiled forward in backward: same memory, same numbers). Traced into the graph
    instead, it fails under TP on torch 2.13: the partitioner saves the DTensor's DeviceMesh for the
    recompute as if it were a tensor. The per-op policy must see the block's aten ops, so a wrapper
    with a policy (`context_fn`) is compiled whole, and is traced."""
    inner = torch_compat.checkpoint_wrapped_module(block)
    if inner is None:
        return block
    return block if torch_compat.checkpoint_has_policy(block) else inner


class _WaitAsync(torch.autograd.Function):
    """Identity for autograd; forward waits for the collective behind an AsyncCollectiveTensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def resolve_async(x):
    """x itself, or, for an AsyncCollectiveTensor, the waited plain tensor with x's autograd history."""
    return _WaitAsync.apply(x) if torch_compat.is_async_collective(x) else x


def with_async_inputs_resolved(fn: Callable) -> Callable:
    """`fn` (a compiled callable) with its positional tensor arguments passed through `resolve_async`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*(resolve_async(a) for a in args), **kwargs)

    return call


def _exclude_context_parallel_attention(block: nn.Module) -> bool:
    """Mark the block's context-parallel attention ops to run eagerly; True if it has any."""
    found = False
    for module in block.modules():
        op = getattr(module, "attention_op", None)
        if isinstance(op, ContextParallelAttention):
            module.attention_op = torch.compiler.disable(op.__call__)
            found = True
    return found


def _exclude_experts(block: nn.Module) -> bool:
    """Run a MoE layer's experts eagerly (their batches are sized by the routing, and under EP/TP their
    weights are sharded DTensors used through their local blocks); True if the block has any."""
    found = False
    for module in block.modules():
        if isinstance(module, GroupedExperts):
            module.forward = torch.compiler.disable(module.forward)
            found = True
    return found


def enable_async_tp(tp_mesh) -> None:
    """Micro-pipelined TP: inductor fuses each all-gather/reduce-scatter with its matmul and overlaps
    them through symmetric memory (CUDA only; checked in feature_checks and on the device)."""
    if tp_mesh.device_type != "cuda":
        raise ConfigError(
            "parallelism.enable_async_tensor_parallel=true needs CUDA, but this rank runs on "
            f"{tp_mesh.device_type}. Fix: set parallelism.enable_async_tensor_parallel=false."
        )
    torch_compat.enable_micro_pipeline_tp()
    torch_compat.enable_symmetric_memory(tp_mesh.get_group().group_name)
