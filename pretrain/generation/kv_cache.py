"""Decoding with a KV cache, without touching the model files: the same two hooks context parallelism uses.

- Every attention module keeps its kernel in `attention_op`, called as op(q, k, v) or op(q, k, v, sinks=...)
  on (B, H, T, E) tensors whose k/v heads are already repeated to the query heads. `KVCache` swaps each for a
  `CachedAttention` that appends the new keys and values to what the earlier forwards left, and attends the
  new queries to all of them: causal with an offset, and the layer's chunked or sliding window (the `kind` and
  `size` of the `WindowedAttention` it replaces) by absolute position, with the layer's sink logits if given.
- Every buffer the model lists in `position_buffers` (RoPE's `freqs_cis`, (T, ...) indexed by position) is
  narrowed to the rows of the positions computed in that forward, as context parallelism narrows `freqs_cis`
  to a rank's positions.

So one forward over the prompt fills the cache (prefill), then each forward computes one new position.
Shapes: B batch, H heads, T new positions, S cached positions after this call, E head width (Ev for v).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_KEY_PAD = 8  # key columns padded to a multiple of this with masked keys, as masks.py does for the CUDA kernel


def allowed_keys_at(kind: str, size: int, start: int, T: int, device: torch.device) -> torch.Tensor:
    """(T, start + T) bool: the query at absolute position start + t may attend to key position j."""
    query = torch.arange(start, start + T, device=device)[:, None]
    keys = torch.arange(start + T, device=device)[None, :]
    allowed = keys <= query
    if kind == "chunked":
        allowed &= (keys // size) == (query // size)
    elif kind == "sliding":
        allowed &= (query - keys) < size
    elif kind != "causal":
        raise ValueError(f"attention window {kind!r}: the KV cache knows causal, chunked and sliding")
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
           sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(E) + mask) v with q (B, H, T, E), k (B, H, S, E), v (B, H, S, Ev); `allowed` (T, S) or
    None for every key; `sinks` (H,): one more key per head with logit sinks[h] and a zero value."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    extra = 1 + (-(S + 1) % _KEY_PAD)  # the sink column, then masked padding
    bias = torch.full((H, T, S + extra), float("-inf"), dtype=q.dtype, device=q.device)
    bias[:, :, :S] = 0.0
    if allowed is not None:
        bias[:, :, :S].masked_fill_(~allowed, float("-inf"))
    bias[:, :, S] = sinks.to(q.dtype)[:, None]
    k, v = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))


class CachedAttention:
    """An `attention_op` that remembers the keys and values of every position computed so far (up to `capacity`)."""

    def __init__(self, kind: str, size: int, capacity: int):
        self.kind, self.size, self.capacity = kind, size, capacity
        self.k: torch.Tensor | None = None  # (B, H, capacity, E), filled up to self.length
        self.v: torch.Tensor | None = None
        self.length = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
        start, T = self.length, q.shape[2]
        if start + T > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full ({start} cached, {T} more)")
        if self.k is None:
            self.k = k.new_empty((*k.shape[:2], self.capacity, k.shape[3]))
            self.v = v.new_empty((*v.shape[:2], self.capacity, v.shape[3]))
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        self.length = S = start + T
        if self.kind == "causal" and T == 1:
            allowed = None  # one new query sees every cached key
        elif self.kind == "causal" and start == 0 and sinks is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the prompt alone, as training sees it
        else:
            allowed = allowed_keys_at(self.kind, self.size, start, T, q.device)
        return attend(q, self.k[:, :, :S], self.v[:, :, :S], allowed, sinks)

    def __repr__(self) -> str:
        return f"CachedAttention({self.kind}, {self.size}, {self.length}/{self.capacity} cached)"


class KVCache:
    """`with KVCache(model, capacity) as cache: logits = cache.forward(tokens)`: each forward computes the positions
    after those of the previous ones. On exit the model has its own kernels and full position buffers back."""

    def __init__(self, model: nn.Module, capacity: int):
        names = getattr(model, "position_buffers", None)
        if names is None:
            raise ValueError(f"{type(model).__name__} has no `position_buffers`: decoding needs to know which buffers "
                             "are indexed by position (the common decoder lists freqs_cis)")
        self.model, self.capacity, self.length = model, capacity, 0
        self.full = {name: getattr(model, name) for name in names}
        for name, buffer in self.full.items():
            if buffer.shape[0] < capacity:
                raise ValueError(f"the model's {name} covers {buffer.shape[0]} positions, fewer than the {capacity} "
                                 "to decode: build it with a longer max_seq_len")
        self.replaced: list[tuple[Any, Callable]] = []
        for module in model.modules():
            op = getattr(module, "attention_op", None)
            if op is not None:
                self.replaced.append((module, op))
                module.attention_op = CachedAttention(getattr(op, "kind", "causal"), getattr(op, "size", 0), capacity)
        if not self.replaced:
            raise ValueError(f"{type(model).__name__} has no attention module with an `attention_op` to cache")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at the next T positions -> logits (B, T, V)."""
        start, T = self.length, tokens.shape[1]
        if start + T > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full ({start} cached, {T} more)")
        for name, buffer in self.full.items():
            setattr(self.model, name, buffer[start : start + T])
        logits = self.model(tokens)
        self.length += T
        return logits

    def close(self) -> None:
        for module, op in self.replaced:
            module.attention_op = op
        for name, buffer in self.full.items():
            setattr(self.model, name, buffer)
        self.replaced = []

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
