"""Qwen3 dense (0.6B to 32B) and Qwen3-MoE (30B-A3B, 235B-A22B): model, parallelism plan, FLOPs and HF
adapter, registered as the family "qwen3"."""

from pretrain.models.spec import ModelSpec


def build_spec() -> ModelSpec:
    from pretrain.model_config import head_dim
    from pretrain.models.qwen3 import hf
    from pretrain.models.qwen3.model import Transformer
    from pretrain.models.qwen3.parallelize import parallelize_qwen3
    from pretrain.models.spec import decoder_flops

    return ModelSpec(
        name="qwen3",
        build_model=Transformer,
        parallelize=parallelize_qwen3,
        # MoE layers count their top-k routed experts only; heads are head_dim wide, not dim / n_heads
        params_and_flops=lambda model, cfg, seq_len: decoder_flops(
            model, model.tok_embeddings, cfg, seq_len, qk_head_dim=head_dim(cfg), v_head_dim=head_dim(cfg)
        ),
        hf_adapter=hf,
    )
