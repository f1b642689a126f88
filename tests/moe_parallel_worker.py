"""Run on gloo ranks by tests/test_expert_parallel.py (helpers.run_on_ranks): a small decoder whose
feed-forwards are MoE layers, trained 3 AdamW steps in each parallel layout named, compared with the same
model trained in the rank's own process on the whole batch. Returns one line per layout: `layout <name> ok
<max rel loss diff> <max rel grad diff>`, or raises.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.config import JobConfig
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.parallelize import parallelize_decoder
from pretrain.distributed.utils import clip_grad_norm_
from pretrain.models.common.decoder import Transformer
from pretrain.models.common.moe import MoE
from pretrain.models.common.tp_plan import tp_plan_block

# name -> (dp_shard, tp, ep); the world size is their product / (ep borrowed from dp_shard)
LAYOUTS = {
    "ep2": (2, 1, 2),
    "tp2": (1, 2, 1),
    "ep4": (4, 1, 4),
    "fsdp4_ep2": (4, 1, 2),
    "fsdp2_ep2_tp2": (2, 2, 2),
    "fsdp2_tp2": (2, 2, 1),
    # every token routed to the first half of the experts: the second expert rank receives none
    "ep2_skewed": (2, 1, 2),
}
B, T, STEPS = 8, 16, 3


def build_model() -> nn.Module:
    """Llama's skeleton with MoE feed-forwards: sigmoid routing, a shared expert, the balance loss."""
    cfg = JobConfig().model
    cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size = 32, 2, 4, 64
    e = cfg.moe
    e.n_routed_experts, e.hidden_dim, e.top_k, e.n_shared_experts = 8, 16, 2, 1
    e.score_func, e.route_norm, e.route_scale, e.aux_loss_coeff = "sigmoid", True, 2.0, 0.01
    torch.manual_seed(0)
    model = Transformer(cfg, T)
    model.init_weights()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.init_weights(0.2)  # large enough for the routing to vary between tokens
        moe.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))  # a bias that changes some choices
    return model


def train(model, batches, dp_ranks, dp, dp_group=None):
    """3 AdamW steps on the per-token mean over the global batch: a parallel run computes its own dp
    rank's rows and FSDP averages the gradients over dp; the reference accumulates every dp rank's rows
    weighted 1/dp itself. Either way the balance loss is taken per dp rank's rows."""
    scale = 1.0 if len(dp_ranks) == 1 else 1.0 / dp
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.aux_loss_scale = scale
    losses = []
    for tokens in batches:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        total = torch.zeros(())
        for r in dp_ranks:
            rows = slice(r * B // dp, (r + 1) * B // dp)
            logits = model(inputs[rows])
            if isinstance(logits, DTensor):
                logits = logits.full_tensor()
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[rows].flatten()) * scale
            loss.backward()
            total += loss.detach()
        clip_grad_norm_(params, 1.0)
        if not losses:  # the first step's gradients: both sides still hold the same weights
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                     for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        if len(dp_ranks) == 1 and dp > 1:
            dist.all_reduce(total, group=dp_group)
            total /= dp
        losses.append(total.item())
    return losses, grads


def run_layout(name: str, reference: nn.Module, batches) -> str:
    dp_shard, tp, ep = LAYOUTS[name]
    job = JobConfig()
    p = job.parallelism
    p.data_parallel_shard_degree, p.tensor_parallel_degree, p.expert_parallel_degree = dp_shard, tp, ep
    dims = ParallelDims.from_config(p, dist.get_world_size())
    dims.build_mesh("cpu")
    if name.endswith("_skewed"):
        reference = copy.deepcopy(reference)
        for moe in (m for m in reference.modules() if isinstance(m, MoE)):
            moe.expert_bias.copy_(torch.tensor([10.0] * 4 + [0.0] * 4))
    model = parallelize_decoder(copy.deepcopy(reference), dims, job, tp_plan_block)
    dp_mesh = dims.mesh("dp")
    dp = dp_mesh.size() if dp_mesh is not None else 1
    dp_rank = dp_mesh.get_local_rank() if dp_mesh is not None else 0
    losses, grads = train(model, batches, [dp_rank], dp, dp_mesh.get_group() if dp_mesh is not None else None)
    ref_losses, ref_grads = train(copy.deepcopy(reference), batches, list(range(dp)), dp)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    diffs = {n: ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items()}
    grad_diff = max(diffs.values())
    worst = max(diffs, key=diffs.get)
    # fp32: the parallel layouts sum the same products in another order (all-reduce, reduce-scatter,
    # all-to-all regrouping), ~1e-7 relative per op. First-step gradients (same weights on both sides) within
    # 1e-5 of each tensor's largest entry; losses over 3 Adam steps within 1e-5. Measured (2026-11): at most
    # 8.3e-7 and 2.1e-7. A token sent to the wrong expert, a missing reduction or a wrong divide factor moves a
    # gradient by > 1e-2 of its largest entry (a missing 1/ep: 0.5).
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (
        f"{name}: losses {losses} vs {ref_losses}; grad diff {grad_diff} at {worst}"
    )
    return f"layout {name} ok {loss_diff:.2e} {grad_diff:.2e}"


def check_layouts(rank: int, world_size: int, layouts: list[str]) -> list[str]:
    """Each layout in turn on this rank of a gloo group of world_size ranks."""
    reference = build_model()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (B, T + 1), generator=g) for _ in range(STEPS)]
    return [run_layout(name, reference, batches) for name in layouts]
