"""Submit validated points to SLURM, say how to follow them, and (blocking) wait and report honestly.

Order, so that nothing is queued unless everything that can be checked has been:
  1. every point was resolved and validated (points.py); none valid -> refused, some invalid ->
     those are skipped and listed;
  2. each distinct resource request is tried with `sbatch --test-only` (request.py);
  3. the code is snapshotted (snapshot.py), then the points are submitted, one job array per
     distinct request (a single point is one plain job).
A job counts as completed only when every task returned; a Python error in any task, or a job that
ended without results (cancelled, killed, out of time), is a failure shown with the task's error.
Submission files and logs go to `<sweep dir>/.submitit/<time>-<pid>/`; the run directories stay
deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pretrain.errors import ConfigError
from pretrain.slurm.manifest import MANIFEST_FILE, write_manifest
from pretrain.slurm.points import Point, label_points
from pretrain.slurm.request import check_request, submitit_parameters
from pretrain.slurm.snapshot import SnapshotEntry, pickled_by_value, take_snapshot
from pretrain.slurm.task import ERROR_FILE, SlurmTask

POLL_S = 2.0  # how often a blocking submission looks for finished jobs
TRACE_LINES = 25  # lines of a task's traceback or log shown for a failure
MAX_LISTED = 10  # skipped points listed on the console (the manifest has them all)


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def submit_points(points: Sequence[Point], sweep_dir: str, is_sweep: bool) -> int:
    """Everything after resolving: returns the exit code for the shell (0, 1 = a job failed, 2 = refused)."""
    label_points(points)
    valid = [p for p in points if p.valid]
    invalid = [p for p in points if not p.valid]
    if not valid:
        for p in invalid:
            prefix = f"point #{p.index} ({p.label}): " if is_sweep else ""
            print(f"error: {prefix}{p.error}", file=sys.stderr)
        print("error: nothing was submitted.", file=sys.stderr)
        return 2
    if invalid:
        print(f"skipping {len(invalid)} of {len(points)} points that do not validate (nothing of theirs is queued):")
        for p in invalid[:MAX_LISTED]:
            print(f"  #{p.index} {p.label}: {p.error}")
        if len(invalid) > MAX_LISTED:
            print(f"  ... and {len(invalid) - MAX_LISTED} more: all in {MANIFEST_FILE} and the sweep report")
    try:
        for cluster in _distinct([p.job.cluster for p in valid]):
            check_request(cluster)
    except ConfigError as e:
        print(f"error: {e}\nerror: nothing was submitted.", file=sys.stderr)
        return 2

    submission_dir = os.path.join(sweep_dir, ".submitit", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    code_dir = take_snapshot(os.path.join(submission_dir, "code"))
    for p in valid:
        stale_error = os.path.join(p.run_dir, ERROR_FILE)
        if os.path.exists(stale_error):
            os.remove(stale_error)
    try:
        jobs = _submit(valid, submission_dir, code_dir)
    except Exception as e:  # sbatch itself refused (the dry run passed, so the cluster changed meanwhile)
        print(
            f"error: submission failed: {e}\nFix: see `squeue --me` for anything queued, then retry.", file=sys.stderr
        )
        return 2
    for p, job in zip(valid, jobs):
        p.extra.update(job_id=job.job_id, stdout=_log_path(job, "stdout"), stderr=_log_path(job, "stderr"))
    manifest = write_manifest(sweep_dir, points, submission_dir) if is_sweep else ""
    _print_submitted(valid, jobs, submission_dir, is_sweep)
    if not all(p.job.cluster.blocking for p in valid):
        if manifest:
            print(f"sweep: {_show(manifest)}; when the jobs are done: python sweeps/report.py {_show(sweep_dir)}")
        return 0

    code = _wait_and_report(valid, jobs)
    if is_sweep:
        write_manifest(sweep_dir, points, submission_dir)
        print(f"report: python sweeps/report.py {_show(sweep_dir)}")
    return code


def _distinct(clusters: list) -> list:
    seen: dict[str, Any] = {}
    for c in clusters:
        seen.setdefault(json.dumps(asdict(c), sort_keys=True), c)
    return list(seen.values())


def _submit(valid: Sequence[Point], submission_dir: str, code_dir: str) -> list:
    """One job (or one job array) per distinct resource request; returns the jobs in `valid`'s order."""
    # lazy: submitit loads only when something is submitted
    import cloudpickle
    import submitit

    groups: dict[str, list[Point]] = {}
    for p in valid:
        groups.setdefault(json.dumps(asdict(p.job.cluster), sort_keys=True), []).append(p)
    entry = SnapshotEntry(code_dir)
    jobs: dict[int, Any] = {}
    for group in groups.values():
        cluster = group[0].job.cluster
        executor = submitit.AutoExecutor(
            folder=os.path.join(submission_dir, "%j"), cluster="slurm", slurm_max_num_timeout=cluster.max_num_timeout
        )
        executor.update_parameters(**submitit_parameters(cluster, group[0].job.job.name))
        payloads = [cloudpickle.dumps(SlurmTask(p.job)) for p in group]
        with pickled_by_value():
            if len(group) == 1:
                submitted = [executor.submit(entry, payloads[0])]
            else:
                submitted = executor.map_array(entry, payloads)
        jobs.update({p.index: job for p, job in zip(group, submitted)})
    return [jobs[p.index] for p in valid]


