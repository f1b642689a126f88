"""Layer 3: every data-parallel layout on 2 and 4 CPU processes (gloo) trains like one process.

All runs see the same global batch of 8 sequences per step (the loader's stream is global), start
from the same weights (CPU init is done on the full model, then sharded) and take the per-token mean
over the global batch, so the only difference left is the order of floating-point sums.
"""

from __future__ import annotations

import pytest

from helpers import TINY, losses, run_launch

pytestmark = pytest.mark.multiprocess

# fp32 on CPU. FSDP reduce-scatters gradients over ranks and each rank sums its own micro-batch, so
# sums are grouped differently than in one process: ~1e-7 relative per reduction. Adam divides by
# sqrt(v), which can amplify such noise in tiny-gradient coordinates, so over 10 steps we allow 1e-5
# relative on the loss. Measured (2026-11, torch 2.13 CPU): at most 1.5e-7 for every layout below.
# A wrong reduction (e.g. a missing division by the dp degree) moves the loss by > 1e-2 in 2 steps.
RTOL = 1e-5

LAYOUTS = {
    # name: overrides on top of TINY (global batch is 8 sequences in every case)
    "single": ["training.local_batch_size=8"],
    "fsdp2": ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"],
    "fsdp4": ["parallelism=fsdp", "cluster.nproc_per_node=4", "training.local_batch_size=2"],
    "hsdp2x2": ["parallelism=hsdp", "cluster.nproc_per_node=4", "training.local_batch_size=2"],
    # gradient accumulation: 4 micro-batches of 2 in one process, and 2 x 2 on two FSDP ranks
    "accum4": ["training.local_batch_size=2", "training.global_batch_size=8"],
    "fsdp2_accum2": [
        "parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=2", "training.global_batch_size=8",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("parity")
    result = {}
    for name, overrides in LAYOUTS.items():
        args = [*TINY, *overrides, f"job.name={name}", f"data.cache_dir={cache_dir}", "checkpoint.enable=false"]
        proc = run_launch(args, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result[name] = losses(root / "outputs" / name)
    return result


def test_single_process_learns(runs):
    single = runs["single"]
    assert sorted(single) == list(range(1, 11))
    assert single[10] < single[1] - 0.2


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_layout_matches_single_process(runs, layout):
    single, other = runs["single"], runs[layout]
    assert sorted(other) == sorted(single)
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=RTOL), (layout, step, other[step], single[step])
