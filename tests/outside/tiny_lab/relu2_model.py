"""The model of `tiny_lab.relu2` (a plain nn.Module) and its tensor-parallel plan. Shapes: B, T, D, F hidden."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel

from pretrain.config.model import ModelConfig, ffn_hidden_dim
from pretrain.models.common.attention import Attention
from pretrain.models.common.decoder import Transformer, TransformerBlock
from pretrain.models.common.tp_plan import tp_plan_attention


class Relu2FeedForward(nn.Module):
    """w2(relu(w1 x)^2): two matrices where SwiGLU has three."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, ffn_hidden_dim(cfg), bias=False)
        self.w2 = nn.Linear(ffn_hidden_dim(cfg), cfg.dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)).square())  # (B, T, F) -> (B, T, D)


class Relu2Block(TransformerBlock):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__(layer_id, cfg, Attention(cfg))
        self.feed_forward = Relu2FeedForward(cfg)


class Relu2Transformer(Transformer):
    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return Relu2Block(layer_id, cfg)


def tp_plan_block(block: nn.Module, colwise: type, rowwise: type, prepare_input: type) -> dict:
    """The common attention plan, and the MLP's hidden units split over the TP ranks."""
    return {
        **tp_plan_attention(colwise, rowwise, prepare_input),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1)),
    }
