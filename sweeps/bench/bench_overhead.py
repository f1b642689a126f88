"""Platform overhead: tokens/s of `launch.py` vs a plain PyTorch loop (sweeps/bench/plain_loop.py) of the same
model (debug), batch, precision (fp32 on CPU) and compile setting, run alternately in one invocation so
both see the same machine state.

    python sweeps/bench/bench_overhead.py                      # seq 512 and 2048, 4096 tokens per step, eager
    python sweeps/bench/bench_overhead.py --compile            # both sides compiled (per block, fullgraph, + the loss)
    python sweeps/bench/bench_overhead.py --no-aim             # launch.py without Aim (on by default, as users run it)
    python sweeps/bench/bench_overhead.py --rounds 1 --steps 4 --warmup 2 --seq-lens 64 --tokens-per-step 128   # smoke

Batch: every sequence length gets the same tokens per step (`--tokens-per-step`, default 4096, so
batch 8 at seq 512 and batch 2 at seq 2048), which keeps a seq-2048 round as long as a seq-512 one
(the debug model does ~2-3k tok/s on 2 cores); `--batch N` fixes the batch for all lengths instead.

Steady state only: the first `--warmup` steps (compilation, allocator and cache warm-up) are not
timed on either side. launch.py's tokens/s is taken from its metrics.jsonl (tokens and elapsed time
between the logged step `--warmup` and the last step, logging included); the plain loop times the
same steps itself. Prints a markdown table: medians over the rounds, their ratio (launch.py / plain,
target >= 0.97) and each side's spread (min-max over rounds).

The helpers below (run_launch, steady_state, machine_summary) are shared with bench_features_cpu.py
and bench_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------------
# shared by the benchmarks


@dataclass
class LaunchResult:
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, one object per logged step (by step)
    returncode: int = 0
    error: str = ""  # the last lines of stderr when the run failed
    wall_s: float = 0.0  # the subprocess' wall time, start-up and compilation included

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.rows)


def repo_env(extra: Optional[dict] = None) -> dict:
    """The environment for a subprocess that imports `pretrain` from this checkout (installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def launch_command(overrides: list[str], name: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "launch.py"), f"job.name={name}", *overrides]


def error_summary(stderr: str, lines: int = 3) -> str:
    """The last few non-empty lines of a failed run's stderr, joined on one line."""
    tail = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return " | ".join(tail[-lines:]) or "no error output"


def run_launch(overrides: list[str], workdir: str, name: str, timeout: Optional[float] = None) -> LaunchResult:
    """Run `launch.py job.name=<name> <overrides>` with `workdir` as cwd (so outputs/ lands there) and
    return its metrics. The run directory is removed first: every call is a fresh run, never a resume."""
    run_dir = os.path.join(workdir, "outputs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            launch_command(overrides, name), cwd=workdir, env=repo_env(), capture_output=True, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return LaunchResult(returncode=124, error=f"timed out after {timeout:.0f}s: {error_summary(stderr)}",
                            wall_s=time.perf_counter() - start)
    result = LaunchResult(returncode=proc.returncode, wall_s=time.perf_counter() - start)
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        by_step = {}
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_step[row["step"]] = row
        result.rows = [by_step[s] for s in sorted(by_step)]
    if proc.returncode or not result.rows:
        result.error = error_summary(proc.stderr) if proc.returncode else "no metrics.jsonl written"
    return result


def steady_state(rows: list[dict], warmup: int) -> dict:
    """Throughput over the steps after `warmup`, from the logged row at step `warmup` to the last row:
    tokens (tokens_seen) over wall time (elapsed_s), so the time spent logging in between counts.
    One process: tokens/s per device = tokens/s. MFU scales the same way (mfu / tokens_per_s of a row
    is FLOPs/token over the peak). Memory: the largest logged value (peak since the start).
    Needs a logged row at step <= warmup (log with metrics.log_freq=warmup) and one after it."""
    base = [r for r in rows if r["step"] <= warmup]
    if not base or rows[-1]["step"] <= base[-1]["step"]:
        raise ValueError(f"no logged steps after the warm-up ({warmup} steps); logged: {[r['step'] for r in rows]}")
    first, last = base[-1], rows[-1]
    tokens_per_s = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])
    out = {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * last["mfu"] / last["tokens_per_s"],
        "memory_gib": max(r.get("memory_gib", 0.0) for r in rows),
        "loss": last["loss"],
        "steps": last["step"] - first["step"],
    }
    if any("memory_active_gib" in r for r in rows):
        out["memory_active_gib"] = max(r.get("memory_active_gib", 0.0) for r in rows)
    return out


