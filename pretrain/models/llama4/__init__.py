"""Llama 4's text decoder (Scout 17B-16E, Maverick 17B-128E), registered as the family "llama4". Importing this
package imports no torch."""

from pretrain.models.common.spec import ModelSpec

SPEC = ModelSpec(
    name="llama4",
    model="pretrain.models.llama4.model:Transformer",
    tp_plan="pretrain.models.llama4.parallelize:tp_plan_block",
    # MoE layers count their routed top-1 expert and the shared one; chunked layers count their chunk's keys
    flops="pretrain.models.common.flops:decoder_flops",
    hf="pretrain.models.llama4.hf",
    features=frozenset({"rope_llama3", "moe", "chunked_attention", "nope_layers", "attn_temperature_tuning",
                        "qk_l2_norm"}),
)
