"""The GPT-OSS family: logits against transformers' GptOssForCausalLM through the HF adapter both ways, on a
sequence longer than the sliding window; YaRN's table against transformers'; the sinks, biases and the clamped
SwiGLU doing what they say; parameter counts against transformers' and the published sizes; the presets against
the hub's config.json; CP refused. The launched runs (FSDP x TP x EP, PP with compile and AC) are in
tests/test_moe_families.py.

Tolerances (fp32 on CPU). Logits: transformers computes the same function in another order (RoPE as
rotate_half on permuted rows, softmax with the sink as an extra column and a max subtracted, per-expert loops
over interleaved gate/up columns, a softmax over the top-k logits where we renormalise a softmax over all), a
few ulps per op; we allow 1e-5 of the largest logit, as tests/test_qwen3.py does (helpers.LOGIT_TOL).
Measured (torch 2.13 CPU, transformers 5.24): 3.9e-6 on import with biases, sinks and norms drawn large
(std 0.5), 8.2e-7 with the tight clamp and plain RoPE, 2.8e-7 on export. Each deliberate error below (q/k
biases not permuted, sinks, router bias, window or clamp left out) moves the logits by 0.17 to 1.2 of their
largest; the tests ask for more than 1e-2.
Routing is discrete: a near-tie between the k-th and (k+1)-th router logits could pick another expert in the
two models; the weights are seeded, so a test that passes keeps passing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_logits_close, compose, logits, logits_and_grads, relative_error, run_on_ranks, spread_weights

from pretrain.checkpoint import hf_io
from pretrain.config import ModelConfig, resolve
from pretrain.errors import ConfigError
from pretrain.models import get_model_spec
from pretrain.models.common.flops import inactive_expert_params
from pretrain.models.common.masks import masked_attention
from pretrain.models.common.moe import MoE, MoEArgs, glu
from pretrain.models.common.rope import yarn_frequencies
from pretrain.models.gpt_oss import hf as gpt_oss_hf
from pretrain.models.gpt_oss.model import precompute_freqs_cis

transformers = pytest.importorskip("transformers")

SPEC = get_model_spec("gpt_oss")
SEQ = 40  # five sliding windows of the debug flavor's 8 tokens


def preset(name: str, *overrides: str) -> ModelConfig:
    return resolve(compose([f"model={name}", *overrides])).model


CASES = {
    "debug": ("gpt_oss_debug",),
    # a clamp that binds on most gate and up values, and plain RoPE
    "tight_clamp_plain_rope": ("gpt_oss_debug", "model.moe.swiglu_limit=0.5", "model.rope_scaling=false"),
}


def hf_config_object(cfg: ModelConfig, dtype: str = "bfloat16"):
    """transformers' GptOssConfig of our config.json (rope_parameters, the key transformers 5 reads)."""
    config = gpt_oss_hf.hf_config(cfg, dtype)
    return transformers.GptOssConfig(**{k: v for k, v in config.items() if k not in ("architectures", "rope_scaling")})


def hf_model_of(cfg: ModelConfig, seed: int = 0):
    """A random transformers GptOssForCausalLM built from our config.json (eager attention, the reference)."""
    config = hf_config_object(cfg, "float32")
    config.initializer_range = 0.1  # decisive routing, sharper attention than at init
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config)
    spread_weights(model, seed, biases=True)
    return model.eval()


