"""DeepSeek-V3 (and the V2 shapes) as plain nn.Modules: multi-head latent attention (MLA), a dense SwiGLU
in the first `moe.n_dense_layers` blocks and the shared MoE layer in the others, RoPE with YaRN.
Shapes: B batch, T sequence, D dim, H heads; per head N = qk_nope_head_dim, R = qk_rope_head_dim,
V = v_head_dim; L = kv_lora_rank, Q = q_lora_rank.

MLA, one block:
    q       = wq(x)                or  wq_b(q_norm(wq_a(x)))      (B, T, H, N + R)
    kv, k_r = wkv_a(x)                                             (B, T, L), (B, T, R): k_r shared by all heads
    k_n, v  = wkv_b(kv_norm(kv))                                   (B, T, H, N), (B, T, H, V)
    q_r, k_r rotated by RoPE; k = [k_n, k_r]; softmax(q k^T * scale) v -> wo -> (B, T, D)

RoPE rotates adjacent pairs (2i, 2i+1) of the R rope dimensions, as Llama's does here and as DeepSeek's
own checkpoints are laid out (transformers' DeepseekV3 with rope_interleave=true): weights map to the
Hugging Face ones without any row permutation.

YaRN (model.rope_scaling=true, rope_scaling_type=yarn) is applied whenever it is configured, at any
sequence length, as transformers applies it (DeepSeek's reference and torchtitan only switch it on when
the run's sequence length exceeds rope_original_max_seq_len). The published checkpoints were trained with
it, so imported weights see the frequencies they expect; to pretrain at the original context with plain
RoPE, as DeepSeek's first stage did, set model.rope_scaling=false.

The block, embedding, final norm, output head, forward and init order are Llama's (the same module names,
so the parallelism plans, pipeline split and checkpoint code fit every family).
No distributed code here: parallelize.py beside this file says how to shard it.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.models.common.attention import causal_attention
from pretrain.models.common.decoder import Transformer as Decoder
from pretrain.models.common.decoder import TransformerBlock
from pretrain.models.common.flops import decoder_flops
from pretrain.models.common.rope import apply_rotary_emb, rotations, uses_yarn, yarn_frequencies, yarn_mscale

# q_norm and kv_norm use DeepSeek's fixed epsilon (its reference code and transformers do), not model.norm_eps
LATENT_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- RoPE with YaRN
def softmax_scale_factor(cfg: ModelConfig) -> float:
    """What multiplies the usual 1/sqrt(N + R) softmax scale: mscale^2 under YaRN, else 1."""
    return yarn_mscale(cfg.rope_scaling_factor, cfg.rope_yarn_mscale) ** 2 if uses_yarn(cfg) else 1.0


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations (T, R/2) for the rope part of q and k; with YaRN, the slow frequencies are divided
    by rope_scaling_factor and a band between blended (transformers' "yarn" type, its ramp ends truncated)."""
    return rotations(yarn_frequencies(cfg, cfg.mla.qk_rope_head_dim, truncate=True, device=device), seq_len)


# ----------------------------------------------------------------------------- attention
class MLAttention(nn.Module):
    """Multi-head latent attention. Keys and values are rebuilt from one L-wide latent per token (plus
    the R-wide rope key every head shares), queries from x directly or through a Q-wide latent."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.mla
        if not a.kv_lora_rank:
            raise ValueError("model.mla.kv_lora_rank=0: DeepSeek-V3 attention needs the latent width. "
                             "Fix: set it (the published sizes use 512).")
        # the attention kernel; context parallelism swaps in one that sees the whole sequence
        self.attention_op = causal_attention
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = a.kv_lora_rank, a.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(self.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        # SDPA scales by 1/sqrt(N + R); YaRN's temperature is folded into q (attention_op keeps (q, k, v))
        self.q_scale = softmax_scale_factor(cfg)

    def init_weights(self, init_std: float) -> None:
        for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name).weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        for norm in (getattr(self, "q_norm", None), self.kv_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        # heads as -1: under tensor parallelism wq / wq_b / wkv_b hold this rank's heads only
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q_nope, q_rope = q.unflatten(-1, (-1, self.nope_dim + self.rope_dim)).split(
            [self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, N), (B, T, H, R)
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, L), (B, T, R)
        q_rope, k_rope = apply_rotary_emb(q_rope, k_rope.unsqueeze(2), freqs_cis)  # k_rope (B, T, 1, R)
        k_nope, v = self.wkv_b(self.kv_norm(kv)).unflatten(-1, (-1, self.nope_dim + self.v_dim)).split(
            [self.nope_dim, self.v_dim], dim=-1)  # (B, T, H, N), (B, T, H, V)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, N + R)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)  # (B, T, H, N + R)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        out = self.attention_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, V)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, T, D)


# ----------------------------------------------------------------------------- model
class Transformer(Decoder):
    """tokens (B, T) -> logits (B, T, V): Llama's model (ModuleDict-of-blocks contract for pipeline stages,
    init) with MLA in every block, a dense SwiGLU in the first moe.n_dense_layers blocks and the routed
    experts after. `freqs_cis` (T, R/2) covers the rope dimensions."""

    def build_block(self, layer_id: int, cfg: ModelConfig) -> nn.Module:
        return TransformerBlock(layer_id, cfg, MLAttention(cfg))

    def build_freqs_cis(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        return precompute_freqs_cis(self.cfg, seq_len, device)


def params_and_flops(model: nn.Module, cfg: ModelConfig, seq_len: int) -> tuple[int, float]:
    """MoE layers count their top-k routed experts only; attention scores use N + R wide q/k, values V."""
    a = cfg.mla
    qk_head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
    return decoder_flops(model, cfg, seq_len, qk_head_dim=qk_head_dim, v_head_dim=a.v_head_dim)
