"""Checkpoints people can take elsewhere, converted on one process (no process group, no GPU).

    python -m pretrain.convert to-hf outputs/my_run/checkpoint/step-1000 hf/my_run [--dtype bfloat16]
        DCP step folder -> Hugging Face folder (safetensors + index + config.json); loads with
        transformers' LlamaForCausalLM.from_pretrained. The model config comes from the run's config.yaml
        (<run_dir>/config.yaml, two folders above the step; --config to name another).
    python -m pretrain.convert from-hf ~/models/Llama-3.1-8B dcp/llama3_8b --model llama3_8b [model.KEY=VALUE ...]
        Hugging Face folder -> a model-only DCP step folder; start a run from it with
        checkpoint.initial_load_path=dcp/llama3_8b (or copy it to <run_dir>/checkpoint/step-0 as a seed).
        --model names a conf/model option; model.* overrides follow it, as on launch.py's command line.
    python -m pretrain.convert to-torch outputs/my_run/checkpoint/step-1000 my_run.pt
        DCP step folder -> one torch.save file ({"model": {...}, "optimizer": {...}} as saved), with
        torch's own dcp_to_torch_save steps; torch.load(path, weights_only=True) reads it.

Works on every checkpoint of a run, the model-only final one (checkpoint.last_save_model_only) included.
A step's files are checked against the checksums written with it before anything is converted; from-hf writes
them. A bad argument or a damaged step prints one line `error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from pretrain.checkpoint import integrity
from pretrain.config import ModelConfig
from pretrain.errors import ConfigError, exit_code_of

MODEL_PREFIX = "model."  # checkpoint.py saves {"model": ..., "optimizer": ...}; DCP flattens to "model.<name>"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- DCP on one process
def check_dcp_dir(path: str, arg: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{arg} {path!r} is not a directory. "
                          "Fix: give a checkpoint step folder, e.g. outputs/<run>/checkpoint/step-N.")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ConfigError(f"{arg} {path!r} is not a DCP checkpoint (no .metadata). "
                          "Fix: give a step folder, e.g. outputs/<run>/checkpoint/step-N.")
    has_checksums, problems = integrity.verify_folder(path)
    if problems:
        raise ConfigError(f"{arg} {path!r} is damaged: {'; '.join(problems)}. Fix: convert another step, e.g. the "
                          "previous complete one in the same checkpoint folder.")
    if not has_checksums:
        print(f"warning: {path} has no {integrity.MANIFEST} (saved by an older version): converted without being "
              "verified", file=sys.stderr)


def read_dcp_model(step_dir: str) -> dict:
    """The model's full tensors (our names) from a DCP step folder, on this process alone."""
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pretrain.checkpoint.safe_reader import SafeFileSystemReader

    reader = SafeFileSystemReader(step_dir)
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise ConfigError(f"dcp_step_dir {step_dir!r} is unreadable ({type(e).__name__}: {e}). "
                          "Fix: pick a complete step folder.") from None
    model = {
        key[len(MODEL_PREFIX):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not model:
        raise ConfigError(f"dcp_step_dir {step_dir!r} holds no model weights (no '{MODEL_PREFIX}*' entries).")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        dcp.load({"model": model}, storage_reader=reader)
    return model


def run_model_config(step_dir: str, config_path: str | None) -> ModelConfig:
    """The model section of the run's config.yaml (written by the Trainer into the run directory)."""
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    from omegaconf import OmegaConf

    arg = "--config"
    if config_path is None:
        config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), "config.yaml")
        arg = "the run's config.yaml"
    if not os.path.isfile(config_path):
        raise ConfigError(f"{arg} {config_path!r} does not exist. Fix: pass --config <run_dir>/config.yaml.")
    try:
        saved = OmegaConf.load(config_path)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.model))
    except Exception as e:
        raise ConfigError(f"--config {config_path!r} has no valid model section ({type(e).__name__}: {e}).") from None


