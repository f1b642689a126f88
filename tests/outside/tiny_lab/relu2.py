"""The family `tiny_lab.relu2`: the common decoder with a squared-ReLU MLP in place of SwiGLU. It is used as
model.name=tiny_lab.relu2 once the folder above tiny_lab is importable (installed, or on PYTHONPATH). Like a
built-in family's __init__.py it imports no torch: the parts are named, and imported when a run builds them."""

from pretrain.models import ModelSpec

SPEC = ModelSpec(
    name="tiny_lab.relu2",
    model="tiny_lab.relu2_model:Relu2Transformer",
    tp_plan="tiny_lab.relu2_model:tp_plan_block",
    flops="pretrain.models.common.flops:decoder_flops",  # 6 x params + attention: true of any such decoder
    features=frozenset({"rope_llama3"}),  # Llama 3.1's RoPE scaling, which the common decoder applies
)