def tokens_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- HF adapter, in process
@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_transformers_logits_and_each_part_matters(tmp_path, case):
    """transformers' model saved -> from_hf -> our model: equal logits; to_hf gives back exactly the tensors read.
    Then each GPT-OSS part broken on purpose moves the logits out of tolerance."""
    cfg = preset(*CASES[case])
    hf = hf_model_of(cfg)
    hf.save_pretrained(str(tmp_path))
    assert gpt_oss_hf.config_mismatches(hf_io.read_config(str(tmp_path)), cfg) == []
    hub_sd = hf_io.read_hf(str(tmp_path))
    assert hub_sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, cfg.dim, 2 * cfg.moe.hidden_dim)
    sd = gpt_oss_hf.from_hf(hub_sd, cfg)
    model = SPEC.build_model(cfg, SEQ)
    model.load_state_dict(sd, strict=True)
    tokens = tokens_for(cfg)
    ref = logits(hf, tokens)
    assert_logits_close(logits(model, tokens), ref)

    back = gpt_oss_hf.to_hf(sd, cfg)
    assert back.keys() == hub_sd.keys() and all(torch.equal(back[k], hub_sd[k]) for k in hub_sd)

    def moved(**changes) -> float:
        broken = dict(sd, **changes)
        other = SPEC.build_model(cfg, SEQ)
        other.load_state_dict(broken)
        return relative_error(logits(other, tokens), ref)

    # q/k biases as HF stores them (halves) instead of our adjacent pairs
    unpermuted = {k: hub_sd[gpt_oss_hf.to_hf_key(k)] for k in sd if k.endswith(("wq.bias", "wk.bias"))}
    assert moved(**unpermuted) > 1e-2
    assert moved(**{k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("sinks")}) > 1e-2
    assert moved(**{k: torch.zeros_like(v) for k, v in sd.items() if k.endswith("router.gate.bias")}) > 1e-2
    # the window: the same weights with every layer attending to its whole causal context
    whole = SPEC.build_model(dataclasses.replace(cfg, attention_window="none"), SEQ)
    whole.load_state_dict(sd)
    assert relative_error(logits(whole, tokens), ref) > 1e-2


def test_the_clamp_binds_in_the_tight_case():
    """Without the clamp the tight case's logits move: the test above does see the activation."""
    cfg = preset(*CASES["tight_clamp_plain_rope"])
    hf = hf_model_of(cfg)
    model = SPEC.build_model(cfg, SEQ)
    model.load_state_dict(gpt_oss_hf.from_hf(hf.state_dict(), cfg))
    tokens = tokens_for(cfg)
    ref = logits(hf, tokens)
    assert_logits_close(logits(model, tokens), ref)
    for layer in model.layers.values():
        layer.moe.experts.args = dataclasses.replace(layer.moe.experts.args, swiglu_limit=1e6)
    assert relative_error(logits(model, tokens), ref) > 1e-2


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    cfg = preset("gpt_oss_debug")
    torch.manual_seed(0)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    spread_weights(model, 0, biases=True)
    config = hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, cfg, dtype="float32")
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2 and config["sliding_window"] == 8
    hf, info = transformers.GptOssForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.rope_parameters["truncate"] is False and hf.config.rope_parameters["factor"] == 32
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf.eval(), tokens))


def test_import_through_hf_io_into_a_model(tmp_path):
    """The initial-load path: names a rank needs, read from the folder, into a model built on meta."""
    cfg = preset("gpt_oss_debug")
    hf = hf_model_of(cfg)
    hf.save_pretrained(str(tmp_path))
    with torch.device("meta"):
        model = SPEC.build_model(cfg, SEQ)
    model.to_empty(device="cpu")
    model.init_weights()
    hf_io.load_hf_into([model], str(tmp_path), SPEC, cfg)
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


