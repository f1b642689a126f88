"""Metrics: MFU arithmetic, peak FLOP/s (GPU table, measured+cached CPU), and the rank-0 logger with real Aim."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import aim_metric

from pretrain.components.metrics import AIM_HASH_FILE, JSONL_FILE, MetricsLogger, memory_gib, throughput
from pretrain.components.peak_flops import CPU_CACHE_FILE, peak_flops, peak_flops_for_name
from pretrain.config import ConfigError, JobConfig

KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "memory_gib", "elapsed_s")


def _values(step: int) -> dict[str, float]:
    return {
        "loss": 10.0 - step,
        "grad_norm": 0.5 * step,
        "lr": 1e-4 * step,
        "tokens_per_s": 1000.0 + step,
        "tflops": 0.1 * step,
        "mfu": 1.5 * step,
        "memory_gib": 1.25,
        "elapsed_s": 2.0 * step,
    }


def _job(tmp_path, aim: bool = True) -> JobConfig:
    job = JobConfig()
    job.job.name = "metrics_test"
    job.job.dump_folder = str(tmp_path)
    job.job.run_dir = str(tmp_path / "metrics_test")
    job.metrics.aim_repo = str(tmp_path / "aim")  # does not exist yet: the logger must create the repo
    job.metrics.enable_aim = aim
    job.training.steps = 1000
    return job


def test_throughput_matches_formula():
    # 4096 tokens in 2 s -> 2048 tokens/s; x 1e9 FLOPs/token -> 2.048e12 FLOP/s = 2.048 TFLOP/s;
    # against a 10.24e12 FLOP/s peak that is 2.048 / 10.24 = 20 % MFU.
    out = throughput(tokens=4096, seconds=2.0, flops_per_token=1e9, peak=10.24e12)
    assert out["tokens_per_s"] == pytest.approx(2048.0)
    assert out["tflops"] == pytest.approx(2.048)
    assert out["mfu"] == pytest.approx(20.0)


@pytest.mark.parametrize(
    "name, dtype, flops, label",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12, "H100 SXM bf16"),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12, "H100 PCIe bf16"),
        ("NVIDIA H100 NVL", torch.bfloat16, 835e12, "H100 NVL bf16"),
        ("NVIDIA H200", torch.bfloat16, 989.5e12, "H200 bf16"),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.5e12, "GH200 bf16"),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12, "A100 bf16"),
        ("NVIDIA B200", torch.bfloat16, 2.25e15, "B200 bf16"),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12, "L40S bf16"),
        ("NVIDIA L4", torch.bfloat16, 121e12, "L4 bf16"),
        ("NVIDIA A10G", torch.bfloat16, 125e12, "A10G bf16"),
        ("NVIDIA H100 80GB HBM3", torch.float32, 989.5e12, "H100 SXM bf16"),  # torchtitan: bf16 peak for fp32 too
        ("NVIDIA H100 80GB HBM3", torch.float8_e4m3fn, 1979e12, "H100 SXM fp8"),
        ("NVIDIA A100-SXM4-80GB", torch.float8_e4m3fn, 312e12, "no fp8"),
    ],
)
def test_gpu_peak_table(name, dtype, flops, label):
    value, text = peak_flops_for_name(name, dtype)
    assert value == flops
    assert label in text and "WARNING" not in text


def test_unknown_gpu_falls_back_to_h100_with_warning():
    value, text = peak_flops_for_name("NVIDIA L40", torch.bfloat16)  # an L40 must not match the L4 row
    assert value == 989.5e12
    assert "WARNING" in text and "NVIDIA L40" in text and "H100 SXM" in text


def test_cpu_peak_measured_then_cached(tmp_path):
    cache_dir = tmp_path / "cache"
    flops, text = peak_flops(torch.device("cpu"), torch.float32, str(cache_dir))
    assert flops > 0
    assert "CPU measured float32" in text
    path = cache_dir / CPU_CACHE_FILE
    cache = json.loads(path.read_text())
    (key,) = cache
    assert f"threads={torch.get_num_threads()}" in key and key.endswith("float32")
    assert cache[key]["flops"] == flops
    # The second call must read the file, not measure: plant a value no benchmark would give.
    cache[key]["flops"] = 123.0
    path.write_text(json.dumps(cache))
    again, text = peak_flops(torch.device("cpu"), torch.float32, str(cache_dir))
    assert again == 123.0
    assert "CPU measured" in text and "cached in" in text


def test_memory_gib_cpu_is_peak_rss():
    used = memory_gib(torch.device("cpu"))
    assert 0.01 < used < 1024  # this process has imported torch: tens of MiB at least


def test_logger_writes_jsonl_console_and_resumes_the_same_aim_run(tmp_path, caplog):
    job = _job(tmp_path)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        metrics = MetricsLogger(job, enabled=True)
        for step in (1, 2, 3):
            metrics.log(step, _values(step))
        metrics.close()
    lines = [r.getMessage() for r in caplog.records if "MFU" in r.getMessage()]
    assert len(lines) == 3 and lines[0].startswith("step    1 | loss  9.0000")

    run_dir = tmp_path / "metrics_test"
    records = [json.loads(line) for line in (run_dir / JSONL_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(KEYS) <= set(r)
        assert r["loss"] == 10.0 - r["step"]
    run_hash = (run_dir / AIM_HASH_FILE).read_text().strip()
    assert run_hash

    resumed = MetricsLogger(job, enabled=True)  # a restarted job: same run_dir, same Aim run
    assert resumed.aim_run_hash == run_hash
    for step in (4, 5):
        resumed.log(step, _values(step))
    resumed.close()
    assert (run_dir / AIM_HASH_FILE).read_text().strip() == run_hash
    assert len((run_dir / JSONL_FILE).read_text().splitlines()) == 5

    import aim

    repo = aim.Repo.from_path(job.metrics.aim_repo)
    assert repo.list_all_runs() == [run_hash]
    steps, losses = aim_metric(job.metrics.aim_repo, run_hash, "loss")
    assert steps == [1, 2, 3, 4, 5]
    assert losses == [10.0 - s for s in steps]
    steps, mfus = aim_metric(job.metrics.aim_repo, run_hash, "mfu")
    assert mfus == pytest.approx([1.5 * s for s in steps])
    run = aim.Run(run_hash, repo=job.metrics.aim_repo, read_only=True)
    assert run["hparams"]["training"]["steps"] == 1000
    assert run["hparams"]["job"]["name"] == "metrics_test"
    assert run.experiment == "metrics_test"


@pytest.mark.slow
def test_resume_after_a_crash_takes_over_the_aim_lock(tmp_path):
    """A job killed without close() leaves Aim's run lock behind; the restarted job must still append."""
    job = _job(tmp_path)
    crashed = textwrap.dedent(
        f"""
        import os
        from pretrain.config import JobConfig
        from pretrain.components.metrics import MetricsLogger
        job = JobConfig()
        job.job.name, job.job.run_dir = "metrics_test", {job.job.run_dir!r}
        job.metrics.aim_repo = {job.metrics.aim_repo!r}
        metrics = MetricsLogger(job, enabled=True)
        metrics.log(1, {_values(1)!r})
        metrics.log(2, {_values(2)!r})
        os._exit(0)  # like SIGKILL / preemption: no close(), no atexit cleanup
        """
    )
    subprocess.run([sys.executable, "-c", crashed], check=True, timeout=120)
    run_hash = (tmp_path / "metrics_test" / AIM_HASH_FILE).read_text().strip()
    assert os.path.exists(os.path.join(job.metrics.aim_repo, ".aim", "locks", f"{run_hash}.softlock"))

    resumed = MetricsLogger(job, enabled=True)
    assert resumed.aim_run_hash == run_hash
    resumed.log(3, _values(3))
    resumed.close()
    steps, losses = aim_metric(job.metrics.aim_repo, run_hash, "loss")
    assert steps == [1, 2, 3] and losses == [9.0, 8.0, 7.0]


def test_disabled_logger_writes_nothing(tmp_path):
    job = _job(tmp_path)
    job.metrics.enable_tensorboard = True  # would fail without tensorboard if it did anything
    metrics = MetricsLogger(job, enabled=False)
    metrics.log(1, _values(1))
    metrics.log_text("nothing")
    metrics.close()
    assert metrics.aim_run_hash is None
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_without_package_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    job = _job(tmp_path, aim=False)
    job.metrics.enable_tensorboard = True
    with pytest.raises(ConfigError, match=r"metrics.enable_tensorboard=true needs the tensorboard package.*"
                                          r"pip install -e \"\.\[tensorboard\]\""):
        MetricsLogger(job, enabled=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason='tensorboard is not installed (pip install -e ".[tensorboard]"; CI installs it)')
def test_tensorboard_events_written(tmp_path):
    job = _job(tmp_path, aim=False)
    job.metrics.enable_tensorboard = True
    metrics = MetricsLogger(job, enabled=True)
    metrics.log(1, _values(1))
    metrics.close()
    assert any(name.startswith("events.") for name in os.listdir(tmp_path / "metrics_test" / "tb"))
