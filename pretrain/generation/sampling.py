"""Token by token: one forward over the prompt fills the KV cache, then one forward per new token.

The next token is the argmax of the last logits (temperature 0, greedy), or drawn from
softmax(logits / temperature), restricted to the top_k most likely tokens when top_k > 0, with a seeded
generator: the same seed gives the same tokens on the same device.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.generation.kv_cache import KVCache


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """The next token id from the logits (V,) of the last position."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The tokens after `prompt` (ids, not empty), at most max_new_tokens, ending early after one of `stop_ids`."""
    if not prompt:
        raise ValueError("the prompt has no tokens: decoding needs at least one")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[int] = []
    model.eval()
    with KVCache(model, len(prompt) + max_new_tokens) as cache:
        logits = cache.forward(torch.tensor([prompt], device=device))  # prefill: (1, len(prompt), V)
        while len(new) < max_new_tokens:
            token = next_token(logits[0, -1], temperature, top_k, generator)
            new.append(token)
            if token in stop_ids or len(new) == max_new_tokens:
                break
            logits = cache.forward(torch.tensor([[token]], device=device))
    return new
