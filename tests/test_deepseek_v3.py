"""DeepSeek-V3 (MLA + MoE): logits against transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM both
ways, the HF adapter's names and refusals, the published sizes and their FLOPs, a 671B dry run at 256 ranks,
tensor-parallel gradients on 2 processes, and FSDP on 2 processes against one through launch.py.

Tolerances (fp32 on CPU). Logits: our model and transformers' compute the same function in another
order (complex RoPE products vs cos/sin on even/odd slices, the YaRN temperature folded into q vs passed
to the kernel, experts looped vs sorted). Each op differs by a few ulps; through four blocks the logits
stay within ~1e-6 of their largest magnitude, and we allow 1e-5 of it, as tests/test_hf.py does.
Measured (torch 2.13 CPU, transformers 5.24): 2.6e-7 for each variant, export and import. Zeroing one
layer's expert bias in transformers' model moves them by 4e-3, dropping the YaRN section of config.json
by 1.5e-2 (checked below: more than 100 x the tolerance), so the tolerance sees routing and RoPE errors.
TP gradients: every parameter's full gradient within 1e-5 of its largest entry (relative) of the one
process gradient; measured 9e-7. Dropping the sum of the shared rope key's gradient over tp (see
parallelize.py) leaves wkv_a's gradient 6e-2 off. The gradients are compared rather than the losses
because Adam's update does not see a gradient that is off by a constant factor.
FSDP losses: as tests/test_parallel_parity.py, 1e-5 relative over 3 steps (measured 1e-7).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from helpers import (
    LOGIT_TOL,
    LOSS_RTOL,
    assert_logits_close,
    compose,
    logits,
    losses,
    relative_error,
    run_launch,
    run_on_ranks,
)

transformers = pytest.importorskip("transformers")

from pretrain.checkpoint import hf_io  # noqa: E402
from pretrain.config import ModelConfig, resolve  # noqa: E402
from pretrain.models import get_model_spec  # noqa: E402
from pretrain.models.deepseek_v3 import hf as ds_hf  # noqa: E402
from pretrain.models.deepseek_v3.model import precompute_freqs_cis, softmax_scale_factor  # noqa: E402

GRAD_TOL = 1e-5
SEQ = 64
SPEC = get_model_spec("deepseek_v3")


def flavor(name: str = "debug") -> ModelConfig:
    return resolve(compose([f"model=deepseek_v3_{name}"])).model


def variant(cfg: ModelConfig, **changes) -> ModelConfig:
    """cfg with top-level keys and moe.* / mla.* keys replaced."""
    moe = {k[4:]: v for k, v in changes.items() if k.startswith("moe_")}
    mla = {k[4:]: v for k, v in changes.items() if k.startswith("mla_")}
    top = {k: v for k, v in changes.items() if not k.startswith(("moe_", "mla_"))}
    moe, mla = dataclasses.replace(cfg.moe, **moe), dataclasses.replace(cfg.mla, **mla)
    return dataclasses.replace(cfg, **top, moe=moe, mla=mla)


DEBUG = flavor()
VARIANTS = {
    # the shipped debug flavor: q compression, YaRN, sigmoid routing in 2 groups, V3's scale
    "debug": DEBUG,
    # queries projected directly, plain RoPE
    "q0_plain_rope": variant(DEBUG, rope_scaling=False, mla_q_lora_rank=0),
    # DeepSeek-V2-Lite's routing (softmax, no renormalisation, no groups) and YaRN temperature: DeepseekV2ForCausalLM
    "softmax_v2": variant(DEBUG, rope_yarn_mscale=0.707, mla_q_lora_rank=0, moe_score_func="softmax",
                          moe_route_norm=False, moe_route_scale=1.0, moe_n_expert_groups=1, moe_n_limited_groups=1,
                          moe_bias_update_speed=0.0),
}


def our_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    with torch.no_grad():
        for block in model.layers.values():
            attention = block.attention
            # sharper attention than at init (q.k x 100 on the rope part), so that the rotations matter
            (attention.wq_b if attention.q_lora_rank else attention.wq).weight.mul_(10)
            attention.wkv_a.weight.mul_(10)
            if block.moe is not None and not ds_hf.is_v2(cfg):  # a bias that changes which experts are chosen
                block.moe.expert_bias.copy_(torch.randn(cfg.moe.n_routed_experts) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, DEBUG.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- model
def test_forward_is_causal_and_yarn_sets_frequencies_and_temperature(tokens):
    model = our_model(DEBUG)
    out = logits(model, tokens)
    assert out.shape == (2, SEQ, DEBUG.vocab_size)
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % DEBUG.vocab_size
    assert torch.equal(logits(model, changed)[:, :40], out[:, :40])
    # YaRN: the fastest pair keeps its frequency, the slowest is divided by the factor (40); temperature
    # (0.1 ln 40 + 1)^2 = 1.874 on the softmax
    plain = precompute_freqs_cis(variant(DEBUG, rope_scaling=False), 2)[1].angle().tolist()
    yarn = precompute_freqs_cis(DEBUG, 2)[1].angle().tolist()
    assert len(yarn) == DEBUG.mla.qk_rope_head_dim // 2
    assert yarn[0] == pytest.approx(plain[0]) and yarn[-1] == pytest.approx(plain[-1] / 40, rel=1e-5)
    assert softmax_scale_factor(DEBUG) == pytest.approx((0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    assert softmax_scale_factor(variant(DEBUG, rope_scaling=False)) == 1.0


def test_dense_and_moe_blocks_and_llama_names():
    model = SPEC.build_model(DEBUG, SEQ)
    first, later = model.layers["0"], model.layers["1"]
    assert first.moe is None and first.feed_forward.w1.out_features == DEBUG.ffn_hidden_dim
    assert later.feed_forward is None and later.moe.experts.w1.shape == (8, 128, 256)
    assert later.moe.shared_experts.w1.shape == (1, 128, 256)  # one shared expert of n_shared x hidden
    names = set(dict(model.named_parameters()))
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention.wo.weight",
            "layers.0.attention.wq_a.weight", "layers.0.attention.q_norm.weight", "layers.0.attention.wkv_b.weight",
            "layers.1.moe.router.gate.weight"} <= names
    assert "layers.1.moe.expert_bias" in model.state_dict()
    assert "layers.0.attention.wq.weight" not in names
    assert "layers.0.attention.wq.weight" in dict(SPEC.build_model(VARIANTS["q0_plain_rope"], SEQ).named_parameters())


# ----------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("name", VARIANTS)
def test_export_loads_in_transformers_with_equal_logits(name, tmp_path, tokens):
    cfg = VARIANTS[name]
    model = our_model(cfg)
    config = hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, cfg, dtype="float32")
    assert config["model_type"] == ("deepseek_v2" if name == "softmax_v2" else "deepseek_v3")
    index = json.loads((tmp_path / hf_io.INDEX).read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]  # the hub's per-expert layout
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(hf).__name__ == config["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    assert_logits_close(logits(model, tokens), logits(hf, tokens))
    assert ds_hf.config_mismatches(hf_io.read_config(str(tmp_path)), cfg) == []
    if name != "debug":
        return
    # the comparison sees the expert bias and YaRN: without either, the logits move well beyond the tolerance
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    saved = bias.clone()
    bias.zero_()
    assert relative_error(logits(model, tokens), logits(hf, tokens)) > 100 * LOGIT_TOL
    bias.copy_(saved)
    config.pop("rope_scaling")
    (tmp_path / "config.json").write_text(json.dumps(config))
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert relative_error(logits(model, tokens), logits(unscaled, tokens)) > 100 * LOGIT_TOL


def hf_checkpoint(cfg: ModelConfig, folder) -> transformers.PreTrainedModel:
    """A random transformers model of cfg's shape (non-zero expert biases), saved by transformers itself."""
    config = {**ds_hf.hf_config(cfg, "float32"), "initializer_range": 0.1}
    config.pop("architectures")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config), dtype=torch.float32)
    with torch.no_grad():
        for layer in hf.model.layers[cfg.moe.n_dense_layers:]:
            if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.moe.n_routed_experts) * 0.1)
    hf.save_pretrained(str(folder))
    return hf.eval()


