"""Starting a fresh run from other weights: `checkpoint.initial_load_path`, a DCP step folder (its model
weights, or everything in it as a resume would) or, with `checkpoint.initial_load_in_hf`, a Hugging Face
model folder. A run that has checkpoints of its own resumes from them instead."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

from pretrain.checkpoint import hf_io
from pretrain.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.checkpoint.state import TRAIN_STATE, LiveState, TrainState, complete_steps, read_train_state
from pretrain.config import CheckpointConfig
from pretrain.errors import ConfigError
from pretrain.log import logger
from pretrain.models import get_model_spec

# check(path, key, train_state or None): the step folder's checksums and, when more than its weights is taken, what
# it was made from (the manager's checks); raises ConfigError
Check = Callable[[str, str, Optional[dict]], None]


def initial_load(cfg: CheckpointConfig, live: LiveState, check: Optional[Check] = None) -> TrainState:
    """A fresh start from checkpoint.initial_load_path: an HF folder (initial_load_in_hf), or a DCP step
    folder: its model weights (initial_load_model_only), or everything in it, as a resume would."""
    path = os.path.expanduser(cfg.initial_load_path)
    if not path:
        return TrainState()
    key = f"checkpoint.initial_load_path={cfg.initial_load_path!r}"
    if not os.path.isdir(path):
        raise ConfigError(
            f"{key} is not a directory. Fix: point it at a checkpoint step folder (<run_dir>/checkpoint/step-N) "
            "or, with checkpoint.initial_load_in_hf=true, at a Hugging Face model folder; or set it to ''."
        )
    is_dcp = os.path.isfile(os.path.join(path, ".metadata"))
    if cfg.initial_load_in_hf:
        if not hf_io.is_hf_dir(path):
            hint = " It is a DCP checkpoint: set checkpoint.initial_load_in_hf=false." if is_dcp else ""
            raise ConfigError(
                f"{key} with checkpoint.initial_load_in_hf=true holds no config.json with "
                f"{hf_io.INDEX} or {hf_io.SINGLE_FILE}.{hint} Fix: point it at a Hugging Face model folder."
            )
        _load_hf(live, path, key)
        return TrainState()
    if not is_dcp:
        hint = ""
        if hf_io.is_hf_dir(path):
            hint = " It is a Hugging Face folder: add checkpoint.initial_load_in_hf=true."
        elif complete_steps(os.path.join(path, "checkpoint")):
            latest = complete_steps(os.path.join(path, "checkpoint"))[-1]
            hint = f" It looks like a run directory: use {os.path.join(path, 'checkpoint', f'step-{latest}')}."
        raise ConfigError(f"{key} is not a DCP checkpoint (no .metadata).{hint} Fix: point it at a step folder.")
    try:
        SafeFileSystemReader(path).read_metadata()
    except Exception as e:
        raise ConfigError(
            f"{key} is unreadable ({type(e).__name__}: {e}). Fix: point it at a complete step folder."
        ) from None
    fix = (f"Fix: use the model config it was saved with (its run's config.yaml), or another {key.split('=')[0]}.")
    if cfg.initial_load_model_only:
        if check is not None:
            check(path, key, None)  # a deliberate change of model or data is what a model-only start is for
        live.load_model(path, key, fix)
        logger.info(f"checkpoint: initial model weights from {path}")
        return TrainState()
    meta_path = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(meta_path):
        raise ConfigError(
            f"{key} has no {TRAIN_STATE}, so only its weights can be taken. "
            "Fix: checkpoint.initial_load_model_only=true."
        )
    try:
        meta = read_train_state(path)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}. Fix: point it at another complete step folder.") from None
    if check is not None:
        check(path, key, meta)
    if meta["model_only"]:
        raise ConfigError(
            f"{key} holds model weights only, but checkpoint.initial_load_model_only=false asks for the optimizer "
            "and training state too. Fix: checkpoint.initial_load_model_only=true."
        )
    return live.restore(path, meta, set(cfg.exclude_from_loading), key, fix)

def _load_hf(live: LiveState, path: str, key: str) -> None:
    model_cfg = live.parts[0].cfg  # the model's own config (every family's model keeps it)
    spec = get_model_spec(model_cfg.name)
    if spec.hf_adapter is None:
        raise ConfigError(f"{key}: model family {spec.name!r} has no Hugging Face adapter. Fix: convert it to DCP.")
    problems = spec.hf_adapter.config_mismatches(hf_io.read_config(path), model_cfg)
    if problems:
        raise ConfigError(
            f"{key} holds another model than this run's: {'; '.join(problems)}. Fix: set the model.* keys to "
            "match its config.json (or pick the model option it was made from)."
        )
    try:
        hf_io.load_hf_into(list(live.parts), path, spec, model_cfg)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{key}: {e}. Fix: check that the folder holds this model's weights.") from None
    logger.info(f"checkpoint: initial model weights from the Hugging Face folder {path}")


