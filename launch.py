"""The one entrypoint.

    python launch.py                                       # the embedded default, one CPU process
    python launch.py parallelism=fsdp cluster.nproc_per_node=4
    python launch.py model=llama3_8b data=c4 training.steps=1000
    python launch.py --help | --cfg job
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pretrain.config import ConfigError, register_configs, resolve
from pretrain.config.torchtitan_names import refuse_foreign_spellings
from pretrain.multirun import REFUSED, record
from pretrain.rundir import remove_if_created

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    # a point of a local multirun: its outcome goes into the summary and the sweep goes on (pretrain/multirun.py)
    point = " ".join(hydra_cfg.overrides.task) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        job = resolve(cfg, run_dir=run_dir)
    except ConfigError as e:
        print(f"error: {e}" if point is None else f"error: point {point or '(no overrides)'}: {e}", file=sys.stderr)
        remove_if_created(run_dir)  # the empty folders Hydra made for a run that never starts, nothing else
        if point is not None:
            return record(point, REFUSED, str(e).split(". Fix:")[0])
        sys.exit(2)
    if job.dry_run:
        # lazy: `--help` and a refused config answer before torch loads
        from pretrain.dry_run import dry_run

        dry_run(job)
        return record(point, 0, "dry run") if point is not None else None
    # lazy: `--help` and a refused config answer before torch loads
    from pretrain.launcher import launch

    code = launch(job)
    if point is not None:
        return record(point, code, "" if code == 0 else f"see {run_dir}")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:  # torchtitan's spellings and near misses get the key to use, before Hydra's "not in struct"
        refuse_foreign_spellings(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
