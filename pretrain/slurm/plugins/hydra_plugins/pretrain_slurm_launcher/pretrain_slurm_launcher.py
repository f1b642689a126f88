"""`hydra/launcher=pretrain_slurm`, which `cluster=slurm` selects: hydra-submitit-launcher's SLURM
launcher, with `launch` replaced by pretrain's (validate every point first, resources from
`cluster.*`, a code snapshot per submission, blocking or not). See pretrain/slurm/hydra_launcher.py."""

# (no `from __future__ import annotations`: Hydra runs this module outside sys.modules, where a
# dataclass with string annotations cannot be built)
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


@dataclass
class PretrainSlurmLauncherConf:
    _target_: str = "hydra_plugins.pretrain_slurm_launcher.pretrain_slurm_launcher.PretrainSlurmLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="pretrain_slurm", node=PretrainSlurmLauncherConf, provider="pretrain"
)


class PretrainSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # lazy: Hydra imports every plugin at start; ours loads only when chosen
        from pretrain.slurm.hydra_launcher import (
            launch_points,  # imported when used: Hydra scans this module at every start
        )

        assert self.config is not None and self.hydra_context is not None
        return launch_points(self.hydra_context.config_loader, self.config, job_overrides)
