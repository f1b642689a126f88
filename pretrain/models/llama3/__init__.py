"""Llama 3 / 3.1: model, parallelism plan, FLOPs and HF adapter, registered as the family "llama3"."""

from pretrain.models.spec import ModelSpec


def build_spec() -> ModelSpec:
    from pretrain.models.llama3 import hf
    from pretrain.models.llama3.model import Transformer
    from pretrain.models.llama3.parallelize import parallelize_llama
    from pretrain.models.spec import dense_transformer_flops

    return ModelSpec(
        name="llama3",
        build_model=Transformer,
        parallelize=parallelize_llama,
        params_and_flops=lambda model, cfg, seq_len: dense_transformer_flops(model, model.tok_embeddings, cfg, seq_len),
        hf_adapter=hf,
    )
