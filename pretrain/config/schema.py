"""JobConfig: the one typed config a run carries from `launch.py` down to every rank.

Hydra composes `conf/config.yaml` plus one option per group; the dataclasses below are the schema
(registered in Hydra's ConfigStore), so an unknown key or a wrong type fails at compose time.
`resolve()` turns the composed DictConfig into plain dataclasses and `validate()` checks the rules
that span fields, before any process starts. Nothing below `launch.py` sees a DictConfig.

This module imports neither torch nor the model code, so a bad command line fails in a blink.
The `model` section lives in model.py; resolve.py and validate.py hold the rest of the way to a JobConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from pretrain.config.model import ModelConfig


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
    # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble
    pipeline_parallel_schedule: str = "1F1B"
    # sequences per pipeline micro-batch; local_batch_size must be a multiple
    pipeline_parallel_microbatch_size: int = 1
    # layers per stage (virtual stages follow); null = one stage per rank (two for looped/V schedules)
    pipeline_parallel_layers_per_stage: Optional[int] = None
    pipeline_parallel_first_stage_less_layers: int = 1  # the first stage holds this many fewer layers (it also embeds)
    # the last stage holds this many fewer layers (it also computes the output)
    pipeline_parallel_last_stage_less_layers: int = 1
    # explicit module names per stage, e.g. [[tok_embeddings, layers.0], [layers.1, norm, output]]
    module_fqns_per_model_part: Optional[list[list[str]]] = None
    context_parallel_method: str = "allgather"  # allgather | ring: how attention sees the whole sequence under CP


@dataclass
class Float8Config:
    # convert linear layers to torchao float8 training (conf/float8: off, tensorwise, rowwise, ...)
    enable: bool = False
    recipe_name: str = "tensorwise"  # torchao recipe: tensorwise | rowwise | rowwise_with_gw_hp
    # tensorwise + FSDP: all-gather weights in float8 (half the bytes of bf16)
    enable_fsdp_float8_all_gather: bool = False
    # with float8 all-gather: one fused amax for all weights after each optimizer step
    precompute_float8_dynamic_scale_for_fsdp: bool = False
    # linear layers whose name contains one of these stay in high precision; "auto_filter_small_kn" also skips layers
    # too small to gain
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    emulate: bool = False  # float8 math emulated in high precision (for testing); CPU always emulates


@dataclass
class CompileConfig:
    enable: bool = False  # torch.compile the components below (inductor; needs a C++ compiler on CPU)
    # of: model (each transformer block, fullgraph), loss
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    backend: str = "inductor"  # torch.compile backend: inductor | aot_eager | eager (the last two for debugging)


@dataclass
class ActivationCheckpointConfig:
    mode: str = "none"  # none | full | selective | memory_budget (memory_budget needs compile)
    # selective mode: "op" (per-op save list) or N as a string/int (checkpoint every N-th block)
    selective_ac_option: str = "op"
    # memory_budget mode: fraction of activation memory the compiler may keep (0 = recompute all, 1 = keep all)
    memory_budget: float = 0.5
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


FILE_BUILDERS = ("local", "json", "parquet", "text", "csv", "arrow")  # data.path values that name a file format
EMBEDDED_SPLITS = ("train", "validation")  # the splits of data.path=embedded (pretrain/data/embedded.py)


@dataclass
class DataConfig:
    name: str = "embedded"  # preset name (informational)
    # embedded | an HF hub id | a local directory laid out like one | local (builder from file extension) | json |
    # parquet | text
    path: str = "embedded"
    config_name: str = ""  # HF dataset config (subset), e.g. "en"; "" = none
    data_files: list[str] = field(default_factory=list)  # paths or globs, relative to `path` when it is a directory
    split: str = "train"  # HF split to read
    text_field: str = "text"  # column that holds the document text
    streaming: bool = True  # stream (no full download); hub datasets should stay streaming
    tokenizer_path: str = ""  # a sentencepiece .model or an HF tokenizer.json / its directory; "" = see README
    cache_dir: str = "~/.cache/pretrain"  # where trained tokenizers and the measured CPU peak are cached
    bos: bool = True  # prepend BOS to every document
    eos: bool = True  # append EOS to every document
    # text: documents tokenized while training | tokenized: data.path is a token store made once by
    # `python -m pretrain.data.prepare` (docs/data.md)
    format: str = "text"
    shuffle: bool = False  # a new order of windows each epoch, the same on every rank and layout (token stores only)
    seed: int = 0  # seed of the window order (data.shuffle)
    prefetch_steps: int = 2  # steps of batches a background thread prepares ahead; 0 = on the training thread


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
    # requeues allowed after a time limit (and counted preemptions); each resumes from the latest checkpoint
    max_num_timeout: int = 3
    # SIGUSR2 comes this many seconds before the time limit: finish the step, checkpoint, requeue
    signal_delay_s: int = 120
    # shell lines run before the tasks start, e.g. "module load cuda/12.4"
    setup: list[str] = field(default_factory=list)
    # more sbatch options, e.g. {mail-type: END}, true = bare flag; CLI: +cluster.extra_sbatch.mail-type=END
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    # wait for the jobs and report how they ended; false = print job ids and log paths, then return
    blocking: bool = True


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
    # float32 | bfloat16: dtype the parameters and optimizer state are stored in; bfloat16 = full-bf16 training (no fp32
    # master weights)
    dtype: str = "float32"
    # auto | bfloat16 | float32: compute dtype of params (auto: bf16 on CUDA, fp32 on CPU)
    mixed_precision_param: str = "auto"
    mixed_precision_reduce: str = "float32"  # float32 | bfloat16: gradient reduce dtype
    # a NaN/Inf loss or gradient norm: stop (exit 3, nothing saved of that step) | skip (drop that step's update)
    on_nonfinite: str = "stop"


@dataclass
class CheckpointConfig:
    enable: bool = True  # save DCP checkpoints and resume from the latest one
    folder: str = "checkpoint"  # inside the run directory
    interval: int = 500  # save every this many steps (and at the last step)
    keep_latest_k: int = 10  # keep this many newest checkpoints; 0 = keep all
    # disabled | async (written by a background thread while training goes on) | async_with_pinned_mem (CUDA: staged
    # through pinned memory)
    async_mode: str = "disabled"
    # a save that fails (disk full, permissions): stop (exit 3) | continue (keep training, retry at the next interval)
    on_save_error: str = "stop"
    load_step: int = -1  # resume from this step; -1 = the latest complete checkpoint
    # the latest step-N folder is incomplete or fails its checksums: false = stop (exit 2) naming it and the previous
    # step | true = warn and resume from the newest intact step (the broken one is kept)
    fall_back_on_broken_step: bool = False
    # of: optimizer, lr_scheduler, dataloader, train_state
    exclude_from_loading: list[str] = field(default_factory=list)
    last_save_model_only: bool = False  # the final checkpoint holds model weights only (for inference/export)
    # write step-0 (initial weights) and exit; run with all degrees 1 on one process
    create_seed_checkpoint: bool = False
    export_dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of a model-only final checkpoint
    # a fresh run (no checkpoint of its own yet) starts from this checkpoint: a DCP step directory, or an HF model
    # directory with initial_load_in_hf
    initial_load_path: str = ""
    # from initial_load_path take the model weights only (not optimizer, schedule, data position)
    initial_load_model_only: bool = True
    initial_load_in_hf: bool = False  # initial_load_path is an HF model directory (safetensors + config.json)


@dataclass
class CommConfig:
    # collectives' timeout until the first step is done (set-up, checkpoint load, compile)
    init_timeout_seconds: int = 300
    train_timeout_seconds: int = 100  # collectives' timeout from then on: a dead or hung rank ends the run this fast


@dataclass
class ValidationConfig:
    enable: bool = False  # held-out loss and perplexity every `freq` steps and at the last step
    freq: int = 500  # steps between validations
    steps: int = -1  # batches per validation; -1 = every full batch of the held-out set
    local_batch_size: int = 0  # sequences per data-parallel rank per batch; 0 = training.local_batch_size
    seq_len: int = 0  # tokens per sequence; 0 = training.seq_len
    # The held-out documents: `split` of data's source (the embedded corpus holds 1 document in 100 out of training
    # as its validation split), or of `path` when set. Read with the run's tokenizer and data options.
    path: str = ""  # "" = data.path; else another source as data.path takes them (a token store with format=tokenized)
    data_files: list[str] = field(default_factory=list)  # its files, as data.data_files; [] = data.data_files
    split: str = "validation"  # the held-out split (local files: the name given to data_files)
    format: str = ""  # text | tokenized, as data.format; "" = data.format


@dataclass
class MetricsConfig:
    log_freq: int = 10  # log every this many steps (and the first and last step)
    enable_aim: bool = True  # track the run in Aim (rank 0)
    aim_repo: str = ""  # Aim repository directory; "" = job.dump_folder
    enable_tensorboard: bool = False  # also write TensorBoard events into <run_dir>/tb
    # also track the run in Weights & Biases (rank 0; pip install -e ".[wandb]"); one W&B run per run directory,
    # resumed with it; W&B's files go to <run_dir>/wandb
    enable_wandb: bool = False
    wandb_project: str = ""  # W&B project; "" = $WANDB_PROJECT, else "pretrain"
    wandb_entity: str = ""  # W&B team or user; "" = $WANDB_ENTITY, else your default entity
    wandb_run_name: str = ""  # the run's display name; "" = job.name
    # online | offline (written under <run_dir>/wandb, uploaded later with `wandb sync`); "" = $WANDB_MODE, else online
    wandb_mode: str = ""


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
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    # build everything on a fake process group at the full world size, print per-rank memory, exit
    dry_run: bool = False

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.nproc_per_node


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults list."""
    ConfigStore.instance().store(name="job_config", node=JobConfig)
