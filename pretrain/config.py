"""JobConfig: the one typed config a run carries from `launch.py` down to every rank.

Hydra composes `conf/config.yaml` plus one option per group; the dataclasses below are the schema
(registered in Hydra's ConfigStore), so an unknown key or a wrong type fails at compose time.
`resolve()` turns the composed DictConfig into plain dataclasses and `validate()` checks the rules
that span fields, before any process starts. Nothing below `launch.py` sees a DictConfig.

This module imports neither torch nor the model code, so a bad command line fails in a blink.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pretrain.model_config import MLAConfig, ModelConfig, MoEConfig, validate_model  # noqa: F401 (re-exported)


class ConfigError(ValueError):
    """A user error in the config: the message names the key, the value and a fix."""


class TrainingHalted(ConfigError):
    """The run stopped itself on purpose (e.g. a non-finite loss): the message says at which step, what
    was kept and how to go on. Exits with code 3."""


@dataclass
class JobSection:
    name: str = "default"  # run name; the run directory is <dump_folder>/<name> (sweeps add the overrides)
    description: str = ""  # free text, stored with the run
    dump_folder: str = "outputs"  # root of all run directories (and of the Aim repo by default)
    run_dir: str = ""  # derived by resolve(): the directory of this run; leave empty


@dataclass
class ParallelismConfig:
    data_parallel_replicate_degree: int = 1  # HSDP replicas (DDP-like groups of FSDP shards)
    data_parallel_shard_degree: int = -1  # FSDP shards; -1 = the ranks left after the other degrees
    tensor_parallel_degree: int = 1  # tensor (+sequence) parallel ranks
    pipeline_parallel_degree: int = 1  # pipeline stages
    context_parallel_degree: int = 1  # ranks splitting the sequence
    expert_parallel_degree: int = 1  # ranks splitting MoE experts
    fsdp_reshard_after_forward: str = "default"  # default | always | never: free gathered params after forward
    disable_loss_parallel: bool = False  # with TP: gather the logits instead of a vocab-sharded cross-entropy
    enable_async_tensor_parallel: bool = False  # overlap TP collectives with matmuls (CUDA + compile only)
    pipeline_parallel_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble
    pipeline_parallel_microbatch_size: int = 1  # sequences per pipeline micro-batch; local_batch_size must be a multiple
    pipeline_parallel_layers_per_stage: Optional[int] = None  # layers per stage (virtual stages follow); null = one stage per rank (two for looped/V schedules)
    pipeline_parallel_first_stage_less_layers: int = 1  # the first stage holds this many fewer layers (it also embeds)
    pipeline_parallel_last_stage_less_layers: int = 1  # the last stage holds this many fewer layers (it also computes the output)
    module_fqns_per_model_part: Optional[list[list[str]]] = None  # explicit module names per stage, e.g. [[tok_embeddings, layers.0], [layers.1, norm, output]]
    context_parallel_method: str = "allgather"  # allgather | ring: how attention sees the whole sequence under CP


@dataclass
class Float8Config:
    enable: bool = False  # convert linear layers to torchao float8 training (conf/float8: off, tensorwise, rowwise, ...)
    recipe_name: str = "tensorwise"  # torchao recipe: tensorwise | rowwise | rowwise_with_gw_hp
    enable_fsdp_float8_all_gather: bool = False  # tensorwise + FSDP: all-gather weights in float8 (half the bytes of bf16)
    precompute_float8_dynamic_scale_for_fsdp: bool = False  # with float8 all-gather: one fused amax for all weights after each optimizer step
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])  # linear layers whose name contains one of these stay in high precision; "auto_filter_small_kn" also skips layers too small to gain
    emulate: bool = False  # float8 math emulated in high precision (for testing); CPU always emulates


@dataclass
class CompileConfig:
    enable: bool = False  # torch.compile the components below (inductor; needs a C++ compiler on CPU)
    components: list[str] = field(default_factory=lambda: ["model", "loss"])  # of: model (each transformer block, fullgraph), loss
    backend: str = "inductor"  # torch.compile backend: inductor | aot_eager | eager (the last two for debugging)


@dataclass
class ActivationCheckpointConfig:
    mode: str = "none"  # none | full | selective | memory_budget (memory_budget needs compile)
    selective_ac_option: str = "op"  # selective mode: "op" (per-op save list) or N as a string/int (checkpoint every N-th block)
    memory_budget: float = 0.5  # memory_budget mode: fraction of activation memory the compiler may keep (0 = recompute all, 1 = keep all)
    preserve_rng_state: bool = False  # restore the RNG state on recompute (only models with dropout need it)


@dataclass
class ProfilingConfig:
    enable_profiling: bool = False  # torch.profiler traces every profile_freq steps into <run_dir>/<save_traces_folder>
    save_traces_folder: str = "profile_traces"  # inside the run directory; one subfolder per profiled step
    profile_freq: int = 10  # steps between traces
    profiler_warmup: int = 3  # steps the profiler warms up before each active window
    profiler_active: int = 1  # steps recorded in each trace
    enable_memory_snapshot: bool = False  # CUDA only: dump the allocator history (pickle for pytorch.org/memory_viz)
    save_memory_snapshot_folder: str = "memory_snapshot"  # inside the run directory


@dataclass
class DataConfig:
    name: str = "embedded"  # preset name (informational)
    path: str = "embedded"  # embedded | an HF hub id | a local directory laid out like one | local (builder from file extension) | json | parquet | text
    config_name: str = ""  # HF dataset config (subset), e.g. "en"; "" = none
    data_files: list[str] = field(default_factory=list)  # paths or globs, relative to `path` when it is a directory
    split: str = "train"  # HF split to read
    text_field: str = "text"  # column that holds the document text
    streaming: bool = True  # stream (no full download); hub datasets should stay streaming
    tokenizer_path: str = ""  # a sentencepiece .model or an HF tokenizer.json / its directory; "" = see README
    cache_dir: str = "~/.cache/pretrain"  # where trained tokenizers and the measured CPU peak are cached
    bos: bool = True  # prepend BOS to every document
    eos: bool = True  # append EOS to every document


@dataclass
class ClusterConfig:
    name: str = "local"  # local: processes on this machine | slurm: one task per device on SLURM nodes
    nproc_per_node: int = 1  # processes (devices) per node; locally 1 runs in-process; on SLURM the tasks per node
    device: str = "auto"  # auto | cpu | cuda: auto picks cuda when available
    # SLURM only (cluster=slurm and its presets); cluster=local ignores these.
    nodes: int = 1  # nodes of the job; world size = nodes x nproc_per_node
    gpus_per_node: int = 0  # GPUs requested per node, one task each (= nproc_per_node); 0 = CPU-only job (gloo)
    cpus_per_task: int = 1  # CPU cores per task; also the task's OMP_NUM_THREADS unless that is set
    mem_gb: int = 0  # memory per node in GB; 0 = the partition's default
    partition: str = ""  # SLURM partition (`sinfo -s` lists them); "" = the cluster's default partition
    account: str = ""  # account charged for the job; "" = your default account
    qos: str = ""  # quality of service; "" = the default
    constraint: str = ""  # required node features, e.g. "h100"; "" = any node of the partition
    timeout_min: int = 240  # time limit of one attempt in minutes; a requeued attempt gets the same again
    max_num_timeout: int = 3  # requeues allowed after a time limit (and counted preemptions); each resumes from the latest checkpoint
    signal_delay_s: int = 120  # SIGUSR2 comes this many seconds before the time limit: finish the step, checkpoint, requeue
    setup: list[str] = field(default_factory=list)  # shell lines run before the tasks start, e.g. "module load cuda/12.4"
    extra_sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {mail-type: END}, true = bare flag; CLI: +cluster.extra_sbatch.mail-type=END
    blocking: bool = True  # wait for the jobs and report how they ended; false = print job ids and log paths, then return


@dataclass
class OptimizerConfig:
    name: str = "AdamW"  # AdamW | Adam
    lr: float = 8e-4  # peak learning rate
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled weight decay (AdamW)
    implementation: str = "foreach"  # foreach | fused | for-loop


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = 2  # linear warm-up from ~0 to optimizer.lr over this many steps
    decay_ratio: Optional[float] = None  # fraction of steps spent decaying at the end; null = decay right after warm-up
    decay_type: str = "linear"  # linear | sqrt | cosine
    min_lr_factor: float = 0.0  # final lr = optimizer.lr * min_lr_factor


@dataclass
class TrainingConfig:
    local_batch_size: int = 8  # sequences per rank per micro-step
    global_batch_size: int = -1  # sequences per optimizer step; -1 = local x data-parallel degree (no accumulation)
    seq_len: int = 2048  # tokens per sequence
    max_norm: float = 1.0  # gradient clipping norm; <= 0 disables clipping
    steps: int = 10000  # optimizer steps to train
    seed: int = 0  # seed for weight init
    deterministic: bool = False  # use deterministic algorithms (bitwise-repeatable on CPU)
    gc_freq: int = 50  # run Python's garbage collector every this many steps, not at random pauses; 0 = automatic
    dtype: str = "float32"  # float32 | bfloat16: dtype the parameters and optimizer state are stored in; bfloat16 = full-bf16 training (no fp32 master weights)
    mixed_precision_param: str = "auto"  # auto | bfloat16 | float32: compute dtype of params (auto: bf16 on CUDA, fp32 on CPU)
    mixed_precision_reduce: str = "float32"  # float32 | bfloat16: gradient reduce dtype
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient norm: stop (exit 3, nothing saved of that step) | skip (drop that step's update)


@dataclass
class CheckpointConfig:
    enable: bool = True  # save DCP checkpoints and resume from the latest one
    folder: str = "checkpoint"  # inside the run directory
    interval: int = 500  # save every this many steps (and at the last step)
    keep_latest_k: int = 10  # keep this many newest checkpoints; 0 = keep all
    async_mode: str = "disabled"  # disabled | async (written by a background thread while training goes on) | async_with_pinned_mem (CUDA: staged through pinned memory)
    on_save_error: str = "stop"  # a save that fails (disk full, permissions): stop (exit 3) | continue (keep training, retry at the next interval)
    load_step: int = -1  # resume from this step; -1 = the latest complete checkpoint
    exclude_from_loading: list[str] = field(default_factory=list)  # of: optimizer, lr_scheduler, dataloader, train_state
    last_save_model_only: bool = False  # the final checkpoint holds model weights only (for inference/export)
    create_seed_checkpoint: bool = False  # write step-0 (initial weights) and exit; run with all degrees 1 on one process
    export_dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of a model-only final checkpoint
    initial_load_path: str = ""  # a fresh run (no checkpoint of its own yet) starts from this checkpoint: a DCP step directory, or an HF model directory with initial_load_in_hf
    initial_load_model_only: bool = True  # from initial_load_path take the model weights only (not optimizer, schedule, data position)
    initial_load_in_hf: bool = False  # initial_load_path is an HF model directory (safetensors + config.json)


@dataclass
class CommConfig:
    init_timeout_seconds: int = 300  # collectives' timeout until the first step is done (set-up, checkpoint load, compile)
    train_timeout_seconds: int = 100  # collectives' timeout from then on: a dead or hung rank ends the run this fast


@dataclass
class MetricsConfig:
    log_freq: int = 10  # log every this many steps (and the first and last step)
    enable_aim: bool = True  # track the run in Aim (rank 0)
    aim_repo: str = ""  # Aim repository directory; "" = job.dump_folder
    enable_tensorboard: bool = False  # also write TensorBoard events into <run_dir>/tb


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    compile: CompileConfig = field(default_factory=CompileConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    dry_run: bool = False  # build everything on a fake process group at the full world size, print per-rank memory, exit

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.nproc_per_node


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_config", node=JobConfig)


def resolve(cfg: DictConfig, run_dir: Optional[str] = None) -> JobConfig:
    """Composed DictConfig -> validated JobConfig with derived values filled in."""
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} has no value (???). Fix: set it on the command line, e.g. {e.full_key}=...") from None
    assert isinstance(job, JobConfig), type(job)
    job.job.run_dir = run_dir or os.path.join(job.job.dump_folder, job.job.name)
    if not job.metrics.aim_repo:
        job.metrics.aim_repo = job.job.dump_folder
    if job.checkpoint.create_seed_checkpoint:
        seed_checkpoint_layout(job)
    validate(job)
    return job


def seed_checkpoint_layout(job: JobConfig) -> None:
    """A seed checkpoint is the full model's initial weights, written by one process: the layout and
    the cluster of the run that will use it do not apply, so the same recipe command works for both."""
    p, c = job.parallelism, job.cluster
    for key in ("data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                "pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree"):
        setattr(p, key, 1)
    p.pipeline_parallel_schedule, p.module_fqns_per_model_part = "1F1B", None
    c.name, c.nodes, c.nproc_per_node, c.gpus_per_node = "local", 1, 1, 0
    job.training.global_batch_size = -1


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}. Fix: set {key} to one of them.")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}. Fix: set {key} to a value {bound}.")


def _unknown_keys(section: Any, prefix: str = "") -> None:
    """Hydra lets `+section.key=value` add a key the schema lacks; nothing would read it."""
    known = {f.name for f in fields(section)}
    for name, value in vars(section).items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(
                f"{key}={value!r} is not a key of the config. "
                "Fix: check its spelling against `python launch.py --cfg job`, or drop it."
            )
        if is_dataclass(value):
            _unknown_keys(value, prefix=f"{key}.")


def validate(job: JobConfig) -> None:
    """Cross-field rules, checked before any process starts. Raises ConfigError."""
    from pretrain.distributed.layout_checks import check_layout
    from pretrain.feature_checks import check_features
    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.models import FAMILIES

    _unknown_keys(job)
    m, t, o, s, c = job.model, job.training, job.optimizer, job.lr_scheduler, job.checkpoint
    _choice("model.name", m.name, tuple(FAMILIES))
    validate_model(m)
    if m.hf_assets_path and not job.dry_run and not os.path.isdir(os.path.expanduser(m.hf_assets_path)):
        raise ConfigError(
            f"model.hf_assets_path={m.hf_assets_path!r} is not a directory. "
            "Fix: point it at a directory holding tokenizer.json, or set it to ''."
        )

    validate_cluster(job.cluster, dry_run=job.dry_run)
    dims = ParallelDims.from_config(job.parallelism, job.world_size)  # raises ConfigError on a bad layout
    check_layout(job, dims)
    _choice(
        "parallelism.fsdp_reshard_after_forward",
        job.parallelism.fsdp_reshard_after_forward,
        ("default", "always", "never"),
    )
    check_features(job, dims)

    for key in ("local_batch_size", "seq_len", "steps"):
        _positive(f"training.{key}", getattr(t, key))
    _positive("training.gc_freq", t.gc_freq, allow_zero=True)
    if math.isnan(t.max_norm):
        raise ConfigError("training.max_norm=nan is not a number. Fix: e.g. training.max_norm=1.0 (<= 0 disables clipping).")
    per_step = t.local_batch_size * dims.dp
    if t.global_batch_size == -1:
        t.global_batch_size = per_step
    if t.global_batch_size <= 0 or t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not a positive multiple of "
            f"training.local_batch_size={t.local_batch_size} x data-parallel degree {dims.dp} = {per_step}. "
            f"Fix: set training.global_batch_size to a multiple of {per_step} (e.g. {per_step * 2}) or to -1."
        )
    _choice("training.mixed_precision_param", t.mixed_precision_param, ("auto", "bfloat16", "float32"))
    _choice("training.dtype", t.dtype, ("float32", "bfloat16"))
    if t.dtype == "bfloat16" and t.mixed_precision_param == "float32":
        raise ConfigError(
            "training.dtype=bfloat16 stores the parameters in bf16, but training.mixed_precision_param=float32 "
            "would compute in fp32 copies of them. Fix: training.mixed_precision_param=auto (or bfloat16)."
        )
    _choice("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    _choice("training.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    for key in ("init_timeout_seconds", "train_timeout_seconds"):
        _positive(f"comm.{key}", getattr(job.comm, key))

    _choice("optimizer.name", o.name, ("AdamW", "Adam"))
    _choice("optimizer.implementation", o.implementation, ("foreach", "fused", "for-loop"))
    _positive("optimizer.lr", o.lr, allow_zero=True)
    _positive("optimizer.eps", o.eps)
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be in [0, 1). Fix: e.g. 0.9 or 0.95.")
    _positive("lr_scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    _choice("lr_scheduler.decay_type", s.decay_type, ("linear", "sqrt", "cosine"))
    if s.decay_ratio is not None and not 0.0 <= s.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio={s.decay_ratio} must be in [0, 1] or null. Fix: e.g. 0.2.")
    if not 0.0 <= s.min_lr_factor <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_factor={s.min_lr_factor} must be in [0, 1]. Fix: e.g. 0.1.")

    _positive("checkpoint.interval", c.interval)
    _positive("checkpoint.keep_latest_k", c.keep_latest_k, allow_zero=True)
    if c.load_step < -1:
        raise ConfigError(f"checkpoint.load_step={c.load_step} must be -1 (latest) or a step. Fix: use -1.")
    for item in c.exclude_from_loading:
        _choice("checkpoint.exclude_from_loading", item, ("optimizer", "lr_scheduler", "dataloader", "train_state"))
    _choice("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16", "float16"))
    _choice("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    _choice("checkpoint.on_save_error", c.on_save_error, ("stop", "continue"))
    if c.async_mode == "async_with_pinned_mem" and job.cluster.device == "cpu":
        raise ConfigError(
            "checkpoint.async_mode=async_with_pinned_mem stages GPU tensors through pinned host memory, but "
            "cluster.device=cpu. Fix: checkpoint.async_mode=async."
        )
    if c.initial_load_in_hf and not c.initial_load_path:
        raise ConfigError(
            "checkpoint.initial_load_in_hf=true but checkpoint.initial_load_path is ''. "
            "Fix: set checkpoint.initial_load_path to a Hugging Face model folder, or initial_load_in_hf=false."
        )
    own_checkpoints = os.path.isdir(os.path.join(job.job.run_dir, c.folder))  # a resume ignores initial_load_path
    initial = os.path.expanduser(c.initial_load_path)
    if initial and not job.dry_run and not own_checkpoints and not os.path.isdir(initial):
        raise ConfigError(
            f"checkpoint.initial_load_path={c.initial_load_path!r} is not a directory. Fix: point it at a checkpoint "
            "step folder (<run_dir>/checkpoint/step-N) or a Hugging Face model folder, or set it to ''."
        )
    _positive("metrics.log_freq", job.metrics.log_freq)
    if "/" in job.job.name or job.job.name in ("", ".", ".."):
        raise ConfigError(f"job.name={job.job.name!r} must be a non-empty name without '/' (and not . or ..). Fix: e.g. job.name=my_run.")
    if not job.job.dump_folder:
        raise ConfigError("job.dump_folder='' is empty. Fix: e.g. job.dump_folder=outputs (the root of all run directories).")
    if not job.dry_run:  # a dry run reads no data
        validate_data(job.data)


# sbatch options that cluster.* keys set; extra_sbatch must not set them a second time
_SBATCH_OPTIONS_OF_KEYS = {
    "nodes": "nodes", "ntasks-per-node": "nproc_per_node", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "partition": "partition", "account": "account",
    "qos": "qos", "constraint": "constraint", "time": "timeout_min", "signal": "signal_delay_s",
}


def validate_cluster(c: ClusterConfig, dry_run: bool = False) -> None:
    """Where the ranks run. On SLURM the request is also tried against the cluster itself at
    submission (`sbatch --test-only`), before anything is queued."""
    _choice("cluster.name", c.name, ("local", "slurm"))
    _choice("cluster.device", c.device, ("auto", "cpu", "cuda"))
    _positive("cluster.nproc_per_node", c.nproc_per_node)
    _positive("cluster.nodes", c.nodes)
    if c.name == "local":
        if c.nodes != 1 and not dry_run:  # a dry run only simulates the nodes
            raise ConfigError(
                f"cluster.nodes={c.nodes}: cluster=local runs on this machine only. "
                "Fix: cluster=slurm for several nodes, or cluster.nodes=1."
            )
        return
    _positive("cluster.gpus_per_node", c.gpus_per_node, allow_zero=True)
    if c.gpus_per_node and c.gpus_per_node != c.nproc_per_node:
        raise ConfigError(
            f"cluster.gpus_per_node={c.gpus_per_node} but cluster.nproc_per_node={c.nproc_per_node}: SLURM "
            "starts one task per GPU. Fix: set only cluster.gpus_per_node (nproc_per_node follows it)."
        )
    if c.gpus_per_node and c.device == "cpu":
        raise ConfigError(
            f"cluster.device=cpu but cluster.gpus_per_node={c.gpus_per_node} GPUs are requested. "
            "Fix: cluster.device=auto, or cluster.gpus_per_node=0 for a CPU-only job."
        )
    if not c.gpus_per_node and c.device == "cuda":
        raise ConfigError(
            "cluster.device=cuda but cluster.gpus_per_node=0 (a CPU-only job). "
            "Fix: cluster.gpus_per_node=<GPUs per node>, or cluster.device=cpu."
        )
    _positive("cluster.cpus_per_task", c.cpus_per_task)
    _positive("cluster.timeout_min", c.timeout_min)
    for key in ("mem_gb", "max_num_timeout", "signal_delay_s"):
        _positive(f"cluster.{key}", getattr(c, key), allow_zero=True)
    if c.signal_delay_s >= c.timeout_min * 60:
        raise ConfigError(
            f"cluster.signal_delay_s={c.signal_delay_s} is not shorter than cluster.timeout_min={c.timeout_min} "
            "minutes: the job would be told to stop as it starts. Fix: e.g. cluster.signal_delay_s=120."
        )
    for option in c.extra_sbatch:
        key = _SBATCH_OPTIONS_OF_KEYS.get(str(option).replace("_", "-"))
        if key:
            raise ConfigError(
                f"cluster.extra_sbatch sets {option!r}, which cluster.{key} already sets. "
                f"Fix: drop it from extra_sbatch and set cluster.{key}."
            )


def validate_data(d: DataConfig) -> None:
    """Local data must exist before launch; hub ids are checked when they are opened."""
    if d.tokenizer_path and not os.path.exists(os.path.expanduser(d.tokenizer_path)):
        raise ConfigError(
            f"data.tokenizer_path={d.tokenizer_path!r} does not exist. "
            "Fix: point it at a sentencepiece .model or a tokenizer.json, or set it to '' to train one."
        )
    if d.path == "embedded":
        return
    root = os.path.expanduser(d.path)
    builders = ("local", "json", "parquet", "text", "csv", "arrow")
    if d.path in builders or os.path.isdir(root):
        if not d.data_files:
            raise ConfigError(
                f"data.path={d.path!r} needs data.data_files (paths or globs). "
                "Fix: e.g. data.data_files='[/data/*.jsonl]'."
            )
        base = root if os.path.isdir(root) else ""
        for pattern in d.data_files:
            full = os.path.join(base, os.path.expanduser(pattern))
            if not glob.glob(full):
                raise ConfigError(
                    f"data.data_files entry {pattern!r} matches no file (looked for {full!r}). "
                    "Fix: correct the path or glob, or the data.path it is relative to."
                )
    elif d.path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", d.path):
        raise ConfigError(
            f"data.path={d.path!r} is neither an existing local directory nor a hub id (owner/name). "
            "Fix: point it at an existing directory, or use a hub id such as allenai/c4."
        )
