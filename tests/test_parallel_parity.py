"""Layer 3: data- and tensor-parallel layouts on 2 and 4 CPU processes (gloo) train like one process.

All runs see the same global batch of 8 sequences per step (the loader's stream is global), start
from the same weights (CPU init is done on the full model, then sharded) and take the per-token mean
over the global batch, so the only difference left is the order of floating-point sums.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import TINY, losses, read_metrics, run_launch, val_losses, with_validation

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
    "tp2": [
        "parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2",
        "training.local_batch_size=8",
    ],
    "tp2_gathered_loss": [
        "parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2",
        "training.local_batch_size=8", "parallelism.disable_loss_parallel=true",
    ],
    "fsdp2_tp2": ["parallelism=fsdp_tp", "cluster.nproc_per_node=4", "training.local_batch_size=4"],
    # gradient accumulation: 4 micro-batches of 2 in one process, and 2 x 2 on two FSDP ranks
    "accum4": ["training.local_batch_size=2", "training.global_batch_size=8"],
    "fsdp2_accum2": [
        "parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=2", "training.global_batch_size=8",
    ],
}


def layout_args(overrides: list[str]) -> list[str]:
    """The launch.py overrides of a layout (tests/test_activation_checkpoint.py compares against fsdp2's run),
    validating at steps 5 and 10 over the same 16 held-out windows in every layout."""
    return with_validation([*TINY, *overrides, "checkpoint.interval=5", "checkpoint.keep_latest_k=0"])


@pytest.fixture(scope="module")
def parity_root(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def run_dirs(launch_once):
    """Each layout's run directory (shared with other modules launching the same run)."""
    return {name: launch_once(layout_args(overrides))[0] for name, overrides in LAYOUTS.items()}


@pytest.fixture(scope="module")
def runs(run_dirs):
    return {name: losses(run_dir) for name, run_dir in run_dirs.items()}


def test_single_process_learns(runs):
    single = runs["single"]
    assert sorted(single) == list(range(1, 11))
    # the reference trains at all (how far depends on the corpus, i.e. on the Python install): the mean
    # loss of the last three steps is below that of the first three
    first, last = sum(single[s] for s in (1, 2, 3)) / 3, sum(single[s] for s in (8, 9, 10)) / 3
    assert last < first - 0.05


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_layout_matches_single_process(runs, layout):
    single, other = runs["single"], runs[layout]
    assert sorted(other) == sorted(single)
    for step in single:
        assert other[step] == pytest.approx(single[step], rel=RTOL), (layout, step, other[step], single[step])


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "single"])
def test_held_out_loss_matches_single_process(run_dirs, layout):
    """The same 16 held-out windows, forward only, in every layout: the same sums in another order (RTOL)."""
    single, other = val_losses(run_dirs["single"]), val_losses(run_dirs[layout])
    assert sorted(single) == [5, 10] and sorted(other) == [5, 10]
    assert other == pytest.approx(single, rel=RTOL), layout


def test_validation_changes_no_training_loss(runs, launch_once):
    """Validation reads its own loader and no RNG, and puts the model back in training mode: the training losses
    of the same run without it are equal to the bit (deterministic CPU run)."""
    run_dir, _ = launch_once([*layout_args(LAYOUTS["single"]), "validation.enable=false"])
    assert not val_losses(run_dir)
    assert losses(run_dir) == runs["single"]


# Resharding: a checkpoint saved by one layout resumes in another. Model and optimizer reshard
# through DCP; the data position is global, so the loader continues at the same window.
RESHARD = {
    "fsdp4_to_fsdp2_tp2": ("fsdp4", LAYOUTS["fsdp2_tp2"]),
    "tp2_to_single": ("tp2", LAYOUTS["single"]),
}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_resharded_resume_continues_the_run(runs, run_dirs, parity_root, cache_dir, case):
    source, target_overrides = RESHARD[case]
    run_dir = parity_root / "outputs" / case
    shutil.copytree(run_dirs[source], run_dir)
    shutil.rmtree(run_dir / "checkpoint" / "step-10")
    args = [*layout_args(target_overrides), f"job.name={case}", f"data.cache_dir={cache_dir}"]
    proc = run_launch(args, cwd=parity_root, timeout=600)  # resumes from step-5
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = losses(run_dir)
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 11)) + list(range(6, 11))
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(runs[source][step], rel=RTOL), (case, step)
    # the held-out loss of step 5 was measured before its checkpoint: the resumed run does not measure it again
    assert [m["step"] for m in read_metrics(run_dir) if "val_loss" in m] == [5, 10, 10]
    assert val_losses(run_dir)[10] == pytest.approx(val_losses(run_dirs[source])[10], rel=RTOL), case
