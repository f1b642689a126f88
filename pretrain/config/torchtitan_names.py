"""torchtitan's option names that are spelled otherwise here, or that have no counterpart, with what to write
instead: one table, so the hints a command line gets and the migration notes say the same. Most of torchtitan's
names are ours as they are (training.steps, parallelism.*, checkpoint.*, ...): they are not listed.

`refuse_foreign_spellings(argv)` runs before Hydra composes anything: an override that uses a torchtitan spelling,
torchtitan's `--section.key value` flags, or a near miss of one of our keys is refused with the key to use (exit 2)
instead of Hydra's bare "Key 'x' is not in struct".
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from pretrain.config.schema import JobConfig
from pretrain.errors import ConfigError

# torchtitan key -> how to say it here ({value} is the value given), or, starting with "not ", why nothing does
RENAMED: dict[str, str] = {
    "job.config_file": "not read: a torchtitan TOML's options go on the command line as overrides, or into a "
                       "recipe in conf/experiment/ (experiment=<name>)",
    "job.print_args": "python launch.py --cfg job (prints the composed config)",
    "training.batch_size": "training.local_batch_size={value}",
    "training.dataset": "data=<preset> (c4: data=c4; c4_test: data=embedded), or data.path={value}",
    "training.dataset_path": "data.path={value}",
    "training.tokenizer_path": "data.tokenizer_path={value}, or model.hf_assets_path=<dir with tokenizer.json>",
    "model.tokenizer_path": "data.tokenizer_path={value}, or model.hf_assets_path=<dir with tokenizer.json>",
    "training.compile": "compile.enable={value}",
    "training.tensor_parallel_degree": "parallelism.tensor_parallel_degree={value}",
    "training.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree={value}",
    "training.data_parallel_replicate_degree": "parallelism.data_parallel_replicate_degree={value}",
    "training.enable_cpu_offload": "not supported: FSDP keeps parameters on the device",
    "model.converters": "float8=<recipe> (float8=tensorwise, rowwise or rowwise_with_gw_hp; float8=off for none)",
    "model.print_after_conversion": "not supported: the dry run (dry_run=true) prints what each rank holds",
    "quantize.linear.float8.enable_fsdp_float8_all_gather": "float8.enable_fsdp_float8_all_gather={value}",
    "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp":
        "float8.precompute_float8_dynamic_scale_for_fsdp={value}",
    "quantize.linear.float8.recipe_name": "float8.recipe_name={value} (or float8={value})",
    "quantize.linear.float8.filter_fqns": "float8.filter_fqns={value}",
    "quantize.linear.float8.emulate": "float8.emulate={value}",
    "lr_scheduler.lr_min": "lr_scheduler.min_lr_factor={value} (a factor of optimizer.lr, as torchtitan's lr_min)",
    "optimizer.early_step_in_backward": "not supported: the optimizer steps after the backward of the whole step",
    "checkpoint.enable_checkpoint": "checkpoint.enable={value}",
    "checkpoint.model_weights_only": "checkpoint.last_save_model_only={value}",
    "checkpoint.last_save_in_hf": "python -m pretrain.convert to-hf <run dir>/checkpoint/step-N OUT after the run",
    "checkpoint.load_only": "not supported: checkpoint.enable=false loads and saves nothing",
    "parallelism.context_parallel_rotate_method": "parallelism.context_parallel_method={value} (allgather | ring)",
    "parallelism.pipeline_parallel_split_points": "parallelism.module_fqns_per_model_part=[[...],[...]] (module "
                                                  "names per stage) or parallelism.pipeline_parallel_layers_per_stage",
    "parallelism.expert_tensor_parallel_degree": "not supported: experts shard over EP, and TP within a rank's experts",
    "parallelism.enable_compiled_autograd": "not supported",
    "metrics.save_tb_folder": "TensorBoard events always go to <run dir>/tb",
    "metrics.disable_color_printing": "not needed: the console lines carry no color",
    "metrics.save_for_all_ranks": "not supported: rank 0 logs the metrics, reduced over the ranks",
    "comm.trace_buf_size": "not supported",
    "validation.enabled": "validation.enable={value}",
    "validation.dataset": "validation.path={value} (with validation.split), or the held-out split of data's source",
    "validation.dataset_path": "validation.path={value}",
    "experimental.custom_import": "model.name=<module>: a family of your own is the dotted name of a module that "
                                  "defines SPEC (docs/adding_a_model.md)",
    "experimental.custom_args_module": "not supported: the schema is pretrain/config/schema.py",
}
# whole sections of torchtitan's that have no counterpart here (yet)
SECTIONS: dict[str, str] = {
    "fault_tolerance": "not supported yet (torchft)",
    "memory_estimation": "dry_run=true: per-rank memory of the real layout on a fake process group",
    "quantize": "float8=<recipe> and float8.*",
}


def schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every key of the schema, dotted -> its type (a nested section is listed and walked)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        out[key] = tp
        if dataclasses.is_dataclass(tp):
            out.update(schema_keys(tp, f"{key}."))
    return out


def _hint(key: str, value: str) -> str | None:
    """What to write instead of torchtitan's `key`, as a message with its fix; None for a name torchtitan lacks."""
    if key in RENAMED:
        ours = RENAMED[key].replace("{value}", value or "<value>")
        if ours.startswith("not "):
            return f"{key} is torchtitan's, with no counterpart here ({ours}). Fix: leave it out."
        return f"{key} is torchtitan's spelling. Fix: {ours}."
    section = key.split(".")[0]
    if section in SECTIONS:
        return f"{key}: torchtitan's [{section}] section; here: {SECTIONS[section]}. Fix: leave it out."
    return None


