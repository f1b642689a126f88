"""TokenStoreLoader: a token store (token_store.py) read by global index, each rank reading only its windows.

The store's stream is cut into `count = tokens // (seq_len + 1)` windows (the last, shorter piece is not used).
Global position p (windows handed out so far, over all ranks) is window `WindowOrder(count, data.shuffle,
data.seed).windows(p)` (shuffle.py): window w is tokens [w * (seq_len + 1), (w + 1) * (seq_len + 1)), a slice of
the memory-mapped files. A step is positions [p, p + global_batch_size); each rank computes the ids of its own
windows (windows.py's layout) and copies only those, so its cost per step does not grow with the dp degree.

With shuffling off, the windows are those TokenWindowLoader cuts from the same source and tokenizer in its first
epoch (it carries the short piece over into the next epoch; the store starts each epoch at a window boundary).
The state is the position p alone, with what it depends on (windows per epoch, shuffle, seed), checked on load.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pretrain.data.shuffle import WindowOrder
from pretrain.data.token_store import TokenStore, check_store_tokenizer
from pretrain.data.windows import EndOfData, GlobalWindowLoader, MicroBatches
from pretrain.errors import ConfigError

KIND = "token_store"  # the "loader" entry of the state: a text stream's state has none


class TokenStoreLoader(GlobalWindowLoader):
    def __init__(self, *args: Any, **kwargs: Any):  # GlobalWindowLoader's arguments
        super().__init__(*args, **kwargs)
        data, tokenizer, seq_len, global_batch_size = self.data, self.tokenizer, self.seq_len, self.global_batch_size
        self.store = TokenStore(data.path)
        check_store_tokenizer(self.store.path, self.store.manifest, tokenizer, data)
        window = seq_len + 1
        self.windows_per_epoch = self.store.tokens // window
        if self.windows_per_epoch < global_batch_size and not self.one_pass:  # one pass: EndOfData at the first step
            raise ConfigError(
                f"Token store {self.store.path} holds {self.store.tokens:,} tokens = {self.windows_per_epoch} "
                f"windows of training.seq_len + 1 = {window} tokens, fewer than one global batch of "
                f"training.global_batch_size={global_batch_size} windows. Fix: prepare more data into the store, or "
                "lower training.global_batch_size (or training.seq_len)."
            )
        self.shuffle, self.seed = data.shuffle, data.seed
        self.order = WindowOrder(self.windows_per_epoch, data.shuffle, data.seed)
        self._slots = self.rank_slots()  # this rank's windows within a step
        self._produced = 0  # position after the last step made (the background thread's)
        self.windows_consumed = 0  # position after the last step handed out: the state

    @property
    def epoch(self) -> int:
        return self.windows_consumed // self.windows_per_epoch

    def rank_windows(self, position: int) -> np.ndarray:
        """The ids of this rank's windows in the step that starts at global position `position`."""
        return self.order.windows(position + self._slots)

    def _produce(self) -> tuple[MicroBatches, int]:
        window = self.seq_len + 1
        if self.one_pass and self._produced + self.global_batch_size > self.windows_per_epoch:
            raise EndOfData
        ids = self.rank_windows(self._produced)
        rows = np.stack([self.store.read(int(w) * window, window) for w in ids])  # (accumulation_steps * B, T + 1)
        self._produced += self.global_batch_size
        return self.micro_batches(torch.from_numpy(rows.astype(np.int64))), self._produced

    def _consumed(self, position: int) -> None:
        self.windows_consumed = position

    def state_dict(self) -> dict:
        """JSON-serialisable, the same on every rank: the global position after the last step handed out."""
        return {
            "loader": KIND,
            "windows_consumed": self.windows_consumed,
            "epoch": self.epoch,  # for people reading train_state.json; derived from windows_consumed
            "windows_per_epoch": self.windows_per_epoch,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`, saved by any rank of any layout reading the same store with the same seq_len."""
        if state.get("loader") != KIND:
            raise ConfigError(
                f"The checkpoint's data position is a text stream's, and this run reads token store {self.store.path}: "
                "a stream position does not translate into store windows. Fix: resume with the data options it was "
                "saved with, or add dataloader to checkpoint.exclude_from_loading to start the data anew."
            )
        saved = {k: state[k] for k in ("windows_per_epoch", "shuffle", "seed")}
        now = {"windows_per_epoch": self.windows_per_epoch, "shuffle": self.shuffle, "seed": self.seed}
        if saved != now:
            changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved[k] != now[k])
            raise ConfigError(
                f"The checkpoint's data position was saved with another window order ({changed}; windows_per_epoch "
                f"follows the store {self.store.path} and training.seq_len): its position would point at other "
                "windows. Fix: resume with the data.shuffle, data.seed, store and training.seq_len it was saved "
                "with, or add dataloader to checkpoint.exclude_from_loading to start the data anew."
            )
        self._stop_prefetch()
        self.windows_consumed = self._produced = int(state["windows_consumed"])
