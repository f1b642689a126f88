"""Pipeline parallelism: the stage split (unit), and real runs on 2 and 4 CPU processes (gloo): every
schedule the installed torch has trains like one process, FSDP x PP too, a seed checkpoint starts a
PP run, and checkpoints reshard from PP to no PP and back.

All runs use a 4-layer TINY model and see the same global batch of 8 sequences per step, starting
from the same weights (CPU init is done on the full model, then split), so the only difference to
one process is the order of floating-point sums.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import TINY, compose, read_metrics, run_launch, with_validation

from pretrain.config import ConfigError, resolve
from pretrain.config.layout import PP_SCHEDULES, pipeline_layers_per_stage
from pretrain.distributed.pipeline import (
    check_explicit_fqns,
    fqns_per_stage,
    schedule_class,
    split_model,
    stage_ids_for_rank,
)

PP_TINY = [*TINY, "model.n_layers=4", "training.steps=6"]

# --------------------------------------------------------------------------- unit: the split


def tiny_model(n_layers: int = 4):
    from pretrain.models.llama3.model import Transformer

    cfg = resolve(compose([*TINY, f"model.n_layers={n_layers}"])).model
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=32)
    model.init_weights()
    return model


def test_split_by_layers_first_and_last_stage_take_fewer():
    model = tiny_model(4)
    # 4 blocks + 1 slot for the embedding + 1 for the output = 6 slots: 3 per stage
    assert fqns_per_stage(model, 2) == [
        ["tok_embeddings", "layers.0", "layers.1"],
        ["layers.2", "layers.3", "norm", "output"],
    ]
    # 6 slots over 4 stages: 2, 2, 1, 1 (earlier stages take the remainder); the last holds only the output
    assert fqns_per_stage(model, 4) == [
        ["tok_embeddings", "layers.0"], ["layers.1", "layers.2"], ["layers.3"], ["norm", "output"],
    ]
    # no allowance for the embedding and output: the blocks alone are spread evenly
    assert fqns_per_stage(model, 2, first_less=0, last_less=0)[0] == ["tok_embeddings", "layers.0", "layers.1"]
    assert pipeline_layers_per_stage(6, 2, first_less=2, last_less=0) == [2, 4]
    assert pipeline_layers_per_stage(5, 2) == [3, 2]
    assert pipeline_layers_per_stage(126, 16) == [7] + [8] * 14 + [7]  # llama3_405b in 16 stages
    with pytest.raises(ConfigError, match="cannot be split"):
        pipeline_layers_per_stage(2, 2, first_less=5, last_less=0)  # the first stage would get -1 blocks
    with pytest.raises(ConfigError, match="cannot be split"):
        pipeline_layers_per_stage(1, 4, first_less=0, last_less=0)  # more stages than slots


def test_explicit_fqns_are_checked():
    model = tiny_model(4)
    stages = [["tok_embeddings", "layers.0"], ["layers.1", "layers.2", "layers.3", "norm", "output"]]
    assert check_explicit_fqns(model, stages) == stages
    for bad in (
        [["tok_embeddings", "layers.0"], ["layers.1", "layers.2", "norm", "output"]],  # layers.3 missing
        [["tok_embeddings", "layers.1"], ["layers.0", "layers.2", "layers.3", "norm", "output"]],  # out of order
        [["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "output"], []],  # empty stage
    ):
        with pytest.raises(ConfigError, match="module_fqns_per_model_part"):
            check_explicit_fqns(model, bad)


def test_stages_chained_compute_the_full_model():
    model = tiny_model(4)
    stages = fqns_per_stage(model, 4)
    parts = [split_model(model, fqns) for fqns in stages]
    assert parts[0].norm is None and parts[0].output is None and list(parts[0].layers) == ["0"]
    assert parts[3].tok_embeddings is None and len(parts[3].layers) == 0
    # names are the full model's, each parameter in exactly one stage
    names = [name for part in parts for name in part.state_dict()]
    assert sorted(names) == sorted(model.state_dict())
    tokens = torch.randint(0, 512, (2, 32))
    h = tokens
    for part in parts:
        h = part(h)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)
    assert model.tok_embeddings is not None and len(model.layers) == 4  # the model itself is left whole


@pytest.mark.parametrize("pp,n_stages", [(2, 2), (2, 4), (2, 6), (4, 8)])
def test_stage_placement_matches_torch(pp, n_stages):
    utils = pytest.importorskip("torch.distributed.pipelining._utils")  # torch's own placement (private)
    generate_stage_to_rank_mapping = utils.generate_stage_to_rank_mapping
    for style in ("loop", "v"):
        mapping = generate_stage_to_rank_mapping(pp, n_stages, style=style)
        for rank in range(pp):
            expected = [stage for stage, owner in sorted(mapping.items()) if owner == rank]
            assert stage_ids_for_rank(rank, pp, n_stages, v_shape=style == "v") == expected
    if n_stages == 2 * pp:  # V: rank 0 holds the first and the last stage
        assert stage_ids_for_rank(0, pp, n_stages, v_shape=True) == [0, n_stages - 1]


def test_impossible_pipeline_layouts_are_refused():
    base = ["parallelism=fsdp_pp", "cluster.nproc_per_node=4"]
    cases = {
        "tie_word_embeddings": ["model.tie_word_embeddings=true"],
        "at least as many micro-batches": ["training.local_batch_size=1"],  # 1F1B: 1 micro-batch, 2 stages
        "exactly two stages": [  # ZBV with 3 stages per rank
            "parallelism.pipeline_parallel_schedule=ZBVZeroBubble", "parallelism.pipeline_parallel_layers_per_stage=1",
            "model.n_layers=4",
        ],
        "rounds": [  # 2 ranks, 5 micro-batches: 2 rounds do not divide 5
            "parallelism.pipeline_parallel_schedule=Interleaved1F1B", "training.local_batch_size=5",
        ],
        "cannot be split": ["model.n_layers=2", "parallelism.pipeline_parallel_layers_per_stage=1",
                            "parallelism.pipeline_parallel_first_stage_less_layers=0",
                            "parallelism.pipeline_parallel_last_stage_less_layers=5",
                            "parallelism.pipeline_parallel_schedule=Interleaved1F1B"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            resolve(compose([*base, *overrides]))
    with pytest.raises(ConfigError, match="not available in the installed torch"):
        schedule_class("NoSuchSchedule")


# --------------------------------------------------------------------------- real runs

# fp32 on CPU. A pipeline splits the batch into micro-batches and sums their losses and gradients in
# another order than one process (and FSDP reduce-scatters over 2 ranks): ~1e-7 relative per sum,
# which Adam's 1/sqrt(v) can amplify a little over the steps, so we allow 1e-5 relative on the loss
# and on the gradient norm. Measured (torch 2.13 CPU, 6 steps): at most 1.5e-7 on the loss and 2.4e-7
# on the gradient norm for every run below (the fsdp_tp_pp preset, not run here for time: 1.5e-7).
# The gradient norm is what catches a wrong gradient scale (the schedule's 1/n_microbatches on top of
# ours: 4x smaller) or a norm not summed over the stages: Adam would hide both in the loss.
RTOL = 1e-5


def pp2(schedule: str, *more: str, local_batch: int = 8, microbatch: int = 2) -> list[str]:
    """2 processes, pp 2: `local_batch` sequences per schedule step in micro-batches of `microbatch`."""
    return [
        "cluster.nproc_per_node=2", "parallelism.data_parallel_shard_degree=1",
        "parallelism.pipeline_parallel_degree=2", f"parallelism.pipeline_parallel_schedule={schedule}",
        f"training.local_batch_size={local_batch}", f"parallelism.pipeline_parallel_microbatch_size={microbatch}",
        *more,
    ]


# name: overrides on top of PP_TINY; global batch 8 in every case. Besides its schedule, each run
# checks one more way of splitting or batching.
RUNS = {
    # saves at step 3 for the resume into PP (ZBVZeroBubble)
    "single": ["training.local_batch_size=8", "checkpoint.enable=true", "checkpoint.interval=3"],
    # 4 micro-batches of 2; saves at step 3 for the resharded resume below
    "1F1B": pp2("1F1B", "checkpoint.enable=true", "checkpoint.interval=3"),
    # explicit, uneven stages: 1 block, then 3
    "GPipe": pp2("GPipe", "parallelism.module_fqns_per_model_part="
                 "[[tok_embeddings,layers.0],[layers.1,layers.2,layers.3,norm,output]]"),
    # one slot per stage: 6 stages, 3 per rank
    "Interleaved1F1B": pp2("Interleaved1F1B", "parallelism.pipeline_parallel_layers_per_stage=1"),
    # gradient accumulation: 2 schedule steps of 4 sequences (4 micro-batches of 1) per optimizer step
    "LoopedBFS": pp2("LoopedBFS", "training.global_batch_size=8", local_batch=4, microbatch=1),
    # no allowance for the embedding: stages of 2, 1, 1 and 0 blocks
    "InterleavedZeroBubble": pp2("InterleavedZeroBubble", "parallelism.pipeline_parallel_first_stage_less_layers=0"),
    # V placement: rank 0 holds the first and the last stage, so it computes the loss itself. Resumes
    # the single-process run's step-3 checkpoint (model, optimizer, data position) and trains 4..6
    "ZBVZeroBubble": pp2("ZBVZeroBubble", "checkpoint.enable=true", "checkpoint.interval=100"),
    # FSDP 2 x PP 2 on 4 processes, started from a seed checkpoint written with training.seed=0 (its
    # own seed is 1, so matching the seed-0 single-process run shows the seed was loaded)
    "fsdp_pp": [
        "parallelism=fsdp_pp", "cluster.nproc_per_node=4", "training.local_batch_size=4", "training.seed=1",
        "checkpoint.enable=true", "checkpoint.interval=100",
    ],
    # 3D on 4 processes: the fsdp_tp_pp preset (dp_shard 1 x tp 2 x pp 2), loss parallel on the last stage
    "fsdp_tp_pp": ["parallelism=fsdp_tp_pp", "cluster.nproc_per_node=4", "training.local_batch_size=8"],
    # 4D on 8 processes: FSDP (over dp_shard x cp = 2) x TP 2 x PP 2 x CP 2, the fsdp_tp_pp_cp preset
    "4d": ["parallelism=fsdp_tp_pp_cp", "cluster.nproc_per_node=8", "training.local_batch_size=8"],
}
# runs that start from another run's checkpoint: name -> (that run, its step)
STARTS_FROM = {"ZBVZeroBubble": ("single", 3)}


def launch(root, name: str, overrides: list[str], cache_dir) -> str:
    # the held-out loss at steps 3 and 6 over the same 16 windows in every layout (the pipeline's eval schedule)
    args = with_validation([*PP_TINY, "checkpoint.enable=false", *overrides], freq=3)
    proc = run_launch([*args, f"job.name={name}", f"data.cache_dir={cache_dir}"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def torch_has_schedule(name: str) -> bool:
    try:
        schedule_class(name)
    except ConfigError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Every run of RUNS (and the seed and resume steps) once: ({run: {step: (loss, grad_norm)}}, {run: stdout})."""
    root = tmp_path_factory.mktemp("pipeline")
    # the seed checkpoint goes into the run directory of "fsdp_pp", which starts from it
    seed = ["checkpoint.enable=true", "checkpoint.create_seed_checkpoint=true"]
    stdout = {"seed": launch(root, "fsdp_pp", seed, cache_dir)}
    for name, overrides in RUNS.items():
        if name in PP_SCHEDULES and not torch_has_schedule(name):
            continue  # its test skips
        if name in STARTS_FROM:
            source, step = STARTS_FROM[name]
            shutil.copytree(root / "outputs" / source / "checkpoint" / f"step-{step}",
                            root / "outputs" / name / "checkpoint" / f"step-{step}")
        stdout[name] = launch(root, name, overrides, cache_dir)
    result = {name: metrics(root / "outputs" / name) for name in stdout if name != "seed"}
    # resharded resume: the same run directory as "1F1B", without PP, from its step-3 checkpoint
    stdout["resumed"] = launch(
        root, "1F1B",
        ["training.local_batch_size=8", "checkpoint.enable=true", "checkpoint.load_step=3", "checkpoint.interval=100"],
        cache_dir,
    )
    result["resumed"] = metrics(root / "outputs" / "1F1B")  # the latest line per step wins: 4..6 are the resumed ones
    return result, stdout


