"""Context parallelism: load-balanced sharding, both attention methods on real gloo groups against full
causal attention, the model with CP against the model without, and training runs against one process.

The attention and model checks run in processes spawned here (2 and 4 ranks, small tensors); the
training runs go through launch.py like every other layout test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, losses, run_launch, run_on_ranks, val_losses, with_validation

from pretrain.config import ConfigError
from pretrain.distributed.context_parallel import load_balanced_positions

# Attention on fp32 inputs. Both methods compute the same softmax as SDPA with the terms summed in
# another order (allgather: SDPA on chunks; ring: per-block log-sum-exp merges in fp32), so outputs
# and q/k/v gradients of O(1) size differ by a few fp32 ulps. Measured (torch 2.13 CPU, T=8*cp,
# E=16, unit-normal inputs): at most 9.6e-7 absolute for cp 2 and 4, both methods. We allow 5e-6.
# (A missing causal mask, or one shifted by a token, moves outputs by > 1 here.)
ATOL_FP32 = 5e-6
# The same in fp64 shows the algorithms are exact, not merely close: measured at most 2.7e-15.
ATOL_FP64 = 1e-12
# The model (2 layers, RoPE, GQA) with CP vs without, fp32 logits: measured at most 3.6e-7. RoPE rows
# not narrowed to the rank's positions give 1e-4 here, so 5e-6 separates the two by > 10x each way.
ATOL_MODEL = 5e-6


def test_load_balanced_positions():
    assert load_balanced_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert load_balanced_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    for cp in (2, 4):
        shards = [load_balanced_positions(64, cp, r) for r in range(cp)]
        assert sorted(torch.cat(shards).tolist()) == list(range(64))  # a partition of the sequence
        # causal work of a query at position p is p + 1 keys: the same on every rank
        assert len({int((s + 1).sum()) for s in shards}) == 1
    with pytest.raises(ConfigError, match="Fix:"):
        load_balanced_positions(18, 2, 0)


def _attention_worker(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from pretrain.config import ModelConfig
    from pretrain.distributed.context_parallel import (
        allgather_attention,
        apply_context_parallel,
        ring_attention,
        shard_sequence,
    )
    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.models.llama3.model import Transformer

    group = dist.group.WORLD
    B, H, T, E = 2, 3, 8 * world_size, 16
    positions = load_balanced_positions(T, world_size, rank)
    for dtype, atol in ((torch.float32, ATOL_FP32), (torch.float64, ATOL_FP64)):
        gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        q, k, v, dout = (torch.randn(B, H, T, E, generator=gen, dtype=dtype) for _ in range(4))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*full, is_causal=True)
        ref.backward(dout)
        for fn in (allgather_attention, ring_attention):
            local = [t[:, :, positions].clone().requires_grad_() for t in (q, k, v)]
            out = fn(*local, group)
            out.backward(dout[:, :, positions])
            pairs = {"out": (out, ref)} | {f"d{n}": (a.grad, b.grad) for n, a, b in zip("qkv", local, full)}
            for name, (got, want) in pairs.items():
                err = (got - want[:, :, positions]).abs().max().item()
                assert err <= atol, f"{fn.__name__} cp={world_size} rank={rank} {dtype} {name}: {err:.3g}"

    # The whole model: CP (attention op + RoPE rows) vs the same weights without CP.
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32)
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    full_model = Transformer(cfg, max_seq_len=T)
    full_model.init_weights()
    want = full_model(tokens)[:, positions]
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=world_size, tp=1, pp=1, world_size=world_size)
    dims.build_mesh("cpu")
    for method in ("allgather", "ring"):
        job = SimpleNamespace(
            parallelism=SimpleNamespace(context_parallel_method=method), training=SimpleNamespace(seq_len=T)
        )
        torch.manual_seed(0)
        model = Transformer(cfg, max_seq_len=T)
        model.init_weights()  # CPU order: init, then parallelize
        apply_context_parallel(model, dims, job)
        (local_tokens,) = shard_sequence(dims.mesh("cp"), tokens)
        err = (model(local_tokens) - want).abs().max().item()
        assert err <= ATOL_MODEL, f"model {method} cp={world_size} rank={rank}: {err:.3g}"
        weights = {name: t.clone() for name, t in model.state_dict().items()}
        model.init_weights()  # CUDA order: init after parallelize recomputes the full RoPE table
        model.load_state_dict(weights)  # (the same weights again; freqs_cis is not in the state dict)
        assert model.freqs_cis.shape[0] == T
        err = (model(local_tokens) - want).abs().max().item()
        assert model.freqs_cis.shape[0] == T // world_size
        assert err <= ATOL_MODEL, f"model {method} after init_weights cp={world_size} rank={rank}: {err:.3g}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 4])
def test_attention_and_model_match_full(world_size):
    run_on_ranks(_attention_worker, world_size)


# ---- training runs ---------------------------------------------------------------------------------

# fp32 on CPU, 8 steps, global batch 8 x 32 tokens in every run. CP changes only the order of sums
# (attention over chunks, FSDP reduce-scatter over cp ranks), ~1e-7 relative each. Measured (torch
# 2.13 CPU): at most 2.2e-7 relative on the loss for every layout below. At this size the freshly
# initialised model barely uses attention, so bugs move the loss little: no causal mask gives 1e-4 by
# step 2, RoPE rows not narrowed to the rank's positions 2e-6 to 3e-6. Hence 1e-6, tighter than the
# data-parallel tests (the sharp check of RoPE and masks is the model test above).
RTOL = 1e-6
CP2 = ["parallelism.data_parallel_shard_degree=1", "parallelism.context_parallel_degree=2"]
LAYOUTS = {
    "single": ["training.local_batch_size=8"],
    "cp2": [*CP2, "cluster.nproc_per_node=2", "training.local_batch_size=8"],
    "fsdp2_cp2": ["parallelism=fsdp_cp", "cluster.nproc_per_node=4", "training.local_batch_size=4"],
    "cp2_tp2_ring": [
        *CP2, "parallelism.tensor_parallel_degree=2", "parallelism.context_parallel_method=ring",
        "cluster.nproc_per_node=4", "training.local_batch_size=8",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("cp")
    result = {}
    for name, overrides in LAYOUTS.items():
        args = with_validation(
            [*TINY, *overrides, "training.steps=8", "checkpoint.enable=false"], freq=8
        )  # the held-out loss at step 8, over the same 16 windows in each layout
        proc = run_launch([*args, f"job.name={name}", f"data.cache_dir={cache_dir}"], cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result[name] = (losses(root / "outputs" / name), val_losses(root / "outputs" / name))
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_cp_layout_matches_single_process(runs, layout):
    (single, single_held_out), (other, held_out) = runs["single"], runs[layout]
    assert sorted(other) == sorted(single) == list(range(1, 9))
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=RTOL), (layout, step, other[step], single[step])
    assert sorted(held_out) == sorted(single_held_out) == [8]
    assert held_out[8] == pytest.approx(single_held_out[8], rel=RTOL), layout
