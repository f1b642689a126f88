"""Small filesystem steps that several packages need for writes that survive a crash."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