def _task_paths(job: Any, task: int) -> Any:
    # lazy: submitit loads only when something is submitted
    from submitit.core.utils import JobPaths

    return JobPaths(job.paths.folder, job_id=job.job_id, task_id=task)


def _log_path(job: Any, stream: str) -> str:
    return str(getattr(_task_paths(job, 0), stream))


def _print_submitted(valid: Sequence[Point], jobs: list, submission_dir: str, is_sweep: bool) -> None:
    cluster = valid[0].job.cluster
    print(
        f"submitted {len(jobs)} SLURM job(s) to partition {cluster.partition or '(the default)'} "
        f"({cluster.nodes} node(s) x {cluster.nproc_per_node} task(s)); code snapshot and logs: {_show(submission_dir)}"
    )
    for p, job in zip(valid, jobs):
        name = f"#{p.index} {p.label} " if is_sweep else ""
        print(f"  job {job.job_id}  {name}-> {_show(p.run_dir)}")
        print(f"      log: {_show(_log_path(job, 'stdout'))}  (errors: {_show(_log_path(job, 'stderr'))})")
    ids = sorted({job.job_id.split("_")[0] for job in jobs})
    print(
        f"follow: squeue -j {','.join(ids)}  |  tail -f {_show(_log_path(jobs[0], 'stdout'))}  |  sacct -j "
        f"{','.join(ids)}"
    )
    print(f"cancel: scancel {' '.join(ids)}")


def _wait_and_report(valid: Sequence[Point], jobs: list) -> int:
    print(f"waiting for {len(jobs)} job(s); Ctrl-C stops waiting, not the jobs", flush=True)
    pending = dict(enumerate(jobs))
    failed = 0
    try:
        while pending:
            for i, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[i]
                p = valid[i]
                status, error = job_outcome(job, p.job.world_size)
                p.extra.update(status=status, error=error)
                what = f"job {job.job_id} ({p.label})" if len(jobs) > 1 else f"job {job.job_id}"
                if status == "completed":
                    print(f"{what}: completed -> {_show(p.run_dir)}", flush=True)
                else:
                    failed += 1
                    print(f"error: {what} failed: {error}", file=sys.stderr, flush=True)
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        ids = " ".join(sorted({job.job_id.split("_")[0] for job in pending.values()}))
        print(f"\nstopped waiting; the jobs keep running (cancel: scancel {ids})", file=sys.stderr)
        return 130
    print(f"{len(jobs) - failed} of {len(jobs)} job(s) completed" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def job_outcome(job: Any, num_tasks: int) -> tuple[str, str]:
    """("completed", "") when every task returned, else ("failed", what went wrong)."""
    # lazy: submitit loads only when something is submitted
    from submitit.core.utils import pickle_load

    errors, silent = [], []
    for task in range(num_tasks):
        result = _task_paths(job, task).result_pickle
        if not result.exists():
            silent.append(task)
            continue
        outcome, value = pickle_load(result)
        if outcome == "error":
            errors.append((task, value))
    if not errors and not silent:
        return "completed", ""
    if errors:
        task, trace = errors[0]
        return (
            "failed",
            f"task {task} raised:\n{describe_trace(trace)}\nlog: {_show(str(_task_paths(job, task).stderr))}",
        )
    task = silent[0]
    log = str(_task_paths(job, task).stderr)
    tail = (
        subprocess.run(["tail", f"-{TRACE_LINES}", log], capture_output=True, text=True).stdout
        if os.path.exists(log)
        else ""
    )
    return "failed", (
        f"SLURM state {job.state}; task(s) {silent} returned no result. End of {_show(log)}:\n{tail.rstrip()}"
    )


def describe_trace(trace: str) -> str:
    """A user error (ConfigError) is its message, which says how to fix it; anything else, the traceback's end."""
    lines = trace.rstrip().splitlines()
    if lines and "ConfigError: " in lines[-1]:
        return "ConfigError: " + lines[-1].partition("ConfigError: ")[2]
    return "\n".join(lines[-TRACE_LINES:])
