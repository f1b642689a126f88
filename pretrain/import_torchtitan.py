"""Turn a torchtitan TOML into a recipe of conf/experiment/:

    python -m pretrain.import_torchtitan path/to/llama3_8b.toml [--name NAME] [--world-size N] [--print | --out DIR]
    python launch.py experiment=NAME dry_run=true

Every option of the TOML lands in one of two places: the recipe (a key of ours, or a group choice: `model.name` +
`model.flavor` pick `model=llama3_8b`, `training.dataset` picks `data=c4`, `model.converters = ["float8"]` picks
`float8=<recipe>`), or the list of options left out, each with its reason, printed and kept as comments at the
end of the recipe. Nothing is dropped without a word. The names come from pretrain/config/torchtitan_names.py, the
table docs/migrating_from_torchtitan.md shows, so the importer, the command-line hints and the page agree.

torchtitan's TOMLs set data_parallel_shard_degree = -1 and say the GPU count in a comment ("a preset for 64 A100
GPUs"); that count, or --world-size, sizes the recipe's cluster (8 GPUs per node). The recipe is checked as
`launch.py` would check it before it is written; a recipe that does not validate is still written, with the reason.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pretrain.config import register_configs, resolve
from pretrain.config.compose import CONF
from pretrain.config.schema import JobConfig
from pretrain.config.torchtitan_names import RENAMED, SECTIONS, schema_keys
from pretrain.errors import ConfigError

GPUS_PER_NODE = 8
# torchtitan's defaults where ours differ: set in every recipe unless the TOML says otherwise
TORCHTITAN_DEFAULTS = {"checkpoint.enable": False, "validation.enable": False}
DATASETS = {"c4": "c4", "c4_test": "embedded", "c4_validation": "c4"}  # torchtitan's dataset names -> data=<option>
# keys whose value is a path: one that does not exist where the import runs is left out with the reason
PATH_KEYS = ("model.hf_assets_path", "model.tokenizer_path", "training.tokenizer_path", "training.dataset_path",
             "checkpoint.initial_load_path", "validation.dataset_path")
_SIMPLE = re.compile(r"([a-z_][\w.]*)=\{value\}")  # a RENAMED entry that is one key of ours


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"training": {"steps": 10}} -> {"training.steps": 10}."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Recipe:
    """What the import makes: group choices, key values, and the options left out with their reasons."""

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.left_out: list[tuple[str, Any, str]] = []
        self.sources: set[str] = set()  # the TOML's options this recipe accounts for (set, chosen or left out)

    def set(self, key: str, value: Any, source: str | None = None) -> None:
        if source:
            self.sources.add(source)
        tp = schema_keys(JobConfig).get(key)
        if typing.get_origin(tp) is list and not isinstance(value, list):
            value = [value]  # torchtitan accepts filter_fqns = "output" for ["output"]
        self.values[key] = value

    def choose(self, group: str, option: str, *sources: str) -> None:
        self.groups[group] = option
        self.sources.update(sources)

    def leave_out(self, key: str, value: Any, why: str) -> None:
        self.left_out.append((key, value, why))
        self.sources.add(key)

    def yaml(self, header: str) -> str:
        nested: dict[str, Any] = {}
        for key, value in self.values.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        body = {"defaults": [{f"override /{g}": o} for g, o in self.groups.items()], **nested}
        text = "# @package _global_\n" + header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
        if self.left_out:
            text += "\n# Left out of the import, with the reason:\n"
            text += "".join(f"#   {key} = {value!r}: {why}\n" for key, value, why in self.left_out)
        return text


def _model(opts: dict[str, Any], recipe: Recipe) -> None:
    name, flavor = opts.pop("model.name", None), opts.pop("model.flavor", None)
    if name is None:
        return
    option = f"{name}_debug" if str(flavor).lower() in ("debugmodel", "debug") else (
        f"{name}_{str(flavor).lower().replace('.', '_')}")
    if (CONF / "model" / f"{option}.yaml").exists():
        recipe.choose("model", option, "model.name", "model.flavor")
    else:
        have = sorted(p.stem for p in (CONF / "model").glob(f"{name}_*.yaml")) or ["none"]
        recipe.leave_out("model.flavor", f"{name}/{flavor}",
                         f"no model option {option} (conf/model/); {name}'s: {', '.join(have)}")


def _dataset(opts: dict[str, Any], recipe: Recipe) -> None:
    for key in ("training.dataset", "training.data.name"):
        if key not in opts:
            continue
        value = opts.pop(key)
        if value in DATASETS:
            recipe.choose("data", DATASETS[value], key)
        else:
            recipe.leave_out(key, value, f"a dataset of torchtitan's registry; here: data=<option> "
                                         f"({', '.join(sorted(p.stem for p in (CONF / 'data').glob('*.yaml')))}) "
                                         "or data.path=<hub name or directory>")
    value = opts.pop("validation.dataset", None)
    if value is not None:
        if DATASETS.get(value) == recipe.groups.get("data", "embedded"):
            recipe.set("validation.split", "validation", "validation.dataset")  # the same source's held-out split
        else:
            recipe.leave_out("validation.dataset", value, RENAMED["validation.dataset"].replace("{value}", value))


def _float8(opts: dict[str, Any], recipe: Recipe) -> None:
    if "model.converters" in opts:
        recipe.sources.add("model.converters")
    converters = opts.pop("model.converters", [])
    converters = [converters] if isinstance(converters, str) else list(converters)
    float8_keys = {k: k.split(".")[-1] for k in opts if re.match(r"(float8|quantize\.(linear|dense)\.float8)\.", k)}
    if "float8" in converters or "quantize.linear.float8" in converters:
        recipe_name = next((opts[k] for k, leaf in float8_keys.items() if leaf == "recipe_name"), "tensorwise")
        recipe.choose("float8", recipe_name)
    for key in converters:
        if key not in ("float8", "quantize.linear.float8"):
            recipe.leave_out("model.converters", key, "only float8 converts models here (float8=<recipe>)")
    for key, leaf in float8_keys.items():
        value = opts.pop(key)
        if "float8" not in recipe.groups:
            recipe.leave_out(key, value, "float8 is off in this TOML (model.converters has no float8)")
        elif leaf == "recipe_name":
            recipe.sources.add(key)  # chose the float8 option above
        else:
            recipe.set(f"float8.{leaf}", value, key)


def _cluster(world_size: int, recipe: Recipe) -> None:
    per_node = min(world_size, GPUS_PER_NODE)
    if world_size % per_node:
        raise ConfigError(f"--world-size {world_size} is not a whole number of {GPUS_PER_NODE}-GPU nodes. "
                          f"Fix: a multiple of {GPUS_PER_NODE}, or at most {GPUS_PER_NODE}.")
    for key, value in (("nodes", world_size // per_node), ("nproc_per_node", per_node),
                       ("gpus_per_node", per_node), ("device", "cuda")):
        recipe.set(f"cluster.{key}", value)


def translate(options: dict[str, Any], world_size: int, name: str, base: Path = Path(".")) -> Recipe:
    """The recipe for torchtitan's flattened options."""
    opts = dict(options)
    recipe = Recipe()
    recipe.set("job.name", name)
    for key, value in TORCHTITAN_DEFAULTS.items():
        recipe.set(key, value)
    _model(opts, recipe)
    _dataset(opts, recipe)
    _float8(opts, recipe)
    recipe.groups.setdefault("parallelism", "fsdp")  # degrees below; fsdp's shard degree -1 as torchtitan's
    _cluster(world_size, recipe)
    schema = schema_keys(JobConfig)
    for key, value in opts.items():
        if key in PATH_KEYS and value and not (base / Path(value).expanduser()).exists() \
                and not Path(value).expanduser().exists():
            recipe.leave_out(key, value, "the path does not exist here; set it when the files are in place")
            continue
        ours = RENAMED.get(key)
        simple = _SIMPLE.fullmatch(ours) if ours else None
        if simple:
            recipe.set(simple.group(1), value, key)
        elif ours is not None:
            recipe.leave_out(key, value, ours.replace("{value}", str(value)))
        elif key in schema and not key.startswith("cluster."):
            recipe.set(key, value, key)
        elif key.split(".")[0] in SECTIONS:
            section = key.split(".")[0]
            recipe.leave_out(key, value, f"torchtitan's [{section}] section; here: {SECTIONS[section]}")
        else:
            recipe.leave_out(key, value, "no such option here (python launch.py --cfg job lists them)")
    if any(key == "checkpoint.initial_load_path" for key, _, _ in recipe.left_out):
        for key in [k for k in recipe.values if k.startswith("checkpoint.initial_load_")]:
            recipe.leave_out(key, recipe.values.pop(key), "goes with checkpoint.initial_load_path, left out")
    return recipe


