"""DeepSeek-V3 (multi-head latent attention + Mixture-of-Experts; also the DeepSeek-V2 shapes), registered
as the family "deepseek_v3". Importing this package imports no torch."""

from pretrain.models.common.spec import ModelSpec

SPEC = ModelSpec(
    name="deepseek_v3",
    model="pretrain.models.deepseek_v3.model:Transformer",
    tp_plan="pretrain.models.deepseek_v3.parallelize:tp_plan_block",
    flops="pretrain.models.deepseek_v3.model:params_and_flops",
    hf="pretrain.models.deepseek_v3.hf",
    features=frozenset({"moe", "mla", "rope_yarn"}),
    required={"mla": "model.mla.kv_lora_rank > 0 (multi-head latent attention)"},
)
