"""Layer 3 for the MoE families: expert parallelism (alone, with FSDP, with TP) on 2 and 4 CPU processes
trains Qwen3-MoE, DeepSeek-V3 and Llama 4 like one process, through launch.py, with the load metrics logged.

The reference is one process with gradient accumulation over the same per-rank micro-batches: the balance
loss is computed per forward, so a data-parallel rank's micro-batch is the unit both sides share.
(Without accumulation it would see 8 sequences at once instead of 4.) DeepSeek's debug flavor has no
balance loss, so its routing is per token and any batching gives the same step: its pipeline runs
(micro-batches of one sequence) compare with the same reference.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import losses, read_metrics, run_launch, val_losses, with_validation

pytestmark = pytest.mark.multiprocess

# fp32 on CPU: the layouts sum the same products in another order (reduce-scatter, all-to-all regrouping),
# ~1e-7 relative per op; Adam can amplify that in tiny-gradient coordinates, so 1e-5 relative over 6 steps.
# Measured (2026-11, torch 2.13 CPU): at most 2e-7. A token routed to the wrong expert or a gradient
# missing a rank's share moves the loss by > 1e-4 within a few steps. (A routing near-tie could flip on
# rounding and break this; the seeds here have none.)
RTOL = 1e-5
STEPS = 6  # enough for routing and Adam to move the experts apart; every launched run here costs seconds

SMALL = {
    "qwen3": ["model=qwen3_moe_debug", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.head_dim=16", "model.vocab_size=512", "model.moe.hidden_dim=32"],
    "deepseek_v3": ["model=deepseek_v3_debug", "model.dim=64", "model.n_layers=3", "model.n_heads=4",
                    "model.vocab_size=512", "model.ffn_hidden_dim=128", "model.moe.hidden_dim=32",
                    "model.mla.kv_lora_rank=32", "model.mla.q_lora_rank=48", "model.mla.qk_nope_head_dim=16",
                    "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=16"],
    # 4 layers: chunked RoPE layers (8-token chunks, 4 per sequence), the NoPE layer 3 with its query temperature
    # stepping every 4 positions, MoE in layers 1 and 3; no balance loss, so routing is per token (as DeepSeek's)
    "llama4": ["model=llama4_debug", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
               "model.vocab_size=512", "model.ffn_hidden_dim=128", "model.moe.hidden_dim=32",
               "model.attention_window_size=8", "model.attn_floor_scale=4", "model.moe.aux_loss_coeff=0"],
    # 2 layers: an 8-token sliding window with sinks (layer 0), full attention with sinks (layer 1), biases in the
    # attention, the router and the experts, the clamped SwiGLU; no balance loss, so routing is per token
    "gpt_oss": ["model=gpt_oss_debug", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                "model.head_dim=16", "model.vocab_size=512", "model.moe.hidden_dim=32"],
}
COMMON = ["training.seq_len=32", "training.deterministic=true", "training.global_batch_size=8",
          "lr_scheduler.warmup_steps=2", "optimizer.lr=3e-3", "metrics.log_freq=1", "metrics.enable_aim=false",
          f"training.steps={STEPS}"]
LAYOUTS = {  # name: (overrides, the reference with the same micro-batches)
    "accum2": (["training.local_batch_size=4"], None),
    "accum4": (["training.local_batch_size=2"], None),
    "ep2": (["parallelism=fsdp", "cluster.nproc_per_node=2", "parallelism.expert_parallel_degree=2",
             "training.local_batch_size=4"], "accum2"),
    "ep4": (["parallelism=fsdp", "cluster.nproc_per_node=4", "parallelism.expert_parallel_degree=4",
             "training.local_batch_size=2"], "accum4"),
    "fsdp4_ep2": (["parallelism=fsdp", "cluster.nproc_per_node=4", "parallelism.expert_parallel_degree=2",
                   "training.local_batch_size=2"], "accum4"),
    # compiled blocks (experts and the all-to-all eager between them) under full activation checkpointing
    "ep2_compile_ac": (["parallelism=fsdp", "cluster.nproc_per_node=2", "parallelism.expert_parallel_degree=2",
                        "training.local_batch_size=4", "compile.enable=true", "activation_checkpoint.mode=full"],
                       "accum2"),
    # pipeline stages with MoE layers (the load metrics and bias update span the stages), alone and with EP
    "pp2": (["parallelism=fsdp_pp", "cluster.nproc_per_node=2", "training.local_batch_size=8"], "accum2"),
    "pp2_ep2": (["parallelism=fsdp_pp", "cluster.nproc_per_node=4", "parallelism.expert_parallel_degree=2",
                 "training.local_batch_size=4"], "accum2"),
    # the two stages' blocks compiled under full activation checkpointing
    "pp2_compile_ac": (["parallelism=fsdp_pp", "cluster.nproc_per_node=2", "training.local_batch_size=8",
                        "compile.enable=true", "activation_checkpoint.mode=full"], "accum2"),
    # the last step's checkpoint removed, the rerun resumes from step 3 (expert-sharded weights, Adam state, biases)
    "ep2_resumed": (["parallelism=fsdp", "cluster.nproc_per_node=2", "parallelism.expert_parallel_degree=2",
                     "training.local_batch_size=4"], "ep2"),
    # the reference without validation: the held-out forwards route tokens, which must not move the expert biases
    "accum2_no_validation": (["training.local_batch_size=4", "validation.enable=false"], None),
    "ep2_tp2": (["parallelism=fsdp_tp", "cluster.nproc_per_node=4", "parallelism.tensor_parallel_degree=2",
                 "parallelism.expert_parallel_degree=2", "training.local_batch_size=4"], "accum2"),
}
RUNS = {
    "qwen3": ["accum2", "accum4", "ep2", "ep4", "ep2_tp2", "ep2_compile_ac"],
    # (FSDP 4 x EP 2: tests/test_expert_parallel.py)
    "deepseek_v3": ["accum2", "accum2_no_validation", "ep2", "pp2", "pp2_ep2", "ep2_resumed"],
    # FSDP 2 x TP 2 x EP 2 on 4 processes; PP 2 compiled under AC on 2 (EP alone, PP with EP: the families above)
    "llama4": ["accum2", "ep2_tp2", "pp2_compile_ac"],
    # the same two: sinks and biases split with heads and hidden units under TP, expert biases carried under EP
    "gpt_oss": ["accum2", "ep2_tp2", "pp2_compile_ac"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family, names in RUNS.items():
        for name in names:
            job = f"{family}_{name}"
            resumed = name.endswith("_resumed")
            # the held-out loss at steps 3 and 6 over the same 16 windows in every layout
            args = with_validation([*SMALL[family], *COMMON, f"checkpoint.interval={3 if resumed else 100}",
                                    *LAYOUTS[name][0]], freq=3)
            args += [o for o in LAYOUTS[name][0] if o.startswith("validation.")]  # the layout's own say last
            args += [f"job.name={job}", f"data.cache_dir={cache_dir}"]
            proc = run_launch(args, cwd=root, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            if resumed:  # lose the last checkpoint: the same command redoes steps 4..6 from step 3
                shutil.rmtree(root / "outputs" / job / "checkpoint" / f"step-{STEPS}")
                proc = run_launch(args, cwd=root, timeout=600)
                assert proc.returncode == 0 and "step-3" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
            out[(family, name)] = root / "outputs" / job
    return out


@pytest.mark.parametrize("family, name", [(f, n) for f, names in RUNS.items() for n in names if LAYOUTS[n][1]])
def test_expert_parallel_layout_trains_like_one_process(runs, family, name):
    ref = losses(runs[(family, LAYOUTS[name][1])])
    got = losses(runs[(family, name)])
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    # A resumed run repeats the same arithmetic: equal to the bit. Inductor fuses and reorders the fp32 sums
    # of the compiled parts, and Adam grows that: measured (2026-11) 2.5e-6, 6.4e-6 at steps 2-3, up to
    # 3e-4 by step 10; so 2e-5 for 3 steps (a wrong routing or gradient share is > 1e-4 by then), 1e-3 after.
    for step, value in ref.items():
        rtol = 0.0 if name.endswith("_resumed") else RTOL
        if "compile" in name:
            rtol = 2e-5 if step <= 3 else 1e-3
        assert got[step] == pytest.approx(value, rel=rtol), f"{family} {name} step {step}: {got[step]} vs {value}"
    ref, got = val_losses(runs[(family, LAYOUTS[name][1])]), val_losses(runs[(family, name)])
    assert sorted(got) == sorted(ref) == [3, 6]
    for step, value in ref.items():
        rtol = 0.0 if name.endswith("_resumed") else 1e-3 if "compile" in name else RTOL
        assert got[step] == pytest.approx(value, rel=rtol), f"{family} {name} held-out loss at {step}"


def test_validation_leaves_expert_biases_alone(runs):
    """DeepSeek-V3 updates its expert biases from the tokens routed in training; the held-out forwards route
    tokens too, and are not counted: the training losses with and without validation are equal to the bit."""
    with_it, without = runs[("deepseek_v3", "accum2")], runs[("deepseek_v3", "accum2_no_validation")]
    assert not val_losses(without) and sorted(val_losses(with_it)) == [3, 6]
    assert losses(with_it) == losses(without)


@pytest.mark.parametrize("family", RUNS)
def test_expert_load_is_logged(runs, family):
    for name in RUNS[family]:
        for m in read_metrics(runs[(family, name)]):
            # max/mean >= 1 >= min/mean; with 8 experts and 2-4 sequences of 32 tokens no layer is balanced exactly
            assert m["moe_max_load"] > 1.0 >= m["moe_min_load"] >= 0.0
