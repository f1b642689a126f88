"""Llama 3 / 3.1, registered as the family "llama3". Importing this package imports no torch."""

from pretrain.models.common.spec import ModelSpec

SPEC = ModelSpec(
    name="llama3",
    model="pretrain.models.llama3.model:Transformer",
    tp_plan="pretrain.models.llama3.parallelize:tp_plan_block",
    flops="pretrain.models.common.flops:decoder_flops",
    hf="pretrain.models.llama3.hf",
    features=frozenset({"rope_llama3"}),
)
