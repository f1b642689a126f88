"""How much of a `python launch.py` step at seq 2048 waits for its batch, streaming text vs a token store.

    python sweeps/bench/loader_share.py                  # ~1 minute on 2 cores; prints a markdown table
    python sweeps/bench/loader_share.py --steps 6 --local-batch 1

The default run (Llama 3 debug on the embedded corpus, one process) with training.seq_len=2048, read as text
(tokenized in the loader's background thread while the step computes) and from a token store of the same corpus
(prepared first, with the run's tokenizer). `data_wait_pct` of metrics.jsonl is the share of the training time the
trainer spent in the loader's next_step() (the rest of the loader's work runs in its thread, overlapped); the
first step (warm-up: the thread starts with it) is left out. Validation is off: it is not the loader of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (the first is left out)")
    parser.add_argument("--local-batch", type=int, default=2, help="sequences of 2048 tokens per step")
    parser.add_argument("--work-dir", default=None, help="where the store and runs go (default: a temp dir)")
    return parser.parse_args()


def run(args: list[str], cwd: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def steady_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "warmup" not in row]


def main() -> None:
    a = parse_args()
    work = a.work_dir or tempfile.mkdtemp(prefix="loader_share_")
    common = ["training.seq_len=2048", f"training.local_batch_size={a.local_batch}", f"training.steps={a.steps}",
              "metrics.log_freq=1", "metrics.enable_aim=false", "checkpoint.enable=false", "validation.enable=false",
              f"job.dump_folder={work}"]
    store = os.path.join(work, "store")
    run(["-m", "pretrain.data.prepare", "data.path=embedded", "--out", store], cwd=REPO)
    loaders = {"text stream (data=embedded)": ["job.name=text"],
               "token store (data=tokenized)": ["job.name=store", "data=tokenized", f"data.path={store}"]}
    print(f"`python launch.py` at seq 2048, local batch {a.local_batch}, {a.steps} steps, one process; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| loader | step (s, median) | waited for the batch (ms/step, median) | share of the step (%, max) |")
    print("|---|---|---|---|")
    for label, extra in loaders.items():
        run([os.path.join(REPO, "launch.py"), *common, *extra], cwd=work)
        rows = steady_rows(os.path.join(work, extra[0].split("=")[1]))
        step_s = statistics.median(2048 * a.local_batch / row["tokens_per_s"] for row in rows)
        wait_ms = statistics.median(row["data_wait_pct"] / 100 * 2048 * a.local_batch / row["tokens_per_s"] * 1e3
                                    for row in rows)
        print(f"| {label} | {step_s:.2f} | {wait_ms:.2f} | {max(row['data_wait_pct'] for row in rows):.3f} |")


if __name__ == "__main__":
    main()
