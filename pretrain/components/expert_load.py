"""Expert load, once per optimizer step: the tokens each MoE layer sent to each expert, summed over the
ranks that hold different tokens (dp x cp; TP ranks route the same tokens), then
  - the auxiliary-loss-free balancing update of each layer's expert bias (DeepSeek-V3), identical on every rank;
  - load metrics: the busiest and the idlest expert of any layer, relative to the layer's mean load
    (1.0 = balanced; an idle expert shows min_load 0).
Without bias updates the counts are reduced only on log steps. Activation checkpointing may recompute a
MoE forward and count its tokens twice: every expert of that layer twice, so the sign of the update and
the ratios are unchanged.
It also tells the MoE layers how to weigh the balance loss (1 / (MoE layers x micro-batches per step)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config.model import ModelConfig, is_moe_layer
from pretrain.models.common.moe import MoE


class ExpertLoad:
    def __init__(self, model_parts: list[nn.Module], cfg: ModelConfig, microbatches: int,
                 token_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None, device: torch.device):
        self.moes = [m for part in model_parts for m in part.modules() if isinstance(m, MoE)]
        self.token_group, self.pp_group, self.device = token_group, pp_group, device
        n_moe_layers = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))
        self.enabled = n_moe_layers > 0  # (a pipeline stage may hold none of them, and still joins the reduction)
        self.updates_bias = cfg.moe.bias_update_speed > 0
        for moe in self.moes:
            moe.aux_loss_scale = 1.0 / (max(n_moe_layers, 1) * microbatches)

    def reset(self) -> None:
        """Forget the tokens counted so far (a pipeline's shape-inference pass routes placeholder inputs)."""
        for moe in self.moes:
            moe.tokens_per_expert.zero_()

    def step(self, log: bool) -> dict[str, torch.Tensor]:
        """Update the biases from this step's counts and reset them; on a log step, return its load metrics.
        Without bias updates, the counts are only reduced on log steps."""
        if not self.enabled:
            return {}
        if not log and not self.updates_bias:
            self.reset()
            return {}
        stats = None  # (max load, -min load); a stage without MoE layers adds nothing
        if self.moes:
            counts = torch.stack([moe.tokens_per_expert for moe in self.moes])  # (layers here, E)
            if self.token_group is not None:
                dist.all_reduce(counts, group=self.token_group)
            for moe, layer_counts in zip(self.moes, counts):
                moe.update_expert_bias(layer_counts)
            load = counts / counts.mean(dim=1, keepdim=True).clamp_min(1e-9)
            stats = torch.stack([load.max(), -load.min()])
        if not log:
            return {}
        if stats is None:
            stats = torch.zeros(2, device=self.device)
        if self.pp_group is not None:  # each stage holds other layers
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.pp_group)
        return {"moe_max_load": stats[0], "moe_min_load": -stats[1]}
