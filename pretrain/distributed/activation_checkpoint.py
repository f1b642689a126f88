"""Activation checkpointing (AC): keep fewer activations after forward and recompute the rest in backward.

  mode=none                       keep everything autograd saves (fastest, most memory)
  mode=full                       every block keeps only its input; its whole forward reruns in backward
  mode=selective, option=N        every N-th block as in `full`, the others keep everything. "Every N-th" counts
                                  the blocks of the whole model from 1: layer ids N-1, 2N-1, 3N-1, ... (N=2:
                                  ids 1, 3, 5, ...). The id is the block's key in `model.layers`, so a pipeline
                                  split does not change which blocks are recomputed.
  mode=selective, option=op       every block runs under a per-op policy (SAVE_OPS below): the outputs of
                                  attention, of cheap-to-keep reductions and reduce-scatters, and of one
                                  matmul in two are kept; everything else (norms, activations, RoPE, the
                                  other matmuls) is recomputed
  mode=memory_budget              no wrapping: torch.compile's min-cut partitioner chooses what to keep within
                                  `memory_budget` (a fraction of what keeping everything would cost)

Blocks are wrapped with torch's non-reentrant checkpoint wrapper and put back under the same key. The
wrapper forwards attribute lookups to the block and strips its `_checkpoint_wrapped_module.` prefix from
state dicts (DCP's get_model_state_dict too), so checkpoints of runs with and without AC are
interchangeable; names from the root's `named_parameters()` do carry the prefix.
Recomputation reruns the same ops on the same inputs, so losses and gradients match mode=none (bitwise with
deterministic kernels, as on CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pretrain import torch_compat
from pretrain.config.features import selective_every_n
from pretrain.log import logger

if TYPE_CHECKING:
    from pretrain.config import ActivationCheckpointConfig


# Outputs kept by the per-op policy: expensive to recompute (attention, collectives) or small and needed
# again (max: the amax of float8 scaling).
# (The ops a torch build lacks are left out: names differ between versions and builds.)
SAVE_OPS = (
    torch_compat.attention_ops()
    | torch_compat.op_overloads("aten", ("max",))
    | torch_compat.reduce_scatter_ops()
)
# Matmuls (float8 ones included): the 1st, 3rd, 5th, ... of each block's forward are kept, the others recomputed.
MATMUL_OPS = torch_compat.op_overloads("aten", ("mm",)) | torch_compat.scaled_mm_ops()


def op_policy_context():
    """A fresh (forward, recompute) context pair for one call of a checkpointed block. The matmul counts
    restart for every call and are kept apart for the forward and the recompute, so the recompute makes
    the same keep/recompute decision for the k-th matmul as the forward did."""
    matmuls = {False: 0, True: 0}  # ctx.is_recompute -> matmuls seen so far

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in MATMUL_OPS:
            matmuls[ctx.is_recompute] += 1
            keep = matmuls[ctx.is_recompute] % 2 == 1
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _layer_ids(blocks: nn.ModuleDict) -> list[int]:
    """Each block's layer id: its key when the keys are integers (as the models build them), else its position."""
    keys = list(blocks.keys())
    return [int(k) for k in keys] if all(k.isdigit() for k in keys) else list(range(len(keys)))


def apply_ac(blocks: nn.ModuleDict, cfg: ActivationCheckpointConfig) -> None:
    """Wrap the transformer blocks in place according to cfg.mode; no-op for mode=none."""
    if cfg.mode == "none":
        return
    if cfg.mode == "memory_budget":
        torch_compat.set_activation_memory_budget(cfg.memory_budget)
        logger.info(f"activation checkpointing: compiler memory budget {cfg.memory_budget} (no block wrapped)")
        return
    every_n = selective_every_n(cfg.selective_ac_option) if cfg.mode == "selective" else 1
    kwargs = {"preserve_rng_state": cfg.preserve_rng_state}
    if every_n == 0:  # the per-op policy
        kwargs["context_fn"] = op_policy_context
    wrapped = []
    for key, layer_id in zip(list(blocks.keys()), _layer_ids(blocks)):
        if (layer_id + 1) % max(every_n, 1) == 0:
            blocks[key] = torch_compat.checkpoint_wrapper(blocks[key], **kwargs)
            wrapped.append(key)
    what = {1: "full", 0: "selective per-op policy"}.get(every_n, f"full, every {every_n}-th block")
    logger.info(f"activation checkpointing: {what} on {len(wrapped)} of {len(blocks)} blocks ({', '.join(wrapped)})")
