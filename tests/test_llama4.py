"""The Llama 4 family (Scout, Maverick, debug): logits against transformers' Llama4ForCausalLM through the HF
adapter both ways, on sequences longer than a chunk (chunked RoPE layers and a NoPE global layer with its query
temperature); the parts that make it Llama 4 one by one; parameter counts against transformers' own model built
on the meta device and the published sizes; presets against the hub's config.json; what the config refuses.
The launched runs (FSDP x TP x EP, PP with compile and AC) are in tests/test_moe_families.py, the recipes' dry runs
in tests/test_dry_run.py.

Tolerance (fp32 on CPU): logits within 1e-5 of their largest magnitude (helpers.LOGIT_TOL), as for the other
families: the two models compute the same function with the same RoPE layout (adjacent pairs as complex numbers),
the same fp32 L2 norm and temperature arithmetic, and differ in the order of sums (kv-head expansion, SDPA vs the
eager softmax, our sorted token groups vs transformers' bmm over every expert). Measured (torch 2.13 CPU,
transformers 5.24): 1.9e-7 of the largest logit on export (eager; sdpa 6e-9), 2.9e-7 on import. Each Llama 4
part turned off moves the logits by more than 10 times the tolerance (checked below), so it sees every one of them.
Routing is discrete: a token whose two best router logits were within float noise could pick another expert in
the two models; the weights are seeded, so a test that passes keeps passing.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import LOGIT_TOL, assert_logits_close, compose, logits, relative_error, spread_weights

from pretrain.checkpoint import hf_io
from pretrain.config import ConfigError, ModelConfig, resolve
from pretrain.config.model import is_moe_layer, is_nope_layer, layer_window
from pretrain.distributed.context_parallel import load_balanced_positions, narrow_rope_to_positions
from pretrain.models import get_model_spec
from pretrain.models.common.rope import precompute_freqs_cis
from pretrain.models.llama4 import hf as llama4_hf
from pretrain.models.llama4.model import attention_temperature

transformers = pytest.importorskip("transformers")

SPEC = get_model_spec("llama4")
SEQ = 40  # five chunks of 8; the temperature steps every 4 positions
SMALL = ["model=llama4_debug", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.vocab_size=512", "model.ffn_hidden_dim=96", "model.moe.hidden_dim=48", "model.attention_window_size=8",
         "model.attn_floor_scale=4", "model.attn_scale=0.5"]


def preset(*overrides: str) -> ModelConfig:
    return resolve(compose(list(overrides))).model


def small(*overrides: str) -> ModelConfig:
    return preset(*SMALL, *overrides)


def tokens_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


def our_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    spread_weights(model, seed)
    return model.eval()


def hf_config_object(cfg: ModelConfig, attn_implementation: str = "sdpa"):
    config = llama4_hf.hf_config(cfg, "float32")
    config = transformers.Llama4TextConfig(**{k: v for k, v in config.items() if k not in ("architectures",
                                                                                           "torch_dtype")})
    config._attn_implementation = attn_implementation
    return config


# ----------------------------------------------------------------------------- HF adapter, both ways
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, attn_implementation):
    cfg = small()
    model = our_model(cfg)
    config = hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, cfg, dtype="float32")
    assert config["layer_types"] == ["chunked_attention"] * 3 + ["full_attention"]
    assert config["no_rope_layers"] == [1, 1, 1, 0] and config["moe_layers"] == [1, 3]
    hf, info = transformers.Llama4ForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, dtype=torch.float32, attn_implementation=attn_implementation)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.attention_chunk_size == 8 and hf.config.use_qk_norm and hf.config.floor_scale == 4
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf.eval(), tokens))


def hf_model_of(cfg: ModelConfig, seed: int = 0):
    """A random transformers Llama4ForCausalLM built from our config.json, with spread norm weights."""
    config = hf_config_object(cfg)
    config.initializer_range = 0.1  # decisive routing, sharper attention than at init
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(config)
    spread_weights(model, seed)
    return model.eval()


def test_import_from_transformers_gives_equal_logits_and_round_trips(tmp_path):
    cfg = small()
    hf = hf_model_of(cfg)
    hf.save_pretrained(str(tmp_path))
    assert llama4_hf.config_mismatches(hf_io.read_config(str(tmp_path)), cfg) == []
    hub_sd = hf_io.read_hf(str(tmp_path))
    assert hub_sd["model.layers.1.feed_forward.experts.gate_up_proj"].shape == (8, 64, 96)  # (X, D, 2H), fused
    sd = llama4_hf.from_hf(hub_sd, cfg)
    model = SPEC.build_model(cfg, SEQ)
    model.load_state_dict(sd, strict=True)
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))
    back = llama4_hf.to_hf(sd, cfg)
    assert back.keys() == hub_sd.keys() and all(torch.equal(back[k], hub_sd[k]) for k in hub_sd)

    # through the initial-load path, a stage's worth of keys at a time
    loaded = SPEC.build_model(cfg, SEQ)
    loaded.init_weights()
    hf_io.load_hf_into([loaded], str(tmp_path), SPEC, cfg, chunk_bytes=20_000)
    assert_logits_close(logits(loaded, tokens), logits(hf, tokens))

    # the comparison sees the fused layout: gate and up halves taken the other way round move the logits
    gate_up = hub_sd["model.layers.1.feed_forward.experts.gate_up_proj"]
    swapped = {**hub_sd, "model.layers.1.feed_forward.experts.gate_up_proj": gate_up.roll(48, dims=-1)}
    model.load_state_dict(llama4_hf.from_hf(swapped, cfg))
    assert relative_error(logits(model, tokens), logits(hf, tokens)) > 1e-3


def test_each_llama4_part_is_seen_by_the_comparison():
    """Our model with one Llama 4 part turned off, on transformers' weights: the logits move by far more than the
    tolerance, so the parity above checks each part. Measured: 4.9e-4 without the RoPE scaling (it slows only the
    frequencies too slow to turn much within 8-token chunks), 0.2 to 1.4 for the others."""
    cfg = small()
    hf = hf_model_of(cfg)
    sd, tokens = llama4_hf.from_hf(hf.state_dict(), cfg), tokens_for(cfg)
    expected = logits(hf, tokens)
    parts = {"temperature": {"attn_temperature_tuning": False}, "qk_norm": {"qk_norm": False},
             "chunks": {"attention_window": "none"}, "rope_scaling": {"rope_scaling": False},
             "nope": {"nope_layer_interval": 0, "attn_temperature_tuning": False}}
    for part, off in parts.items():
        model = SPEC.build_model(dataclasses.replace(cfg, **off), SEQ)
        model.load_state_dict(sd)
        assert relative_error(logits(model, tokens), expected) > 10 * LOGIT_TOL, part


def test_names_keys_needed_and_refusals():
    cfg = small()
    needed = llama4_hf.hf_keys_needed(
        ["layers.1.moe.experts.w1", "layers.1.moe.experts.w3", "layers.1.moe.experts.w2", "layers.1.moe.expert_bias",
         "layers.1.moe.router.gate.weight", "layers.1.moe.shared_experts.w2", "layers.0.feed_forward.w1.weight",
         "layers.0.attention.wq.weight", "output.weight"], cfg)
    fused = "model.layers.1.feed_forward.experts."
    assert needed == {
        "layers.1.moe.experts.w1": fused + "gate_up_proj", "layers.1.moe.experts.w3": fused + "gate_up_proj",
        "layers.1.moe.experts.w2": fused + "down_proj",
        "layers.1.moe.router.gate.weight": "model.layers.1.feed_forward.router.weight",
        "layers.1.moe.shared_experts.w2": "model.layers.1.feed_forward.shared_expert.down_proj.weight",
        "layers.0.feed_forward.w1.weight": "model.layers.0.feed_forward.gate_proj.weight",
        "layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
        "output.weight": "lm_head.weight",
    }  # no HF tensor for the expert bias: it stays zero
    assert llama4_hf.from_hf_key(fused + "down_proj") == "layers.1.moe.experts.w2"
    sd = SPEC.build_model(cfg, SEQ).state_dict()
    sd["layers.1.moe.expert_bias"] = torch.ones(8)
    with pytest.raises(ValueError, match="bias_update_speed=0"):
        llama4_hf.to_hf(sd, cfg)
    for change, key in ((dict(qk_norm_type="rms"), "qk_norm_type=rms"), (dict(tie_word_embeddings=True), "lm_head"),
                        (dict(moe=dataclasses.replace(cfg.moe, score_func="softmax")), "score_func=softmax"),
                        (dict(moe=dataclasses.replace(cfg.moe, score_before_experts=False)), "score_before_experts")):
        with pytest.raises(ValueError, match=key):
            llama4_hf.hf_config(dataclasses.replace(cfg, **change))


# The text_config of the hub's config.json for the two published models (the keys that shape the network).
HUB_TEXT = {
    "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384, "vocab_size": 202048,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "attention_chunk_size": 8192, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "floor_scale": 8192, "num_experts_per_tok": 1, "model_type": "llama4_text",
    "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
}
HUB_CONFIGS = {
    "llama4_scout": {**HUB_TEXT, "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True,
                     "max_position_embeddings": 10485760,
                     "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "llama4_maverick": {**HUB_TEXT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                        "max_position_embeddings": 1048576, "rope_scaling": None},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_presets_match_the_hub_config(name):
    cfg = preset(f"model={name}")
    hub = HUB_CONFIGS[name]
    assert llama4_hf.config_mismatches(hub, cfg) == []
    assert llama4_hf.config_mismatches({"text_config": hub, "model_type": "llama4"}, cfg) == []  # the whole file
    problems = llama4_hf.config_mismatches({**hub, "num_local_experts": 64, "use_qk_norm": not hub["use_qk_norm"],
                                            "no_rope_layer_interval": 3}, cfg)
    assert any(p.startswith("model.moe.n_routed_experts gives num_local_experts=") for p in problems)
    assert any(p.startswith("model.qk_norm gives use_qk_norm=") for p in problems)
    assert any(p.startswith("model.nope_layer_interval gives no_rope_layers=") for p in problems)


# ----------------------------------------------------------------------------- sizes and FLOPs
# transformers' Llama4ForCausalLM on the meta device, from our config.json; and Meta's figures: 17B active for
# both, 109B (Scout, with its vision encoder: the text decoder is 107.8B) and 400B total
HF_COUNTS = {"llama4_scout": (107_769_861_120, 17_172_894_720), "llama4_maverick": (400_711_848_960, 17_184_691_200)}
PUBLISHED = {"llama4_scout": (109e9, 17e9), "llama4_maverick": (400e9, 17e9)}


def hf_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all, active per token) parameters of transformers' model: a token uses top_k of the X routed experts."""
    with torch.device("meta"):
        model = transformers.Llama4ForCausalLM(hf_config_object(cfg))
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    X = cfg.moe.n_routed_experts
    return total, total - routed * (X - cfg.moe.top_k) // X


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_published_sizes_equal_transformers_counts(name):
    cfg = preset(f"model={name}")
    with torch.device("meta"):
        model = SPEC.build_model(cfg, 8192)
    n_params, flops = SPEC.params_and_flops(model, cfg, 8192)
    total, active = hf_counts(cfg)
    assert (total, active) == HF_COUNTS[name] and n_params == total
    assert total == pytest.approx(PUBLISHED[name][0], rel=0.015) and active == pytest.approx(PUBLISHED[name][1],
                                                                                             rel=0.015)
    # 6 x active non-embedding params + 6 x heads x 2E x (keys each layer sees: every one at seq 8192 = the chunk)
    E = cfg.head_dim
    assert flops == 6 * (active - cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.n_heads * E * 8192
    _, longer = SPEC.params_and_flops(model, cfg, 32768)  # chunked layers see 8192 keys, the 12 NoPE ones 32768
    assert longer == 6 * (active - cfg.vocab_size * cfg.dim) + 12 * cfg.n_heads * E * (36 * 8192 + 12 * 32768)


def test_flavors_compose_with_their_published_layers():
    scout, maverick = preset("model=llama4_scout"), preset("model=llama4_maverick")
    for m in (scout, maverick):
        assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size, m.ffn_hidden_dim) == (
            5120, 48, 40, 8, 128, 202048, 16384)
        assert [layer_window(m, i) for i in range(4)] == [("chunked", 8192)] * 3 + [("causal", 0)]
        assert [is_nope_layer(m, i) for i in range(8)] == [False, False, False, True] * 2
        assert (m.moe.top_k, m.moe.n_shared_experts, m.moe.score_func, m.moe.score_before_experts) == (
            1, 1, "sigmoid", True)
    assert all(is_moe_layer(scout, i) for i in range(48)) and scout.qk_norm and scout.qk_norm_type == "l2"
    assert [is_moe_layer(maverick, i) for i in range(4)] == [False, True, False, True] and not maverick.qk_norm
    assert (scout.rope_scaling, scout.rope_scaling_factor, scout.rope_low_freq_factor, scout.rope_high_freq_factor,
            maverick.rope_scaling) == (True, 16, 1.0, 1.0, False)


