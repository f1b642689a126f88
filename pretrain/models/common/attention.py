"""Grouped-query attention via SDPA, as Llama 3 has it; other families subclass it or bring their own.
Shapes: B batch, T sequence, D dim, H heads, K kv heads, E head_dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig, head_dim
from pretrain.models.common.rope import apply_rotary_emb


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over (B, H, T, E) tensors with as many k/v heads as q heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attend(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra) -> torch.Tensor:
    """q (B, T, H, E), k and v (B, T, K, E) -> (B, T, H x E): heads first, each kv head repeated for the
    H / K query heads it serves (grouped-query attention), the kernel `op(q, k, v, **extra)`, heads back."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, E)
    repeats = q.shape[1] // k.shape[1]
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return op(q, k, v, **extra).transpose(1, 2).flatten(2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the attention kernel; context parallelism swaps in one that sees the whole sequence
        self.attention_op = causal_attention
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim(cfg)
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def kernel_extras(self) -> dict:
        """Keyword arguments of the kernel besides q, k, v (GPT-OSS: its sink logits); none here."""
        return {}

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        return self.wo(attend(self.attention_op, q, k, v, **self.kernel_extras()))  # (B, T, D)
