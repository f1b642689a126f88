"""GPT-OSS as plain nn.Modules: the common decoder with GPT-OSS's attention and its MoE configuration.
Shapes: B batch, T sequence, D dim, H heads, K kv heads, E head_dim.

What differs from Llama's decoder:
- attention: biases on q, k, v and o; a learned sink logit per head (H,) in every query's softmax
  denominator (softmax over [q k^T * E^-0.5, sink], the sink's probability dropped: it carries no value);
  layers alternate between a sliding window of `attention_window_size` keys (layer 0, 2, ...) and full
  causal attention (1, 3, ...), as config.model.layer_window says. The kernel is `attention_op`, a
  WindowedAttention called with the sinks (pretrain/models/common/masks.py).
- RoPE with YaRN (model.rope_scaling=true, rope_scaling_type=yarn), its ramp ends not rounded (HF
  truncate=false), and YaRN's attention factor 0.1 ln(factor) + 1 on the rotations' magnitude, so q and k
  are both scaled by it, as transformers scales cos and sin.
- the MoE feed-forward in every block is the shared layer (pretrain/models/common/moe.py) configured as
  GPT-OSS: a router with a bias, softmax over the top-k logits (= softmax, top-k, renormalised), experts
  with biases and the clamped SwiGLU (model.moe.activation=clamped_swiglu).

The module names are Llama's (wq, wk, wv, wo, sinks under `attention`), so the parallelism plans, pipeline
split and checkpoint code fit. No distributed code here: parallelize.py beside this file says how to shard it.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config.model import ModelConfig, head_dim, layer_window
from pretrain.models.common import attention
from pretrain.models.common.decoder import Transformer as Decoder
from pretrain.models.common.decoder import TransformerBlock
from pretrain.models.common.masks import WindowedAttention
from pretrain.models.common.rope import rotations, uses_yarn, yarn_frequencies, yarn_mscale
from pretrain.models.common.sharded import local_part


class Attention(attention.Attention):
    """Grouped-query attention with biases, per-head sinks, and the layer's window."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg)
        self.attention_op = WindowedAttention(*layer_window(cfg, layer_id))
        E = self.head_dim  # Llama's bias-free projections, replaced by biased ones (the same names and shapes)
        self.wq = nn.Linear(cfg.dim, self.n_heads * E, bias=True)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * E, bias=True)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * E, bias=True)
        self.wo = nn.Linear(self.n_heads * E, cfg.dim, bias=True)
        self.sinks = nn.Parameter(torch.empty(self.n_heads))  # (H,) one logit per query head

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.sinks)  # a sink logit of 0: one extra key of score 0 to every query, at the start

    def kernel_extras(self) -> dict:
        return {"sinks": local_part(self.sinks)}  # under TP, this rank's heads' sinks


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations (T, E/2): YaRN's frequencies (ramp ends not rounded), of magnitude YaRN's attention
    factor; plain RoPE when model.rope_scaling=false."""
    freqs = yarn_frequencies(cfg, head_dim(cfg), truncate=False, device=device)
    magnitude = yarn_mscale(cfg.rope_scaling_factor, cfg.rope_yarn_mscale) if uses_yarn(cfg) else 1.0
    return rotations(freqs, seq_len, magnitude)


class Transformer(Decoder):
    """tokens (B, T) -> logits (B, T, V): Llama's skeleton with GPT-OSS's attention in every block and the
    shared MoE layer as its feed-forward."""

    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return TransformerBlock(layer_id, cfg, Attention(cfg, layer_id))

    def build_freqs_cis(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        return precompute_freqs_cis(self.cfg, seq_len, device)
