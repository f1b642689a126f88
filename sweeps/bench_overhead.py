"""Platform overhead: tokens/s of `launch.py` vs a plain PyTorch loop of the same model, batch and
precision (fp32 on CPU), run alternately in one invocation so both see the same machine state.

    python sweeps/bench_overhead.py [--rounds 3] [--steps 40] [--seq-lens 256,512] [--batch 8]

launch.py's tokens/s is read from metrics.jsonl over the steps after the first log window
(warm-up), the plain loop's over the same number of steps after the same warm-up.
Prints a markdown table; the ratio is launch.py / plain (target >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_launch(seq_len: int, batch: int, steps: int, warmup: int, workdir: str) -> float:
    run_dir = os.path.join(workdir, "outputs", "bench")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable, os.path.join(REPO, "launch.py"), "job.name=bench",
        f"training.seq_len={seq_len}", f"training.local_batch_size={batch}", f"training.steps={steps}",
        f"metrics.log_freq={warmup}", "checkpoint.enable=false",
    ]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"launch.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # each row's tokens_per_s covers the steps since the previous row; skip windows within the warm-up
    tokens = seconds = 0.0
    for prev, row in zip(rows, rows[1:]):
        if row["step"] > warmup:
            window = (row["step"] - prev["step"]) * batch * seq_len
            tokens += window
            seconds += window / row["tokens_per_s"]
    return tokens / seconds


def run_plain(seq_len: int, batch: int, steps: int, warmup: int) -> float:
    cmd = [
        sys.executable, os.path.join(REPO, "sweeps", "plain_loop.py"),
        f"--seq-len={seq_len}", f"--batch={batch}", f"--steps={steps}", f"--warmup={warmup}",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-lens", default="256,512")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-overhead-")
    print(f"# platform overhead, debug model, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.rounds} alternating rounds, {time.strftime('%Y-%m-%d')}\n")
    print("| seq_len | launch.py tok/s (median) | plain loop tok/s (median) | ratio |")
    print("|---:|---:|---:|---:|")
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        ours, plain = [], []
        for _ in range(args.rounds):
            ours.append(run_launch(seq_len, args.batch, args.steps, args.warmup, workdir))
            plain.append(run_plain(seq_len, args.batch, args.steps, args.warmup))
        o, p = statistics.median(ours), statistics.median(plain)
        print(f"| {seq_len} | {o:,.0f} | {p:,.0f} | {o / p:.3f} |", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
