"""Llama 3's tensor-parallel plan: attention heads and the SwiGLU hidden units split over the TP ranks.
pretrain/distributed/parallelize.py applies it, with the rest of the layout."""

from pretrain.models.common.tp_plan import tp_plan_block

__all__ = ["tp_plan_block"]