def machine_summary() -> str:
    """CPU model and cores, Python and torch versions (and the GPU, when one is visible)."""
    import torch

    from pretrain.components.peak_flops import cpu_model_name

    parts = [f"{cpu_model_name()}, {os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.insert(0, f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return "; ".join(parts)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------------
# the overhead benchmark


def launch_tokens_per_s(seq_len: int, batch: int, args, workdir: str) -> float:
    overrides = [
        "model=llama3_debug", "cluster.device=cpu", f"training.seq_len={seq_len}", f"training.local_batch_size={batch}",
        f"training.steps={args.steps}", f"metrics.log_freq={args.warmup}", "checkpoint.enable=false",
    ]
    if args.compile:
        overrides.append("compile.enable=true")
    if args.no_aim:
        overrides.append("metrics.enable_aim=false")
    result = run_launch(overrides, workdir, "bench_overhead")
    if not result.ok:
        command = " ".join(launch_command(overrides, "bench_overhead"))
        sys.exit(f"launch.py failed ({result.returncode}): {result.error}\n  {command}")
    return steady_state(result.rows, args.warmup)["tokens_per_s"]


def plain_tokens_per_s(seq_len: int, batch: int, args) -> float:
    cmd = [
        sys.executable, os.path.join(REPO, "sweeps", "bench", "plain_loop.py"),
        f"--seq-len={seq_len}", f"--batch={batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
    ]
    if args.compile:
        cmd.append("--compile")
    cmd.append(f"--tokens={args.plain_tokens}")
    proc = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"plain_loop.py failed ({proc.returncode}): {error_summary(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating launch.py / plain rounds per length")
    parser.add_argument("--plain-tokens", choices=("random", "embedded"), default="random",
                        help="the plain loop's tokens: random, or the embedded corpus launch.py trains on")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed (>= 1)")
    parser.add_argument("--seq-lens", default="512,2048", help="comma-separated sequence lengths")
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="batch = this / seq_len (at least 1)")
    parser.add_argument("--batch", type=int, default=None,
                        help="fixed batch for every length (overrides --tokens-per-step)")
    parser.add_argument("--compile", action="store_true",
                        help="compile.enable=true / per-block compile + compiled loss")
    parser.add_argument("--no-aim", action="store_true", help="launch.py with metrics.enable_aim=false")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps)")

    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-overhead-")
    print(f"# Platform overhead: launch.py vs a plain PyTorch loop\n\n"
          f"- date: {time.strftime('%Y-%m-%d %H:%M')}\n- command: `{command_line()}`\n- machine: {machine_summary()}\n"
          f"- debug model, one process, fp32, {'compiled' if args.compile else 'eager'}; "
          f"launch.py with Aim {'off' if args.no_aim else 'on'}, checkpoints off; "
          f"the plain loop on {args.plain_tokens} tokens\n"
          f"- {args.steps} steps per run, the first {args.warmup} not timed; {args.rounds} alternating rounds; "
          + (f"batch {args.batch}" if args.batch
             else f"{args.tokens_per_step} tokens per step (batch = tokens / seq_len)")
          + "\n", flush=True)
    print("| seq_len | batch | launch.py tok/s (median) | plain loop tok/s (median) | ratio "
          "| launch.py min-max | plain min-max |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    try:
        for seq_len in seq_lens:
            batch = args.batch or max(1, args.tokens_per_step // seq_len)
            ours, plain = [], []
            for r in range(args.rounds):  # alternate who goes first, so a drift of the machine hits both
                if r % 2 == 0:
                    ours.append(launch_tokens_per_s(seq_len, batch, args, workdir))
                    plain.append(plain_tokens_per_s(seq_len, batch, args))
                else:
                    plain.append(plain_tokens_per_s(seq_len, batch, args))
                    ours.append(launch_tokens_per_s(seq_len, batch, args, workdir))
            o, p = statistics.median(ours), statistics.median(plain)
            print(f"| {seq_len} | {batch} | {o:,.0f} | {p:,.0f} | {o / p:.3f} | {spread(ours)} | {spread(plain)} |",
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