def test_names_keys_needed_and_refusals():
    cfg = preset("gpt_oss_debug")
    needed = gpt_oss_hf.hf_keys_needed(["layers.2.moe.experts.w1", "layers.2.moe.experts.w3", "layers.2.moe.experts.b2",
                                        "layers.2.attention.sinks", "layers.2.moe.router.gate.bias"], cfg)
    assert needed == {"layers.2.moe.experts.w1": "model.layers.2.mlp.experts.gate_up_proj",
                      "layers.2.moe.experts.w3": "model.layers.2.mlp.experts.gate_up_proj",
                      "layers.2.moe.experts.b2": "model.layers.2.mlp.experts.down_proj_bias",
                      "layers.2.attention.sinks": "model.layers.2.self_attn.sinks",
                      "layers.2.moe.router.gate.bias": "model.layers.2.mlp.router.bias"}
    with pytest.raises(ValueError, match="MXFP4"):
        gpt_oss_hf.from_hf({"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(1)}, cfg)
    sd = SPEC.build_model(cfg, SEQ).state_dict()
    sd["layers.0.moe.expert_bias"] = torch.ones(8)
    with pytest.raises(ValueError, match="balancing bias"):
        gpt_oss_hf.to_hf(sd, cfg)
    for override in ("model.moe.activation=swiglu", "model.moe.router_bias=false", "model.moe.route_norm=false"):
        with pytest.raises(ValueError, match=override.split("=")[0]):
            gpt_oss_hf.hf_config(preset("gpt_oss_debug", override))


# ----------------------------------------------------------------------------- RoPE, sinks, biases, clamp
@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_table_is_transformers(truncate):
    """Our YaRN frequencies and attention factor are transformers' for the 20B's config, with the ramp ends kept
    fractional (GPT-OSS) or rounded (DeepSeek-V3's truncate)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("gpt_oss_20b")
    config = transformers.GptOssConfig(rope_parameters={**gpt_oss_hf.hf_config(cfg)["rope_parameters"],
                                                        "truncate": truncate}, head_dim=64)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = yarn_frequencies(cfg, 64, truncate=truncate)
    assert torch.allclose(ours, inv_freq, rtol=1e-6, atol=0)  # the same fp32 ops
    table = precompute_freqs_cis(cfg, 3)
    assert table.abs()[0].tolist() == pytest.approx([attention_factor] * 32) and attention_factor > 1.3
    if not truncate:  # the two roundings differ on the 20B's ramp: the choice is seen
        assert not torch.allclose(ours, yarn_frequencies(cfg, 64, truncate=True), rtol=1e-3)


def test_clamped_swiglu_clamps_gate_above_and_up_on_both_sides():
    args = MoEArgs(dim=4, hidden_dim=4, n_experts=1, top_k=1, activation="clamped_swiglu")
    gate = torch.tensor([20.0, -20.0, 1.0, 1.0])
    up = torch.tensor([0.0, 0.0, 20.0, -20.0])
    want = [7 * torch.sigmoid(torch.tensor(1.702 * 7)).item(),  # gate clamped to 7
            -20 * torch.sigmoid(torch.tensor(-1.702 * 20)).item(),  # a negative gate is not clamped
            torch.sigmoid(torch.tensor(1.702)).item() * 8,  # up clamped to 7: (7 + 1)
            torch.sigmoid(torch.tensor(1.702)).item() * -6]  # up clamped to -7: (-7 + 1)
    assert glu(gate, up, args).tolist() == pytest.approx(want, rel=1e-6)
    plain = MoEArgs(dim=4, hidden_dim=4, n_experts=1, top_k=1)
    assert glu(gate, up, plain).tolist() == pytest.approx((torch.nn.functional.silu(gate) * up).tolist())


def test_router_bias_chooses_and_expert_biases_add():
    """A large router bias on one expert sends every token there (weight 1 of top-1); with zero weights an
    expert's output is its output bias b2."""
    torch.manual_seed(0)
    args = MoEArgs(dim=8, hidden_dim=4, n_experts=4, top_k=1, route_norm=True, router_bias=True,
                   expert_proj_bias=True, activation="clamped_swiglu")
    moe = MoE(args)
    moe.init_weights()
    with torch.no_grad():
        moe.router.gate.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
        moe.experts.w2.zero_()
        moe.experts.b2.copy_(torch.arange(4.0).unsqueeze(1).expand(4, 8))
    out = moe(torch.randn(2, 3, 8))
    assert torch.equal(out, torch.full((2, 3, 8), 2.0))  # expert 2's b2, weight 1
    assert moe.tokens_per_expert.tolist() == [0, 0, 6, 0]


def test_sinks_take_probability_and_minus_infinity_removes_them():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=gen) for _ in range(3))
    plain = masked_attention(q, k, v, "sliding", 4)
    none = masked_attention(q, k, v, "sliding", 4, sinks=torch.full((2,), float("-inf")))
    assert torch.allclose(none, plain, atol=1e-6)
    heavy = masked_attention(q, k, v, "sliding", 4, sinks=torch.tensor([30.0, 0.0]))
    assert heavy[:, 0].abs().max() < 1e-6 < (heavy[:, 1] - plain[:, 1]).abs().max()  # head 0's sink takes it all


