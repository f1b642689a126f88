"""Llama 3 as a plain nn.Module: RMSNorm, RoPE with Llama 3.1 scaling, grouped-query attention via
SDPA, SwiGLU feed-forward. Shapes: B batch, T sequence, D dim, H heads, K kv heads, E head_dim.

The block and the model skeleton here serve every decoder family: a block takes the family's attention
and holds a dense SwiGLU or, in a MoE layer, the shared MoE layer (Llama's configs have no experts, so
every Llama block is dense); the model builds its blocks and its RoPE table through methods a family
overrides.

No distributed code here: parallelize.py beside this file says how to shard it.
Build on the meta device, then call `init_weights()` after the parameters are materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model_config import ffn_hidden_dim, head_dim, is_moe_layer
from pretrain.models.moe import MoE, MoEArgs


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations (T, E/2) for RoPE, with Llama 3.1's frequency scaling when enabled."""
    E = head_dim(cfg)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, E, 2, device=device).float() / E))
    if cfg.rope_scaling:
        low_wavelen = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / freqs
        # long wavelengths are slowed by the factor, short ones kept, the band between interpolated
        smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blended = (1 - smooth) * freqs / cfg.rope_scaling_factor + smooth * freqs
        freqs = torch.where(wavelen > low_wavelen, freqs / cfg.rope_scaling_factor, freqs)
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = torch.where(is_mid, blended, freqs)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent pairs of q (B, T, H, E) and k (B, T, K, E) by freqs_cis (T, E/2)."""
    xq_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    rot = freqs_cis[None, : xq.shape[1], None, :]
    xq_out = torch.view_as_real(xq_c * rot).flatten(3)
    xk_out = torch.view_as_real(xk_c * rot).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over (B, H, T, E) tensors with as many k/v heads as q heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, E)
        repeats = q.shape[1] // k.shape[1]
        if repeats > 1:  # grouped-query attention: each kv head serves `repeats` query heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = self.attention_op(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); hidden size model.ffn_hidden_dim, or 2/3 * 4D scaled and rounded up to multiple_of."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block of every decoder family: x + attention(norm(x)), then h + ffn(norm(h)), where ffn is
    a dense SwiGLU (`feed_forward`) or, in a MoE layer (model_config.is_moe_layer), the routed experts
    (`moe`); the other one is None. `attention` is the family's: a module called as attention(x, freqs_cis)
    with an init_weights(init_std)."""

    def __init__(self, layer_id: int, cfg: ModelConfig, attention: nn.Module):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = attention
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        moe = is_moe_layer(cfg, layer_id)
        self.moe = MoE(MoEArgs.from_config(cfg)) if moe else None
        self.feed_forward = None if moe else FeedForward(cfg)
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5  # deeper blocks start smaller

    @property
    def ffn(self) -> nn.Module:
        return self.feed_forward if self.moe is None else self.moe

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.init_std)
        self.ffn.init_weights(self.init_std)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)  # (B, T, D)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V). Layers sit in a ModuleDict and the embedding, final norm and
    output may be None, so a pipeline stage keeps only its part: (B, T) or (B, T, D) in, (B, T, D) or logits out.

    Other families reuse this skeleton and override `build_block` (their attention) and `build_freqs_cis`
    (their RoPE table)."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): self.build_block(i, cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", self.build_freqs_cis(max_seq_len), persistent=False)

    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return TransformerBlock(layer_id, cfg, Attention(cfg))

    def build_freqs_cis(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """The RoPE rotations the blocks are called with: (T, E/2)."""
        return precompute_freqs_cis(self.cfg, seq_len, device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Fill every parameter (after to_empty) and recompute the RoPE buffer. The output head is drawn with
        std dim^-0.5 (truncated at 3 std), also when it is the embedding matrix (tie_word_embeddings): drawn
        as an N(0, 1) embedding it would make the first logits ~sqrt(dim) large (a loss near 60, not ln V)."""
        self.freqs_cis = self.build_freqs_cis(self.max_seq_len, device=buffer_device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.cfg.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, D)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # (B, T, V)
