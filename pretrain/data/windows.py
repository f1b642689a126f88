"""What every loader shares: the layout of a global batch over data-parallel ranks, and steps prepared ahead.

A step takes the next `global_batch_size` windows of the global stream (each seq_len + 1 tokens). Window k of a
step (0 <= k < global_batch_size) goes to dp rank (k // local_batch_size) % dp_degree, micro-batch
k // (local_batch_size * dp_degree). So the global batch of a step is the same for any layout, and the position
in the stream (windows handed out, over all ranks) is one number that any layout can resume from.

Steps are made by `_produce()` in a background thread (data.prefetch_steps ahead, pinned on CUDA) and handed out
by `next_step()`. The state a checkpoint saves is the one `_produce()` returned with the last step handed out:
the position of what the trainer consumed, not of what was prepared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch

from pretrain.config import DataConfig
from pretrain.data.prefetch import Prefetcher

if TYPE_CHECKING:
    from pretrain.data.tokenizer import Tokenizer

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


class EndOfData(Exception):
    """A one-pass loader (validation's) has handed out every full step of its data; the rest is fewer windows than
    one step."""


class GlobalWindowLoader(ABC):
    """The loaders (dataset.py: TokenWindowLoader, store_loader.py: TokenStoreLoader) take these arguments:
    data and tokenizer: what to read and how; this rank's share of a step of global_batch_size windows of
    seq_len + 1 tokens; pin_memory: None = when CUDA is available; one_pass: hand out each full step of the data
    once, then raise EndOfData (validation), instead of starting again."""

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Tokenizer,
        seq_len: int,
        local_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        pin_memory: bool | None = None,
        one_pass: bool = False,
    ):
        micro_step_windows = local_batch_size * dp_degree
        if seq_len <= 0 or local_batch_size <= 0 or global_batch_size % micro_step_windows or global_batch_size <= 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of local_batch_size="
                f"{local_batch_size} x dp_degree={dp_degree}, and seq_len={seq_len} positive."
            )
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_degree={dp_degree}).")
        self.data, self.tokenizer = data, tokenizer
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.accumulation_steps = global_batch_size // micro_step_windows
        self.prefetch_steps = data.prefetch_steps
        self.one_pass = one_pass  # next_step raises EndOfData at the end of the data instead of starting it again
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._prefetcher: Prefetcher | None = None  # started by the first next_step, after any load_state_dict

    # -- the layout of a step ------------------------------------------------------------------------------
    def rank_slots(self) -> np.ndarray:
        """The indices k (within a step) of this rank's windows, micro-batch after micro-batch."""
        micro = np.arange(self.accumulation_steps)[:, None]
        first = (micro * self.dp_degree + self.dp_rank) * self.local_batch_size
        return (first + np.arange(self.local_batch_size)[None, :]).reshape(-1)

    def micro_batches(self, rows: torch.Tensor) -> MicroBatches:
        """This rank's windows (accumulation_steps * local_batch_size, seq_len + 1), in rank_slots() order, as
        accumulation_steps (inputs, labels) pairs of LongTensors (local_batch_size, seq_len)."""
        out = []
        for micro in rows.view(self.accumulation_steps, self.local_batch_size, self.seq_len + 1):  # (B, T + 1)
            inputs, labels = micro[:, :-1].contiguous(), micro[:, 1:].contiguous()  # (B, T), (B, T)
            if self.pin_memory:
                inputs, labels = inputs.pin_memory(), labels.pin_memory()
            out.append((inputs, labels))
        return out

    # -- steps, prepared ahead -----------------------------------------------------------------------------
    def next_step(self) -> MicroBatches:
        """accumulation_steps micro-batches of (inputs, labels), each a LongTensor (local_batch_size, seq_len)."""
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._produce, self.prefetch_steps, name=type(self).__name__)
        micro_batches, state = self._prefetcher.take()
        self._consumed(state)
        return micro_batches

    def _stop_prefetch(self) -> None:
        """Stops the thread and drops the steps it prepared. The producer's position is then past the last step
        handed out: the caller sets it (load_state_dict)."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None

    def close(self) -> None:
        """Stops the background thread (it also ends when the loader is dropped); a later next_step() goes on
        from the last step handed out."""
        self.load_state_dict(self.state_dict())

    @abstractmethod
    def state_dict(self) -> dict:
        """JSON-serialisable, the same on every rank: the position after the last step handed out."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (saved by any rank of any layout): drops what was prepared ahead."""

    @abstractmethod
    def _produce(self) -> tuple[MicroBatches, object]:
        """The next step's micro-batches, and the state after it (runs in the background thread)."""

    @abstractmethod
    def _consumed(self, state: object) -> None:
        """The trainer took the step `_produce` returned with `state`."""
