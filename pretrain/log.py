"""Logging: rank 0 talks, the other ranks only warn. Every side effect goes through `on_rank0`."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("pretrain")


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return global_rank() == 0


def init_logging() -> None:
    """Console logging: INFO on rank 0, WARNING (with the rank) elsewhere."""
    rank = global_rank()
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank{rank}] "
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
