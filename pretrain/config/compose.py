"""conf/ composed by Hydra outside launch.py (the converter, the token store's prepare), as launch.py composes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.config.schema import register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]) -> Any:
    """The composed DictConfig of conf/config.yaml with `overrides`; Hydra's own exception when they are wrong."""
    # lazy: a tool's `--help` and argument errors answer before Hydra's compose API loads
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)
