"""Hugging Face checkpoint folders: write a full state dict as safetensors shards + index + config.json,
and read back only the tensors a rank needs, into whatever layout the rank holds (FSDP, TP, PP stages).

A folder written here loads with `transformers.AutoModelForCausalLM.from_pretrained(folder)`:
    model-00001-of-0000N.safetensors ...    tensors under HF names, in the chosen dtype
    model.safetensors.index.json            {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    config.json                             from the family's adapter (ModelSpec.hf_adapter)
    tokenizer.json, tokenizer_config.json   copied from model.hf_assets_path when it is set

Reading opens the files lazily (`safe_open`): a rank reads the tensors of its own parameters, a chunk
at a time, so a pipeline stage never reads the other stages' layers and peak memory stays near one chunk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from pretrain.data.tokenizer import load_tokenizer
from pretrain.distributed.fsdp import DTYPES

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.common.spec import ModelSpec

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG = "config.json"
# copied along with the weights when model.hf_assets_path names a directory holding them
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "generation_config.json")
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
LOAD_CHUNK_BYTES = 2 * 2**30  # full tensors read and scattered per step when loading


def adapter_of(spec: ModelSpec) -> Any:
    if spec.hf_adapter is None:
        raise ValueError(f"model family {spec.name!r} has no Hugging Face adapter (ModelSpec.hf_adapter)")
    return spec.hf_adapter


# ----------------------------------------------------------------------------- write
def save_hf(
    state_dict: dict[str, torch.Tensor],
    out_dir: str,
    spec: ModelSpec,
    model_cfg: ModelConfig,
    dtype: str = "bfloat16",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    max_position_embeddings: int | None = None,
) -> dict:
    """Write our full (unsharded) state dict as an HF folder; returns the config.json written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    adapter = adapter_of(spec)
    keep_fp32 = getattr(adapter, "FP32_KEYS", ())  # e.g. DeepSeek's routing bias, kept in fp32 on the hub
    hf_sd = {
        k: v.detach().to("cpu", torch.float32 if k.endswith(keep_fp32) else DTYPES[dtype]).contiguous()
        for k, v in adapter.to_hf(state_dict, model_cfg).items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in hf_sd.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    os.makedirs(out_dir, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    _write_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = adapter.hf_config(model_cfg, dtype, max_position_embeddings)
    config.update(_copy_assets(model_cfg.hf_assets_path, out_dir))
    _write_json(os.path.join(out_dir, CONFIG), config)
    return config


def _copy_assets(assets_path: str, out_dir: str) -> dict:
    """Copy the tokenizer files; returns bos/eos token ids for config.json when the tokenizer names them."""
    if not assets_path:
        return {}
    assets_path = os.path.expanduser(assets_path)
    for name in ASSET_FILES:
        if os.path.isfile(os.path.join(assets_path, name)):
            shutil.copyfile(os.path.join(assets_path, name), os.path.join(out_dir, name))
    try:
        tokenizer = load_tokenizer(assets_path)
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    except Exception:  # the weights are still usable without the ids
        return {}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------- read
def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and (
        os.path.isfile(os.path.join(path, INDEX)) or os.path.isfile(os.path.join(path, SINGLE_FILE))
    )


def read_config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, CONFIG)) as f:
        return json.load(f)


def weight_map(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file (path) holding it, from the index or the single file."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return {key: os.path.join(hf_dir, name) for key, name in json.load(f)["weight_map"].items()}
    single = os.path.join(hf_dir, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{hf_dir} holds neither {INDEX} nor {SINGLE_FILE}")

    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def read_hf(
    hf_dir: str, keys: Iterable[str] | None = None, files: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The named HF tensors (all when `keys` is None), each read lazily from its shard."""
    files = files if files is not None else weight_map(hf_dir)
    keys = list(files) if keys is None else list(keys)
    missing = [k for k in keys if k not in files]
    if missing:
        raise KeyError(f"{hf_dir} has no tensor {missing[0]!r} ({len(missing)} missing)")
    by_file: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_file[files[key]].append(key)
    out = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                out[name] = f.get_tensor(name)
    return out


def hf_names(source: str | list[str]) -> list[str]:
    """The HF tensor names one of our parameters is read from: one, or several (stacked experts)."""
    return [source] if isinstance(source, str) else list(source)


def load_hf_into(
    model_parts: list[nn.Module],
    hf_dir: str,
    spec: ModelSpec,
    model_cfg: ModelConfig,
    strict: bool = True,
    chunk_bytes: int = LOAD_CHUNK_BYTES,
) -> None:
    """Fill each model part (a whole model or a pipeline stage, wrapped or not, sharded or not) with the
    HF weights of its own parameters. Every rank reads the full tensors it needs and
    `set_model_state_dict(full_state_dict=True)` keeps its shard (FSDP/TP DTensors) or the whole tensor.
    strict: every parameter must be in the HF folder (else KeyError); shapes must match (else ValueError).
    Collective: every rank of the part's meshes calls it."""
    adapter = adapter_of(spec)
    files = weight_map(hf_dir)
    options = StateDictOptions(full_state_dict=True, strict=False)  # a chunk at a time: coverage is checked here
    for part in model_parts:
        own = get_model_state_dict(part)  # names without wrapper prefixes; values: local tensors or DTensors
        needed = adapter.hf_keys_needed(own, model_cfg)
        if not strict:
            needed = {key: src for key, src in needed.items() if all(n in files for n in hf_names(src))}
        missing = [n for src in needed.values() for n in hf_names(src) if n not in files]
        if missing:
            raise KeyError(f"{hf_dir} has no tensor {missing[0]!r} ({len(missing)} of this model's tensors missing)")
        for chunk in _chunks(list(needed), own, chunk_bytes):
            hf_sd = read_hf(hf_dir, {n for key in chunk for n in hf_names(needed[key])}, files)
            sd = adapter.from_hf(hf_sd, model_cfg, keys=chunk)
            for key, value in sd.items():
                if tuple(value.shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"{needed[key]} in {hf_dir} has shape {tuple(value.shape)}, our {key} has "
                        f"{tuple(own[key].shape)}"
                    )
                sd[key] = value.to(own[key].dtype)
            set_model_state_dict(part, sd, options=options)


def _chunks(keys: list[str], own: dict[str, Any], chunk_bytes: int) -> list[list[str]]:
    """Consecutive groups of keys whose full tensors add up to about chunk_bytes."""
    chunks: list[list[str]] = [[]]
    size = 0
    for key in keys:
        value = own[key]
        nbytes = value.numel() * value.element_size()  # a DTensor's numel is that of the full tensor
        if chunks[-1] and size + nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(key)
        size += nbytes
    return chunks if chunks[-1] else []
