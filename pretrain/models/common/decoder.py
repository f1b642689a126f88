"""The decoder every family builds on, as plain nn.Modules: RMSNorm, the family's attention, a SwiGLU
feed-forward or the shared MoE layer, and the model skeleton. Shapes: B batch, T sequence, D dim, V vocab.

A block takes the family's attention and holds a dense SwiGLU or, in a MoE layer, the shared MoE layer; the
model builds its blocks and its RoPE table through methods a family overrides (`build_block`,
`build_freqs_cis`). With the defaults (grouped-query attention, Llama 3.1's RoPE) it is Llama 3.

No distributed code here: each family's parallelize.py says how to shard it.
Build on the meta device, then call `init_weights()` after the parameters are materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig, ffn_hidden_dim, is_moe_layer
from pretrain.models.common.attention import Attention
from pretrain.models.common.moe import MoE, MoEArgs
from pretrain.models.common.rope import precompute_freqs_cis


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); hidden size model.ffn_hidden_dim, or 2/3 * 4D scaled and rounded up to
    multiple_of."""

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
    a dense SwiGLU (`feed_forward`) or, in a MoE layer (config.model.is_moe_layer), the routed experts
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

    # buffers indexed by token position along dim 0 (T, ...): code that runs the model on some positions only
    # (context parallelism, decoding with a KV cache) narrows each of them to those positions
    position_buffers: tuple[str, ...] = ("freqs_cis",)

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
