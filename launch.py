"""The one entrypoint.

    python launch.py                                       # the embedded default, one CPU process
    python launch.py parallelism=fsdp cluster.nproc_per_node=4
    python launch.py model=llama3_8b data=c4 training.steps=1000
    python launch.py --help | --cfg job
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pretrain.config import ConfigError, register_configs, resolve
from pretrain.rundir import remove_if_created

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        job = resolve(cfg, run_dir=run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        remove_if_created(run_dir)  # the empty folders Hydra made for a run that never starts, nothing else
        sys.exit(2)
    if job.dry_run:
        # lazy: `--help` and a refused config answer before torch loads
        from pretrain.dry_run import dry_run

        return dry_run(job)
    # lazy: `--help` and a refused config answer before torch loads
    from pretrain.launcher import launch

    code = launch(job)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
