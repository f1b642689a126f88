"""Training data: the documents of a source (sources.py), packed by `TokenWindowLoader` into windows of tokens,
or read back from a token store made once by `python -m pretrain.data.prepare` (store_loader.py).

The token stream is global: every document becomes [BOS] + tokens + [EOS], documents are concatenated in
dataset order, and the stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs = window[:-1],
labels = window[1:], as torchtitan does). Each optimizer step takes the next `global_batch_size` windows and
hands each data-parallel rank its share (windows.py), so the global batch of a step is the same for any layout,
and a checkpoint saved with one layout resumes exactly with another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pretrain.config import DataConfig
from pretrain.data.sources import iter_texts, open_text_stream
from pretrain.data.store_loader import TokenStoreLoader
from pretrain.data.windows import EndOfData, GlobalWindowLoader, MicroBatches
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    pass


def build_loader(data: DataConfig, *args: Any, **kwargs: Any) -> TokenWindowLoader | TokenStoreLoader:
    """The loader of `data`: a token store (data.format=tokenized) read by index, or text tokenized as it streams.
    The arguments are GlobalWindowLoader's (windows.py)."""
    loader = TokenStoreLoader if data.format == "tokenized" else TokenWindowLoader
    return loader(data, *args, **kwargs)


class TokenWindowLoader(GlobalWindowLoader):
    """Hands out, step after step, this data-parallel rank's micro-batches of the global token stream, read from
    text and tokenized as it goes, in a background thread (data.prefetch_steps ahead of the trainer).

    Trade-off: every rank reads and tokenizes the whole stream and keeps only its windows. Tokenizing costs
    dp_degree times the CPU it strictly needs (a token store avoids it), but the position in the stream is one
    global number, so any layout sees the same global batch and the state saved by one layout resumes
    token-exactly under another.
    When the dataset runs out it starts again (epoch += 1; datasets reorders multi-file sources by epoch).
    """

    def __init__(self, *args: Any, **kwargs: Any):  # GlobalWindowLoader's arguments
        super().__init__(*args, **kwargs)
        data, tokenizer = self.data, self.tokenizer
        self._bos = [tokenizer.bos_id] if data.bos else []
        self._eos = [tokenizer.eos_id] if data.eos else []
        self._dataset = open_text_stream(data)
        # The producer's position (read and written by the background thread only, while it runs):
        self._documents = None  # iterator over self._dataset; None = (re)start it at the next read
        self._dataset_state_at_start = None  # state the next iterator starts from (None = start of the epoch)
        self._epoch = 0
        self._windows = 0  # windows of the global stream cut so far (all ranks)
        self._buffer: list[int] = []  # tokens read but not yet in a window; starts at a window boundary
        self._state = self._producer_state()  # the position of the last step handed out

    @property
    def epoch(self) -> int:
        """Passes over the dataset finished before the last step handed out."""
        return self._state["epoch"]

    @property
    def windows_consumed(self) -> int:
        """Windows of the global stream handed out so far (all ranks)."""
        return self._state["windows_consumed"]

    def _produce(self) -> tuple[MicroBatches, dict]:
        window = self.seq_len + 1
        step_tokens = self._take(self.global_batch_size * window)
        self._windows += self.global_batch_size
        rank_block = self.local_batch_size * window  # this rank's contiguous tokens in one micro-step
        rows = []
        for micro in range(self.accumulation_steps):
            start = (micro * self.dp_degree + self.dp_rank) * rank_block
            rows += step_tokens[start : start + rank_block]
        rows = torch.tensor(rows, dtype=torch.long).view(-1, window)  # (accumulation_steps * B, T + 1)
        return self.micro_batches(rows), self._producer_state()

    def _consumed(self, state: dict) -> None:
        self._state = state

    def _take(self, count: int) -> list[int]:
        """The next `count` tokens of the global stream."""
        while len(self._buffer) < count:
            self._buffer += self._next_document_tokens()
        taken = self._buffer[:count]
        del self._buffer[:count]
        return taken

    def _next_document_tokens(self) -> list[int]:
        field = self.data.text_field
        for _ in range(3):  # the rest of a resumed epoch may be empty; a whole empty epoch means no data
            if self._documents is None:
                resumed = self._dataset_state_at_start is not None
                if resumed:
                    self._dataset.load_state_dict(self._dataset_state_at_start)
                # bad input (unreadable file, text that is not a string, no such column) raises ConfigError
                self._documents = iter_texts(self._dataset, self.data, from_start=not resumed)
            for text in self._documents:
                if text:  # empty or missing documents are skipped, not packed as a lone [BOS, EOS]
                    return self._bos + self.tokenizer.encode(text) + self._eos
            if self.one_pass:
                raise EndOfData
            self._epoch += 1
            self._dataset.set_epoch(self._epoch)  # datasets ignores a starting state saved in another epoch
            self._documents, self._dataset_state_at_start = None, None
        raise ConfigError(
            f"data.path={self.data.path!r} has no document with text in data.text_field={field!r}. "
            "Fix: set data.text_field to the column that holds the text."
        )

    def _producer_state(self) -> dict:
        if self._documents is not None:  # HF's state is "after the last document it yielded", which we consumed
            dataset_state = self._dataset.state_dict()
        else:
            dataset_state = self._dataset_state_at_start
        return {
            "epoch": self._epoch,
            "dataset": dataset_state,  # datasets.IterableDataset.state_dict(), or None at the start of the epoch
            "buffer": list(self._buffer),  # tokens read past the last window handed out
            "windows_consumed": self._windows,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable: the position of the global stream after the last step handed out (the same on every
        rank); steps prepared ahead are not in it."""
        return {**self._state, "buffer": list(self._state["buffer"])}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`, saved by any rank of any data-parallel layout with the same data and tokenizer."""
        if "dataset" not in state or "buffer" not in state:
            raise ConfigError(
                f"The checkpoint's data position is not a text stream's (keys {sorted(state)}): it was saved by a run "
                f"reading a token store, and this run streams data.path={self.data.path!r}. Fix: resume with the "
                "data options it was saved with, or add dataloader to checkpoint.exclude_from_loading to start the "
                "data anew."
            )
        self._stop_prefetch()
        if self._documents is not None:  # an iteration is under way: start from a fresh stream
            self._dataset = open_text_stream(self.data)
        self._epoch = state["epoch"]
        self._windows = state["windows_consumed"]
        self._buffer = list(state["buffer"])
        self._dataset.set_epoch(self._epoch)
        self._documents, self._dataset_state_at_start = None, state["dataset"]
        self._state = self._producer_state()
