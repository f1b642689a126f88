"""The points of a run: each composed from Hydra's overrides, validated, and given its run directory.

Every point is resolved before anything is queued. A one-point run uses the run directory a local
run would use (`hydra.run.dir`, `outputs/<job.name>`), so the cluster choice never changes where a
run lives; the points of a sweep live in `hydra.sweep.dir/hydra.sweep.subdir` (the overrides).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pretrain.config import JobConfig, resolve
from pretrain.errors import ConfigError

# A sweep point's directory name is its overrides; past this many bytes it is cut and a hash added
# (file systems refuse names over 255 bytes).
MAX_DIR_NAME_BYTES = 200


@dataclass
class Point:
    index: int  # position in the sweep, 0-based
    overrides: list[str]  # Hydra overrides of this point (command line + sweep parameters)
    run_dir: str  # absolute run directory
    job: Optional[JobConfig] = None  # the validated config; None when the point is invalid
    error: str = ""  # why the point is invalid (a ConfigError message)
    distinct_overrides: list[str] = field(default_factory=list)  # those not every point of the sweep shares
    label: str = ""  # the same, as one line
    extra: dict = field(default_factory=dict)  # filled at submission: job id, log paths, outcome

    @property
    def valid(self) -> bool:
        return self.job is not None


def point_dir_name(name: str, distinct: Sequence[str] = ()) -> str:
    """One directory level from a point's override_dirname: `/` in values escaped. When too long, the
    overrides that set the point apart (`distinct`) plus a hash of the whole name (still deterministic)."""
    name = name.replace("/", "%2F")
    if len(name.encode()) <= MAX_DIR_NAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    head = ",".join(sorted(distinct)).replace("/", "%2F") or name
    return f"{head.encode()[: MAX_DIR_NAME_BYTES - 11].decode(errors='ignore')}~{digest}"


def hydra_points(config_loader, base_config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> list[Point]:
    """Compose and validate every point of a Hydra multirun, as `run_job` would compose it."""
    # lazy: HydraConfig exists only inside a Hydra run
    from hydra.core.hydra_config import HydraConfig

    points = [Point(index=i, overrides=list(o), run_dir="") for i, o in enumerate(job_overrides)]
    label_points(points)
    try:
        for point in points:
            sweep_config = config_loader.load_sweep_config(base_config, point.overrides)
            HydraConfig.instance().set_config(sweep_config)  # `${hydra:...}` interpolations read it
            hydra_node = sweep_config.hydra
            if len(points) == 1:
                run_dir = str(hydra_node.run.dir)
            else:
                name = point_dir_name(str(hydra_node.sweep.subdir), point.distinct_overrides)
                run_dir = os.path.join(str(hydra_node.sweep.dir), name)
            point.run_dir = os.path.abspath(run_dir)
            task_config = copy.deepcopy(sweep_config)
            with read_write(task_config), open_dict(task_config):
                del task_config["hydra"]
            try:
                point.job = resolve(task_config, run_dir=point.run_dir)
            except ConfigError as e:
                point.error = str(e)
    finally:
        HydraConfig.instance().set_config(base_config)
    return points


def sweep_dir_of(base_config: DictConfig) -> str:
    """The directory that holds the sweep's points (and, for one point, is its run directory)."""
    return os.path.abspath(str(OmegaConf.select(base_config, "hydra.sweep.dir")))


def label_points(points: Sequence[Point]) -> None:
    """Label each point by the overrides that not every point shares (all of them for a single point)."""
    common = set(points[0].overrides).intersection(*(p.overrides for p in points[1:])) if len(points) > 1 else set()
    for p in points:
        p.distinct_overrides = [o for o in p.overrides if o not in common]
        p.label = " ".join(p.distinct_overrides) or "(no overrides)"
