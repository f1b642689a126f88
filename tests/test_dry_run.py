"""Every shipped recipe builds at its real world size on a fake process group, in seconds: all of them in
one `launch.py --multirun` (one process, so Python, torch and Hydra start once for the lot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import CONF, run_launch

RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Published totals (see tests/test_model.py) and the world size of each recipe.
EXPECTED = {
    "llama3_8b": (8_030_261_248, 8),
    "llama3_70b": (70_553_706_496, 256),
    "llama3_405b_4d": (405_853_388_800, 512),
    "deepseek_v3_671b": (671_026_404_352, 256),  # the published 671B (MTP module not included)
    "llama4_scout": (107_769_861_120, 64),  # the text decoder: transformers' Llama4ForCausalLM count (109B with vision)
    "llama4_maverick": (400_711_848_960, 256),  # the text decoder: transformers' Llama4ForCausalLM count (400B)
    "gpt_oss_20b": (20_914_757_184, 8),  # the published 20.9B: transformers' GptOssForCausalLM count
    "gpt_oss_120b": (116_829_156_672, 64),  # the published 116.8B: transformers' GptOssForCausalLM count
}


def test_every_recipe_is_covered():
    assert set(RECIPES) == set(EXPECTED)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the directory launch.py ran in, {recipe: its dry run's report}); the multirun runs the recipes in the
    order given and each report starts with "dry run: "."""
    root = tmp_path_factory.mktemp("dry_runs")
    proc = run_launch(["--multirun", f"experiment={','.join(RECIPES)}", "dry_run=true"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reports = proc.stdout.split("dry run: ")[1:]
    assert len(reports) == len(RECIPES), proc.stdout
    return root, dict(zip(RECIPES, reports))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_runs_at_full_scale(recipe, dry_runs):
    root, reports = dry_runs
    out = reports[recipe]
    total, world = EXPECTED[recipe]
    assert f"world {world} = ParallelDims" in out
    local = int(re.search(r"rank 0 holds ([\d,]+) parameters", out).group(1).replace(",", ""))
    pp = int(re.search(r"tp=\d+, pp=(\d+)", out).group(1))
    # rank 0 holds its shard of its pipeline stage: about total / world (FSDP pads shards; the first
    # stage holds the embedding, and stages differ by a layer), so within a factor that PP allows
    expected = total / world
    slack = 1.01 if pp == 1 else 2.0
    assert expected / slack <= local <= expected * slack, (local, expected)
    gib = {label: float(re.search(rf"{re.escape(label)}[^\n]*?([\d.]+) GiB", out).group(1)) for label in (
        "parameters", "gradients", "optimizer state", "all-gathered block", "activations (estimate)",
        "validation batch (forward only)", "total")}
    # every recipe trains on c4 and measures the held-out loss on its validation files: the validation batch runs
    # after the step (gradients and saved activations freed), so the total holds the larger of the two
    assert "validation: every 500 steps, every full batch of the held-out set" in out
    training = gib["gradients"] + gib["activations (estimate)"]
    fixed = gib["parameters"] + gib["optimizer state"] + gib["all-gathered block"]
    assert gib["total"] == pytest.approx(fixed + max(training, gib["validation batch (forward only)"]), abs=0.03)
    assert not any(root.rglob("step-*"))  # a dry run saves nothing


@pytest.mark.slow
def test_async_tp_is_checked_by_the_dry_run(tmp_path):
    """The 70B recipe with async TP (CUDA only) is checked from a CPU machine, as everything else is."""
    args = ["experiment=llama3_70b", "parallelism.enable_async_tensor_parallel=true", "compile.enable=true",
            "dry_run=true"]
    proc = run_launch(args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "async TP: checked" in proc.stdout and "world 256" in proc.stdout
