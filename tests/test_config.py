"""Layer 1: every option of every group composes and validates; bad input is refused clearly."""

from __future__ import annotations

import os
import re

import pytest
from helpers import CONF, REPO, compose, run_launch

from pretrain.config import ConfigError, JobConfig, resolve
from pretrain.config.flavors import flavor_changes, flavor_label, published_flavors
from pretrain.config.torchtitan_names import RENAMED, migration_table, refuse_foreign_spellings, schema_keys

GROUPS = ("model", "parallelism", "float8", "data", "cluster")
# What an option needs beside itself to be a valid run on its own: the parallelism presets' defaults
# are made for 4 processes (the 4D one for 8).
NEEDS = {"parallelism": ["cluster.nproc_per_node=4"], "cluster": ["parallelism=fsdp"]}


def all_options():
    for group in GROUPS:
        for name in sorted(os.listdir(CONF / group)):
            if name.endswith(".yaml"):
                yield f"{group}/{name[:-5]}"


@pytest.mark.parametrize("option", list(all_options()))
def test_every_option_composes_and_validates(option, tmp_path):
    group, name = option.split("/")
    overrides = [f"{group}={name}", *(NEEDS.get(group, []) if name != "single" else [])]
    if option == "parallelism/fsdp_tp_pp_cp":  # four axes of 2 need 8 ranks
        overrides.append("cluster.nproc_per_node=8")
    if option == "parallelism/fsdp_ep":  # experts to split
        overrides.append("model=qwen3_moe_debug")
    if option == "data/local":
        (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
        overrides.append(f"data.data_files=[{tmp_path}/*.jsonl]")
    if option == "data/tokenized":  # validation looks for the manifest prepare writes last
        (tmp_path / "store").mkdir()
        (tmp_path / "store" / "manifest.json").write_text("{}")
        overrides.append(f"data.path={tmp_path}/store")
    job = resolve(compose(overrides))
    assert isinstance(job, JobConfig)
    assert job.job.run_dir.endswith(os.path.join("outputs", "default"))
    assert job.training.global_batch_size % job.training.local_batch_size == 0


def test_model_presets_have_torchtitan_dims():
    j8 = resolve(compose(["model=llama3_8b"])).model
    assert (j8.dim, j8.n_layers, j8.n_heads, j8.n_kv_heads, j8.ffn_dim_multiplier, j8.multiple_of, j8.vocab_size) == (
        4096, 32, 32, 8, 1.3, 1024, 128256,
    )
    j405 = resolve(compose(["model=llama3_405b"])).model
    assert (j405.dim, j405.n_layers, j405.n_heads, j405.ffn_dim_multiplier) == (16384, 126, 128, 1.2)


def test_global_batch_defaults_to_local_times_dp():
    job = resolve(compose(["parallelism=fsdp", "cluster.nproc_per_node=4", "training.local_batch_size=3"]))
    assert job.training.global_batch_size == 12


BAD = [
    (["training.global_batch_size=12", "training.local_batch_size=8"], "training.global_batch_size"),
    (["parallelism.data_parallel_shard_degree=3", "cluster.nproc_per_node=4"], "world size is 4"),
    (["parallelism.data_parallel_replicate_degree=3", "cluster.nproc_per_node=4"], "data_parallel_replicate_degree=3"),
    (["parallelism.expert_parallel_degree=2"], "parallelism.expert_parallel_degree"),
    (["parallelism.tensor_parallel_degree=3", "cluster.nproc_per_node=3"], "model.n_heads=16"),
    (["model.n_heads=7"], "model.n_heads"),
    # parallel layouts that cannot work (issue: 4D); each is refused before anything starts
    (["model=llama3_8b", "parallelism.tensor_parallel_degree=16", "cluster.nproc_per_node=16"], "model.n_kv_heads=8"),
    (["parallelism=fsdp", "parallelism.tensor_parallel_degree=3", "cluster.nproc_per_node=4"],
     "not divisible by the other degrees"),
    (["parallelism.data_parallel_shard_degree=2", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=8"],
     "do not fill the world"),
    (["parallelism.tensor_parallel_degree=0"], "parallelism.tensor_parallel_degree=0"),
    (["parallelism.context_parallel_degree=2", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=4",
      "training.seq_len=100"], "training.seq_len=100"),
    (["parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2", "training.seq_len=255"],
     "training.seq_len=255"),
    (["parallelism.pipeline_parallel_degree=8", "cluster.nproc_per_node=8", "model.n_layers=2"], "model.n_layers=2"),
    (["parallelism.pipeline_parallel_degree=2", "cluster.nproc_per_node=2", "training.local_batch_size=3",
      "parallelism.pipeline_parallel_microbatch_size=2"], "pipeline_parallel_microbatch_size=2"),
    (["parallelism.pipeline_parallel_schedule=Foo"], "parallelism.pipeline_parallel_schedule"),
    (["parallelism.pipeline_parallel_degree=2", "cluster.nproc_per_node=2",
      "parallelism.pipeline_parallel_schedule=Interleaved1F1B", "parallelism.pipeline_parallel_layers_per_stage=4"],
     "Interleaved1F1B"),
    (["parallelism.pipeline_parallel_degree=2", "cluster.nproc_per_node=2",
      "parallelism.pipeline_parallel_schedule=1F1B", "parallelism.pipeline_parallel_layers_per_stage=1"],
     "stages per rank"),
    (["parallelism.enable_async_tensor_parallel=true"], "parallelism.enable_async_tensor_parallel"),
    # throughput features (issue: compile, AC, float8, profiling)
    (["parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2",
      "parallelism.enable_async_tensor_parallel=true"], "compile.enable=true"),
    (["parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2", "cluster.device=cpu",
      "compile.enable=true", "parallelism.enable_async_tensor_parallel=true"], "cluster.device=cpu"),
    (["compile.components=[model,optimizer]"], "compile.components"),
    (["compile.backend=tvm"], "compile.backend"),
    (["activation_checkpoint.mode=partial"], "activation_checkpoint.mode"),
    (["activation_checkpoint.mode=selective", "activation_checkpoint.selective_ac_option=some"], "selective_ac_option"),
    (["activation_checkpoint.mode=selective", "activation_checkpoint.selective_ac_option=0"], "selective_ac_option"),
    (["activation_checkpoint.mode=memory_budget"], "compile.enable=true"),
    (["activation_checkpoint.mode=memory_budget", "compile.enable=true", "activation_checkpoint.memory_budget=1.5"],
     "activation_checkpoint.memory_budget"),
    (["float8.recipe_name=mxfp8"], "float8.recipe_name"),
    (["profiling.enable_profiling=true", "profiling.profile_freq=3"], "profiling.profile_freq"),
    (["profiling.profiler_active=0"], "profiling.profiler_active"),
    (["checkpoint.async_mode=background"], "checkpoint.async_mode"),
    (["checkpoint.async_mode=async_with_pinned_mem", "cluster.device=cpu"], "async_with_pinned_mem"),
    (["checkpoint.on_save_error=retry"], "checkpoint.on_save_error"),
    (["training.on_nonfinite=ignore"], "training.on_nonfinite"),
    (["comm.train_timeout_seconds=0"], "comm.train_timeout_seconds"),
    (["parallelism.context_parallel_method=ulysses"], "parallelism.context_parallel_method"),
    (["model.n_kv_heads=5"], "model.n_kv_heads"),
    (["lr_scheduler.decay_type=step"], "lr_scheduler.decay_type"),
    (["training.mixed_precision_param=fp8"], "training.mixed_precision_param"),
    (["cluster.device=tpu"], "cluster.device"),
    (["checkpoint.exclude_from_loading=[weights]"], "checkpoint.exclude_from_loading"),
    (["optimizer.beta2=1.5"], "optimizer.beta2"),
    (["training.steps=0"], "training.steps"),
    (["data=local", "data.data_files=[/nonexistent/*.jsonl]"], "data.data_files"),
    (["data=local"], "data.data_files"),
    (["data.path=/nonexistent/dir"], "data.path"),
    (["model.name=gpt2"], "model.name"),
    (["job.name=a/b"], "job.name"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match="Fix:") as info:
        resolve(compose(overrides))
    assert key in str(info.value)


CLI_BAD = [
    (["training.no_such_key=1"], "no_such_key"),
    (["training.steps=abc"], "training.steps"),
    (["model=llama3_1t"], "llama3_1t"),
    (["data=local", "data.data_files=[/nonexistent/*.jsonl]"], "data.data_files"),
    (["training.global_batch_size=12"], "training.global_batch_size"),
    (["parallelism=fsdp", "cluster.nproc_per_node=3", "parallelism.data_parallel_replicate_degree=2"], "replicate"),
    (["training.dataset=c4"], "training.dataset is torchtitan's spelling. Fix: data=<preset> (c4: data=c4"),
    (["--training.steps", "10"], "Fix: python launch.py training.steps=10"),
]


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("args,key", CLI_BAD, ids=[k for _, k in CLI_BAD])
def test_cli_bad_input_exits_cleanly_and_writes_nothing(args, key, tmp_path):
    run_dir = tmp_path / "outputs" / "default"
    (run_dir / "checkpoint" / "step-5").mkdir(parents=True)
    (run_dir / "checkpoint" / "step-5" / "train_state.json").write_text("{}")
    before = _snapshot(tmp_path)
    proc = run_launch(args, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert key in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_help_lists_groups_and_cfg_prints_config(tmp_path):
    proc = run_launch(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for group in GROUPS:
        assert f"{group}:" in proc.stdout
    assert "llama3_70b" in proc.stdout
    proc = run_launch(["--cfg", "job", "model=llama3_8b"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    assert "dim: 4096" in proc.stdout
    assert not (tmp_path / "outputs").exists()
    assert (REPO / "launch.py").stat().st_size < 4000


@pytest.mark.slow
def test_a_local_multirun_runs_the_valid_points_and_lists_the_others(tmp_path):
    """As the SLURM launcher does: the invalid point is skipped with its reason, the valid one runs, a summary ends
    it; exit 0 unless a point failed, 2 when none is valid."""
    proc = run_launch(["-m", "parallelism.data_parallel_shard_degree=2,1", "dry_run=true"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: llama3/debug" in proc.stdout and "Traceback" not in proc.stderr
    summary = proc.stderr[proc.stderr.index("multirun: "):]
    assert summary.startswith("multirun: 1 of 2 points done, 0 failed, 1 skipped (they do not validate)")
    assert "skipped: parallelism.data_parallel_shard_degree=2 dry_run=True: parallel degrees do not fill" in summary
    assert "done: parallelism.data_parallel_shard_degree=1 dry_run=True: dry run" in summary
    proc = run_launch(["-m", "parallelism.data_parallel_shard_degree=2,4", "dry_run=true"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "multirun: 0 of 2 points done, 0 failed, 2 skipped" in proc.stderr
    # the skipped points leave no folder; the valid one's stays (a dry run writes nothing into it)
    points = sorted(p.name for p in (tmp_path / "outputs" / "default").iterdir() if p.is_dir())
    assert points == ["dry_run=True,parallelism.data_parallel_shard_degree=1"]


def test_seed_checkpoint_runs_on_one_process_whatever_the_recipe():
    job = resolve(compose(
        ["experiment=llama3_405b_4d", "checkpoint.create_seed_checkpoint=true", "model.hf_assets_path=''"]
    ))
    p = job.parallelism
    assert job.world_size == 1 and job.cluster.name == "local"
    assert (p.data_parallel_shard_degree, p.tensor_parallel_degree, p.pipeline_parallel_degree) == (1, 1, 1)
    assert job.model.n_layers == 126  # the model is the recipe's


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_option_is_its_published_flavor(option):
    model = resolve(compose([f"model={option}"])).model
    assert published_flavors(model.name)[model.flavor][0] == option
    assert flavor_label(model) == model.flavor and not flavor_changes(model)


def test_a_flavor_label_never_lies_about_the_dims():
    # torchtitan's spelling of "the 8B" on top of the default (debug) option: the dims would be debug's
    with pytest.raises(ConfigError, match=r"model.flavor=8B names llama3's published 8B, but the dims are those of "
                                          r"model=llama3_debug \(model.dim=256 \(8B: 4096\).*Fix: model=llama3_8b"):
        resolve(compose(["model.name=llama3", "model.flavor=8B"]))
    # a published flavor with dims edited on purpose runs, and says so wherever it names the model
    model = resolve(compose(["model=llama3_8b", "model.n_layers=1"])).model
    assert flavor_label(model) == "8B modified: n_layers=1 (8B: 32)"
    assert flavor_label(resolve(compose(["model.flavor=mine"])).model) == "mine"  # a label of the user's own
    # every key counts, also those a flavor's option leaves to the schema: a MoE flavor with a tied output is not the
    # dense debug flavor, whose keys it matches otherwise
    moe = resolve(compose(["model=qwen3_moe_debug", "model.tie_word_embeddings=true"])).model
    assert flavor_label(moe) == "moe_debug modified: tie_word_embeddings=True (moe_debug: False)"


def test_torchtitan_spellings_get_the_key_to_use():
    schema = set(schema_keys(JobConfig))
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    for key, ours in RENAMED.items():
        assert key not in schema, f"{key} is one of our keys: the hint would shadow it"
        for named in re.findall(r"\b([a-z_0-9]+(?:\.[a-z_0-9]+)*)=", ours):  # every key the fix names is ours
            assert named in schema or named in groups, (key, named)
    cases = {
        "model.converters=[float8]": "model.converters is torchtitan's spelling. Fix: float8=<recipe>",
        "quantize.linear.float8.recipe_name=rowwise": "Fix: float8.recipe_name=rowwise (or float8=rowwise)",
        "metrics.save_for_all_ranks=true": "no counterpart here (not supported: rank 0 logs the metrics",
        "fault_tolerance.enable=true": "torchtitan's [fault_tolerance] section",
        "training.stpes=3": "training.stpes is not a key of the config. Fix: training.steps=3",
        "+optimizer.lrr=1": "Fix: +optimizer.lr=1",
    }
    for arg, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            refuse_foreign_spellings([arg])
    with pytest.raises(ConfigError, match=re.escape("--compile.enable: torchtitan's command-line flag")):
        refuse_foreign_spellings(["-m", "--compile.enable"])
    # what Hydra reads as it is: valid keys, groups, dict fields, its own keys, deletions, flags without a dot
    refuse_foreign_spellings(["training.steps=3", "model=llama3_8b", "+cluster.extra_sbatch.mail-type=END",
                              "hydra.run.dir=x", "-m", "--cfg", "job", "~metrics.aim_repo", "data.data_files=[a,b]",
                              "-cd", "sweeps", "model.moe.top_k=2", "training.no_such_key=1"])


def test_the_migration_page_holds_the_table():
    page = (REPO / "docs" / "migrating_from_torchtitan.md").read_text()
    assert migration_table() in page, "regenerate it: python -m pretrain.config.torchtitan_names"