# ----------------------------------------------------------------------------- the parts, one by one
def test_rope_scaling_with_equal_factors_matches_transformers():
    """Scout's llama3 scaling has low_freq_factor == high_freq_factor: no band between kept and divided
    frequencies (no division by zero), the same frequencies as transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("model=llama4_scout")
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config_object(cfg))
    ours = precompute_freqs_cis(cfg, 2).angle()[1]  # the angle at position 1 is the frequency
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, inv_freq, rtol=1e-6, atol=0)
    divided = (inv_freq < 2 * math.pi / 8192).sum().item()  # wavelengths above the original context
    assert 0 < divided < 64 and torch.allclose(ours[-divided:] * 16, 1.0 / 500000 ** (torch.arange(
        128 - 2 * divided, 128, 2) / 128), rtol=1e-6)
    with pytest.raises(ConfigError, match="rope_high_freq_factor=0.5 must be at least"):
        preset("model=llama4_scout", "model.rope_high_freq_factor=0.5")


def test_temperature_is_a_per_position_buffer_for_the_nope_layers():
    cfg = preset("model=llama4_scout")
    scales = attention_temperature(cfg, 3 * 8192)
    assert scales[:8191].eq(1.0).all()  # floor((p + 1) / 8192) = 0 before position 8191
    assert scales[8191].item() == pytest.approx(1 + 0.1 * math.log(2))
    assert scales[-1].item() == pytest.approx(1 + 0.1 * math.log(4))
    model = SPEC.build_model(small(), SEQ)
    assert model.position_buffers == ("freqs_cis", "attn_temperature")
    assert model.attn_temperature.shape == (SEQ,) and model.attn_temperature[-1] > 1
    kinds = [(b.attention.use_rope, b.attention.l2_qk_norm, b.attention.attention_op.kind) for b in
             model.layers.values()]
    assert kinds == [(True, True, "chunked")] * 3 + [(False, False, "causal")]
    model.freqs_cis = model.freqs_cis[:8]  # narrowing one table and not the other is refused, not run
    with pytest.raises(RuntimeError, match="position_buffers"):
        model(tokens_for(small())[:, :8])
    # context parallelism narrows both to a rank's positions (head and tail chunks), so NoPE layers scale the
    # queries of the positions they hold (measured: a 4-process CP 2 x FSDP 2 run without chunks trains to the
    # same losses as one process, 8.1050 and 8.0403 at steps 1-2)
    full = SPEC.build_model(small(), SEQ)
    positions = load_balanced_positions(SEQ, 2, 1)
    narrow_rope_to_positions(full, positions)
    assert torch.equal(full.attn_temperature, attention_temperature(small(), SEQ)[positions])
    assert full.freqs_cis.shape[0] == positions.numel()


def test_routing_is_top1_sigmoid_on_the_expert_input_plus_a_shared_expert():
    cfg = small()
    moe = our_model(cfg).layers["1"].moe
    x = torch.randn(1, 5, cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = moe(x)[0]
        logits_ = moe.router.gate(x[0])
        best = logits_.argmax(-1)
        w1, w2, w3 = moe.experts.w1, moe.experts.w2, moe.experts.w3
        s1, s2, s3 = moe.shared_experts.w1[0], moe.shared_experts.w2[0], moe.shared_experts.w3[0]
        for t in range(5):
            e, xt = best[t], x[0, t]
            scaled = xt * torch.sigmoid(logits_[t, e])  # the weight scales the expert's input
            routed = (torch.nn.functional.silu(w1[e] @ scaled) * (w3[e] @ scaled)) @ w2[e].T
            shared = (torch.nn.functional.silu(s1 @ xt) * (s3 @ xt)) @ s2.T
            torch.testing.assert_close(out[t], routed + shared, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- what the config refuses
BAD = {
    # context parallelism computes plain causal attention: the chunks would be dropped
    "cp": (["model=llama4_debug", "parallelism.context_parallel_degree=2", "cluster.nproc_per_node=2"],
           "model.attention_window=chunked"),
    "temperature_without_nope": (["model=llama4_debug", "model.nope_layer_interval=0"], "leaves none"),
    "qk_norm_kind": (["model=llama4_debug", "model.qk_norm_type=layer"], "model.qk_norm_type"),
    # another family asked for Llama 4's parts
    "qwen3_nope": (["model=qwen3_debug", "model.nope_layer_interval=4"], "families that do: llama4"),
    "qwen3_l2": (["model=qwen3_debug", "model.qk_norm_type=l2"], "families that do: llama4"),
    "llama3_temperature": (["model=llama3_debug", "model.nope_layer_interval=4", "model.attn_temperature_tuning=true"],
                           "families that do: llama4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_before_launch(case):
    overrides, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        resolve(compose(overrides))
