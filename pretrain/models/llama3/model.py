"""Llama 3 / 3.1 as a plain nn.Module: the common decoder as it stands (RMSNorm, grouped-query attention,
RoPE with Llama 3.1's frequency scaling, SwiGLU). Every other family is a difference from it.

No distributed code here: parallelize.py beside this file says how to shard it.
"""

from pretrain.models.common.decoder import Transformer

__all__ = ["Transformer"]