def _known(key: str, schema: dict[str, Any]) -> bool:
    """A key of the schema, or a key below a dict-typed field (cluster.extra_sbatch.mail-type)."""
    if key in schema:
        return True
    parts = key.split(".")
    for i in range(1, len(parts)):
        tp = schema.get(".".join(parts[:i]))
        if tp is not None and typing.get_origin(tp) is dict:
            return True
    return False


def refuse_foreign_spellings(argv: list[str]) -> None:
    """ConfigError for the first override that is a torchtitan spelling, a `--section.key` flag, or a near miss of
    one of our keys; the others are left to Hydra (groups, hydra.*, +/~ additions and deletions, valid keys)."""
    schema = schema_keys(JobConfig)
    sections = {key for key in schema if "." not in key}
    for i, arg in enumerate(argv):
        flag = re.fullmatch(r"--([a-z_]+(?:\.[a-z_0-9]+)+)(?:=(.*))?", arg)
        if flag:
            key = flag.group(1)
            value = flag.group(2) if flag.group(2) is not None else (
                argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "true")
            hint = _hint(key, value)
            raise ConfigError(hint or f"{arg}: torchtitan's command-line flag; options are key=value overrides here. "
                              f"Fix: python launch.py {key}={value}.")
        match = re.fullmatch(r"([+~]{0,2})([A-Za-z_][\w.-]*)(?:@[\w.]+)?=(.*)", arg, re.DOTALL)
        if not match or "." not in match.group(2):
            continue
        prefix, key, value = match.groups()
        if key.split(".")[0] == "hydra" or _known(key, schema):
            continue
        hint = _hint(key, value)
        if hint:
            raise ConfigError(hint)
        if prefix.startswith("~") or key.split(".")[0] not in sections:
            continue  # Hydra says what is wrong with these
        close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{key} is not a key of the config. Fix: {prefix}{close[0]}={value} "
                              "(python launch.py --cfg job lists every key).")


def migration_table() -> str:
    """The markdown table of docs/migrating_from_torchtitan.md (tests/test_config.py checks the page holds it)."""
    rows = ["| torchtitan | here |", "|---|---|"]
    rows += [f"| `{key}` | {ours.replace('{value}', 'V').replace('|', '/')} |" for key, ours in RENAMED.items()]
    rows += [f"| `[{section}]` | {ours} |" for section, ours in SECTIONS.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(migration_table(), end="")
