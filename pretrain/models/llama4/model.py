"""Llama 4 (the text decoder of Scout and Maverick) as plain nn.Modules. Shapes: B batch, T sequence, D dim,
H heads, K kv heads, E head_dim.

Llama 3 with these changes:
  - iRoPE: every model.nope_layer_interval-th layer (4th) has no RoPE and attends to its whole causal context;
    the other layers rotate q and k and see only their own chunk of attention_window_size tokens
    (model.attention_window=chunked, every global_attention_every-th layer global);
  - on the NoPE layers, attention temperature tuning: the query at position p is scaled by
    1 + attn_scale x ln(1 + floor((p + 1) / attn_floor_scale)), so far positions attend more sharply;
  - on the RoPE layers, an L2 norm (an RMSNorm without weight, eps model.norm_eps) of each head of q and k
    after the rotation (model.qk_norm with qk_norm_type=l2; Scout has it, Maverick not);
  - the feed-forward of a MoE layer (every layer in Scout, every other one in Maverick: moe.interleave_step) is
    the shared MoE layer with top-1 sigmoid routing, the routing weight applied to the expert's input
    (moe.score_before_experts) and one shared expert; the dense layers have their own hidden size (ffn_hidden_dim).

Per-position tables: `freqs_cis` (T, E/2) for the RoPE layers and `attn_temperature` (T,) for the NoPE layers,
both non-persistent buffers listed in `position_buffers`, so code that runs the model on some positions only
narrows both. A block gets the one table its attention uses.

No distributed code here: parallelize.py beside this file says how to shard it.
Build on the meta device, then call `init_weights()` after the parameters are materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig, is_nope_layer, layer_window
from pretrain.models.common import attention
from pretrain.models.common.decoder import Transformer as Decoder
from pretrain.models.common.decoder import TransformerBlock
from pretrain.models.common.masks import WindowedAttention
from pretrain.models.common.rope import apply_rotary_emb


def attention_temperature(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(T,) fp32 query scales of the NoPE layers at positions 0..T-1 (all ones without temperature tuning)."""
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    if not cfg.attn_temperature_tuning:
        return torch.ones_like(positions)
    return torch.log1p(torch.floor((positions + 1.0) / cfg.attn_floor_scale)) * cfg.attn_scale + 1.0


class Attention(attention.Attention):
    """Grouped-query attention of one Llama 4 layer: RoPE, L2 q/k norm and a chunked window, or (a NoPE layer)
    none of them and a per-position query temperature."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg)
        self.attention_op = WindowedAttention(*layer_window(cfg, layer_id))  # the kernel, swappable from outside
        self.use_rope = not is_nope_layer(cfg, layer_id)
        self.l2_qk_norm = cfg.qk_norm and cfg.qk_norm_type == "l2" and self.use_rope
        self.norm_eps = cfg.norm_eps

    def _l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) over the head dimension, in fp32 (HF Llama4TextL2Norm)."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.norm_eps).type_as(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); positions: freqs_cis (T, E/2) on a RoPE layer, the query temperature (T,) on a NoPE layer."""
        E = self.head_dim
        # heads as -1: under tensor parallelism wq/wk/wv hold this rank's heads only
        q = self.wq(x).unflatten(-1, (-1, E))  # (B, T, H, E)
        k = self.wk(x).unflatten(-1, (-1, E))  # (B, T, K, E)
        v = self.wv(x).unflatten(-1, (-1, E))  # (B, T, K, E)
        if self.use_rope:
            q, k = apply_rotary_emb(q, k, positions)
            if self.l2_qk_norm:
                q, k = self._l2_norm(q), self._l2_norm(k)
        else:  # fp32 scales, the product back in q's dtype
            q = (q * positions[: q.shape[1], None, None]).to(q.dtype)
        return self.wo(attention.attend(self.attention_op, q, k, v))  # (B, T, D)


class Transformer(Decoder):
    """tokens (B, T) -> logits (B, T, V): the common decoder (ModuleDict-of-blocks contract for pipeline stages,
    init) with Llama 4's attention in every block, and the NoPE layers given the temperature table instead of
    the RoPE table."""

    position_buffers = ("freqs_cis", "attn_temperature")

    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__(cfg, max_seq_len)
        self.register_buffer("attn_temperature", attention_temperature(cfg, max_seq_len), persistent=False)

    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return TransformerBlock(layer_id, cfg, Attention(cfg, layer_id))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        super().init_weights(buffer_device)
        self.attn_temperature = attention_temperature(self.cfg, self.max_seq_len, device=buffer_device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.freqs_cis.shape[0] != self.attn_temperature.shape[0]:
            raise RuntimeError(
                f"freqs_cis has {self.freqs_cis.shape[0]} positions and attn_temperature "
                f"{self.attn_temperature.shape[0]}: code that narrows the model to some positions must narrow "
                f"every buffer of position_buffers {self.position_buffers}"
            )
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, D)
        for layer_id, layer in self.layers.items():  # ids, not modules: wrappers (AC, compile) hide attributes
            nope = is_nope_layer(self.cfg, int(layer_id))
            h = layer(h, self.attn_temperature if nope else self.freqs_cis)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # (B, T, V)
