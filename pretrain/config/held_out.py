"""The validation section: where the held-out documents come from (`held_out_data`) and the rules it must meet
before launch (`check_validation`). The validator itself runs in the trainer (pretrain/validation.py)."""

from __future__ import annotations

from dataclasses import replace

from pretrain.config.degrees import Degrees
from pretrain.config.schema import FILE_BUILDERS, DataConfig, JobConfig
from pretrain.errors import ConfigError, check_choice, check_positive


def held_out_data(job: JobConfig) -> DataConfig:
    """The data options of the held-out documents: the run's data options with validation's source and split.
    The tokenizer and the text rules (BOS/EOS, text_field) stay the run's; the order is never shuffled."""
    v, d = job.validation, job.data
    same_source = not v.path
    return replace(
        d,
        name=f"{d.name}-{v.split}",
        path=v.path or d.path,
        config_name=d.config_name if same_source else "",
        data_files=list(v.data_files) or (list(d.data_files) if same_source else []),
        split=v.split,
        format=v.format or d.format,
        shuffle=False,
    )


def validation_shape(job: JobConfig) -> tuple[int, int]:
    """(local batch size, sequence length) of a validation batch."""
    v, t = job.validation, job.training
    return v.local_batch_size or t.local_batch_size, v.seq_len or t.seq_len


def check_validation(job: JobConfig, dims: Degrees) -> None:
    """The validation section's values and its held-out source, before launch. Raises ConfigError."""
    v, d, t = job.validation, job.data, job.training
    if not v.enable:
        return
    check_positive("validation.freq", v.freq)
    check_positive("validation.local_batch_size", v.local_batch_size, allow_zero=True)
    check_positive("validation.seq_len", v.seq_len, allow_zero=True)
    if v.steps != -1:
        check_positive("validation.steps", v.steps)
    if v.format:
        check_choice("validation.format", v.format, ("text", "tokenized"))
    if not v.split:
        raise ConfigError("validation.split='' names no split. Fix: e.g. validation.split=validation.")
    batch, seq_len = validation_shape(job)
    if seq_len > t.seq_len:
        raise ConfigError(
            f"validation.seq_len={seq_len} is longer than training.seq_len={t.seq_len}, the longest sequence the model "
            f"is built for (its RoPE table). Fix: validation.seq_len={t.seq_len} or less (0 = training.seq_len)."
        )
    seq_factor = 2 * dims.cp * dims.tp if dims.cp_enabled else dims.tp
    if seq_len % seq_factor:
        raise ConfigError(
            f"validation.seq_len={seq_len} is not divisible by {seq_factor}, which the layout splits every sequence "
            f"into (cp={dims.cp}, tp={dims.tp}). Fix: use a multiple of {seq_factor}, or 0 for training.seq_len."
        )
    if dims.pp_enabled and (batch, seq_len) != (t.local_batch_size, t.seq_len):
        raise ConfigError(
            f"validation batches of {batch} x {seq_len} under pipeline parallelism: the pipeline's stages and "
            f"schedule are built for training's {t.local_batch_size} x {t.seq_len}. Fix: validation.local_batch_size=0 "
            "and validation.seq_len=0 (training's shape)."
        )
    if v.path:
        return
    fmt = v.format or d.format
    if fmt == "tokenized" and d.format != "tokenized":
        raise ConfigError(
            f"validation.format=tokenized reads a token store, and validation.path is '' (data.path={d.path!r} is "
            "text). Fix: set validation.path to a store prepared from the held-out documents, or validation.format="
            "'' to read them as data.format does."
        )
    if d.format == "tokenized" and fmt == "tokenized":
        raise ConfigError(
            f"validation.enable=true reads held-out documents from the token store data.path={d.path!r}, but a "
            "store holds one split, the training one. Fix: prepare the held-out split with the training store's "
            "tokenizer into a store of its own, `python -m pretrain.data.prepare <data options> data.split=validation "
            f"data.tokenizer_path={d.path}/tokenizer --out DIR`, and set validation.path=DIR; or "
            "validation.enable=false."
        )
    if d.path in FILE_BUILDERS and not v.data_files:
        raise ConfigError(
            f"validation.enable=true: data.path={d.path} reads the files of data.data_files, which hold no held-out "
            f"split {v.split!r}. Fix: list the held-out files, e.g. validation.data_files='[/data/valid-*.jsonl]', or "
            "set validation.enable=false."
        )
