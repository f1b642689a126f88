"""The SLURM path: `cluster=slurm` (and its presets) submit through submitit, one task per device.

    points.py          each point of a (one-point or multi-point) run: composed, validated, its run directory
    request.py         cluster.* -> submitit parameters, and `sbatch --test-only` before anything is queued
    snapshot.py        the copy of the code a queued job runs, and the small entry that loads it
    submission.py      snapshot, submit, say how to follow the jobs, wait, report how they ended
    manifest.py        sweep.json: the points of a sweep, which were skipped and why, their jobs and outcomes
    hydra_launcher.py  the Hydra launcher that `cluster=slurm` selects (multirun mode, sweeper params work)
    task.py            what each task runs: rank environment, device, preemption handler, `train.main`

Nothing here imports torch at submission time.
"""
