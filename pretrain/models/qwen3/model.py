"""Qwen3 (dense) and Qwen3-MoE as plain nn.Modules. Shapes: B batch, T sequence, D dim, H heads,
K kv heads, E head_dim (set on its own, 128 in the published sizes, not D / H).

Llama 3 with three changes:
  - q and k each get an RMSNorm over E (one weight shared by all heads), applied per head before RoPE;
  - RoPE without frequency scaling (theta 1e6), the dense SwiGLU size given explicitly (ffn_hidden_dim);
  - the MoE flavors replace every block's SwiGLU (after moe.n_dense_layers) by the shared MoE layer:
    softmax router, top-k, weights renormalised (HF norm_topk_prob), no shared expert.
Block, embedding, final norm, output head, RoPE buffer, init and forward are Llama's (the same module
names, so the tensor-parallel plans, pipeline split and checkpoint code fit both).

No distributed code here: parallelize.py beside this file says how to shard it.
Build on the meta device, then call `init_weights()` after the parameters are materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.models.common import attention
from pretrain.models.common.decoder import Transformer as Decoder
from pretrain.models.common.decoder import TransformerBlock
from pretrain.models.common.rope import apply_rotary_emb


class Attention(attention.Attention):
    """Grouped-query attention with per-head RMSNorm on q and k (before RoPE); no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        E = self.head_dim
        # heads as -1: under tensor parallelism wq/wk/wv hold this rank's heads only
        q = self.q_norm(self.wq(x).unflatten(-1, (-1, E)))  # (B, T, H, E), normalised per head
        k = self.k_norm(self.wk(x).unflatten(-1, (-1, E)))  # (B, T, K, E)
        v = self.wv(x).unflatten(-1, (-1, E))  # (B, T, K, E)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        return self.wo(attention.attend(self.attention_op, q, k, v))  # (B, T, D)


class Transformer(Decoder):
    """tokens (B, T) -> logits (B, T, V): the common decoder (ModuleDict-of-blocks contract for pipeline stages,
    init, tied output head in the 0.6B to 4B sizes) with Qwen3's attention in every block."""

    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return TransformerBlock(layer_id, cfg, Attention(cfg))
