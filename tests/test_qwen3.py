"""The Qwen3 family (dense and MoE): logits against transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM
through the HF adapter both ways, parameter counts and FLOPs, every preset composing (the large ones
dry-running at full scale), q/k-norm gradients under tensor parallelism, and launched runs (TP 2 and
FSDP 2 against one process; a MoE smoke run).

Tolerances (fp32 on CPU). Logits: our model and transformers' compute the same function in another
order (RoPE as complex products of adjacent pairs vs rotate_half on permuted rows, differently
rounded angles, kv-head expansion, matmul groupings, per-expert loops vs our sorted token groups), a
few ulps (~1e-7 relative) per op; through the blocks the logits stay within ~1e-6 of their largest
magnitude. We allow 1e-5 of it, as tests/test_hf.py does. Measured (torch 2.13 CPU, transformers 5.24):
1.5e-6 on import (transformers' weights, initializer_range 0.1), 3e-7 on export. Skipping the
reordering of the q/k norm weights moves them by ~1 (relative), checked below.
Routing is discrete: a token whose k-th and (k+1)-th router scores were within float noise could pick
another expert in the two models; the weights here are seeded, so a test that passes keeps passing.
Losses of launched runs: 1e-5 relative, as tests/test_parallel_parity.py allows (same weights, same
global batch; layouts differ only by the order of sums). Measured: TP 2 and FSDP 2 within 2e-7 of one
process over 4 steps. q/k norm gradients under TP: 1e-5 of their largest entry (fp32, sums over heads
and ranks in another order).
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from helpers import (
    CONF,
    LOSS_RTOL,
    assert_logits_close,
    compose,
    logits,
    logits_and_grads,
    losses,
    run_launch,
    run_on_ranks,
    spread_weights,
)

from pretrain.checkpoint import hf_io
from pretrain.config import ModelConfig, resolve
from pretrain.config.model import head_dim
from pretrain.models import get_model_spec
from pretrain.models.qwen3 import hf as qwen3_hf

transformers = pytest.importorskip("transformers")

SPEC = get_model_spec("qwen3")
SEQ = 64


def preset(name: str, *overrides: str) -> ModelConfig:
    return resolve(compose([f"model={name}", *overrides])).model


# the debug presets, and one with a dense first layer (HF mlp_only_layers=[0])
CASES = {
    "dense": ("qwen3_debug",),
    "moe": ("qwen3_moe_debug",),
    "moe_dense_first": ("qwen3_moe_debug", "model.moe.n_dense_layers=1"),
}


def tokens_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


def hf_model_of(cfg: ModelConfig, seed: int = 0):
    """A random transformers model built from our config.json, with spread norm weights."""
    config = qwen3_hf.hf_config(cfg, "float32", SEQ)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    config.initializer_range = 0.1  # decisive routing, sharper attention than at init
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    spread_weights(model, seed)
    return model.eval()


# ----------------------------------------------------------------------------- HF adapter, in process
@pytest.mark.parametrize("case", sorted(CASES))
def test_import_of_hub_layout_gives_transformers_logits(tmp_path, case):
    """transformers' model saved in the hub's layout (per-expert tensors) -> from_hf -> our model: equal
    logits; and to_hf gives back exactly the tensors read."""
    cfg = preset(*CASES[case])
    hf = hf_model_of(cfg)
    hf.save_pretrained(str(tmp_path))
    assert qwen3_hf.config_mismatches(hf_io.read_config(str(tmp_path)), cfg) == []
    hub_sd = hf_io.read_hf(str(tmp_path))
    if cfg.moe.n_routed_experts:
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in hub_sd
    sd = qwen3_hf.from_hf(hub_sd, cfg)
    model = SPEC.build_model(cfg, SEQ)
    model.load_state_dict(sd, strict=True)
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))

    back = qwen3_hf.to_hf(sd, cfg)
    assert back.keys() == hub_sd.keys() and all(torch.equal(back[k], hub_sd[k]) for k in hub_sd)

    # the comparison sees the q/k norm weights' order: taken as HF stores them, the logits move
    for key in [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight"))]:
        sd[key] = hub_sd[qwen3_hf.to_hf_key(key)]
    model.load_state_dict(sd)
    with pytest.raises(AssertionError):
        assert_logits_close(logits(model, tokens), logits(hf, tokens))


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, case):
    cfg = preset(*CASES[case])
    torch.manual_seed(0)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    spread_weights(model, 0)
    config = hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, cfg, dtype="float32")
    assert config["head_dim"] == 64 != cfg.dim // cfg.n_heads
    cls = transformers.Qwen3MoeForCausalLM if cfg.moe.n_routed_experts else transformers.Qwen3ForCausalLM
    hf, info = cls.from_pretrained(str(tmp_path), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    if cfg.moe.n_routed_experts:
        assert hf.config.num_experts == 8 and hf.config.mlp_only_layers == list(range(cfg.moe.n_dense_layers))
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


@pytest.mark.parametrize("name", ["qwen3_debug", "qwen3_moe_debug"])
def test_import_through_hf_io_into_a_model(tmp_path, name):
    cfg = preset(name)
    hf = hf_model_of(cfg)
    hf.save_pretrained(str(tmp_path))
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    hf_io.load_hf_into([model], str(tmp_path), SPEC, cfg)
    tokens = tokens_for(cfg)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


def test_names_keys_needed_and_refusals():
    moe = preset("qwen3_moe_debug")
    needed = qwen3_hf.hf_keys_needed(
        ["layers.1.moe.experts.w2", "layers.1.moe.expert_bias", "layers.1.moe.router.gate.weight",
         "layers.0.attention.q_norm.weight", "output.weight"], moe)
    assert needed == {
        "layers.1.moe.experts.w2": [f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)],
        "layers.1.moe.router.gate.weight": "model.layers.1.mlp.gate.weight",
        "layers.0.attention.q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "output.weight": "lm_head.weight",
    }  # no HF tensor for the expert bias: it stays zero
    dense = preset("qwen3_debug")  # tied: the output projection is read from the embedding
    assert qwen3_hf.hf_keys_needed(["output.weight"], dense) == {"output.weight": "model.embed_tokens.weight"}

    model = SPEC.build_model(moe, SEQ)
    model.init_weights()
    sd = model.state_dict()
    assert torch.equal(qwen3_hf.from_hf(qwen3_hf.to_hf(sd, moe), moe)["layers.0.moe.expert_bias"], torch.zeros(8))
    sd["layers.0.moe.expert_bias"] = torch.ones(8)
    with pytest.raises(ValueError, match="bias_update_speed=0"):
        qwen3_hf.to_hf(sd, moe)
    sigmoid = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, score_func="sigmoid"))
    with pytest.raises(ValueError, match="model.moe.score_func=sigmoid"):
        qwen3_hf.hf_config(sigmoid)


# The hub's config.json of two published models (the keys that shape the network).
HUB_CONFIGS = {
    "qwen3_8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_size": 4096,
        "intermediate_size": 12288, "max_position_embeddings": 40960, "num_attention_heads": 32,
        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3_30b_a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1,
        "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
        "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936,
    },
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_presets_match_the_hub_config(name):
    cfg = preset(name)
    hub = HUB_CONFIGS[name]
    assert qwen3_hf.config_mismatches(hub, cfg) == []
    ours = qwen3_hf.hf_config(cfg)
    assert {k: ours[k] for k in hub} == hub
    problems = qwen3_hf.config_mismatches({**hub, "num_key_value_heads": 16, "rope_scaling": {"rope_type": "yarn"}},
                                          cfg)
    assert any(p.startswith("model.n_kv_heads gives num_key_value_heads=") for p in problems)
    assert any("rope type is 'yarn'" in p for p in problems)


# ----------------------------------------------------------------------------- sizes and FLOPs
def expected_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all, active per token) parameters, counted from the config alone."""
    D, H, K, E, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, head_dim(cfg), cfg.vocab_size
    attention = D * H * E + 2 * D * K * E + H * E * D + 2 * E  # wq, wk + wv, wo, q_norm + k_norm
    total = active = V * D * (1 if cfg.tie_word_embeddings else 2) + D  # embedding (+ output), final norm
    for layer in range(cfg.n_layers):
        block = attention + 2 * D  # + the two block norms
        if cfg.moe.n_routed_experts and layer >= cfg.moe.n_dense_layers:
            X, k, F = cfg.moe.n_routed_experts, cfg.moe.top_k, cfg.moe.hidden_dim
            total += block + X * D + X * 3 * D * F  # router, experts
            active += block + X * D + k * 3 * D * F
        else:
            total += block + 3 * D * cfg.ffn_hidden_dim
            active += block + 3 * D * cfg.ffn_hidden_dim
    return total, active