def composed_model_config(option: str | None, overrides: list[str]) -> ModelConfig:
    """conf/model/<option> plus model.* overrides, composed by Hydra as launch.py would."""
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    from omegaconf import OmegaConf

    from pretrain.config.compose import CONF, compose_config

    bad = [o for o in overrides if not o.startswith(MODEL_PREFIX) or "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not a model.KEY=VALUE override. Fix: e.g. model.dim=64.")
    try:
        cfg = compose_config(([f"model={option}"] if option else []) + overrides)
        return OmegaConf.to_object(cfg.model)
    except Exception as e:
        options = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ConfigError(f"--model {option!r} {' '.join(overrides)}: {e}. Fix: one of {', '.join(options)}, "
                          "then model.KEY=VALUE overrides.") from None


def _check_out_dir(path: str, arg: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConfigError(f"{arg} {path!r} exists and is not an empty directory. Fix: choose a new path, or delete it.")


# ----------------------------------------------------------------------------- commands
def to_hf(args: argparse.Namespace) -> None:
    check_dcp_dir(args.dcp_step_dir, "dcp_step_dir")
    _check_out_dir(args.out_dir, "out_dir")
    model_cfg = run_model_config(args.dcp_step_dir, args.config)
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    from pretrain.checkpoint.hf_io import save_hf
    from pretrain.models import get_model_spec

    spec = get_model_spec(model_cfg.name)
    if spec.hf_adapter is None:
        raise ConfigError(f"model family {spec.name!r} has no Hugging Face adapter, so it cannot be converted.")
    state_dict = read_dcp_model(args.dcp_step_dir)
    save_hf(state_dict, args.out_dir, spec, model_cfg, dtype=args.dtype,
            max_position_embeddings=args.max_position_embeddings)
    print(f"wrote {args.out_dir}: {len(state_dict)} tensors of {model_cfg.name}/{model_cfg.flavor} in {args.dtype}")


def from_hf(args: argparse.Namespace) -> None:
    hf_files = ("model.safetensors", "model.safetensors.index.json")
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")) or not any(
        os.path.isfile(os.path.join(args.hf_dir, name)) for name in hf_files
    ):
        raise ConfigError(f"hf_dir {args.hf_dir!r} is not a Hugging Face model folder (config.json with "
                          f"{' or '.join(hf_files)}). Fix: give such a folder.")
    _check_out_dir(args.out_dcp_dir, "out_dcp_dir")
    model_cfg = composed_model_config(args.model, args.overrides)
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    import torch
    import torch.distributed.checkpoint as dcp

    from pretrain.checkpoint.hf_io import hf_names, read_config, read_hf, weight_map
    from pretrain.checkpoint.provenance import model_record
    from pretrain.checkpoint.state import TRAIN_STATE, TrainState
    from pretrain.distributed.fsdp import DTYPES
    from pretrain.models import get_model_spec

    spec = get_model_spec(model_cfg.name)
    if spec.hf_adapter is None:
        raise ConfigError(f"model family {spec.name!r} has no Hugging Face adapter, so it cannot be converted.")
    problems = spec.hf_adapter.config_mismatches(read_config(args.hf_dir), model_cfg)
    if problems:
        raise ConfigError(f"hf_dir {args.hf_dir!r} does not match --model: {'; '.join(problems)}. "
                          "Fix: pick the model option it was made from, or add model.KEY=VALUE overrides.")
    with torch.device("meta"):
        keys = list(spec.build_model(model_cfg, 1).state_dict())
    needed = spec.hf_adapter.hf_keys_needed(keys, model_cfg)
    files = weight_map(args.hf_dir)
    wanted = {n for src in needed.values() for n in hf_names(src)}
    missing = sorted(n for n in wanted if n not in files)
    if missing:
        raise ConfigError(f"hf_dir {args.hf_dir!r} has no tensor {missing[0]!r} ({len(missing)} missing). "
                          "Fix: check that the folder holds this model's weights.")
    hf_sd = read_hf(args.hf_dir, wanted, files)
    state_dict = {k: v.to(DTYPES[args.dtype]) for k, v in spec.hf_adapter.from_hf(hf_sd, model_cfg, keys=keys).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state_dict}, checkpoint_id=args.out_dcp_dir)
    meta = {"train_state": vars(TrainState()), "model_only": True, "lr_scheduler": None, "dataloader": None,
            "made_from": model_record(model_cfg)}  # no tokenizer or data: only the model is checked on load
    with open(os.path.join(args.out_dcp_dir, TRAIN_STATE), "w") as f:
        json.dump(meta, f)
    names = [n for n in os.listdir(args.out_dcp_dir) if n != integrity.MANIFEST]
    integrity.write_manifest(args.out_dcp_dir, integrity.hash_files(args.out_dcp_dir, names))
    print(f"wrote {args.out_dcp_dir}: {len(state_dict)} tensors in {args.dtype}; start a run from it with "
          f"checkpoint.initial_load_path={args.out_dcp_dir}")


