"""Qwen3 dense (0.6B to 32B) and Qwen3-MoE (30B-A3B, 235B-A22B), registered as the family "qwen3".
Importing this package imports no torch."""

from pretrain.models.common.spec import ModelSpec

SPEC = ModelSpec(
    name="qwen3",
    model="pretrain.models.qwen3.model:Transformer",
    tp_plan="pretrain.models.qwen3.parallelize:tp_plan_block",
    # MoE layers count their top-k routed experts only; heads are head_dim wide, not dim / n_heads
    flops="pretrain.models.common.flops:decoder_flops",
    hf="pretrain.models.qwen3.hf",
    features=frozenset({"qk_norm", "moe"}),
)
