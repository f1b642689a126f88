"""Llama 4's tensor-parallel plan: Llama's. Attention heads (wq, wk, wv column-parallel, wo row-parallel) and a
dense block's SwiGLU hidden units split over the TP ranks; a MoE block keeps only its sequence-parallel norm here
(pretrain/distributed/parallelize.py shards the routed and shared experts, as for every MoE family).

Nothing of Llama 4's own needs a plan: the L2 q/k norm has no weight and works on each rank's own heads, the
NoPE layers' query temperature is a per-position table every rank holds in full (the attention input is the
whole sequence, all-gathered by the sequence-parallel plan), and the chunked mask depends on positions only.
"""

from pretrain.models.common.tp_plan import tp_plan_block

__all__ = ["tp_plan_block"]
