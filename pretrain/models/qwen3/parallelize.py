"""How Qwen3 is parallelized: Llama's tensor-parallel plan for attention and the dense SwiGLU, plus the
q/k head norms. The order (TP, MoE parallelism, CP, AC, compile, FSDP) and the MoE layers' tensor and
expert parallelism are shared by every decoder family (pretrain/distributed/parallelize.py).

q_norm / k_norm under TP: wq and wk are column-parallel, so each rank normalises its own heads with
the one (E,) weight every head shares. Each rank's gradient of that weight covers its heads only, and
the full gradient is their sum. `SequenceParallel(sequence_dim=2)` gives exactly that: it makes the
weight a DTensor replicated over the tp mesh and wraps the local (B, T, heads, E) input as a DTensor
sharded on the heads (dim 2), so the weight's gradient is the sum over the tp ranks (a Partial DTensor,
reduced where clipping and the optimizer read it, as for the sequence-parallel block norms); the output
goes back to a local tensor of this rank's heads for RoPE and attention.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import SequenceParallel

from pretrain.models.common.tp_plan import tp_plan_attention, tp_plan_ffn

HEAD_DIM = 2  # q and k enter their norms as (B, T, heads, E)


def tp_plan_qk_norm() -> dict:
    """The shared per-head norm weights replicated over TP, applied to this rank's heads."""
    return {
        "attention.q_norm": SequenceParallel(sequence_dim=HEAD_DIM, use_local_output=True),
        "attention.k_norm": SequenceParallel(sequence_dim=HEAD_DIM, use_local_output=True),
    }


def tp_plan_block(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """Attention heads (and their norms) split over TP ranks; the feed-forward as in every family."""
    return {**tp_plan_attention(colwise, rowwise, prepare_input), **tp_plan_qk_norm(),
            **tp_plan_ffn(block, colwise, rowwise, prepare_input)}
