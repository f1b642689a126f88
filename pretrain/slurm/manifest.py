"""sweep.json: what a sweep submitted, kept in its sweep directory for `sweeps/report.py`.

    {"submitted": "2026-11-25 18:51:33", "submission_dir": ".../.submitit/<stamp>",
     "points": [{"index": 0, "overrides": [...], "label": "parallelism.tensor_parallel_degree=2",
                 "run_dir": "...", "status": "skipped|queued|completed|failed", "error": "...",
                 "job_id": "12_0", "stdout": "...", "stderr": "..."}, ...]}

`status` is `queued` until a blocking submission has seen the job end; the report then reads the
run directory itself (metrics.jsonl, error.txt).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from pretrain.slurm.points import Point

MANIFEST_FILE = "sweep.json"


def point_record(point: Point) -> dict:
    record = {
        "index": point.index,
        "overrides": point.overrides,
        "label": point.label,
        "run_dir": point.run_dir,
        "status": "queued" if point.valid else "skipped",
        "error": point.error,
    }
    record.update(point.extra)
    return record


def write_manifest(sweep_dir: str, points: Sequence[Point], submission_dir: str) -> str:
    manifest = {
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "submission_dir": submission_dir,
        "points": [point_record(p) for p in points],
    }
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return path


def read_manifest(sweep_dir: str) -> dict:
    with open(os.path.join(sweep_dir, MANIFEST_FILE)) as f:
        return json.load(f)
