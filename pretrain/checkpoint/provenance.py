"""What a checkpoint was made from, and whether this run may resume from it.

Each step records in its train_state.json ("made_from") the values that give its weights and its data position
their meaning, and a resume compares them with this run's before anything is loaded:

- the model section: what each tensor is. Keys that only spell the same sizes differently do not count
  (n_kv_heads=null or =n_heads; multiple_of and ffn_dim_multiplier where ffn_hidden_dim is the same), nor keys the
  model does not use (the yarn keys of a llama3-scaled RoPE, moe.* of a dense model, mla.* without MLA);
- the tokenizer, by the sha256 of its file: what each embedding row and each token of the data position stand for.
  Where it lives does not count, its content does (a retrained tokenizer that comes out the same is the same);
- the data source: data.path, format, config_name, data_files, split, text_field, streaming, bos, eos: what the
  saved stream position points into. Checked only when the data position is loaded. (A token store's loader checks
  its own window order, data.shuffle and data.seed, when its position is restored.)

Not recorded, so safe to change on resume: the optimizer and lr schedule (the schedule follows this run's config
from the saved step on: state.py), training.steps, batch sizes and seq_len (the data position is a place in the
token stream, cut into windows as it is read), the parallel layout, logging, model.flavor (a label),
model.moe.bias_update_speed and aux_loss_coeff (training knobs), and model.hf_assets_path, data.tokenizer_path,
data.name and data.cache_dir themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from pretrain.config import JobConfig, ModelConfig
from pretrain.config.model import ffn_hidden_dim, head_dim
from pretrain.data.token_store import read_manifest
from pretrain.data.tokenizer import tokenizer_cache_key

# model keys that change how the model trains, not what its weights mean
MODEL_SAFE = ("model.flavor", "model.hf_assets_path", "model.moe.bias_update_speed", "model.moe.aux_loss_coeff")
DATA_KEYS = ("path", "format", "config_name", "data_files", "split", "text_field", "streaming", "bos", "eos")
TOKENIZER = "tokenizer"
# the sizes that null defaults and multiple_of / ffn_dim_multiplier resolve to: keys that only spell them differently
# (n_kv_heads=null or =n_heads) are one model
EFFECTIVE = "model.effective"
SHAPE_INPUTS = ("model.n_kv_heads", "model.head_dim", "model.ffn_hidden_dim", "model.multiple_of",
                "model.ffn_dim_multiplier")
_ROPE_SCALING = ("rope_scaling_type", "rope_scaling_factor", "rope_original_max_seq_len")
_ROPE_LLAMA3 = ("rope_low_freq_factor", "rope_high_freq_factor")
_ROPE_YARN = ("rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_mscale")


def made_from(job: JobConfig) -> dict[str, Any]:
    """{"model.<key>": value, ..., "tokenizer": {"sha256", "source"}, "data.<key>": value}, JSON-serialisable."""
    record = model_record(job.model)
    record[TOKENIZER] = tokenizer_identity(job)
    for key in DATA_KEYS:
        if hasattr(job.data, key):  # data.format: text streams or token stores (pretrain/data/)
            value = getattr(job.data, key)
            record[f"data.{key}"] = list(value) if isinstance(value, list) else value
    return record


def schedule_record(job: JobConfig) -> dict[str, Any]:
    """What the saved lr schedule was computed from: shown when this run's schedule gives another lr."""
    return {"training.steps": job.training.steps, "optimizer.lr": job.optimizer.lr}


def model_record(m: ModelConfig) -> dict[str, Any]:
    """The model section's part of the record (alone, for a folder converted from Hugging Face)."""
    values = _flatten("model", dataclasses.asdict(m))
    unused = set()
    if not m.rope_scaling:
        unused |= {*_ROPE_SCALING, *_ROPE_LLAMA3, *_ROPE_YARN}
    else:
        unused |= set(_ROPE_YARN if m.rope_scaling_type == "llama3" else _ROPE_LLAMA3)
    drop = {f"model.{key}" for key in unused} | set(MODEL_SAFE)
    record = {
        key: value for key, value in values.items()
        if key not in drop
        and not (key.startswith("model.moe.") and not m.moe.n_routed_experts)
        and not (key.startswith("model.mla.") and not m.mla.kv_lora_rank)
    }
    record[EFFECTIVE] = {"model.n_kv_heads": m.n_kv_heads or m.n_heads, "model.head_dim": head_dim(m),
                         "model.ffn_hidden_dim": ffn_hidden_dim(m)}
    return record


