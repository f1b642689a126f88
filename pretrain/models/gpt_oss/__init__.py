"""GPT-OSS (OpenAI's open-weight Mixture-of-Experts models, 20B and 120B), registered as the family "gpt_oss".
Importing this package imports no torch."""

from pretrain.models.common.spec import ModelSpec

SPEC = ModelSpec(
    name="gpt_oss",
    model="pretrain.models.gpt_oss.model:Transformer",
    tp_plan="pretrain.models.gpt_oss.parallelize:tp_plan_block",
    flops="pretrain.models.common.flops:decoder_flops",
    hf="pretrain.models.gpt_oss.hf",
    features=frozenset({"moe", "rope_yarn", "sliding_attention"}),
    required={"moe": "model.moe.n_routed_experts > 0 (every GPT-OSS block is a MoE layer)"},
)
