"""A trained model from its run directory: the run's saved config (`<run dir>/config.yaml`, written by the
Trainer), the newest complete checkpoint step (or the step folder given), checked as a resume checks it
(files present, checksums, readable metadata), loaded with the checkpoint code's own DCP reading, and the run's
tokenizer, checked against the one the step records. Every failure is a ConfigError naming the path and a fix.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain.checkpoint.provenance import TOKENIZER, tokenizer_identity
from pretrain.checkpoint.resume import StepChecks
from pretrain.checkpoint.state import STEP_DIR, LiveState, complete_steps, incomplete_steps
from pretrain.config import JobConfig
from pretrain.data.tokenizer import Tokenizer, build_tokenizer
from pretrain.distributed.fsdp import cast_parameters
from pretrain.errors import ConfigError
from pretrain.models import get_model_spec

CONFIG_FILE = "config.yaml"  # the resolved config the Trainer saves in the run directory
WHERE = "a run directory (outputs/<job.name>) or one of its step folders (outputs/<job.name>/checkpoint/step-N)"


@dataclass
class Run:
    job: JobConfig  # the run's saved config
    step_dir: str  # the checked step folder to load
    tokenizer: Tokenizer


def run_config(run_dir: str, config_path: str | None = None) -> JobConfig:
    """The JobConfig a run saved (keys added to the schema since then take their defaults)."""
    path = config_path or os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist, so the run's model is unknown. Fix: give {WHERE} (the Trainer "
                          "writes config.yaml there), or name the run's config with --config.")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(path)))
    except Exception as e:
        raise ConfigError(f"{path} is not a config this version reads ({type(e).__name__}: {e}). "
                          "Fix: name another run's config.yaml with --config.") from None


def locate(path: str, config_path: str | None = None) -> tuple[JobConfig, str]:
    """(the run's config, the step folder to load) for a run directory (its newest complete step) or a step folder."""
    given = os.path.expanduser(path)
    if not os.path.isdir(given):
        what = "does not exist" if not os.path.exists(given) else "is not a directory"
        raise ConfigError(f"{path} {what}. Fix: give {WHERE}.")
    if os.path.isfile(os.path.join(given, ".metadata")) or STEP_DIR.match(os.path.basename(os.path.normpath(given))):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(given)))
        return run_config(run_dir, config_path), given
    job = run_config(given, config_path)
    folder = os.path.join(given, job.checkpoint.folder)
    steps = complete_steps(folder)
    if not steps:
        broken = incomplete_steps(folder)
        found = f" (not complete: {', '.join(f'step-{s}: {why}' for s, why in broken.items())})" if broken else ""
        raise ConfigError(f"{path} has no complete checkpoint in {folder}{found}. Fix: train it until it saves one "
                          f"(checkpoint.interval, and always at the last step), or give another run's directory.")
    return job, os.path.join(folder, f"step-{steps[-1]}")


def check_step(job: JobConfig, step_dir: str) -> dict:
    """The step folder's train_state.json, after the checks a resume makes (files present, checksums, metadata)."""
    checks = StepChecks(job.checkpoint, os.path.dirname(step_dir), lambda value: [value], 0, 1, True)
    problem, meta, _ = checks.check(step_dir)
    if problem is not None:
        earlier = [s for s in complete_steps(os.path.dirname(step_dir))
                   if f"step-{s}" != os.path.basename(os.path.normpath(step_dir))]
        fix = (f"give an earlier step folder, e.g. {os.path.join(os.path.dirname(step_dir), f'step-{earlier[-1]}')}"
               if earlier else "train the run again (it resumes from its last intact step) to write a new one")
        raise ConfigError(f"checkpoint {step_dir} is broken: {problem}. Fix: {fix}.")
    return meta


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device. Fix: --device cpu (or auto).")
    return torch.device(name)


def build_model(job: JobConfig, max_seq_len: int, device: torch.device) -> nn.Module:
    """The run's model on `device` with position buffers for max_seq_len positions; weights still to be loaded."""
    spec = get_model_spec(job.model.name)
    with torch.device("meta"):
        model = spec.build_model(job.model, max_seq_len)
    model.to_empty(device=device)
    if job.model.tie_word_embeddings and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # to_empty gives each its own tensor
    model.init_weights(buffer_device=device)  # the position buffers; the weights are overwritten next
    return model


def open_run(path: str, config_path: str | None = None) -> Run:
    """The run's config, the checked step folder and the run's tokenizer (the one the step was trained with)."""
    job, step_dir = locate(path, config_path)
    meta = check_step(job, step_dir)
    tokenizer = build_tokenizer(job.data, job.model)
    saved = (meta.get("made_from") or {}).get(TOKENIZER, {}).get("sha256")
    now = tokenizer_identity(job)
    if saved and now["sha256"] and saved != now["sha256"]:
        raise ConfigError(f"the tokenizer {now['source']} is not the one checkpoint {step_dir} was trained with "
                          f"(sha256 {now['sha256'][:12]}, saved {saved[:12]}). Fix: put the run's tokenizer back where "
                          "its config.yaml names it (model.hf_assets_path, data.tokenizer_path or data.cache_dir).")
    return Run(job, step_dir, tokenizer)


def load_model(run: Run, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The step's weights in the run's model, in eval mode, with position buffers for max_seq_len positions."""
    model = build_model(run.job, max_seq_len, device)
    fix = "Fix: give the step folder of a run whose config.yaml describes this model (--config to name it)."
    with warnings.catch_warnings():  # DCP on one process without a process group: intended
        warnings.simplefilter("ignore")
        LiveState([model], None, None, None).load_model(run.step_dir, f"checkpoint {run.step_dir}", fix)
    if dtype != torch.float32:
        cast_parameters(model, dtype)  # parameters only: RoPE's complex table keeps its dtype
    return model.eval()
