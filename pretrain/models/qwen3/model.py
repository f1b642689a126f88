"""Qwen3 (dense) and Qwen3-MoE as plain nn.Modules. Shapes: B batch, T sequence, D dim, H heads,
K kv heads, E head_dim (set on its own, 128 in the published sizes, not D / H).

Llama 3 with three changes:
  - q and k each get an RMSNorm over E (one weight shared by all heads), applied per head before RoPE;
  - RoPE without frequency scaling (theta 1e6), the dense SwiGLU size given explicitly (ffn_hidden_dim);
  - the MoE flavors replace every block's SwiGLU (after moe.n_dense_layers) by the shared MoE layer:
    softmax router, top-k, weights renormalised (HF norm_topk_prob), no shared expert.
Embedding, final norm, output head, RoPE buffer, init and forward are Llama's (the same module names,
so the tensor-parallel plans, pipeline split and checkpoint code fit both).

No distributed code here: parallelize.py beside this file says how to shard it.
Build on the meta device, then call `init_weights()` after the parameters are materialised.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model_config import ffn_hidden_dim, is_moe_layer
from pretrain.models.llama3 import model as llama
from pretrain.models.moe import MoE, MoEArgs


class Attention(llama.Attention):
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
        q, k = llama.apply_rotary_emb(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, E)
        group = q.shape[1] // k.shape[1]
        if group > 1:  # each kv head serves `group` query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = self.attention_op(q, k, v)  # (B, H, T, E)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + ffn(norm(h)) where ffn is a dense SwiGLU
    (`feed_forward`) or, in a MoE layer, the routed experts (`moe`)."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if is_moe_layer(cfg, layer_id):
            self.moe = MoE(MoEArgs.from_config(cfg))
        else:
            self.feed_forward = llama.FeedForward(cfg, hidden=ffn_hidden_dim(cfg))
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # deeper blocks start smaller (as Llama's)

    @property
    def ffn(self) -> nn.Module:
        return self.moe if hasattr(self, "moe") else self.feed_forward

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.ffn.init_weights(self.init_std)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)  # (B, T, D)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(llama.Transformer):
    """tokens (B, T) -> logits (B, T, V), with Llama's ModuleDict-of-blocks contract for pipeline stages
    (embedding, final norm and output may be None). With tie_word_embeddings (0.6B to 4B) the output
    head is the embedding matrix."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        # Llama's skeleton (embedding, norm, output, tying, RoPE buffer) built without blocks, then ours
        super().__init__(dataclasses.replace(cfg, n_layers=0), max_seq_len)
        self.cfg = cfg
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Llama's init; a tied matrix is then drawn as the output head (std dim^-0.5), not as an embedding
        (std 1), which would make the first logits ~sqrt(dim) large (a loss near 60 instead of ln V)."""
        super().init_weights(buffer_device)
        if self.cfg.tie_word_embeddings and self.output is not None:
            std = self.cfg.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
