"""Rules that span fields, checked before any process starts: the sections' values, the cluster request
and the data paths here; the model section in model.py, the parallel layout in layout.py, the throughput
features in features.py. Every failure is a ConfigError naming the key, the value and a fix."""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
from dataclasses import fields, is_dataclass
from typing import Any

from pretrain.config.degrees import Degrees
from pretrain.config.features import check_features
from pretrain.config.flavors import check_flavor
from pretrain.config.held_out import check_validation, held_out_data
from pretrain.config.layout import check_layout
from pretrain.config.model import family_spec, validate_model
from pretrain.config.schema import EMBEDDED_SPLITS, FILE_BUILDERS, ClusterConfig, DataConfig, JobConfig, MetricsConfig
from pretrain.errors import ConfigError, check_choice, check_positive


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
    _unknown_keys(job)
    m, t, o, s, c = job.model, job.training, job.optimizer, job.lr_scheduler, job.checkpoint
    family_spec(m.name)  # an unknown family is named before anything else of the model section
    validate_model(m)
    check_flavor(m)  # a label naming a published flavor over another flavor's dims
    if m.hf_assets_path and not job.dry_run and not os.path.isdir(os.path.expanduser(m.hf_assets_path)):
        raise ConfigError(
            f"model.hf_assets_path={m.hf_assets_path!r} is not a directory. "
            "Fix: point it at a directory holding tokenizer.json, or set it to ''."
        )

    validate_cluster(job.cluster, dry_run=job.dry_run)
    dims = Degrees.from_config(job.parallelism, job.world_size)  # raises ConfigError on a bad layout
    check_layout(job, dims)
    check_choice(
        "parallelism.fsdp_reshard_after_forward",
        job.parallelism.fsdp_reshard_after_forward,
        ("default", "always", "never"),
    )
    check_features(job, dims)

    for key in ("local_batch_size", "seq_len", "steps"):
        check_positive(f"training.{key}", getattr(t, key))
    check_positive("training.gc_freq", t.gc_freq, allow_zero=True)
    if math.isnan(t.max_norm):
        raise ConfigError("training.max_norm=nan is not a number. Fix: e.g. training.max_norm=1.0 (<= 0 disables "
                          "clipping).")
    per_step = t.local_batch_size * dims.dp
    if t.global_batch_size == -1:
        t.global_batch_size = per_step
    if t.global_batch_size <= 0 or t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not a positive multiple of "
            f"training.local_batch_size={t.local_batch_size} x data-parallel degree {dims.dp} = {per_step}. "
            f"Fix: set training.global_batch_size to a multiple of {per_step} (e.g. {per_step * 2}) or to -1."
        )
    check_choice("training.mixed_precision_param", t.mixed_precision_param, ("auto", "bfloat16", "float32"))
    check_choice("training.dtype", t.dtype, ("float32", "bfloat16"))
    if t.dtype == "bfloat16" and t.mixed_precision_param == "float32":
        raise ConfigError(
            "training.dtype=bfloat16 stores the parameters in bf16, but training.mixed_precision_param=float32 "
            "would compute in fp32 copies of them. Fix: training.mixed_precision_param=auto (or bfloat16)."
        )
    check_choice("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    check_choice("training.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    for key in ("init_timeout_seconds", "train_timeout_seconds"):
        check_positive(f"comm.{key}", getattr(job.comm, key))

    check_choice("optimizer.name", o.name, ("AdamW", "Adam"))
    check_choice("optimizer.implementation", o.implementation, ("foreach", "fused", "for-loop"))
    check_positive("optimizer.lr", o.lr, allow_zero=True)
    check_positive("optimizer.eps", o.eps)
    check_positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be in [0, 1). Fix: e.g. 0.9 or 0.95.")
    check_positive("lr_scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    check_choice("lr_scheduler.decay_type", s.decay_type, ("linear", "sqrt", "cosine"))
    if s.decay_ratio is not None and not 0.0 <= s.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio={s.decay_ratio} must be in [0, 1] or null. Fix: e.g. 0.2.")
    if not 0.0 <= s.min_lr_factor <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_factor={s.min_lr_factor} must be in [0, 1]. Fix: e.g. 0.1.")

    check_positive("checkpoint.interval", c.interval)
    check_positive("checkpoint.keep_latest_k", c.keep_latest_k, allow_zero=True)
    if c.load_step < -1:
        raise ConfigError(f"checkpoint.load_step={c.load_step} must be -1 (latest) or a step. Fix: use -1.")
    for item in c.exclude_from_loading:
        check_choice(
            "checkpoint.exclude_from_loading", item, ("optimizer", "lr_scheduler", "dataloader", "train_state")
        )
    check_choice("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16", "float16"))
    check_choice("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    check_choice("checkpoint.on_save_error", c.on_save_error, ("stop", "continue"))
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
    check_metrics(job.metrics)
    if "/" in job.job.name or job.job.name in ("", ".", ".."):
        raise ConfigError(
            f"job.name={job.job.name!r} must be a non-empty name without '/' (and not . or ..). Fix: "
            "e.g. job.name=my_run."
        )
    if not job.job.dump_folder:
        raise ConfigError(
            "job.dump_folder='' is empty. Fix: e.g. job.dump_folder=outputs (the root of all run directories)."
        )
    check_data_options(job.data)
    check_validation(job, dims)
    if not job.dry_run:  # a dry run reads no data
        validate_data(job.data)
        if job.validation.enable:
            try:
                check_source(held_out_data(job), key="validation")
            except ConfigError as e:
                raise ConfigError(f"{e} Or train without a held-out loss: validation.enable=false.") from None


def check_metrics(m: MetricsConfig) -> None:
    """The metrics section; an optional tracker's package must be installed before anything starts."""
    check_positive("metrics.log_freq", m.log_freq)
    if m.wandb_mode:
        check_choice("metrics.wandb_mode", m.wandb_mode, ("online", "offline"))
    if m.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            'metrics.enable_wandb=true needs the wandb package, which is not installed. Fix: pip install -e ".[wandb]" '
            "(or pip install wandb), or set metrics.enable_wandb=false."
        )


# sbatch options that cluster.* keys set; extra_sbatch must not set them a second time
_SBATCH_OPTIONS_OF_KEYS = {
    "nodes": "nodes",
    "ntasks-per-node": "nproc_per_node",
    "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem_gb",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "time": "timeout_min",
    "signal": "signal_delay_s",
}


def validate_cluster(c: ClusterConfig, dry_run: bool = False) -> None:
    """Where the ranks run. On SLURM the request is also tried against the cluster itself at
    submission (`sbatch --test-only`), before anything is queued."""
    check_choice("cluster.name", c.name, ("local", "slurm"))
    check_choice("cluster.device", c.device, ("auto", "cpu", "cuda"))
    check_positive("cluster.nproc_per_node", c.nproc_per_node)
    check_positive("cluster.nodes", c.nodes)
    if c.name == "local":
        if c.nodes != 1 and not dry_run:  # a dry run only simulates the nodes
            raise ConfigError(
                f"cluster.nodes={c.nodes}: cluster=local runs on this machine only. "
                "Fix: cluster=slurm for several nodes, or cluster.nodes=1."
            )
        return
    check_positive("cluster.gpus_per_node", c.gpus_per_node, allow_zero=True)
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
    check_positive("cluster.cpus_per_task", c.cpus_per_task)
    check_positive("cluster.timeout_min", c.timeout_min)
    for key in ("mem_gb", "max_num_timeout", "signal_delay_s"):
        check_positive(f"cluster.{key}", getattr(c, key), allow_zero=True)
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


def check_data_options(d: DataConfig) -> None:
    """The data options that need no file (dry runs check them too)."""
    check_choice("data.format", d.format, ("text", "tokenized"))
    check_positive("data.prefetch_steps", d.prefetch_steps, allow_zero=True)
    if d.shuffle and d.format != "tokenized":
        raise ConfigError(
            "data.shuffle=true needs a token store: a text stream is read in order. Fix: prepare one with "
            "`python -m pretrain.data.prepare <data options> --out DIR` and run with data=tokenized data.path=DIR, "
            "or set data.shuffle=false."
        )


def validate_data(d: DataConfig) -> None:
    """The data section's files, before launch (see check_source)."""
    check_data_options(d)
    if d.tokenizer_path and not os.path.exists(os.path.expanduser(d.tokenizer_path)):
        raise ConfigError(
            f"data.tokenizer_path={d.tokenizer_path!r} does not exist. "
            "Fix: point it at a sentencepiece .model or a tokenizer.json, or set it to '' to train one."
        )
    check_source(d)


def check_source(d: DataConfig, key: str = "data") -> None:
    """Local data must exist before launch; hub ids are checked when they are opened. A token store must have its
    manifest (written last by prepare); the rest of it is checked when it is opened (pretrain/data/token_store.py).
    key: the section that set d.path and d.data_files, named in the messages."""
    if d.format == "tokenized":
        store = os.path.expanduser(d.path)
        if not d.path:
            raise ConfigError(
                f"{key}.format=tokenized needs {key}.path, the directory of a token store. Fix: make one with "
                "`python -m pretrain.data.prepare <data and model options> --out DIR` and add "
                f"{key}.path=DIR (see docs/data.md)."
            )
        if not os.path.isfile(os.path.join(store, "manifest.json")):
            what = "is not a directory" if not os.path.isdir(store) else "has no manifest.json (an unfinished prepare?)"
            raise ConfigError(
                f"{key}.path={d.path!r} {what}, so not a complete token store ({key}.format=tokenized). Fix: make "
                f"it with `python -m pretrain.data.prepare <data and model options> --out {d.path}` (see docs/data.md)."
            )
        return
    if d.path == "embedded":
        if d.split not in EMBEDDED_SPLITS:
            raise ConfigError(
                f"{key}.split={d.split!r}: the embedded corpus has the splits {', '.join(EMBEDDED_SPLITS)} (train: the "
                "documents trained on; validation: 1 in 100, held out). Fix: one of them."
            )
        return
    root = os.path.expanduser(d.path)
    if d.path in FILE_BUILDERS or os.path.isdir(root):
        if not d.data_files:
            raise ConfigError(
                f"{key}.path={d.path!r} needs {key}.data_files (paths or globs). "
                f"Fix: e.g. {key}.data_files='[/data/*.jsonl]'."
            )
        base = root if os.path.isdir(root) else ""
        for pattern in d.data_files:
            full = os.path.join(base, os.path.expanduser(pattern))
            if not glob.glob(full):
                raise ConfigError(
                    f"{key}.data_files entry {pattern!r} matches no file (looked for {full!r}). "
                    f"Fix: correct the path or glob, or the {key}.path it is relative to."
                )
    elif d.path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", d.path):
        raise ConfigError(
            f"{key}.path={d.path!r} is neither an existing local directory nor a hub id (owner/name). "
            "Fix: point it at an existing directory, or use a hub id such as allenai/c4."
        )