def to_torch(args: argparse.Namespace) -> None:
    check_dcp_dir(args.dcp_step_dir, "dcp_step_dir")
    parent = os.path.dirname(os.path.abspath(args.file))
    if not os.path.isdir(parent):
        raise ConfigError(f"file {args.file!r}: the folder {parent!r} does not exist. Fix: create it first.")
    # lazy: `--help` and argument errors answer before torch, hydra or a model loads
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from pretrain import torch_compat
    from pretrain.checkpoint.safe_reader import SafeFileSystemReader

    # what torch's format_utils.dcp_to_torch_save does, with the metadata read without unpickling code
    reader = SafeFileSystemReader(args.dcp_step_dir)
    try:
        reader.read_metadata()  # first, alone: a crafted or torn .metadata is refused with a short message
    except Exception as e:
        raise ConfigError(f"dcp_step_dir {args.dcp_step_dir!r} is unreadable ({type(e).__name__}: {e}). "
                          "Fix: pick a complete step folder.") from None
    state_dict: dict = {}
    try:
        torch_compat.load_dcp_into_empty(state_dict, reader)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        raise ConfigError(f"dcp_step_dir {args.dcp_step_dir!r} is unreadable ({type(e).__name__}: {e}). "
                          "Fix: pick a complete step folder.") from None
    torch.save(state_dict, args.file)
    print(f"wrote {args.file}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="DCP step folder -> Hugging Face safetensors folder")
    p.add_argument("dcp_step_dir", help="a checkpoint step folder: <run_dir>/checkpoint/step-N")
    p.add_argument("out_dir", help="the HF folder to write (new or empty)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="dtype of the written tensors")
    p.add_argument("--config", help="the run's config.yaml (default: <run_dir>/config.yaml)")
    p.add_argument("--max-position-embeddings", type=int, help="config.json's max_position_embeddings "
                   "(default: rope_original_max_seq_len x rope_scaling_factor)")
    p.set_defaults(func=to_hf)
    p = sub.add_parser("from-hf", help="Hugging Face folder -> model-only DCP step folder")
    p.add_argument("hf_dir", help="an HF model folder (config.json + safetensors)")
    p.add_argument("out_dcp_dir", help="the DCP folder to write (new or empty)")
    p.add_argument("--model", help="a conf/model option, e.g. llama3_8b (default: the config's default)")
    p.epilog = ("model.KEY=VALUE overrides may follow, as on launch.py's command line: "
                "--model llama3_8b model.n_layers=2")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype stored in the DCP checkpoint")
    p.set_defaults(func=from_hf)
    p = sub.add_parser("to-torch", help="DCP step folder -> one torch.save file")
    p.add_argument("dcp_step_dir", help="a checkpoint step folder: <run_dir>/checkpoint/step-N")
    p.add_argument("file", help="the .pt file to write")
    p.set_defaults(func=to_torch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # from-hf: the model.* overrides, wherever they stand
    if extra and args.command != "from-hf":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return exit_code_of(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
