"""The cases of tests/test_config_fuzz.py: seeded random INVALID override sets, each with the keys its
refusal must name, and random VALID sets.

Every case comes from random.Random(SEED); PRETRAIN_FUZZ_SEED picks another seed and PRETRAIN_FUZZ_SCALE
multiplies the number of cases. The schema's leaves (pretrain.config.JobConfig) are read with
dataclasses.fields: the wrong-type and unknown-key generators cover a new field as soon as it exists, and
test_every_field_is_classified asks for its range or choices in RANGES / CHOICES / FREE below. Rules
between fields are hand-listed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import string
import typing

from helpers import CONF
from omegaconf import OmegaConf

from pretrain.config import JobConfig
from pretrain.config.features import AC_MODES, COMPILE_COMPONENTS, FLOAT8_RECIPES
from pretrain.config.layout import MULTI_STAGE_SCHEDULES, PP_SCHEDULES
from pretrain.config.model import family_names

SEED = int(os.environ.get("PRETRAIN_FUZZ_SEED", "20250611"))
SCALE = int(os.environ.get("PRETRAIN_FUZZ_SCALE", "1"))
# invalid sets per category (200 in all at scale 1), and valid sets
COUNTS = {"wrong_type": 42, "out_of_range": 42, "bad_choice": 24, "unknown_key": 24, "unknown_option": 12,
          "degrees": 24, "paths": 14, "conflicts": 18}
N_VALID = 50

# ------------------------------------------------------------------------------------------- the schema


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str  # dotted, e.g. training.steps
    kind: str  # int | float | bool | str | list | dict
    optional: bool


def schema_leaves(cls: type = JobConfig, prefix: str = "") -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            leaves += schema_leaves(tp, f"{prefix}{f.name}.")
            continue
        optional = typing.get_origin(tp) is typing.Union
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kind = {int: "int", float: "float", bool: "bool", str: "str", list: "list", dict: "dict"}
        leaves.append(Leaf(prefix + f.name, kind[typing.get_origin(tp) or tp], optional))
    return leaves


LEAVES = schema_leaves()
SECTIONS = sorted(name for name, tp in typing.get_type_hints(JobConfig).items() if dataclasses.is_dataclass(tp))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in GROUPS}

SLURM = ("cluster=slurm_cpu", "parallelism=fsdp")  # SLURM resources are checked with cluster=slurm only
PIPELINE = ("parallelism=fsdp_pp", "cluster.nproc_per_node=4")  # pipeline keys are checked with pp > 1
BUDGET = ("activation_checkpoint.mode=memory_budget", "compile.enable=true")
# model sections read only by the families that have them
MOE = ("model.name=qwen3", "model.rope_scaling=false", "model.moe.n_routed_experts=8", "model.moe.hidden_dim=32",
       "model.moe.top_k=2")
MLA = ("model.name=deepseek_v3", "model.rope_scaling=false", "model.mla.kv_lora_rank=16")
VALIDATION = ("validation.enable=true",)  # the section is checked when it is on
YARN = ("model.name=deepseek_v3", "model.rope_scaling_type=yarn", "model.mla.kv_lora_rank=16")
TEMPERATURE = ("model=llama4_debug",)  # NoPE layers with query temperature tuning

# key -> (rule, overrides under which the rule applies); _bad_value() draws a value that breaks the rule
RANGES = {
    "data.prefetch_steps": ("int>=0", ()),
    **{f"model.{k}": ("int>0", ()) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                              "rope_original_max_seq_len")},
    **{f"model.{k}": ("float>0", ()) for k in ("ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor",
                                                "rope_low_freq_factor")},
    "model.rope_high_freq_factor": ("float>=1", ()),  # at least rope_low_freq_factor (1.0)
    **{f"model.{k}": ("int>0", ()) for k in ("head_dim", "ffn_hidden_dim")},
    **{f"model.rope_yarn_{k}": ("float>0", YARN) for k in ("beta_slow", "mscale")},
    "model.rope_yarn_beta_fast": ("float>1", YARN),  # above rope_yarn_beta_slow (1.0)
    "model.nope_layer_interval": ("int>=0", ()),
    "model.global_attention_every": ("int>=0", ()),
    "model.attention_window_size": ("int>0", TEMPERATURE),  # Llama 4's chunks: checked when there is a window
    "model.moe.interleave_step": ("int>0", MOE),
    "model.attn_floor_scale": ("int>0", TEMPERATURE),
    "model.attn_scale": ("float>=0", TEMPERATURE),
    **{f"model.moe.{k}": ("int>=0", ()) for k in ("n_routed_experts", "n_shared_experts")},
    **{f"model.moe.{k}": ("float>=0", ()) for k in ("bias_update_speed", "aux_loss_coeff")},
    "model.moe.n_dense_layers": ("int>=0", MOE),
    **{f"model.moe.{k}": ("int>0", MOE) for k in ("top_k", "hidden_dim", "n_expert_groups", "n_limited_groups")},
    "model.moe.route_scale": ("float>0", MOE),
    **{f"model.moe.swiglu_{k}": ("float>0", (*MOE, "model.moe.activation=clamped_swiglu")) for k in ("alpha", "limit")},
    **{f"model.mla.{k}": ("int>=0", ()) for k in ("kv_lora_rank", "q_lora_rank")},
    **{f"model.mla.{k}": ("int>0", MLA) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
    **{f"parallelism.{k}": ("int>0", ()) for k in ("data_parallel_replicate_degree", "tensor_parallel_degree",
                                                    "pipeline_parallel_degree", "context_parallel_degree")},
    "parallelism.data_parallel_shard_degree": ("int>0|-1", ()),
    "parallelism.expert_parallel_degree": ("int>0", ()),
    "parallelism.pipeline_parallel_microbatch_size": ("int>0", PIPELINE),
    "parallelism.pipeline_parallel_layers_per_stage": ("int>0", PIPELINE),
    "parallelism.pipeline_parallel_first_stage_less_layers": ("int>=0", PIPELINE),
    "parallelism.pipeline_parallel_last_stage_less_layers": ("int>=0", PIPELINE),
    "activation_checkpoint.memory_budget": ("[0,1]", BUDGET),
    "profiling.profile_freq": ("int>0", ()),
    "profiling.profiler_warmup": ("int>=0", ()),
    "profiling.profiler_active": ("int>0", ()),
    "cluster.nproc_per_node": ("int>0", ()),
    "cluster.nodes": ("int>0", ()),
    **{f"cluster.{k}": ("int>0", SLURM) for k in ("cpus_per_task", "timeout_min")},
    **{f"cluster.{k}": ("int>=0", SLURM) for k in ("gpus_per_node", "mem_gb", "max_num_timeout", "signal_delay_s")},
    "optimizer.lr": ("float>=0", ()),
    "optimizer.beta1": ("[0,1)", ()),
    "optimizer.beta2": ("[0,1)", ()),
    "optimizer.eps": ("float>0", ()),
    "optimizer.weight_decay": ("float>=0", ()),
    "lr_scheduler.warmup_steps": ("int>=0", ()),
    "lr_scheduler.decay_ratio": ("[0,1]", ()),
    "lr_scheduler.min_lr_factor": ("[0,1]", ()),
    **{f"training.{k}": ("int>0", ()) for k in ("local_batch_size", "seq_len", "steps")},
    "training.global_batch_size": ("int>0|-1", ()),
    "training.gc_freq": ("int>=0", ()),
    "training.max_norm": ("number", ()),  # any number; <= 0 disables clipping
    "checkpoint.interval": ("int>0", ()),
    "checkpoint.keep_latest_k": ("int>=0", ()),
    "checkpoint.load_step": ("int>=-1", ()),
    "comm.init_timeout_seconds": ("int>0", ()),
    "comm.train_timeout_seconds": ("int>0", ()),
    "metrics.log_freq": ("int>0", ()),
    "job.name": ("name", ()),
    **{f"validation.{k}": ("int>=0", VALIDATION) for k in ("local_batch_size", "seq_len")},
    "validation.freq": ("int>0", VALIDATION),
    "validation.steps": ("int>0|-1", VALIDATION),
}
# key -> (allowed values, overrides under which they are checked); list fields take a list of them
CHOICES = {
    "data.format": (("text", "tokenized"), ()),
    "model.name": (tuple(family_names()), ()),
    "model.rope_scaling_type": (("llama3", "yarn"), ()),
    "model.qk_norm_type": (("rms", "l2"), ()),
    "model.attention_window": (("none", "chunked", "sliding"), ()),
    "model.moe.score_func": (("softmax", "sigmoid"), MOE),
    "model.moe.activation": (("swiglu", "clamped_swiglu"), MOE),
    "parallelism.fsdp_reshard_after_forward": (("default", "always", "never"), ()),
    "parallelism.pipeline_parallel_schedule": (PP_SCHEDULES, ()),
    "parallelism.context_parallel_method": (("allgather", "ring"), ()),
    "float8.recipe_name": (FLOAT8_RECIPES, ()),
    "compile.components": (COMPILE_COMPONENTS, ()),
    "compile.backend": (("inductor", "aot_eager", "eager"), ()),
    "activation_checkpoint.mode": (AC_MODES, ()),
    "activation_checkpoint.selective_ac_option": (("op",), ("activation_checkpoint.mode=selective",)),  # or N > 0
    "cluster.name": (("local", "slurm"), ()),
    "cluster.device": (("auto", "cpu", "cuda"), ()),
    "optimizer.name": (("AdamW", "Adam"), ()),
    "optimizer.implementation": (("foreach", "fused", "for-loop"), ()),
    "lr_scheduler.decay_type": (("linear", "sqrt", "cosine"), ()),
    "training.mixed_precision_param": (("auto", "bfloat16", "float32"), ()),
    "training.dtype": (("float32", "bfloat16"), ()),
    "training.mixed_precision_reduce": (("float32", "bfloat16"), ()),
    "training.on_nonfinite": (("stop", "skip"), ()),
    "checkpoint.exclude_from_loading": (("optimizer", "lr_scheduler", "dataloader", "train_state"), ()),
    "checkpoint.export_dtype": (("float32", "bfloat16", "float16"), ()),
    "checkpoint.async_mode": (("disabled", "async", "async_with_pinned_mem"), ()),
    "checkpoint.on_save_error": (("stop", "continue"), ()),
    "validation.format": (("text", "tokenized"), VALIDATION),  # or "" (data.format)
    "metrics.wandb_mode": (("online", "offline"), ()),  # or "" ($WANDB_MODE)
}
EMPTY_ALLOWED = {"validation.format", "metrics.wandb_mode"}  # "" means "as elsewhere": a valid value
# paths, checked by the "paths" generators below
PATHS = {"model.hf_assets_path", "data.path", "data.data_files", "data.tokenizer_path", "checkpoint.initial_load_path",
         "validation.path", "validation.data_files"}
# any value of the right type is valid (or is checked where it is used: module names when the model is built)
FREE = {
    "training.seed", "job.description", "job.dump_folder", "job.run_dir", "model.flavor", "data.name",
    "data.config_name", "data.split", "data.text_field", "data.cache_dir", "cluster.partition", "cluster.account",
    "cluster.qos", "cluster.constraint", "cluster.setup", "cluster.extra_sbatch", "checkpoint.folder",
    "metrics.aim_repo", "profiling.save_traces_folder", "profiling.save_memory_snapshot_folder",
    "float8.filter_fqns", "parallelism.module_fqns_per_model_part",
    "data.seed", "validation.split", "metrics.wandb_project", "metrics.wandb_entity", "metrics.wandb_run_name",
}

# ------------------------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    keys: tuple[str, ...]  # the message must name one of these
    files: tuple[str, ...] = ()  # files made in the working directory before the run

    @property
    def command(self) -> str:
        return f"python launch.py {' '.join(shlex.quote(a) for a in self.args)}  (PRETRAIN_FUZZ_SEED={SEED})"


def _word(rng: random.Random) -> str:
    return "zq" + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))


def _typo(rng: random.Random, name: str) -> str:
    i = rng.randrange(len(name))
    return rng.choice([
        name[:i] + name[i + 1:],  # a letter dropped
        name[:i] + name[i] + name[i:],  # one doubled
        name[:i] + rng.choice(string.ascii_lowercase) + name[i + 1:],  # one replaced
        name[:i] + name[i + 1:i + 2] + name[i:i + 1] + name[i + 2:],  # two swapped
    ])


def _new_name(rng: random.Random, taken: list[str]) -> str:
    """A plausible key or option that does not exist: a typo of an existing one, or a random word."""
    for _ in range(20):
        name = _typo(rng, rng.choice(taken)) if taken and rng.random() < 0.7 else _word(rng)
        if name and name not in taken and name[0].isalpha() and name.replace("_", "").isalnum():
            return name
    return _word(rng)


def _bad_value(rule: str, rng: random.Random) -> str:
    big, small = rng.randint(2, 10**6), f"{rng.uniform(1e-6, 10):.6g}"
    return rng.choice({
        "int>0": ["0", "-1", f"-{big}"],
        "int>=0": ["-1", f"-{big}"],
        "int>0|-1": ["0", "-2", f"-{big}"],  # -1 = derived
        "int>=-1": ["-2", f"-{big}"],
        "==1": ["0", "-1", "2", str(big)],
        "float>0": ["0", f"-{small}", "nan", "inf", "-inf"],
        "float>=0": [f"-{small}", "nan", "inf"],
        "float>1": ["1.0", "0.5", f"-{small}", "nan"],
        "float>=1": ["0.5", f"-{small}", "nan"],
        "[0,1]": [f"-{small}", f"1{small}", "nan"],
        "[0,1)": ["1.0", f"1{small}", f"-{small}", "nan"],
        "number": ["nan"],
        "name": ["a/b", ".", "..", "", f"{_word(rng)}/{_word(rng)}"],
    }[rule])


WRONG_TYPE = {
    "int": ["abc", "1.5", "true", "[1,2]", "2x", "nan", "{a:1}"],
    "float": ["abc", "[0.5]", "{a:1}", "1.0.0", "0.1x"],
    "bool": ["maybe", "abc", "1.5", "[true]", "{a:1}"],  # OmegaConf reads 0/1, yes/no, on/off as bools
    "str": ["[a,b]", "{a:1}"],
    "list": ["abc", "7", "{a:1}"],
    "dict": ["abc", "[a,b]", "7"],
}


def gen_wrong_type(rng):
    leaf = rng.choice(LEAVES)
    return [f"{leaf.key}={rng.choice(WRONG_TYPE[leaf.kind])}"], [leaf.key], []


def gen_out_of_range(rng):
    key = rng.choice(sorted(RANGES))
    rule, context = RANGES[key]
    return [*context, f"{key}={_bad_value(rule, rng)}"], [key], []


def gen_bad_choice(rng):
    key = rng.choice(sorted(CHOICES))
    allowed, context = CHOICES[key]
    value = rng.choice([_word(rng), rng.choice(allowed).swapcase(), rng.choice(allowed) + "x",
                        *([] if key in EMPTY_ALLOWED else [""])])
    if key.endswith("selective_ac_option"):
        value = rng.choice([_word(rng), "0", str(-rng.randint(1, 9)), "Op"])
    if next(leaf for leaf in LEAVES if leaf.key == key).kind == "list":
        value = "[" + ",".join([*rng.sample(allowed, rng.randint(0, 1)), value or _word(rng)]) + "]"
    return [*context, f"{key}={value}"], [key], []


def gen_unknown_key(rng):
    section = rng.choice([*SECTIONS, ""])
    prefix = f"{section}." if section else ""
    taken = [
        leaf.key[len(prefix):] for leaf in LEAVES if leaf.key.startswith(prefix) and "." not in leaf.key[len(prefix):]
    ]
    name = _new_name(rng, taken + ([] if section else [*SECTIONS, *GROUPS, "hydra"]))
    key = prefix + name
    return [f"{rng.choice(['', '+', '++'])}{key}={rng.choice(['1', 'abc', '0.5', 'true'])}"], [key], []


def gen_unknown_option(rng):
    group = rng.choice([*GROUPS, *(s for s in SECTIONS if s not in GROUPS)])
    option = _new_name(rng, OPTIONS.get(group, []))
    return [f"{group}={option}"], [option if group in GROUPS else group], []


def _degrees(dp_shard=-1, tp=1, pp=1, cp=1, replicate=1, nproc=None, ep=1):
    world = nproc if nproc is not None else max(1, replicate * tp * pp * cp * max(dp_shard, 1))
    return [f"parallelism.data_parallel_replicate_degree={replicate}",
            f"parallelism.data_parallel_shard_degree={dp_shard}", f"parallelism.tensor_parallel_degree={tp}",
            f"parallelism.pipeline_parallel_degree={pp}",
            f"parallelism.context_parallel_degree={cp}", f"parallelism.expert_parallel_degree={ep}",
            f"cluster.nproc_per_node={world}"]


def _product_mismatch(rng):
    while True:
        d = dict(replicate=rng.choice([1, 2]), tp=rng.choice([1, 2, 4]), pp=rng.choice([1, 2]), cp=rng.choice([1, 2]),
                 dp_shard=rng.choice([-1, 1, 2, 3]))
        nproc = rng.randint(1, 12)
        product = d["replicate"] * d["tp"] * d["pp"] * d["cp"]
        if (nproc % product if d["dp_shard"] == -1 else product * d["dp_shard"] != nproc):
            break
    return _degrees(**d, nproc=nproc) + ["parallelism.pipeline_parallel_schedule=GPipe"], ["data_parallel_shard_degree"]


def _tp_heads(rng):
    heads = rng.choice([4, 6, 8, 12, 16])
    kv = rng.choice([None, *(k for k in range(1, heads + 1) if heads % k == 0)])
    tp = rng.choice([t for t in range(2, 9) if heads % t or (kv or heads) % t])
    key = "model.n_heads" if heads % tp else "model.n_kv_heads"
    return ["parallelism=tp", *_degrees(dp_shard=1, tp=tp), f"model.n_heads={heads}", f"model.dim={heads * 16}",
            f"model.n_kv_heads={'null' if kv is None else kv}", f"training.seq_len={64 * tp}"], [key]


def _pp_layers(rng):
    layers = rng.randint(1, 4)
    pp = rng.randint(layers + 3, layers + 6)
    return ["parallelism=fsdp_pp", *_degrees(pp=pp), f"model.n_layers={layers}",
            "parallelism.pipeline_parallel_schedule=GPipe"], ["model.n_layers"]


def _seq_len(rng):
    cp, tp = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 4])
    factor = 2 * cp * tp if cp > 1 else tp
    if factor == 1:
        tp, factor = 2, 2
    seq = factor * rng.randint(1, 64) + rng.randint(1, factor - 1)
    preset = "parallelism=fsdp_cp" if cp > 1 else "parallelism=tp"
    return [preset, *_degrees(tp=tp, cp=cp), f"training.seq_len={seq}"], ["training.seq_len"]


def _global_batch(rng):
    nproc, local = rng.choice([1, 2, 4]), rng.randint(1, 8)
    per_step = nproc * local
    bad = per_step * rng.randint(1, 4) + rng.randint(1, per_step - 1) if per_step > 1 else rng.choice([0, -2, -7])
    return ["parallelism=fsdp", f"cluster.nproc_per_node={nproc}", f"training.local_batch_size={local}",
            f"training.global_batch_size={bad}"], ["training.global_batch_size"]


def _pp_microbatch(rng):
    micro = rng.randint(2, 6)
    local = micro * rng.randint(1, 4) + rng.randint(1, micro - 1)
    args = [*PIPELINE, f"training.local_batch_size={local}", f"parallelism.pipeline_parallel_microbatch_size={micro}"]
    return args, ["pipeline_parallel_microbatch_size"]


def _pp_tied(rng):
    return [*PIPELINE, "model.tie_word_embeddings=true"], ["model.tie_word_embeddings"]


def _expert(rng):
    if rng.random() < 0.5:  # a dense model has no experts to split
        ep = rng.choice([2, 4, 8])
        return ["parallelism=fsdp", f"cluster.nproc_per_node={ep}", f"parallelism.expert_parallel_degree={ep}"], \
            ["parallelism.expert_parallel_degree"]
    ep = rng.choice([3, 6])  # 8 experts do not split over 3 or 6 expert ranks
    return [*MOE, "parallelism=fsdp", f"cluster.nproc_per_node={ep}", f"parallelism.expert_parallel_degree={ep}"], \
        ["model.moe.n_routed_experts", "parallelism.expert_parallel_degree"]


def _stages_per_rank(rng):
    if rng.random() < 0.5:  # a looped schedule with one stage per rank
        return [*PIPELINE, f"parallelism.pipeline_parallel_schedule={rng.choice(MULTI_STAGE_SCHEDULES)}",
                "parallelism.pipeline_parallel_layers_per_stage=4"], ["pipeline_parallel_schedule"]
    return [*PIPELINE, f"parallelism.pipeline_parallel_schedule={rng.choice(['GPipe', '1F1B'])}",
            "parallelism.pipeline_parallel_layers_per_stage=2"], ["pipeline_parallel_schedule"]


def _few_microbatches(rng):
    pp = rng.choice([2, 4])
    args = ["parallelism=fsdp_pp", *_degrees(pp=pp), f"training.local_batch_size={rng.randint(1, pp - 1)}",
            "parallelism.pipeline_parallel_schedule=1F1B"]
    return args, ["training.local_batch_size", "pipeline_parallel_microbatch_size"]


def _fqn_parts(rng):
    n = rng.choice([1, 3, 5])
    parts = [[f"layers.{i}"] for i in range(n)]
    return [*PIPELINE, "parallelism.module_fqns_per_model_part=" + str(parts).replace("'", "").replace(" ", "")], \
        ["pipeline_parallel_degree"]


def _dim_heads(rng):
    heads = rng.choice([3, 5, 6, 7, 12])
    return [f"model.n_heads={heads}", f"model.dim={heads * 16 + rng.randint(1, heads - 1)}"], ["model.dim"]


def _kv_heads(rng):
    heads = rng.choice([6, 8, 12, 16])
    kv = rng.choice([k for k in range(2, heads) if heads % k])
    return [f"model.n_heads={heads}", f"model.dim={heads * 16}", f"model.n_kv_heads={kv}"], ["model.n_kv_heads"]


DEGREES = [_product_mismatch, _tp_heads, _pp_layers, _seq_len, _global_batch, _pp_microbatch, _pp_tied, _expert,
           _stages_per_rank, _few_microbatches, _fqn_parts, _dim_heads, _kv_heads]


def gen_degrees(rng):
    return (*rng.choice(DEGREES)(rng), [])


def gen_paths(rng):
    missing = f"/nonexistent-{_word(rng)}"
    data = rng.choice([[], ["data=c4"], ["data=local", "data.data_files=[corpus.jsonl]"]])
    return rng.choice([
        ([f"model.hf_assets_path={missing}/hf"], ["model.hf_assets_path"], []),
        (["model.hf_assets_path=tokenizer.json"], ["model.hf_assets_path"], ["tokenizer.json"]),  # a file
        ([*data, f"data.tokenizer_path={missing}/tokenizer.model"], ["data.tokenizer_path"], ["corpus.jsonl"]),
        (["data=local", f"data.data_files=[corpus.jsonl,{_word(rng)}*.jsonl]"], ["data.data_files"], ["corpus.jsonl"]),
        (["data=local", f"data.data_files=[{missing}/*.jsonl]"], ["data.data_files"], []),
        (["data=local"], ["data.data_files"], []),
        ([f"data.path={rng.choice([missing, './' + _word(rng), '~/' + _word(rng)])}"], ["data.path"], []),
        (["data.path=corpus", f"data.data_files=[*.{rng.choice(['parquet', 'txt', 'json'])}]"], ["data.data_files"],
         ["corpus/a.jsonl"]),
        ([f"data.path={rng.choice(['json', 'parquet', 'text', 'local'])}"], ["data.data_files"], []),
        ([f"validation.path={missing}", "validation.format=tokenized"], ["validation.path"], []),
        (["validation.path=json", f"validation.data_files=[{missing}/*.jsonl]"], ["validation.data_files"], []),
        (["data=local", "data.data_files=[corpus.jsonl]", "validation.enable=true"], ["validation.data_files"],
         ["corpus.jsonl"]),
        # a fresh run: one with checkpoints of its own resumes from them and ignores initial_load_path
        ([f"checkpoint.initial_load_path={missing}/step-100", f"job.name={_word(rng)}"],
         ["checkpoint.initial_load_path"], []),
    ])


def gen_conflicts(rng):
    tp = rng.choice([2, 4])
    tp_layout = ["parallelism=tp", *_degrees(dp_shard=1, tp=tp)]
    slurm = rng.choice([["cluster=slurm"], ["cluster=site_example_h100"], ["cluster=site_example_a100_4gpu"]])
    gpus = rng.choice([1, 2, 4, 8])
    option = rng.choice(["nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "partition", "account",
                         "qos", "constraint", "time", "signal", "cpus_per_task", "gpus_per_node"])
    timeout = rng.randint(1, 60)
    freq = rng.randint(1, 20)
    warmup = rng.randint(0, freq)
    return rng.choice([
        (["activation_checkpoint.mode=memory_budget",
          *rng.choice([[], ["compile.enable=false"], ["compile.enable=true", "compile.components=[loss]"]])],
         ["activation_checkpoint.mode"]),
        ([f"float8={rng.choice(['rowwise', 'rowwise_with_gw_hp'])}", "float8.enable_fsdp_float8_all_gather=true"],
         ["float8.enable_fsdp_float8_all_gather"]),
        (["float8=tensorwise", "float8.precompute_float8_dynamic_scale_for_fsdp=true"],
         ["float8.precompute_float8_dynamic_scale_for_fsdp"]),
        (["float8=tensorwise", *tp_layout, "cluster.device=cpu"], ["float8.recipe_name"]),
        (["parallelism.enable_async_tensor_parallel=true", *rng.choice([[], ["compile.enable=true"]])],
         ["parallelism.enable_async_tensor_parallel"]),
        ([*tp_layout, "parallelism.enable_async_tensor_parallel=true"], ["parallelism.enable_async_tensor_parallel"]),
        ([*tp_layout, "compile.enable=true", "parallelism.enable_async_tensor_parallel=true", "cluster.device=cpu"],
         ["parallelism.enable_async_tensor_parallel"]),
        (["profiling.enable_profiling=true", f"profiling.profile_freq={freq}", f"profiling.profiler_warmup={warmup}",
          f"profiling.profiler_active={freq - warmup + rng.randint(1, 5)}"], ["profiling.profile_freq"]),
        ([*slurm, "parallelism=fsdp", f"cluster.gpus_per_node={gpus}", "cluster.device=cpu"], ["cluster.device"]),
        ([*SLURM, "cluster.device=cuda"], ["cluster.device"]),
        ([*slurm, "parallelism=fsdp", f"cluster.gpus_per_node={gpus}", f"cluster.nproc_per_node={gpus * 2}"],
         ["cluster.gpus_per_node"]),
        ([*SLURM, f"+cluster.extra_sbatch.{option}={rng.choice(['1', 'x', 'true'])}"], ["cluster.extra_sbatch"]),
        ([*SLURM, f"cluster.timeout_min={timeout}", f"cluster.signal_delay_s={timeout * 60 + rng.randint(0, 600)}"],
         ["cluster.signal_delay_s"]),
        ([f"cluster.nodes={rng.randint(2, 64)}"], ["cluster.nodes"]),
        (["checkpoint.initial_load_in_hf=true"], ["checkpoint.initial_load_in_hf"]),
        (["checkpoint.async_mode=async_with_pinned_mem", *rng.choice([["cluster.device=cpu"], SLURM])],
         ["checkpoint.async_mode"]),
    ]) + ([],)


GENERATORS = {"wrong_type": gen_wrong_type, "out_of_range": gen_out_of_range, "bad_choice": gen_bad_choice,
              "unknown_key": gen_unknown_key, "unknown_option": gen_unknown_option, "degrees": gen_degrees,
              "paths": gen_paths, "conflicts": gen_conflicts}


def invalid_cases() -> list[Case]:
    rng = random.Random(SEED)
    cases = []
    for category, count in COUNTS.items():
        for _ in range(count * SCALE):
            args, keys, files = GENERATORS[category](rng)
            cases.append(Case(f"s{SEED}-{len(cases):03d}-{category}", tuple(args), tuple(keys), tuple(files)))
    return cases




# ------------------------------------------------------------------------------------------- valid sets


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _windowed(model: str) -> bool:
    """Whether a model option, over its family's base option, has attention windows (they refuse context
    parallelism)."""
    option = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    merged = OmegaConf.merge(*[OmegaConf.load(CONF / "model" / f"{entry.split('@')[0]}.yaml")
                               for entry in option.get("defaults", []) if str(entry).endswith("@_here_")], option)
    return merged.get("attention_window", "none") != "none"


def valid_args(rng: random.Random) -> list[str]:
    """Random values inside the valid ranges, group options, and a layout that fits the model and the world."""
    args = []
    model = rng.choice(OPTIONS["model"])
    preset = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    heads, kv, layers = preset.n_heads, preset.get("n_kv_heads") or preset.n_heads, preset.n_layers
    args.append(f"model={model}")
    if model == "llama3_debug" or (model.startswith("llama3") and rng.random() < 0.5):  # other families: their dims
        heads = rng.choice([1, 2, 4, 8, 16])
        kv, layers = rng.choice(_divisors(heads)), rng.randint(1, 8)
        args += [f"model.n_heads={heads}", f"model.dim={heads * rng.choice([8, 16, 32])}", f"model.n_layers={layers}",
                 f"model.n_kv_heads={rng.choice([kv, 'null'] if kv == heads else [kv])}",
                 f"model.vocab_size={rng.randint(256, 4096)}", f"model.multiple_of={rng.choice([16, 32, 256])}",
                 f"model.ffn_dim_multiplier={rng.choice(['null', '1.3', '0.5'])}",
                 f"model.norm_eps={10 ** rng.uniform(-8, -4):.3g}",
                 f"model.rope_scaling={rng.choice(['true', 'false'])}"]

    cluster = rng.choice(OPTIONS["cluster"])
    nodes = 1 if cluster == "local" else rng.choice([1, 2, 4])
    nproc = rng.choice([1, 2, 4, 8])
    args += [f"cluster={cluster}", f"cluster.nodes={nodes}"]  # cluster.nproc_per_node: with the degrees below
    device = "cpu" if cluster == "slurm_cpu" else "auto"
    if cluster == "local":
        device = rng.choice(["auto", "cpu", "cuda"])
        args.append(f"cluster.device={device}")
    elif cluster != "slurm_cpu":
        args.append(f"cluster.gpus_per_node={nproc}")
    if cluster != "local":
        timeout = rng.randint(2, 2000)
        args += [f"cluster.timeout_min={timeout}", f"cluster.signal_delay_s={rng.randint(0, 60)}",
                 f"cluster.cpus_per_task={rng.randint(1, 16)}", f"cluster.max_num_timeout={rng.randint(0, 5)}",
                 f"+cluster.extra_sbatch.mail-type={rng.choice(['END', 'FAIL'])}"]

    world = nodes * nproc
    tp = rng.choice([t for t in _divisors(world) if heads % t == 0 and kv % t == 0 and t <= 8])
    pp = rng.choice([p for p in _divisors(world // tp) if p <= layers + 2 and p <= 4])
    cp = rng.choice(_divisors(world // tp // pp))
    if _windowed(model):
        cp = 1
    replicate = rng.choice(_divisors(world // tp // pp // cp))
    shard = world // (tp * pp * cp * replicate)
    factor = 2 * cp * tp if cp > 1 else tp
    micro = rng.choice([1, 2])
    local = micro * rng.randint(pp, pp + 4) if pp > 1 else rng.randint(1, 16)
    dp = replicate * shard
    experts = preset.get("moe", {}).get("n_routed_experts", 0)
    ep = rng.choice([e for e in _divisors(shard * cp) if e % cp == 0 and experts % e == 0]) if experts else 1
    args += [f"parallelism={rng.choice(OPTIONS['parallelism'])}",
             *_degrees(dp_shard=rng.choice([shard, -1]), tp=tp, pp=pp, cp=cp, replicate=replicate, nproc=nproc, ep=ep),
             f"parallelism.pipeline_parallel_schedule={rng.choice(['GPipe', '1F1B'])}",
             f"parallelism.pipeline_parallel_microbatch_size={micro}",
             f"parallelism.context_parallel_method={rng.choice(['allgather', 'ring'])}",
             f"parallelism.fsdp_reshard_after_forward={rng.choice(['default', 'always', 'never'])}",
             f"training.seq_len={factor * rng.randint(1, 64)}", f"training.local_batch_size={local}",
             f"training.global_batch_size={rng.choice([-1, local * dp * rng.randint(1, 4)])}",
             f"model.tie_word_embeddings={'false' if pp > 1 else rng.choice(['true', 'false'])}"]

    compiled = rng.random() < 0.5
    components = rng.sample(COMPILE_COMPONENTS, rng.randint(1, len(COMPILE_COMPONENTS)))
    args += [f"compile.enable={str(compiled).lower()}", f"compile.components=[{','.join(components)}]",
             f"compile.backend={rng.choice(['inductor', 'aot_eager', 'eager'])}"]
    modes = [m for m in AC_MODES if m != "memory_budget" or (compiled and "model" in components)]
    mode = rng.choice(modes)
    args += [f"activation_checkpoint.mode={mode}", f"activation_checkpoint.memory_budget={rng.uniform(0, 1):.3f}",
             f"activation_checkpoint.selective_ac_option={rng.choice(['op', str(rng.randint(1, 4))])}"]
    if tp > 1 and compiled and "model" in components and device != "cpu":
        args.append(f"parallelism.enable_async_tensor_parallel={rng.choice(['true', 'false'])}")

    float8 = rng.choice([o for o in OPTIONS["float8"] if not (o == "tensorwise" and tp > 1 and device == "cpu")])
    args.append(f"float8={float8}")
    if float8 == "tensorwise" and rng.random() < 0.5:
        args += ["float8.enable_fsdp_float8_all_gather=true",
                 f"float8.precompute_float8_dynamic_scale_for_fsdp={rng.choice(['true', 'false'])}"]

    freq = rng.randint(1, 50)
    warmup = rng.randint(0, freq - 1)
    args += [f"profiling.enable_profiling={rng.choice(['true', 'false'])}", f"profiling.profile_freq={freq}",
             f"profiling.profiler_warmup={warmup}", f"profiling.profiler_active={rng.randint(1, freq - warmup)}"]

    data = rng.choice(OPTIONS["data"])
    args.append(f"data={data}")
    if data == "local":
        args.append("data.data_files=[corpus.jsonl]")
    if data == "tokenized":
        args.append("data.path=store")  # the test makes it: a folder with the manifest prepare writes last

    exclude = rng.sample(CHOICES["checkpoint.exclude_from_loading"][0], rng.randint(0, 2))
    args += [
        f"optimizer.name={rng.choice(['AdamW', 'Adam'])}",
        f"optimizer.implementation={rng.choice(['foreach', 'fused', 'for-loop'])}",
        f"optimizer.lr={10 ** rng.uniform(-6, -2):.3g}", f"optimizer.beta1={rng.uniform(0, 0.99):.3f}",
        f"optimizer.beta2={rng.uniform(0, 0.999):.3f}", f"optimizer.eps={10 ** rng.uniform(-12, -6):.3g}",
        f"optimizer.weight_decay={rng.uniform(0, 0.3):.3f}",
        f"lr_scheduler.warmup_steps={rng.randint(0, 500)}",
        f"lr_scheduler.decay_ratio={rng.choice(['null', f'{rng.random():.3f}'])}",
        f"lr_scheduler.decay_type={rng.choice(['linear', 'sqrt', 'cosine'])}",
        f"lr_scheduler.min_lr_factor={rng.random():.3f}",
        f"training.steps={rng.randint(1, 10**6)}", f"training.seed={rng.randint(-(2**31), 2**31)}",
        f"training.max_norm={rng.uniform(-1, 5):.3f}", f"training.gc_freq={rng.randint(0, 100)}",
        f"training.mixed_precision_param={rng.choice(['auto', 'bfloat16', 'float32'])}",
        f"training.mixed_precision_reduce={rng.choice(['float32', 'bfloat16'])}",
        f"training.on_nonfinite={rng.choice(['stop', 'skip'])}",
        f"checkpoint.interval={rng.randint(1, 1000)}", f"checkpoint.keep_latest_k={rng.randint(0, 20)}",
        f"checkpoint.load_step={rng.randint(-1, 1000)}", f"checkpoint.exclude_from_loading=[{','.join(exclude)}]",
        f"checkpoint.export_dtype={rng.choice(['float32', 'bfloat16', 'float16'])}",
        "checkpoint.async_mode="
        f"{rng.choice(['disabled', 'async'] + (['async_with_pinned_mem'] if device != 'cpu' else []))}",
        f"checkpoint.on_save_error={rng.choice(['stop', 'continue'])}",
        f"comm.init_timeout_seconds={rng.randint(1, 3600)}", f"comm.train_timeout_seconds={rng.randint(1, 3600)}",
        f"metrics.log_freq={rng.randint(1, 100)}", f"job.name={_word(rng)}",
        f"validation.freq={rng.randint(1, 1000)}", f"validation.steps={rng.choice([-1, rng.randint(1, 100)])}",
    ]
    rng.shuffle(args)  # later overrides of a key win wherever they are; groups are ordered by the defaults list
    return args


VALID = [(f"s{SEED}-{i:03d}-valid", valid_args(random.Random(f"{SEED}-valid-{i}"))) for i in range(N_VALID * SCALE)]

