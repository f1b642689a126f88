"""Expert parallelism and MoE tensor parallelism on 2 and 4 CPU processes (gloo): a small decoder with MoE
feed-forwards (sigmoid routing with a bias that changes choices, a shared expert, the balance loss) trains
3 AdamW steps in each layout, and its losses and every parameter's gradient match the same model trained in
one process on the whole batch. The tolerances and why are in tests/moe_parallel_worker.py. The families'
own EP runs through launch.py are in tests/test_moe_families.py."""

from __future__ import annotations

import pytest
from helpers import run_on_ranks
from moe_parallel_worker import check_layouts

from pretrain.config import ConfigError, ParallelismConfig
from pretrain.distributed.parallel_dims import ParallelDims


def run_worker(nproc: int, layouts: list[str]) -> None:
    for lines in run_on_ranks(check_layouts, nproc, layouts):
        assert [line.split()[:3] for line in lines] == [["layout", name, "ok"] for name in layouts], lines


@pytest.mark.multiprocess
def test_two_processes_ep_and_moe_tp():
    run_worker(2, ["ep2", "tp2", "ep2_skewed"])  # skewed: one expert rank gets no token, and must not hang


@pytest.mark.multiprocess
def test_four_processes_ep_with_fsdp_and_tp():
    # ep4: all experts spread, one FSDP rank per expert group; fsdp4_ep2: experts also FSDP-sharded over
    # 2 ranks; fsdp2_ep2_tp2: EP on the FSDP ranks and the experts' hidden units over TP; fsdp2_tp2: MoE TP
    run_worker(4, ["ep4", "fsdp4_ep2", "fsdp2_ep2_tp2", "fsdp2_tp2"])


@pytest.mark.parametrize(
    "degrees, world, key",
    [
        (dict(expert_parallel_degree=3), 4, "expert_parallel_degree=3"),  # does not divide dp_shard x cp = 4
        (dict(expert_parallel_degree=2, tensor_parallel_degree=2), 2, "expert_parallel_degree=2"),  # dp_shard = 1
        # not a multiple of cp
        (dict(expert_parallel_degree=2, context_parallel_degree=4), 8, "expert_parallel_degree=2"),
        (dict(expert_parallel_degree=0), 2, "expert_parallel_degree=0"),
    ],
)
def test_bad_expert_degrees_are_refused(degrees, world, key):
    p = ParallelismConfig(**degrees)
    with pytest.raises(ConfigError, match=key):
        ParallelDims.from_config(p, world)


def test_ep_borrows_from_dp_shard_and_cp():
    p = ParallelismConfig(expert_parallel_degree=4, context_parallel_degree=2)
    dims = ParallelDims.from_config(p, 8)
    assert (dims.dp_shard, dims.cp, dims.ep, dims.ep_enabled) == (4, 2, 4, True)
