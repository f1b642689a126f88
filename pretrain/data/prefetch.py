"""Work done ahead in a background thread: the loaders' next steps, ready before the trainer asks.

`Prefetcher(produce, depth)` calls `produce()` again and again in a daemon thread and queues up to `depth`
results; `take()` hands them out in order and re-raises, in the caller's thread, what `produce` raised. The
thread holds its owner only weakly (a WeakMethod), so an owner that is dropped is collected and its thread
ends. `stop()` returns once the thread has finished its current call: the owner may then change the state
that `produce` reads. With depth 0 there is no thread: `take()` calls `produce()` itself.

At exit the threads are stopped and joined (atexit) before the interpreter tears down: a daemon thread still in
C++ code at that moment (pyarrow, sentencepiece, or torch freeing the tensors of a dropped queue) is unwound by
the finalising interpreter and aborts the process ("terminate called without an active exception", exit 134).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

_POLL_S = 0.1  # how often a blocked thread looks whether it was stopped
_JOIN_AT_EXIT_S = 120.0  # the longest a thread may take to finish its step at exit (a streaming step at dp=512: ~15 s)
# every prefetch thread not yet ended, with its stop flag (a thread is referenced by `threading` until it has ended,
# its last frame freed: the queue and the tensors it may be the last to hold included)
_stop_flags: weakref.WeakKeyDictionary[threading.Thread, threading.Event] = weakref.WeakKeyDictionary()


class Prefetcher:
    def __init__(self, produce: Callable[[], Any], depth: int, name: str = "prefetch"):
        self._depth = depth
        self._produce = produce if depth == 0 else None  # depth 0: called by take(), no thread
        self._error: BaseException | None = None
        if depth == 0:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=_run, args=(weakref.WeakMethod(produce), self._queue, self._stopped), name=name, daemon=True
        )
        _stop_flags[self._thread] = self._stopped
        self._thread.start()
        weakref.finalize(self, self._stopped.set)  # the owner was dropped: let the thread end

    def take(self) -> Any:
        """The next result of `produce()`, in order; raises what `produce` raised."""
        if self._error is not None:
            raise self._error
        if self._depth == 0:
            return self._produce()
        while True:
            try:
                ok, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if not ok:
            self._error = value
            raise value
        return value

    def stop(self) -> None:
        """Stops the thread and drops what it prepared; returns when it no longer runs `produce`."""
        if self._depth == 0:
            return
        self._stopped.set()
        self._thread.join()


@atexit.register
def _stop_all() -> None:
    threads = list(_stop_flags.items())
    for _, stopped in threads:
        stopped.set()
    for thread, _ in threads:
        thread.join(timeout=_JOIN_AT_EXIT_S)


def _run(produce_ref: weakref.WeakMethod, results: queue.Queue, stopped: threading.Event) -> None:
    while not stopped.is_set():
        produce = produce_ref()
        if produce is None:  # the owner is gone
            return
        try:
            item = (True, produce())
        except Exception as e:  # handed to the trainer's thread by take()
            item = (False, e)
        del produce  # hold the owner only while producing
        while not stopped.is_set():
            try:
                results.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if not item[0]:
            return
