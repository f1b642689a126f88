"""RoPE: the rotation table (with Llama 3.1's frequency scaling when enabled) and its application to q and k.
Shapes: T sequence, E head_dim; q (B, T, H, E), k (B, T, K, E)."""

from __future__ import annotations

import math

import torch

from pretrain.config.model import ModelConfig, head_dim


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
