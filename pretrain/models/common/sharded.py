"""Model code that reads a weight directly (not through an nn.Linear) gets the rank's own part of it when
parallelism has sharded it: a DTensor's local block. Duck-typed, so model files import no distributed code."""

from __future__ import annotations

import torch


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The rank's own block of a tensor that parallelism has sharded (a DTensor: experts under EP, hidden units
    under TP, heads' sinks under TP), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