def test_moe_debug_counts_active_params_in_flops():
    cfg = preset("qwen3_moe_debug")
    model = SPEC.build_model(cfg, SEQ)
    total, active = expected_params(cfg)
    n_params, flops = SPEC.params_and_flops(model, cfg, SEQ)
    assert n_params == total == sum(p.numel() for p in model.parameters())
    assert active < total
    # 6 x active non-embedding params + 12 x layers x heads x head_dim x seq_len
    assert flops == 6 * (active - cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * SEQ


# The model cards' figures (Qwen's, rounded to 2 or 3 digits): all params, non-embedding (dense), active (MoE).
PUBLISHED = {
    "qwen3_0_6b": (0.6e9, 0.44e9, None), "qwen3_1_7b": (1.7e9, 1.4e9, None), "qwen3_4b": (4.0e9, 3.6e9, None),
    "qwen3_8b": (8.2e9, 6.95e9, None), "qwen3_14b": (14.8e9, 13.2e9, None), "qwen3_32b": (32.8e9, 31.2e9, None),
    "qwen3_30b_a3b": (30.5e9, None, 3.3e9), "qwen3_235b_a22b": (235e9, None, 22e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_on_meta(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = SPEC.build_model(cfg, 4096)
    n_params, flops = SPEC.params_and_flops(model, cfg, 4096)
    total, active = expected_params(cfg)
    assert n_params == total
    published_total, non_embedding, published_active = PUBLISHED[name]
    assert total == pytest.approx(published_total, rel=0.02)
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_word_embeddings else 2)
    if non_embedding:
        assert total - embeddings == pytest.approx(non_embedding, rel=0.02)
    if published_active:
        assert active == pytest.approx(published_active, rel=0.02)
    assert flops == 6 * (active - cfg.vocab_size * cfg.dim) + 12 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * 4096


def test_tied_matrix_starts_as_an_output_head():
    """qwen3_debug ties the output head to the embedding; the shared matrix is drawn with std dim^-0.5, so
    the first logits are O(1) (an N(0, 1) embedding would make them ~sqrt(dim))."""
    cfg = preset("qwen3_debug")
    torch.manual_seed(0)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.std().item() == pytest.approx(cfg.dim**-0.5, rel=0.1)
    assert logits(model, tokens_for(cfg)).std().item() < 3


# ----------------------------------------------------------------------------- presets
PRESETS = sorted(p.stem for p in (CONF / "model").glob("qwen3_*.yaml"))


def test_every_preset_is_covered():
    assert set(PRESETS) == set(PUBLISHED) | {"qwen3_debug", "qwen3_moe_debug"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_says_what_it_is(name):
    # a flavor file extends the family's base option: between them they set every key explicitly
    text = (CONF / "model" / f"{name}.yaml").read_text()
    base = (CONF / "model" / "qwen3" / "base.yaml").read_text()
    assert text.startswith("# ") and "- qwen3/base@_here_" in text
    for key in ("name", "flavor", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                "ffn_hidden_dim", "norm_eps", "qk_norm", "rope_theta", "rope_scaling", "tie_word_embeddings"):
        assert re.search(rf"^{key}:", text + "\n" + base, re.MULTILINE), f"{name} and qwen3/base do not set {key}"
    cfg = preset(name)
    assert cfg.name == "qwen3" and cfg.qk_norm and not cfg.rope_scaling and cfg.norm_eps == 1e-6
    assert cfg.rope_theta == 1e6 and head_dim(cfg) == (64 if "debug" in name else 128)


# Full-scale layouts on a fake process group: (overrides, world size). MoE layers take FSDP here; their
# tensor and expert parallelism is pretrain/distributed/expert_parallel.py's.
DRY_RUNS = {
    "qwen3_235b_a22b_fsdp64": (["model=qwen3_235b_a22b", "parallelism=fsdp", "cluster.nproc_per_node=64"], 64),
    "qwen3_32b_fsdp8_tp8": (["model=qwen3_32b", "parallelism=fsdp_tp", "parallelism.tensor_parallel_degree=8",
                             "cluster.nproc_per_node=64"], 64),
    "qwen3_4b_tied_fsdp4_tp2": (["model=qwen3_4b", "parallelism=fsdp_tp", "cluster.nproc_per_node=8"], 8),
    "qwen3_14b_fsdp2_tp4_pp2": (["model=qwen3_14b", "parallelism=fsdp_tp_pp", "parallelism.tensor_parallel_degree=4",
                                 "cluster.nproc_per_node=16"], 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_at_full_scale(tmp_path, case):
    overrides, world = DRY_RUNS[case]
    proc = run_launch([*overrides, "dry_run=true"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"world {world} = ParallelDims" in proc.stdout
    local = int(re.search(r"rank 0 holds ([\d,]+) parameters", proc.stdout).group(1).replace(",", ""))
    total, _ = expected_params(preset(overrides[0].split("=")[1]))
    if "pp" in case:  # rank 0 holds the first stage (the embedding, and a layer more or less)
        assert total / world / 2 <= local <= total / world * 2
    else:
        assert local == pytest.approx(total / world, rel=0.01)  # FSDP pads the shards a little


# ----------------------------------------------------------------------------- tensor parallel q/k norms
TP2 = ["parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2"]
ATOL_GRAD = 1e-5  # fp32: sums over heads and ranks in another order, ~1e-7 relative


def _tp_worker(rank: int, world_size: int, job) -> None:
    from torch.distributed.tensor import DTensor, Partial, Replicate

    full, want = logits_and_grads(SPEC, job, world_size, parallel=False)
    tp, got = logits_and_grads(SPEC, job, world_size, parallel=True)
    assert (got - want).abs().max().item() <= ATOL_GRAD * want.abs().max().item(), (got - want).abs().max().item()
    for name in ("q_norm", "k_norm"):
        for i in tp.layers:
            weight = getattr(tp.layers[i].attention, name).weight
            assert isinstance(weight, DTensor) and weight.placements == (Replicate(),)
            # each rank's gradient covers its own heads: a pending sum over tp (Partial), reduced when
            # read (clipping, optimizer step), as for the sequence-parallel norms
            grad, ref = weight.grad, getattr(full.layers[i].attention, name).weight.grad
            assert isinstance(grad, DTensor) and grad.placements in ((Partial(),), (Replicate(),)), grad
            err = (grad.full_tensor() - ref).abs().max().item()
            assert err <= ATOL_GRAD * ref.abs().max().item(), f"rank {rank} layer {i} {name}: {err:.3g}"
            if grad.placements == (Partial(),):  # one rank's heads alone are not the gradient
                assert (grad.to_local() - ref).abs().max().item() > 1e-2 * ref.abs().max().item()


@pytest.mark.multiprocess
def test_qk_norm_gradients_are_summed_over_tp_ranks():
    """TP 2 on two gloo processes: logits and every q/k norm weight's gradient (replicated over tp)
    equal those of the unsharded model, i.e. each rank's heads' contributions are summed."""
    job = resolve(compose(["model=qwen3_debug", "model.n_layers=2", "parallelism=tp", *TP2,
                           "parallelism.disable_loss_parallel=true", "training.seq_len=16"]))
    run_on_ranks(_tp_worker, 2, job)


# ----------------------------------------------------------------------------- launched runs
# qwen3_debug (tied, head_dim != dim / n_heads) shrunk so that 2 processes on 2 cores take seconds
SMALL = [
    "model=qwen3_debug", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=32", "model.ffn_hidden_dim=96", "model.vocab_size=512", "training.seq_len=32",
    "training.steps=4", "training.deterministic=true", "lr_scheduler.warmup_steps=2", "optimizer.lr=3e-3",
    "metrics.log_freq=1", "metrics.enable_aim=false", "checkpoint.enable=false",
]
LAYOUTS = {  # global batch 8 in each
    "single": ["training.local_batch_size=8"],
    "tp2": ["parallelism=tp", *TP2, "training.local_batch_size=8"],
    "fsdp2": ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"],
}


def launch(root, name: str, overrides: list[str], cache_dir) -> dict[int, float]:
    proc = run_launch([*overrides, f"job.name={name}", f"data.cache_dir={cache_dir}"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(root / "outputs" / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("qwen3_runs")
    return {name: launch(root, name, [*SMALL, *extra], cache_dir) for name, extra in LAYOUTS.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "fsdp2"])
def test_dense_layout_matches_single_process(runs, layout):
    single, other = runs["single"], runs[layout]
    assert sorted(single) == sorted(other) == [1, 2, 3, 4]
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=LOSS_RTOL), (layout, step, other[step], single[step])


@pytest.mark.multiprocess
def test_moe_debug_trains_and_reruns_identically(tmp_path, cache_dir):
    base = ["model=qwen3_moe_debug", "model.n_layers=2", "training.seq_len=64", "training.local_batch_size=4",
            "training.deterministic=true", "lr_scheduler.warmup_steps=2", "optimizer.lr=3e-3", "metrics.log_freq=1",
            "metrics.enable_aim=false", "checkpoint.enable=false"]
    first = launch(tmp_path, "moe_a", [*base, "training.steps=6"], cache_dir)
    assert sorted(first) == list(range(1, 7)) and all(math.isfinite(v) for v in first.values())
    assert first[6] < first[1] - 0.05
    again = launch(tmp_path, "moe_b", [*base, "training.steps=6"], cache_dir)
    assert again == first  # deterministic: the same routing and the same losses, bit for bit
