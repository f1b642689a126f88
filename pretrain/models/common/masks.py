"""Attention with masks beyond plain causal, one mechanism for every family. Shapes: B batch, H heads,
T sequence, E head width; q, k, v (B, H, T, E) with as many k/v heads as q heads.

A layer's window (config.model.layer_window) says which earlier keys a query at position i may see:

    causal    every key j <= i                                  (Llama 3, Qwen3, a global layer)
    chunked   j <= i in the same chunk: j // size == i // size  (Llama 4's RoPE layers, attention_chunk_size)
    sliding   the last `size` keys: i - size < j <= i           (GPT-OSS's sliding layers, sliding_window)

Attention sinks (GPT-OSS) add a learned logit per head to every query's softmax denominator, a key that
absorbs probability and carries no value. They go through the same kernel: one zero key column with a
zero value, whose additive mask entry is the head's sink logit (so q . 0 + sink = sink), and whose
gradient reaches the sink parameter through the mask.

Everything is torch's scaled_dot_product_attention: `is_causal` for plain causal; a boolean mask (T, T)
for a window; an additive float mask (H, T, T + pad) with sinks. On CPU that is exact (the math or the CPU
flash kernel); on CUDA the boolean and float masks run the fused memory-efficient kernel, which takes an
additive bias and returns its gradient. The masks depend on positions only, so they are built once per
(window, length, device) and kept. Context parallelism is refused for windows and sinks before launch
(config.validate), because its kernels assume a plain causal mask over the gathered sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.config.model import WINDOW_KINDS

_KEY_PAD = 8  # key columns are padded to a multiple of this with masked keys: the fused CUDA kernel wants aligned rows
_masks: dict[tuple, torch.Tensor] = {}


def allowed_keys(kind: str, size: int, T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool: query i may attend to key j (causal, within the chunk or the sliding window)."""
    if kind not in WINDOW_KINDS:
        raise ValueError(f"attention window {kind!r}: one of {', '.join(WINDOW_KINDS)}")
    key = (kind, size, T, str(device))
    if key not in _masks:
        i = torch.arange(T, device=device)
        query, keys = i[:, None], i[None, :]
        allowed = keys <= query
        if kind == "chunked":
            allowed &= (keys // size) == (query // size)
        elif kind == "sliding":
            allowed &= (query - keys) < size
        _masks[key] = allowed
    return _masks[key]


def _sink_bias(allowed: torch.Tensor, sinks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(H, T, T + pad) additive mask: 0 where allowed, -inf elsewhere, the head's sink logit in column T."""
    H, (T, _) = sinks.shape[0], allowed.shape
    pad = -(T + 1) % _KEY_PAD
    blocked = torch.zeros(T, T + 1 + pad, dtype=dtype, device=allowed.device)
    blocked[:, :T].masked_fill_(~allowed, float("-inf"))
    blocked[:, T + 1 :] = float("-inf")
    sink_column = F.pad(sinks.to(dtype).view(H, 1, 1).expand(H, T, 1), (T, pad))  # (H, T, T + 1 + pad)
    return blocked.unsqueeze(0) + sink_column


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "causal",
    size: int = 0,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over (B, H, T, E): `kind`/`size` the window, `sinks` (H,) logits or None;
    scale defaults to E^-0.5. Returns (B, H, T, Ev)."""
    T = q.shape[-2]
    if sinks is None:
        if kind == "causal" or size >= T:  # a window as long as the sequence is plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        mask = allowed_keys(kind, size, T, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    bias = _sink_bias(allowed_keys(kind, size, T, q.device), sinks, q.dtype)
    extra = bias.shape[-1] - T  # the sink column and the padding: zero keys and values
    k = F.pad(k, (0, 0, 0, extra))
    v = F.pad(v, (0, 0, 0, extra))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)


class WindowedAttention:
    """An `attention_op` for one layer's window: (q, k, v, sinks=None) -> out. An attention module keeps its
    kernel in `attention_op` and calls it with its sink logits, if it has any, as `sinks=`; code that swaps the
    kernel (decoding with a KV cache) reads `kind` and `size` from the op it replaces."""

    def __init__(self, kind: str = "causal", size: int = 0):
        self.kind, self.size = kind, size

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None
    ) -> torch.Tensor:
        return masked_attention(q, k, v, self.kind, self.size, sinks=sinks)

    def __repr__(self) -> str:
        return f"WindowedAttention({self.kind}, {self.size})"
