"""The local launcher with real processes: a user error found inside the ranks is reported once with its
fix, and the embedded default trains. A rank that dies takes the run down (no hang): tests/test_faults.py
kills one and checks the launcher's message along with the resume."""

from __future__ import annotations

import math

import pytest
from helpers import TINY, read_metrics, run_launch

pytestmark = pytest.mark.multiprocess


def test_user_error_inside_ranks_is_one_clear_message(tmp_path, cache_dir):
    # the tokenizer is trained inside the ranks; 300 pieces cannot hold the corpus's characters
    args = [
        *TINY, "parallelism=fsdp", "cluster.nproc_per_node=2", "model.vocab_size=300", f"data.cache_dir={cache_dir}",
    ]
    proc = run_launch(args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 2
    assert "model.vocab_size" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_embedded_default_learns(tmp_path, cache_dir):
    """The README's main job, shortened: the default config on one process, loss falls from ~ln(V)."""
    proc = run_launch(["training.steps=12", f"data.cache_dir={cache_dir}", "metrics.enable_aim=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "outputs" / "default")
    assert abs(rows[0]["loss"] - 7.62) < 0.8  # ln(2048) = 7.62 at initialisation
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "memory_gib", "elapsed_s"):
        assert key in rows[-1]
    # (MFU is only checked positive: the CPU peak is measured once, maybe while the machine was busy)
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["mfu"] > 0
    assert "step   12 | loss" in proc.stdout
    # the default holds out 1 embedded document in 100: the held-out loss of the last step, in the console too
    assert "val_loss" in rows[-1] and not any("val_loss" in row for row in rows[:-1])
    assert rows[-1]["val_perplexity"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    assert rows[-1]["val_tokens"] > 0 and rows[-1]["val_loss"] < rows[0]["loss"]
    assert "| val loss" in proc.stdout
    assert (tmp_path / "outputs" / "default" / "checkpoint" / "step-12" / "train_state.json").exists()
    assert (tmp_path / "outputs" / "default" / "config.yaml").exists()
