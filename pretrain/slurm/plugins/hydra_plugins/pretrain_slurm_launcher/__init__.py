"""Hydra discovers launchers only inside the `hydra_plugins` namespace package; this one is pretrain's
SLURM launcher (the work is done in pretrain/slurm/)."""
