"""The order in which a token store's windows are visited: epoch after epoch, each a permutation of the windows.

Position p of the global stream (p = windows handed out so far, over all ranks) is window `order(p)`: epoch
p // count, index p % count within it. With shuffling, the index goes through a permutation drawn from
(data.seed, epoch), so every rank, under every layout, computes the same window for the same position from
nothing but p: there is no state to share and nothing to save beyond p itself.

The permutation is a Feistel network on the smallest even number of bits that covers `count`, with "cycle
walking" (an output >= count is encrypted again until it falls below count): a bijection of [0, count) that
costs O(1) memory and a few integer operations per window, where a stored permutation of 10^8 windows would
take 800 MB on every rank.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # Feistel rounds; 4 already mix well, 6 leave no visible structure between nearby positions
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wraps modulo 2^64, as it should)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class WindowOrder:
    """Maps global positions to window ids: identity within each epoch, or a fresh permutation per epoch."""

    def __init__(self, count: int, shuffle: bool, seed: int):
        if count <= 0:
            raise ValueError(f"count={count} must be positive")
        self.count, self.shuffle, self.seed = count, shuffle, seed
        bits = max(2, int(count - 1).bit_length())
        self._half = np.uint64((bits + 1) // 2)  # both halves get the same width: a balanced Feistel network
        self._mask = np.uint64((1 << int(self._half)) - 1)

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """The window id (0 <= id < count) at each global position, as int64."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, indices = np.divmod(positions, self.count)
        if not self.shuffle:
            return indices
        out = np.empty_like(indices)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.permute(indices[here], int(epoch))
        return out

    def permute(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of [0, count), applied to `indices`."""
        keys = np.random.SeedSequence([self.seed, epoch]).generate_state(ROUNDS, dtype=np.uint64)
        values = np.asarray(indices, dtype=np.uint64)
        values = self._encrypt(values, keys)
        outside = values >= self.count
        while outside.any():  # cycle walking: at most a few rounds, the domain is < 4 x count
            values[outside] = self._encrypt(values[outside], keys)
            outside = values >= self.count
        return values.astype(np.int64)

    def _encrypt(self, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        left, right = values >> self._half, values & self._mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << self._half) | right
