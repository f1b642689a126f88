"""`python -m pretrain.import_torchtitan` on torchtitan's own published recipes (tests/fixtures/torchtitan, each
with its source noted): every option accounted for, the settings that matter carried over, and each imported
recipe dry-run at its world size by launch.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_launch

from pretrain.config.torchtitan_names import RENAMED, migration_table
from pretrain.import_torchtitan import flatten, main, tomllib, translate

FIXTURES = REPO / "tests" / "fixtures" / "torchtitan"
# fixture: (world size, the model option, its published parameter count as tests/test_dry_run.py has it)
PUBLISHED = {
    "llama3_8b": (64, "llama3_8b", 8_030_261_248),  # "a preset for 64 A100 GPUs"
    "llama3_70b": (64, "llama3_70b", 70_553_706_496),
    "llama3_405b": (128, "llama3_405b", 405_853_388_800),  # "a preset for 128 H100 GPUs"
    "qwen3_32b": (8, "qwen3_32b", None),  # "a preset for 8 H100 GPUs"
    "deepseek_v3_671b": (256, "deepseek_v3_671b", 671_026_404_352),  # no GPU count in the TOML: --world-size 256
}


def options(name: str) -> dict:
    return flatten(tomllib.loads((FIXTURES / f"{name}.toml").read_text()))


@pytest.mark.parametrize("name", PUBLISHED)
def test_every_option_is_carried_over_or_left_out_with_a_reason(name):
    opts = options(name)
    recipe = translate(opts, PUBLISHED[name][0], name)
    assert recipe.sources == set(opts), set(opts) ^ recipe.sources
    assert recipe.groups["model"] == PUBLISHED[name][1]
    assert recipe.groups["data"] == "c4"
    assert all(why for _, _, why in recipe.left_out)
    # torchtitan's defaults where ours differ are written out
    assert recipe.values["validation.enable"] is opts.get("validation.enabled", False)
    assert recipe.values["checkpoint.enable"] is opts.get("checkpoint.enable", opts.get("checkpoint.enable_checkpoint",
                                                                                         False))


def test_the_settings_that_shape_a_run_are_translated():
    r405 = translate(options("llama3_405b"), 128, "t")
    assert r405.groups["float8"] == "tensorwise"  # converters = "float8", torchtitan's default recipe
    assert r405.values["float8.enable_fsdp_float8_all_gather"] is True
    assert r405.values["float8.filter_fqns"] == ["output"]  # a bare string in the TOML
    assert r405.values["training.local_batch_size"] == 2  # the older training.batch_size
    assert r405.values["compile.enable"] is True  # the older training.compile
    assert r405.values["parallelism.tensor_parallel_degree"] == 8
    assert r405.values["parallelism.enable_async_tensor_parallel"] is True
    assert (r405.values["cluster.nodes"], r405.values["cluster.nproc_per_node"]) == (16, 8)
    r8 = translate(options("llama3_8b"), 64, "t")
    assert "float8" not in r8.groups  # converters commented out: the [float8] keys are inert and said so
    assert {k for k, _, why in r8.left_out if "float8 is off" in why} == {
        "float8.enable_fsdp_float8_all_gather", "float8.precompute_float8_dynamic_scale_for_fsdp", "float8.filter_fqns"}
    assert r8.values["activation_checkpoint.selective_ac_option"] == "op"
    ds = translate(options("deepseek_v3_671b"), 256, "t")
    assert ds.values["lr_scheduler.decay_type"] == "cosine" and ds.values["lr_scheduler.decay_ratio"] == 0.8
    left = {k: why for k, _, why in ds.left_out}
    assert "no counterpart" in left["parallelism.expert_tensor_parallel_degree"] or "not supported" in left[
        "parallelism.expert_tensor_parallel_degree"]
    assert "path does not exist" in left["checkpoint.initial_load_path"]
    r70 = translate(options("llama3_70b"), 64, "t")
    assert r70.values["validation.split"] == "validation"  # c4_validation: data=c4's held-out split


def test_importer_and_hints_share_one_table():
    # a renamed key the importer carries over is the one the command-line hint names, and the table lists it
    table = migration_table()
    for key in ("training.batch_size", "checkpoint.enable_checkpoint", "validation.enabled"):
        assert f"`{key}`" in table and key in RENAMED
    recipe = translate({"training.batch_size": 3, "checkpoint.enable_checkpoint": True}, 8, "t")
    assert recipe.values["training.local_batch_size"] == 3 and recipe.values["checkpoint.enable"] is True


def test_bad_input_is_refused_and_nothing_is_overwritten(tmp_path, capsys):
    assert main([str(tmp_path / "missing.toml")]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 1")
    assert main([str(bad)]) == 2
    assert "bad.toml is not valid TOML" in capsys.readouterr().err
    out = tmp_path / "experiment"
    assert main([str(FIXTURES / "qwen3_32b.toml"), "--name", "mine", "--out", str(out)]) == 0
    (out / "mine.yaml").write_text("# edited by hand\n")
    assert main([str(FIXTURES / "qwen3_32b.toml"), "--name", "mine", "--out", str(out)]) == 2
    assert (out / "mine.yaml").read_text() == "# edited by hand\n"
    assert main([str(FIXTURES / "qwen3_32b.toml"), "--name", "9lives", "--out", str(out)]) == 2
    assert main([str(FIXTURES / "llama3_8b.toml"), "--world-size", "12", "--out", str(out)]) == 2


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The five fixtures imported (as a user would, through the command line) into one search-path folder."""
    root = tmp_path_factory.mktemp("imported")
    for name, (world, _, _) in PUBLISHED.items():
        args = [sys.executable, "-m", "pretrain.import_torchtitan", str(FIXTURES / f"{name}.toml"), "--name",
                f"tt_{name}", "--out", str(root / "experiment")]
        if name == "deepseek_v3_671b":
            args += ["--world-size", str(world)]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "check it:" in proc.stdout, proc.stdout + proc.stderr
    return root


@pytest.mark.slow
def test_imported_recipes_dry_run_at_their_world_size(imported, tmp_path):
    recipes = [f"tt_{name}" for name in PUBLISHED]
    text = (imported / "experiment" / "tt_llama3_405b.yaml").read_text()
    assert "# Left out of the import, with the reason:" in text and "metrics.save_tb_folder" in text
    assert yaml.safe_load(text)["training"]["seq_len"] == 8192
    proc = run_launch(["--multirun", f"experiment={','.join(recipes)}", "dry_run=true",
                       f"hydra.searchpath=[file://{imported}]"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reports = proc.stdout.split("dry run: ")[1:]
    assert len(reports) == len(recipes), proc.stdout
    for (name, (world, _, total)), report in zip(PUBLISHED.items(), reports):
        assert f"world {world} = ParallelDims" in report, (name, report[:400])
        if total:
            params = float(re.search(r"\(([\d.]+) B params", report).group(1))
            assert params == pytest.approx(total / 1e9, abs=0.05), name
