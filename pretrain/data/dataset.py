"""Training data: the documents of a source (sources.py), packed by `TokenWindowLoader` into windows of tokens.

The token stream is global: every document becomes [BOS] + tokens + [EOS], documents are concatenated in
dataset order, and the stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs = window[:-1],
labels = window[1:], as torchtitan does). Each optimizer step takes the next `global_batch_size` windows and
hands each data-parallel rank its share, so the global batch of a step is the same for any layout, and a
checkpoint saved with one layout resumes exactly with another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.config import DataConfig
from pretrain.data.sources import iter_texts, open_text_stream
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.data.tokenizer import Tokenizer

class TokenWindowLoader:
    """Hands out, step after step, this data-parallel rank's micro-batches of the global token stream.

    Window k of a step (0 <= k < global_batch_size) goes to dp rank (k // local_batch_size) % dp_degree,
    micro-batch k // (local_batch_size * dp_degree). Trade-off: every rank reads and tokenizes the whole
    stream and keeps only its windows. Tokenizing costs dp_degree times the CPU it strictly needs, but the
    position in the stream is one global number, so any layout sees the same global batch and the state
    saved by one layout resumes token-exactly under another.
    When the dataset runs out it starts again (epoch += 1; datasets reorders multi-file sources by epoch).
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Tokenizer,
        seq_len: int,
        local_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
    ):
        micro_step_windows = local_batch_size * dp_degree
        if seq_len <= 0 or local_batch_size <= 0 or global_batch_size % micro_step_windows or global_batch_size <= 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of local_batch_size="
                f"{local_batch_size} x dp_degree={dp_degree}, and seq_len={seq_len} positive."
            )
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_degree={dp_degree}).")
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.accumulation_steps = global_batch_size // micro_step_windows
        self._data = data
        self._tokenizer = tokenizer
        self._bos = [tokenizer.bos_id] if data.bos else []
        self._eos = [tokenizer.eos_id] if data.eos else []
        self._dataset = open_text_stream(data)
        self._documents = None  # iterator over self._dataset; None = (re)start it at the next read
        self._dataset_state_at_start = None  # state the next iterator starts from (None = start of the epoch)
        self.epoch = 0
        self.windows_consumed = 0  # windows of the global stream handed out so far (all ranks)
        self._buffer: list[int] = []  # tokens read but not yet in a window; starts at a window boundary

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """accumulation_steps micro-batches of (inputs, labels), each a LongTensor (local_batch_size, seq_len)."""
        window = self.seq_len + 1
        step_tokens = self._take(self.global_batch_size * window)
        self.windows_consumed += self.global_batch_size
        rank_block = self.local_batch_size * window  # this rank's contiguous tokens in one micro-step
        micro_batches = []
        for micro in range(self.accumulation_steps):
            start = (micro * self.dp_degree + self.dp_rank) * rank_block
            rows = torch.tensor(step_tokens[start : start + rank_block], dtype=torch.long)
            rows = rows.view(self.local_batch_size, window)  # (B, T + 1)
            micro_batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))  # (B, T), (B, T)
        return micro_batches

    def _take(self, count: int) -> list[int]:
        """The next `count` tokens of the global stream."""
        while len(self._buffer) < count:
            self._buffer += self._next_document_tokens()
        taken = self._buffer[:count]
        del self._buffer[:count]
        return taken

    def _next_document_tokens(self) -> list[int]:
        field = self._data.text_field
        for _ in range(3):  # the rest of a resumed epoch may be empty; a whole empty epoch means no data
            if self._documents is None:
                resumed = self._dataset_state_at_start is not None
                if resumed:
                    self._dataset.load_state_dict(self._dataset_state_at_start)
                # bad input (unreadable file, text that is not a string, no such column) raises ConfigError
                self._documents = iter_texts(self._dataset, self._data, from_start=not resumed)
            for text in self._documents:
                if text:  # empty or missing documents are skipped, not packed as a lone [BOS, EOS]
                    return self._bos + self._tokenizer.encode(text) + self._eos
            self.epoch += 1
            self._dataset.set_epoch(self.epoch)  # datasets ignores a starting state saved in another epoch
            self._documents, self._dataset_state_at_start = None, None
        raise ConfigError(
            f"data.path={self._data.path!r} has no document with text in data.text_field={field!r}. "
            "Fix: set data.text_field to the column that holds the text."
        )

    def state_dict(self) -> dict:
        """JSON-serialisable: the position of the global stream (the same on every rank)."""
        if self._documents is not None:  # HF's state is "after the last document it yielded", which we consumed
            dataset_state = self._dataset.state_dict()
        else:
            dataset_state = self._dataset_state_at_start
        return {
            "epoch": self.epoch,
            "dataset": dataset_state,  # datasets.IterableDataset.state_dict(), or None at the start of the epoch
            "buffer": list(self._buffer),  # tokens read past the last window handed out
            "windows_consumed": self.windows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`, saved by any rank of any data-parallel layout with the same data and tokenizer."""
        if self._documents is not None:  # an iteration is under way: start from a fresh stream
            self._dataset = open_text_stream(self._data)
        self.epoch = state["epoch"]
        self.windows_consumed = state["windows_consumed"]
        self._buffer = list(state["buffer"])
        self._dataset.set_epoch(self.epoch)
        self._documents, self._dataset_state_at_start = None, state["dataset"]