def metrics(run_dir) -> dict[int, tuple[float, ...]]:
    """step -> (loss, grad_norm) or, on a step that validated, (loss, grad_norm, held-out loss), the latest line
    winning (a resumed run logs its steps again)."""
    return {m["step"]: (m["loss"], m["grad_norm"], *([m["val_loss"]] if "val_loss" in m else []))
            for m in read_metrics(run_dir)}


def assert_close(other: dict, single: dict, steps, name: str) -> None:
    for step in steps:
        assert other[step] == pytest.approx(single[step], rel=RTOL), (name, step, other[step], single[step])


@pytest.mark.multiprocess
def test_single_process_learns(runs):
    single = runs[0]["single"]
    assert sorted(single) == list(range(1, 7))
    assert [step for step, values in single.items() if len(values) == 3] == [3, 6]  # validated
    # a sanity check that the reference trains at all (6 steps of a tiny model move the loss little,
    # and by how much depends on the corpus, i.e. on the Python install); the parity checks are below
    assert single[6][0] < single[1][0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [n for n in RUNS if n != "single"])
def test_pipeline_matches_single_process(runs, name):
    result, _ = runs
    if name not in result:
        pytest.skip(f"the installed torch {torch.__version__} has no {name} schedule")
    single, other = result["single"], result[name]
    first = STARTS_FROM[name][1] + 1 if name in STARTS_FROM else 1
    assert sorted(other) == list(range(first, 7)), name
    assert_close(other, single, other, name)


@pytest.mark.multiprocess
def test_seed_checkpoint_starts_the_pp_run(runs):
    _, stdout = runs
    assert "saved step 0" in stdout["seed"]
    assert "resumed from" in stdout["fsdp_pp"] and "step-0" in stdout["fsdp_pp"]
    # the losses matching the seed-0 run (test_pipeline_matches_single_process[fsdp_pp]) show the weights came from it


@pytest.mark.multiprocess
def test_checkpoints_reshard_between_pp_and_no_pp(runs):
    result, stdout = runs
    # no PP -> PP: test_pipeline_matches_single_process[ZBVZeroBubble] compares its steps 4..6
    if "ZBVZeroBubble" in stdout:
        assert "resumed from" in stdout["ZBVZeroBubble"] and "step-3" in stdout["ZBVZeroBubble"]
    # PP -> no PP
    assert "step-3" in stdout["resumed"] and "pp=1" in stdout["resumed"]
    assert_close(result["resumed"], result["single"], (4, 5, 6), "resumed")