def _flatten(prefix: str, values: dict) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(f"{prefix}.{key}", value))
        else:
            flat[f"{prefix}.{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return flat


def tokenizer_identity(job: JobConfig) -> dict[str, Any]:
    """{"sha256": of the tokenizer file (and its tokenizer_config.json, which names BOS/EOS), or None when the file
    is not there; "source": where it was found}. The same order as pretrain.data.tokenizer.build_tokenizer."""
    m, d = job.model, job.data
    if d.format == "tokenized" and not (m.hf_assets_path or d.tokenizer_path):  # the copy the store was made with
        store = os.path.expanduser(d.path)
        return {"sha256": read_manifest(store).get("tokenizer", {}).get("sha256"), "source": f"token store {store}"}
    if m.hf_assets_path or d.tokenizer_path:
        origin = "model.hf_assets_path" if m.hf_assets_path else "data.tokenizer_path"
        path = os.path.expanduser(m.hf_assets_path or d.tokenizer_path)
        if os.path.isdir(path):
            path = next((os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model")
                         if os.path.isfile(os.path.join(path, n))), path)
    else:
        origin = "trained on the corpus"
        path = os.path.join(os.path.expanduser(d.cache_dir), "tokenizers",
                            tokenizer_cache_key(d, m.vocab_size) + ".model")
    files = [path, os.path.join(os.path.dirname(path), "tokenizer_config.json")] if path.endswith(".json") else [path]
    digest = hashlib.sha256()
    for file in files:
        if os.path.isfile(file):
            with open(file, "rb") as f:
                digest.update(f.read())
        elif file == path:
            return {"sha256": None, "source": f"{origin}: {path}"}
    return {"sha256": digest.hexdigest(), "source": f"{origin}: {path}"}


def differences(saved: dict[str, Any], now: dict[str, Any], data: bool) -> list[tuple[str, Any, Any]]:
    """(key, value in the checkpoint, value now) for each recorded key that differs; the data keys only with
    `data`. A key one side lacks (recorded by another version) is not compared."""
    found = []
    for key in now:
        if key not in saved or key == EFFECTIVE or (key.startswith("data.") and not data):
            continue
        old, new = saved[key], now[key]
        if key == TOKENIZER:
            if old.get("sha256") and new.get("sha256") and old["sha256"] != new["sha256"]:
                found.append((key, old, new))
        elif old != new:
            found.append((key, old, new))
    old_sizes, new_sizes = saved.get(EFFECTIVE), now.get(EFFECTIVE)
    if old_sizes is not None and old_sizes == new_sizes:  # spelled differently, the same sizes
        found = [f for f in found if f[0] not in SHAPE_INPUTS]
    elif old_sizes is not None and new_sizes is not None and not any(f[0].startswith("model.") for f in found):
        found += [(key, value, new_sizes.get(key)) for key, value in old_sizes.items() if value != new_sizes.get(key)]
    return found


def refusal(path: str, found: list[tuple[str, Any, Any]], initial_key: str = "") -> str:
    """The message that refuses a resume (or, with `initial_key`, a full start from checkpoint.initial_load_path):
    each key with both values, then the fixes."""
    model = [f for f in found if not f[0].startswith("data.")]
    data = [f for f in found if f[0].startswith("data.")]
    what = " and ".join(w for w, fs in (("another model", model), ("other data", data)) if fs)
    listed = "; ".join(f"{key}: {_shown(key, old)} in the checkpoint, {_shown(key, new)} now"
                       for key, old, new in found)
    harm = []
    if model:
        harm.append("its weights would be read as another model's")
    if data:
        harm.append("its data position would be applied to another stream")
    old_values = " ".join(_override(key, old) for key, old, _ in found)
    fixes = [f"run with the values it was saved with ({old_values}; its run's config.yaml holds them all)"]
    if model and initial_key:
        fixes.append("to change the model or tokenizer on purpose, take its weights only: "
                     "checkpoint.initial_load_model_only=true")
    elif model:
        fixes.append(
            f"to change the model or tokenizer on purpose, start a new run (another job.name) from its weights with "
            f"checkpoint.initial_load_path={path} (checkpoint.initial_load_model_only=true, the default)"
        )
    if data:
        fixes.append("to go on with new data from its start, keeping the weights, optimizer and step: "
                     "checkpoint.exclude_from_loading=[dataloader]")
    source = initial_key or f"checkpoint {path}"
    return (f"{source} was made from {what} than this run's: {listed}. Resuming would go wrong silently: "
            f"{' and '.join(harm)}. Fix: {'; or '.join(fixes)}.")


def _shown(key: str, value: Any) -> str:
    if key == TOKENIZER:
        return f"sha256 {str(value.get('sha256'))[:12]} ({value.get('source')})"
    return json.dumps(value)


def _override(key: str, value: Any) -> str:
    if key == TOKENIZER:
        return f"the tokenizer {value.get('source')}"
    if isinstance(value, list):
        return f"'{key}=[{','.join(str(v) for v in value)}]'"
    return f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