def test_import_from_transformers_gives_equal_logits(tmp_path, tokens):
    hf = hf_checkpoint(DEBUG, tmp_path)
    assert ds_hf.config_mismatches(hf_io.read_config(str(tmp_path)), DEBUG) == []
    model = our_model(DEBUG, seed=1)  # other weights until loaded
    needed = ds_hf.hf_keys_needed(model.state_dict(), DEBUG)
    wanted = {name for names in needed.values() for name in ([names] if isinstance(names, str) else names)}
    model.load_state_dict(ds_hf.from_hf(hf_io.read_hf(str(tmp_path), wanted), DEBUG, keys=list(needed)))
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


def test_initial_load_from_transformers_through_hf_io(tmp_path, tokens):
    hf = hf_checkpoint(DEBUG, tmp_path)
    model = our_model(DEBUG, seed=1)
    hf_io.load_hf_into([model], str(tmp_path), SPEC, DEBUG)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


def test_adapter_round_trip_names_and_refusals():
    cfg = DEBUG
    sd = our_model(cfg).state_dict()
    hf_sd = ds_hf.to_hf(sd, cfg)
    assert hf_sd["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (128, 256)
    assert torch.equal(hf_sd["model.layers.2.mlp.experts.5.up_proj.weight"], sd["layers.2.moe.experts.w3"][5])
    assert torch.equal(hf_sd["model.layers.3.mlp.gate.e_score_correction_bias"], sd["layers.3.moe.expert_bias"])
    back = ds_hf.from_hf(hf_sd, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # a pipeline stage asks for its own keys only; a stacked expert tensor reads the per-expert list
    needed = ds_hf.hf_keys_needed(["layers.3.moe.experts.w2", "layers.0.attention.kv_norm.weight"], cfg)
    assert needed["layers.0.attention.kv_norm.weight"] == "model.layers.0.self_attn.kv_a_layernorm.weight"
    assert needed["layers.3.moe.experts.w2"] == [f"model.layers.3.mlp.experts.{e}.down_proj.weight" for e in range(8)]
    # the hub's multi-token-prediction layer (num_hidden_layers and after) is skipped on import
    mtp = {**hf_sd, "model.layers.4.eh_proj.weight": torch.zeros(2, 2),
           "model.layers.4.self_attn.o_proj.weight": torch.zeros(2)}
    assert ds_hf.from_hf(mtp, cfg).keys() == sd.keys()
    # float8 weights and their block scales are refused with the way out
    fp8 = {**hf_sd, "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(2, 2)}
    with pytest.raises(ValueError, match=r"float8.*fp8_cast_bf16"):
        ds_hf.from_hf(fp8, cfg)
    fp8 = {"model.norm.weight": torch.ones(4, dtype=torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match=r"float8"):
        ds_hf.from_hf(fp8, cfg, keys=["norm.weight"])
    # softmax routing exports to DeepseekV2, which has no expert bias: zero on import, non-zero refused
    v2 = VARIANTS["softmax_v2"]
    v2_sd = our_model(v2).state_dict()
    assert not any("e_score_correction_bias" in k for k in ds_hf.to_hf(v2_sd, v2))
    assert torch.equal(ds_hf.from_hf(ds_hf.to_hf(v2_sd, v2), v2)["layers.1.moe.expert_bias"], torch.zeros(8))
    v2_sd["layers.1.moe.expert_bias"][0] = 1.0
    with pytest.raises(ValueError, match=r"bias_update_speed=0"):
        ds_hf.to_hf(v2_sd, v2)


# The published config.json files (deepseek-ai/DeepSeek-V3, DeepSeek-V2-Lite, DeepSeek-V2 on the hub), the keys
# that shape the network.
_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
HUB_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "vocab_size": 129280,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}
HUB_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "topk_method": "greedy", "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, "tie_word_embeddings": False,
}
HUB_V2 = {**HUB_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
          "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 160,
          "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0, "topk_method": "group_limited_greedy",
          "q_lora_rank": 1536}


def test_flavors_match_the_published_configs():
    assert ds_hf.config_mismatches(HUB_V3, flavor("671b")) == []
    assert ds_hf.config_mismatches(HUB_V2_LITE, flavor("16b")) == []
    # the hub's V3 folder is float8: refused, with the way to a bf16 copy
    fp8 = {**HUB_V3, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    assert any("fp8_cast_bf16" in p for p in ds_hf.config_mismatches(fp8, flavor("671b")))
    # 236B has DeepSeek-V2's dims but scores expert groups as DeepSeek-V3 does (best two, not best one)
    problems = ds_hf.config_mismatches(HUB_V2, flavor("236b"))
    assert len(problems) == 1 and "n_expert_groups=8" in problems[0]
    problems = ds_hf.config_mismatches(HUB_V3, DEBUG)
    assert "model.dim gives hidden_size=256 but config.json has hidden_size=7168" in problems
    v3_without_defaults = {k: v for k, v in HUB_V3.items() if k not in ("tie_word_embeddings", "n_group", "topk_group")}
    assert ds_hf.config_mismatches(v3_without_defaults, flavor("671b")) == []  # transformers' defaults are V3's


def independent_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, active per token) from the config alone."""
    D, H, a, e = cfg.dim, cfg.n_heads, cfg.mla, cfg.moe
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk if a.q_lora_rank else D * H * qk
    kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # wkv_a, kv_norm
    kv += a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)  # wkv_b
    attention = q + kv + H * a.v_head_dim * D + 2 * D  # + the block's two norms
    dense = 3 * D * cfg.ffn_hidden_dim
    expert = 3 * D * e.hidden_dim
    moe_all = e.n_routed_experts * D + (e.n_routed_experts + e.n_shared_experts) * expert
    moe_active = e.n_routed_experts * D + (e.top_k + e.n_shared_experts) * expert
    n_moe = cfg.n_layers - e.n_dense_layers
    outside = 2 * cfg.vocab_size * D + D
    base = cfg.n_layers * attention + e.n_dense_layers * dense + outside
    return base + n_moe * moe_all, base + n_moe * moe_active


@pytest.mark.parametrize("name", ["debug", "16b", "236b", "671b"])
def test_params_and_flops_count_active_experts(name):
    cfg = flavor(name)
    with torch.device("meta"):
        model = SPEC.build_model(cfg, 4096)
    total, active = independent_counts(cfg)
    n_params, flops = SPEC.params_and_flops(model, cfg, 4096)
    assert n_params == total
    a = cfg.mla
    attention = 6 * cfg.n_layers * cfg.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * 4096
    assert flops == 6 * (active - cfg.vocab_size * cfg.dim) + attention
    # the sizes in the yaml comments (active: with the embeddings); the totals are DeepSeek's published ones
    stated = {"debug": (5.0e6, 3.3e6), "16b": (15.7e9, 2.7e9), "236b": (235.7e9, 21.4e9), "671b": (671.0e9, 37.6e9)}
    scale = 1e5 if name == "debug" else 1e8
    assert (round(total / scale) * scale, round(active / scale) * scale) == pytest.approx(stated[name])


def test_flavors_compose_with_their_published_dims():
    m = flavor("671b")
    assert (m.dim, m.n_layers, m.n_heads, m.vocab_size, m.ffn_hidden_dim, m.rope_theta, m.norm_eps) == (
        7168, 61, 128, 129280, 18432, 10000, 1e-6)
    assert (m.moe.n_routed_experts, m.moe.n_shared_experts, m.moe.top_k, m.moe.hidden_dim, m.moe.n_dense_layers,
            m.moe.n_expert_groups, m.moe.n_limited_groups, m.moe.route_scale, m.moe.score_func, m.moe.route_norm) == (
        256, 1, 8, 2048, 3, 8, 4, 2.5, "sigmoid", True)
    a = m.mla
    assert (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (m.rope_scaling_type, m.rope_scaling_factor, m.rope_original_max_seq_len, m.rope_yarn_beta_fast,
            m.rope_yarn_beta_slow, m.rope_yarn_mscale, m.tie_word_embeddings) == ("yarn", 40, 4096, 32, 1, 1.0, False)
    s = flavor("16b")
    assert (s.dim, s.n_layers, s.n_heads, s.mla.q_lora_rank, s.moe.score_func, s.rope_yarn_mscale) == (
        2048, 27, 16, 0, "softmax", 0.707)
    v2 = flavor("236b")
    assert (v2.dim, v2.n_layers, v2.moe.n_routed_experts, v2.moe.route_scale, v2.moe.n_limited_groups) == (
        5120, 60, 160, 16.0, 3)


# ----------------------------------------------------------------------------- at scale and in parallel
@pytest.mark.slow
def test_671b_dry_run_at_256_ranks(tmp_path):
    proc = run_launch(["model=deepseek_v3_671b", "parallelism=fsdp", "cluster.nproc_per_node=8", "cluster.nodes=32",
                       "training.seq_len=4096", "training.local_batch_size=1", "dry_run=true"],
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world 256 = ParallelDims" in proc.stdout
    for label in ("parameters", "gradients", "optimizer state", "activations (estimate)", "total"):
        assert label in proc.stdout
    local = int(re.search(r"rank 0 holds ([\d,]+) parameters", proc.stdout).group(1).replace(",", ""))
    total, _ = independent_counts(flavor("671b"))
    # FSDP shards every tensor on dim 0; the shared experts are stacked as ONE expert, (1, 2048, 7168), so
    # rank 0 holds all 58 layers' shared experts (2.55B) on top of its 1/256 of the rest
    shared = 58 * 3 * 2048 * 7168
    assert total / 256 <= local <= 1.01 * ((total - shared) / 256 + shared), local


def _tp_worker(rank: int, world_size: int) -> dict[str, float]:
    """One of 2 gloo ranks: the debug flavor (and its dense MLA-only variant) under tp=2 vs unsharded, on
    the same batch; returns each parameter's relative gradient error."""
    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.distributed.parallelize import parallelize_decoder

    errors = {}
    for name, extra in (("moe_q96", []), ("dense_q0", ["model.moe.n_routed_experts=0", "model.mla.q_lora_rank=0"])):
        job = resolve(compose(["model=deepseek_v3_debug", *extra, "parallelism=tp", "cluster.nproc_per_node=2",
                               "parallelism.tensor_parallel_degree=2", "training.seq_len=32",
                               "parallelism.disable_loss_parallel=true"]))
        torch.manual_seed(0)
        reference = SPEC.build_model(job.model, 32)
        reference.init_weights()
        model = SPEC.build_model(job.model, 32)
        model.load_state_dict(reference.state_dict())
        dims = ParallelDims.from_config(job.parallelism, world_size)
        dims.build_mesh("cpu")
        model = parallelize_decoder(model, dims, job, SPEC.tp_plan_block)
        batch = torch.randint(0, job.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
        for m in (reference, model):
            torch.nn.functional.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        for (key, p), ref in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errors[f"{name}:{key}"] = ((grad - ref.grad).abs().max() / ref.grad.abs().max()).item()
    return errors


@pytest.mark.multiprocess
def test_tensor_parallel_gradients_match_one_process():
    errors, _ = run_on_ranks(_tp_worker, 2)
    assert any(k.endswith("attention.wkv_a.weight") for k in errors) and any(".wq_b." in k for k in errors)
    bad = {k: v for k, v in errors.items() if not v <= GRAD_TOL}
    assert not bad, bad


FSDP_RUN = ["model=deepseek_v3_debug", "training.seq_len=32", "training.steps=3", "training.deterministic=true",
            "lr_scheduler.warmup_steps=1", "optimizer.lr=3e-3", "metrics.log_freq=1", "metrics.enable_aim=false",
            "checkpoint.enable=false"]


@pytest.mark.multiprocess
def test_training_runs_and_fsdp2_matches_one_process(tmp_path, cache_dir):
    runs = {}
    for name, extra in (("single", ["training.local_batch_size=8"]),
                        ("fsdp2", ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"])):
        args = [*FSDP_RUN, *extra, f"job.name={name}", f"data.cache_dir={cache_dir}"]
        proc = run_launch(args, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = losses(tmp_path / "outputs" / name)
    single = runs["single"]
    assert sorted(single) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in single.values())
    assert single[3] < single[1]  # it learns
    for step, loss in single.items():
        assert runs["fsdp2"][step] == pytest.approx(loss, rel=LOSS_RTOL), (step, runs["fsdp2"][step], loss)