def test_layers_alternate_sliding_and_full():
    cfg = preset("gpt_oss_20b")
    model = None
    with torch.device("meta"):
        model = SPEC.build_model(cfg, 256)
    ops = [(layer.attention.attention_op.kind, layer.attention.attention_op.size) for layer in model.layers.values()]
    assert ops == [("sliding", 128), ("causal", 0)] * 12


# ----------------------------------------------------------------------------- sizes and presets
PUBLISHED = {  # total, active per token (OpenAI's model card: 20.91B / 3.61B, 116.83B / 5.13B; active counts the
    # output head, not the embedding lookup)
    "gpt_oss_20b": (20_914_757_184, 3.61e9),
    "gpt_oss_120b": (116_829_156_672, 5.13e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_on_meta(name):
    cfg = preset(name)
    total, active = PUBLISHED[name]
    with torch.device("meta"):
        ours = SPEC.build_model(cfg, 4096)
        theirs = transformers.GptOssForCausalLM(hf_config_object(cfg))
    n_params, flops = SPEC.params_and_flops(ours, cfg, 4096)
    assert n_params == total == sum(p.numel() for p in theirs.parameters())
    our_active = n_params - inactive_expert_params(ours) - ours.tok_embeddings.weight.numel()
    assert our_active == pytest.approx(active, rel=2e-3)
    # 6 x active + attention: the sliding half of the layers counts 128 keys, the full half 4096
    attention = 6 * cfg.n_heads * 128 * (cfg.n_layers // 2 * (128 + 4096))
    assert flops == 6 * our_active + attention


HUB_120B = {  # https://huggingface.co/openai/gpt-oss-120b/raw/main/config.json, less quantization_config
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False,
    "pad_token_id": 199999, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
# the 20B's differs in these keys only
HUB_20B = {**HUB_120B, "num_hidden_layers": 24, "num_local_experts": 32,
           "layer_types": ["sliding_attention", "full_attention"] * 12}


@pytest.mark.parametrize("name, hub", [("gpt_oss_120b", HUB_120B), ("gpt_oss_20b", HUB_20B)])
def test_presets_match_the_hub_config(name, hub):
    cfg = preset(name)
    assert gpt_oss_hf.config_mismatches(hub, cfg) == []
    ours = gpt_oss_hf.hf_config(cfg)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_local_experts", "experts_per_token", "vocab_size", "sliding_window", "layer_types",
                "rope_theta", "max_position_embeddings", "initial_context_length", "swiglu_limit"):
        assert ours[key] == hub[key], key
    assert ours["rope_scaling"] == {**hub["rope_scaling"], "rope_theta": 150000}
    assert any("quantization_config" in p for p in gpt_oss_hf.config_mismatches(
        {**hub, "quantization_config": {"quant_method": "mxfp4"}}, cfg))
    changed = {**hub, "sliding_window": 256, "rope_scaling": {**hub["rope_scaling"], "truncate": True}}
    problems = gpt_oss_hf.config_mismatches(changed, cfg)
    assert any("sliding_window=256" in p for p in problems) and any("truncate" in p for p in problems)


@pytest.mark.parametrize("name", ["gpt_oss_debug", "gpt_oss_20b", "gpt_oss_120b"])
def test_flavor_composes_and_says_what_it_is(name):
    cfg = preset(name)
    assert (cfg.name, cfg.attention_window, cfg.global_attention_every, cfg.rope_scaling_type) == (
        "gpt_oss", "sliding", 2, "yarn")
    assert (cfg.moe.top_k, cfg.moe.activation, cfg.moe.router_bias, cfg.moe.expert_proj_bias) == (
        2 if name == "gpt_oss_debug" else 4, "clamped_swiglu", True, True)
    assert cfg.attention_window_size == (8 if name == "gpt_oss_debug" else 128)


def test_context_parallel_is_refused():
    with pytest.raises(ConfigError, match="attention_window=sliding"):
        resolve(compose(["model=gpt_oss_debug", "parallelism=fsdp_cp", "cluster.nproc_per_node=4"]))


# ----------------------------------------------------------------------------- TP and EP, in process groups
GRAD_TOL = 1e-5  # fp32: sums over heads, hidden units and ranks in another order; measured 1.0e-6 (TP), 4.1e-7 (EP)


def _parallel_worker(rank: int, world_size: int, job, double_output_bias: bool) -> float:
    """The largest difference, relative to the largest entry, between the parallel model's logits and
    gradients (full tensors) and the unsharded model's, every rank on the same tokens. (With FSDP the ranks'
    gradients are averaged: on the same tokens the average is the one-process gradient.)"""
    from torch.distributed.tensor import DTensor

    def double_the_output_bias(model) -> None:  # the error the expert TP hook prevents: b2 added on each rank
        for layer in model.layers.values():
            layer.moe.experts.add_output_bias = True

    cfg = job.model
    full, want = logits_and_grads(SPEC, job, world_size, parallel=False, biases=True)
    parallel, got = logits_and_grads(SPEC, job, world_size, parallel=True, biases=True,
                                     after_parallelize=double_the_output_bias if double_output_bias else None)
    worst = (got - want).abs().max().item() / want.abs().max().item()
    ref_grads = dict(full.named_parameters())
    for name, p in parallel.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        ref = ref_grads[name].grad
        worst = max(worst, (grad - ref).abs().max().item() / ref.abs().max().item())
    if job.parallelism.tensor_parallel_degree > 1:  # the sinks are split with the heads
        sinks = parallel.layers["0"].attention.sinks
        assert isinstance(sinks, DTensor) and sinks.to_local().shape == (cfg.n_heads // 2,)
    return worst


def _layout(*overrides: str):
    return resolve(compose(["model=gpt_oss_debug", "model.n_layers=2", "cluster.nproc_per_node=2",
                            "parallelism.disable_loss_parallel=true", "training.seq_len=24", *overrides]))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tensor_parallel_biases_sinks_and_expert_biases():
    """TP 2 on two gloo processes, biases and sinks drawn large: logits and every parameter's gradient equal
    the unsharded model's (q/k/v biases and sinks split with their heads, wo's bias and the experts' output
    bias added once, the router bias replicated). Adding the experts' output bias on each rank is seen."""
    job = _layout("parallelism=tp", "parallelism.tensor_parallel_degree=2")
    assert max(run_on_ranks(_parallel_worker, 2, job, False)) <= GRAD_TOL
    assert min(run_on_ranks(_parallel_worker, 2, job, True)) > 1e-2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_expert_parallel_carries_the_expert_biases():
    """EP 2 (with FSDP 2) on two gloo processes: each rank holds 4 of the 8 experts with their biases; logits
    and every gradient (the experts' biases included) equal the unsharded model's."""
    job = _layout("parallelism=fsdp", "parallelism.expert_parallel_degree=2")
    assert max(run_on_ranks(_parallel_worker, 2, job, False)) <= GRAD_TOL
