"""DeepSeek-V3 (multi-head latent attention + Mixture-of-Experts; also the DeepSeek-V2 shapes): model,
parallelism plan, FLOPs and HF adapter, registered as the family "deepseek_v3"."""

from pretrain.models.spec import ModelSpec


def build_spec() -> ModelSpec:
    from pretrain.models.deepseek_v3 import hf
    from pretrain.models.deepseek_v3.model import Transformer
    from pretrain.models.deepseek_v3.parallelize import parallelize_deepseek_v3
    from pretrain.models.spec import decoder_flops

    def params_and_flops(model, cfg, seq_len):
        # MoE layers count their top-k routed experts only; attention scores use N + R wide q/k, values V
        a = cfg.mla
        return decoder_flops(model, model.tok_embeddings, cfg, seq_len,
                             qk_head_dim=a.qk_nope_head_dim + a.qk_rope_head_dim, v_head_dim=a.v_head_dim)

    return ModelSpec(
        name="deepseek_v3",
        build_model=Transformer,
        parallelize=parallelize_deepseek_v3,
        params_and_flops=params_and_flops,
        hf_adapter=hf,
    )
