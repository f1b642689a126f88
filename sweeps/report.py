"""Sweep report: a finished sweep directory -> a markdown table, a CSV and a PNG plot.

    python sweeps/report.py outputs/sweep_dp_degrees          # writes report.md, report.csv, report.png there

Per completed point, from its run directory's metrics.jsonl: tokens/s per device and MFU (medians
over the logged windows after the first, which holds the warm-up), peak memory (the largest logged),
final loss. Best first by tokens/s. Failed points are listed with their error, and points that
validate() refused before anything was queued with the reason.

The points come from the sweep's sweep.json (written when it was submitted to SLURM); without one,
every subdirectory holding a config.yaml is a point (a local `-m` sweep).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

from omegaconf import OmegaConf

MANIFEST = "sweep.json"  # pretrain.slurm.manifest.MANIFEST_FILE
ERROR_FILE = "error.txt"  # pretrain.slurm.task.ERROR_FILE
COLUMNS = ["rank", "point", "status", "tokens_per_s", "mfu", "memory_gib", "loss", "steps", "error", "run_dir"]


def read_points(sweep_dir: str) -> list[dict]:
    path = os.path.join(sweep_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["points"]
    points = []
    for root, _, files in sorted(os.walk(sweep_dir)):
        if "config.yaml" in files and ".submitit" not in root:
            rel = os.path.relpath(root, sweep_dir)
            points.append({"label": rel, "run_dir": root, "status": "queued", "error": ""})
    return points


def metrics_summary(run_dir: str) -> dict:
    """Medians of the steady windows, the peak memory, the last step and its loss; {} without metrics."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row  # a resumed run logs some steps again: the last line wins
    if not by_step:
        return {}
    rows = [by_step[s] for s in sorted(by_step)]
    steady = rows[1:] or rows
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "memory_gib": max(r.get("memory_gib", 0.0) for r in rows),
        "loss": rows[-1]["loss"],
        "steps": rows[-1]["step"],
    }


def planned_steps(run_dir: str) -> int | None:
    path = os.path.join(run_dir, "config.yaml")
    return OmegaConf.load(path).training.steps if os.path.exists(path) else None


def error_of(run_dir: str) -> str:
    """The exception line of the traceback a failed task left in the run directory."""
    path = os.path.join(run_dir, ERROR_FILE)
    if not os.path.exists(path):
        return ""
    lines = [line.strip() for line in open(path).read().splitlines() if line.strip()]
    return f"{lines[-1]} ({lines[0]})" if len(lines) > 1 else "".join(lines)


def classify(point: dict) -> dict:
    row = {"point": point["label"], "run_dir": point["run_dir"], "error": point.get("error", "")}
    if point["status"] == "skipped":
        return {**row, "status": "skipped"}
    summary = metrics_summary(point["run_dir"])
    row.update(summary)
    if point["status"] == "failed":
        return {**row, "status": "failed", "error": row["error"].strip().splitlines()[0] if row["error"] else "failed"}
    if summary and summary["steps"] == planned_steps(point["run_dir"]):
        return {**row, "status": "completed", "error": ""}
    error = error_of(point["run_dir"])
    if error:
        return {**row, "status": "failed", "error": error}
    where = f"job {point['job_id']}, log {point.get('stderr', '')}" if point.get("job_id") else "no job recorded"
    return {**row, "status": "unfinished", "error": f"no error recorded; still queued or running, or killed ({where})"}


def build_rows(points: list[dict]) -> list[dict]:
    rows = [classify(p) for p in points]
    completed = sorted((r for r in rows if r["status"] == "completed"), key=lambda r: -r["tokens_per_s"])
    for rank, row in enumerate(completed, 1):
        row["rank"] = rank
    order = {"failed": 0, "unfinished": 1, "skipped": 2}
    return completed + sorted((r for r in rows if r["status"] != "completed"), key=lambda r: order[r["status"]])


def to_markdown(sweep_dir: str, rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed", "unfinished", "skipped")}
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(rows)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
        "tokens/s is per device and MFU is against the peak named in each run's log (torchtitan's definitions); "
        "both are medians over the logged windows after the first.",
        "",
        "| # | point | tokens/s | MFU % | peak memory GiB | final loss | steps |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] == "completed":
            lines.append(
                f"| {r['rank']} | `{r['point']}` | {r['tokens_per_s']:,.0f} | {r['mfu']:.1f} | "
                f"{r['memory_gib']:.2f} | {r['loss']:.4f} | {r['steps']} |"
            )
    for status, title in (
        ("failed", "Failed"),
        ("unfinished", "Unfinished"),
        ("skipped", "Skipped: refused by validate() before anything was queued"),
    ):
        listed = [r for r in rows if r["status"] == status]
        if listed:
            lines += ["", f"## {title}", ""]
            lines += [f"- `{r['point']}`: {r['error']}" for r in listed]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """Three panels (tokens/s, MFU, peak memory), one bar per completed point, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed"]
    labels = [r["point"] if len(r["point"]) <= 60 else r["point"][:57] + "..." for r in done]
    fig, axes = plt.subplots(1, 3, figsize=(15, 1.5 + 0.45 * max(1, len(done))), sharey=True)
    panels = (("tokens_per_s", "tokens/s per device"), ("mfu", "MFU %"), ("memory_gib", "peak memory GiB"))
    for ax, (key, name) in zip(axes, panels):
        ax.barh(range(len(done)), [r[key] for r in done], color="tab:blue")
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(done)), labels)
    axes[0].invert_yaxis()  # best first, at the top
    if not done:
        axes[1].text(0.5, 0.5, "no completed point", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="the sweep directory (outputs/<job.name>)")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir.rstrip("/")
    points = read_points(sweep_dir)
    if not points:
        message = f"error: {sweep_dir} holds no {MANIFEST} and no run directories. Fix: pass a sweep directory."
        print(message, file=sys.stderr)
        return 2
    rows = build_rows(points)
    markdown = to_markdown(sweep_dir, rows)
    with open(os.path.join(sweep_dir, "report.md"), "w") as f:
        f.write(markdown)
    write_csv(os.path.join(sweep_dir, "report.csv"), rows)
    write_plot(os.path.join(sweep_dir, "report.png"), rows, f"sweep {os.path.basename(os.path.abspath(sweep_dir))}")
    print(markdown)
    print(f"written: {', '.join(os.path.join(sweep_dir, n) for n in ('report.md', 'report.csv', 'report.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
