"""The code a queued job runs: a copy of the `pretrain` package taken at submission.

A job can wait in the queue for hours and is requeued after preemption; it must run the code that
was submitted, not whatever the checkout holds by then. `take_snapshot()` copies the package next to
the job's logs. `SnapshotEntry` is the function submitit pickles: this class is pickled by value
(`pickled_by_value()`), so loading it imports nothing, and each task's payload is opaque bytes.
In the task it puts the snapshot first on sys.path, and only then unpickles and runs the payload,
so every `pretrain` module the task imports comes from the snapshot.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from typing import Any


def take_snapshot(dest_dir: str) -> str:
    """Copy the `pretrain` package into `dest_dir`; returns the directory to put on sys.path."""
    # lazy: this module is pickled by value; names are imported where it runs
    import pretrain

    source = os.path.dirname(os.path.abspath(pretrain.__file__))
    shutil.copytree(source, os.path.join(dest_dir, "pretrain"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest_dir


class SnapshotEntry:
    """Runs a pickled callable with `code_dir` first on sys.path; submitit requeues it as it is."""

    def __init__(self, code_dir: str):
        self.code_dir = code_dir

    def __call__(self, payload: bytes) -> Any:
        if sys.path[:1] != [self.code_dir]:
            sys.path.insert(0, self.code_dir)
        for name in [m for m in sys.modules if m == "pretrain" or m.startswith("pretrain.")]:
            del sys.modules[name]  # nothing of the checkout may stay imported
        task = pickle.loads(payload)
        return task()

    def checkpoint(self, payload: bytes) -> Any:
        """submitit calls this on preemption or timeout: requeue the same call (the run resumes from its checkpoint)."""
        # lazy: this module is pickled by value; names are imported where it runs
        import submitit

        return submitit.helpers.DelayedSubmission(self, payload)


@contextlib.contextmanager
def pickled_by_value() -> Iterator[None]:
    """While open, cloudpickle (submitit's pickler) embeds this module's classes instead of importing them."""
    # lazy: this module is pickled by value; names are imported where it runs
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)
