"""RoPE: the rotation table (with Llama 3.1's frequency scaling when enabled, or YaRN's) and its application
to q and k. Shapes: T sequence, E head_dim; q (B, T, H, E), k (B, T, K, E)."""

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
        band = cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        scaled = torch.where(wavelen > low_wavelen, freqs / cfg.rope_scaling_factor, freqs)
        if band > 0:  # equal factors (Llama 4 Scout) leave no band: each frequency is kept or divided, as in HF
            smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / band
            blended = (1 - smooth) * freqs / cfg.rope_scaling_factor + smooth * freqs
            is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            scaled = torch.where(is_mid, blended, scaled)
        freqs = scaled
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


# ----------------------------------------------------------------------------- YaRN (DeepSeek-V3, GPT-OSS)
def uses_yarn(cfg: ModelConfig) -> bool:
    return cfg.rope_scaling and cfg.rope_scaling_type == "yarn"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 x mscale x ln(factor) + 1 (1 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_ramp(cfg: ModelConfig, dim: int, truncate: bool, device: torch.device | None) -> torch.Tensor:
    """(dim/2,) in [0, 1]: 0 for the fast pairs kept as they are (more than beta_fast rotations over the
    original context), 1 for the slow ones fully interpolated (fewer than beta_slow), linear between. The
    ramp's ends are rounded out to whole pairs when `truncate` (DeepSeek-V3, transformers' default), kept
    fractional otherwise (GPT-OSS: HF rope_parameters truncate=false)."""

    def pair(turns: float) -> float:  # the pair index that turns `turns` times over the original context
        return dim * math.log(cfg.rope_original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = pair(cfg.rope_yarn_beta_fast), pair(cfg.rope_yarn_beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no empty ramp
    return ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_frequencies(
    cfg: ModelConfig, dim: int, truncate: bool = True, device: torch.device | None = None
) -> torch.Tensor:
    """(dim/2,) rotation frequencies of `dim` rotated dimensions; with YaRN (model.rope_scaling=true,
    rope_scaling_type=yarn) the slow ones are divided by rope_scaling_factor and a band between blended
    (the numbers of transformers' "yarn" rope type)."""
    wavelengths = cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    freqs = 1.0 / wavelengths
    if uses_yarn(cfg):
        ramp = _yarn_ramp(cfg, dim, truncate, device)
        freqs = (1.0 / (cfg.rope_scaling_factor * wavelengths)) * ramp + freqs * (1 - ramp)
    return freqs


def rotations(freqs: torch.Tensor, seq_len: int, magnitude: float = 1.0) -> torch.Tensor:
    """Complex rotations (T, E/2) of positions 0..T-1 by `freqs`; `magnitude` scales them (and so q and k),
    as transformers scales cos and sin by YaRN's attention factor."""
    angles = torch.outer(torch.arange(seq_len, device=freqs.device, dtype=torch.float32), freqs)
    return torch.polar(torch.full_like(angles, magnitude), angles)
