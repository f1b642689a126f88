"""Profiler traces land in the run directory on their schedule, one per rank, and hold real op events."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, read_metrics, run_launch

pytestmark = pytest.mark.multiprocess


def test_traces_every_profile_freq_steps_per_rank(tmp_path):
    args = TINY + [
        "training.steps=9",
        "parallelism=fsdp",
        "cluster.nproc_per_node=2",
        "training.local_batch_size=2",
        "profiling.enable_profiling=true",
        "profiling.profile_freq=4",
        "profiling.profiler_warmup=1",
        "profiling.profiler_active=1",
        "profiling.enable_memory_snapshot=true",  # CUDA only: a CPU run warns and writes none
        "checkpoint.enable=false",
        "job.name=prof",
    ]
    out = run_launch(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "prof"
    traces = run_dir / "profile_traces"
    # windows end on multiples of profile_freq: steps 4 and 8 of 9
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_4", "iteration_8"]
    for folder in traces.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["rank0_trace.json", "rank1_trace.json"]
        events = json.loads((folder / "rank0_trace.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names), sorted(names)[:20]
    assert not (run_dir / "memory_snapshot").exists()
    assert "memory snapshots record the CUDA allocator" in out.stderr + out.stdout
    # step 1 is reported as warm-up; memory is logged every step
    assert "first step took" in out.stderr + out.stdout
    assert all(m["memory_gib"] > 0 for m in read_metrics(run_dir))
