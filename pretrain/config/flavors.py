"""`model.flavor` is a label; the dims come from the model option (conf/model/<family>_<flavor>.yaml). A label that
names a published flavor must not lie about the dims: `check_flavor` refuses a run whose dims are another published
flavor's (torchtitan's `model.flavor=8B` on top of the debug option), and `flavor_changes` says how a run that
edits a flavor's dims (`model=llama3_8b model.n_layers=1`) differs from it, for the logs."""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

from omegaconf import OmegaConf

from pretrain.config.compose import CONF
from pretrain.config.model import ModelConfig
from pretrain.errors import ConfigError

_LABELS = ("flavor",)  # keys that name, not shape, a model


@functools.cache
def published_flavors(family: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """flavor label -> (the model option that defines it, the dotted model keys it sets, its base included)."""
    found = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        option = OmegaConf.load(path)
        merged = OmegaConf.create()
        for entry in option.get("defaults", []):
            if isinstance(entry, str) and entry.endswith("@_here_"):  # the family's base option
                merged = OmegaConf.merge(merged, OmegaConf.load(CONF / "model" / f"{entry.split('@')[0]}.yaml"))
        own = OmegaConf.create({k: v for k, v in option.items() if k != "defaults"})
        merged = OmegaConf.to_container(OmegaConf.merge(merged, own))
        if merged.get("name") == family and "flavor" in merged:
            found[merged["flavor"]] = (path.stem, _flatten(merged))
    return found


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif key not in _LABELS and key != "name":
            flat[f"{prefix}{key}"] = value
    return flat


_FIRST = ("dim", "n_layers", "n_heads", "vocab_size")  # the differences named first


def _differences(m: ModelConfig, keys: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (this run's value, the flavor's) where they differ, the main dims first. The flavor is its option's
    keys over the schema's defaults: every key counts, also those its option leaves alone."""
    ours = _flatten(asdict(m))
    theirs = {**_flatten(asdict(ModelConfig())), **keys}
    order = sorted(theirs, key=lambda k: _FIRST.index(k) if k in _FIRST else len(_FIRST))
    return {key: (ours.get(key), theirs[key]) for key in order if ours.get(key) != theirs[key]}


def flavor_changes(m: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """How this model differs from the published flavor its label names ({} when it is that flavor, or the label
    names none)."""
    published = published_flavors(m.name).get(m.flavor)
    return _differences(m, published[1]) if published else {}


def check_flavor(m: ModelConfig) -> None:
    """ConfigError when model.flavor names a published flavor and the dims are exactly another published flavor's."""
    flavors = published_flavors(m.name)
    if m.flavor not in flavors or not flavor_changes(m):
        return
    for other, (option, keys) in flavors.items():
        if other != m.flavor and not _differences(m, keys):
            wanted = flavors[m.flavor][0]
            shown = ", ".join(f"model.{k}={ours} ({m.flavor}: {theirs})" for k, (ours, theirs) in
                              list(flavor_changes(m).items())[:4])
            raise ConfigError(
                f"model.flavor={m.flavor} names {m.name}'s published {m.flavor}, but the dims are those of "
                f"model={option} ({shown}, ...): model.flavor is only a label, the dims come from the model option. "
                f"Fix: model={wanted} (it sets the {m.flavor} dims and the label)."
            )


def flavor_label(m: ModelConfig) -> str:
    """The flavor as logs should say it: `8B`, or `8B modified: n_layers=1 (8B: 32)` when the dims were edited."""
    changes = flavor_changes(m)
    if not changes:
        return m.flavor
    shown = ", ".join(f"{key}={ours} ({m.flavor}: {theirs})" for key, (ours, theirs) in list(changes.items())[:3])
    return f"{m.flavor} modified: {shown}{', ...' if len(changes) > 3 else ''}"