def preset_world_size(text: str) -> int | None:
    """The GPU count torchtitan's TOMLs state in a comment: "a preset for 64 A100 GPUs"."""
    match = re.search(r"preset for (\d+)\s", text)
    return int(match.group(1)) if match else None


def check(recipe_path: Path) -> str | None:
    """The reason `launch.py experiment=<recipe> dry_run=true` would refuse the recipe, or None when it validates
    (a multi-node recipe runs with cluster=slurm; its dry run checks it from here)."""
    register_configs()
    search = [] if recipe_path.parent.parent == CONF else [f"hydra.searchpath=[file://{recipe_path.parent.parent}]"]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            resolve(compose("config", overrides=[f"experiment={recipe_path.stem}", "dry_run=true", *search]))
    except ConfigError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.import_torchtitan", description=__doc__.split("\n\n")[0])
    parser.add_argument("toml", type=Path, help="a torchtitan train config (.toml)")
    parser.add_argument("--name", help="recipe name (default: the TOML's file name)")
    parser.add_argument("--world-size", type=int, help="GPUs the recipe runs on (default: the TOML's 'preset for N "
                                                        "GPUs' comment, else 8)")
    parser.add_argument("--out", type=Path, default=CONF / "experiment", help="folder to write NAME.yaml into")
    parser.add_argument("--print", action="store_true", help="print the recipe instead of writing it")
    parser.add_argument("--force", action="store_true", help="overwrite an existing recipe of that name")
    args = parser.parse_args(argv)
    try:
        text = args.toml.read_text()
        options = flatten(tomllib.loads(text))
    except FileNotFoundError:
        return _refuse(f"{args.toml}: no such file. Fix: give the path of a torchtitan .toml.")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return _refuse(f"{args.toml} is not valid TOML ({e}). Fix: check the file.")
    name = args.name or re.sub(r"\W", "_", args.toml.stem)
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        return _refuse(f"--name {name!r}: a recipe name is letters, digits and _. Fix: --name llama3_8b_tt.")
    world_size = args.world_size or preset_world_size(text) or GPUS_PER_NODE
    try:
        recipe = translate(options, world_size, name, base=args.toml.parent)
    except ConfigError as e:
        return _refuse(str(e))
    header = (f"# Imported from torchtitan's {args.toml.name} for {world_size} GPUs "
              "(python -m pretrain.import_torchtitan).\n")
    text = recipe.yaml(header)
    if args.print:
        print(text, end="")
        return 0
    path = args.out / f"{name}.yaml"
    if path.exists() and not args.force:
        return _refuse(f"{path} exists. Fix: --name <another name>, or --force to replace it.")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    mapped = len(recipe.values) + len(recipe.groups)
    print(f"wrote {path}: {mapped} settings, {len(recipe.left_out)} options left out")
    for key, value, why in recipe.left_out:
        print(f"  left out {key} = {value!r}: {why}")
    problem = check(path)
    if problem:
        print(f"warning: launch.py would refuse experiment={name} as written: {problem}", file=sys.stderr)
    else:
        search = "" if args.out.resolve() == (CONF / "experiment").resolve() else (
            f" hydra.searchpath=[file://{args.out.resolve().parent}]")
        print(f"check it:  python launch.py experiment={name} dry_run=true{search}")
        print(f"run it:    python launch.py experiment={name} cluster=slurm cluster.partition=<p>{search}")
    return 0


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
