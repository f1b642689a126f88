"""Throughput features on CPU, one process, the debug model, each point a `launch.py` run:

1. eager vs compile x activation checkpointing (none, full, selective op, selective every 2nd block;
   memory_budget 0.5 with compile only: it is the compiler's partitioner): steady tokens/s and peak RSS;
2. float8 numerics: the loss curve over `--float8-steps` steps for float8=off, tensorwise and rowwise
   (emulated on CPU: float8 rounding, float32 matmuls), with the largest and the final relative loss
   difference against off.

    python sweeps/bench/bench_features_cpu.py
    python sweeps/bench/bench_features_cpu.py --seq-len 256 --batch 8 --steps 30 --warmup 5
    # a subset (substring of the point name)
    python sweeps/bench/bench_features_cpu.py --only eager --float8-steps 0
    python sweeps/bench/bench_features_cpu.py --seq-len 32 --batch 2 --steps 4 --warmup 2 --float8-steps 3 --only none

tokens/s: steady state, from metrics.jsonl between the logged step `--warmup` and the last one
(compilation happens in the warm-up). Peak memory is `memory_gib` of metrics.jsonl, the process' peak
RSS on CPU: it includes Python, the data pipeline and, for compiled points, the compiler's own memory
(inductor compiles in this process), so it shows activation savings only where they outweigh that.
Aim and checkpoints are off (they are not what is measured here). A point that fails (a feature not
available in this build, say) is listed with its error; the others still run. Prints markdown tables
with the date, the command and the machine.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time

from bench_overhead import command_line, machine_summary, run_launch, steady_state

AC_POINTS = [  # (label, overrides)
    ("none", []),
    ("full", ["activation_checkpoint.mode=full"]),
    ("selective op", ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_ac_option=op"]),
    ("selective 2", ["activation_checkpoint.mode=selective", "activation_checkpoint.selective_ac_option=2"]),
]
MEMORY_BUDGET = (
    "memory_budget 0.5", ["activation_checkpoint.mode=memory_budget", "activation_checkpoint.memory_budget=0.5"]
)
FLOAT8_RECIPES = ["off", "tensorwise", "rowwise"]


def feature_points() -> list[tuple[str, str, list[str]]]:
    """(compile label, AC label, overrides): eager and compiled for every AC mode; memory_budget compiled only."""
    points = [("eager", ac, overrides) for ac, overrides in AC_POINTS]
    points += [("compile", ac, ["compile.enable=true", *overrides]) for ac, overrides in [*AC_POINTS, MEMORY_BUDGET]]
    return points


def base_overrides(args, steps: int, log_freq: int) -> list[str]:
    return [
        "model=llama3_debug", "cluster.device=cpu", f"training.seq_len={args.seq_len}",
        f"training.local_batch_size={args.batch}", f"training.steps={steps}", f"metrics.log_freq={log_freq}",
        "checkpoint.enable=false", "metrics.enable_aim=false", "training.seed=0",
    ]


def selected(name: str, only: list[str]) -> bool:
    return not only or any(o in name for o in only)


def run_features(args, workdir: str) -> None:
    print("## Compile x activation checkpointing\n")
    print(f"debug model, seq {args.seq_len}, batch {args.batch}, fp32, {args.steps} steps (the first {args.warmup} "
          "not timed), one process\n")
    print("| compile | activation checkpointing | tokens/s | MFU % | peak RSS GiB | final loss | run s | error |")
    print("|---|---|---:|---:|---:|---:|---:|---|", flush=True)
    for compile_label, ac_label, overrides in feature_points():
        if not selected(f"{compile_label} {ac_label}", args.only):
            continue
        name = f"features_{compile_label}_{ac_label.replace(' ', '_').replace('.', '')}"
        result = run_launch([*base_overrides(args, args.steps, args.warmup), *overrides], workdir, name, args.timeout)
        try:
            if not result.ok:
                raise ValueError(result.error)
            s = steady_state(result.rows, args.warmup)
        except ValueError as e:
            print(f"| {compile_label} | {ac_label} | | | | | {result.wall_s:.0f} | {e} |", flush=True)
            continue
        print(f"| {compile_label} | {ac_label} | {s['tokens_per_s']:,.0f} | {s['mfu']:.1f} | {s['memory_gib']:.2f} | "
              f"{s['loss']:.4f} | {result.wall_s:.0f} | |", flush=True)


def run_float8(args, workdir: str) -> None:
    print(f"\n## Float8 numerics: loss vs float8=off over {args.float8_steps} steps\n")
    mode = "compiled" if args.float8_compile else "eager"
    print(f"debug model, seq {args.seq_len}, batch {args.batch}, same seed and data, {mode}; float8 emulated on CPU "
          "(operands rounded to float8 as on the GPU, float32 matmuls); the output layer stays in high precision "
          "(float8.filter_fqns default)\n", flush=True)
    extra = ["compile.enable=true"] if args.float8_compile else []
    curves: dict[str, dict[int, float]] = {}
    errors: dict[str, str] = {}
    for recipe in FLOAT8_RECIPES:
        overrides = [*base_overrides(args, args.float8_steps, 1), f"float8={recipe}", *extra]
        result = run_launch(overrides, workdir, f"float8_{recipe}", args.timeout)
        if result.ok:
            curves[recipe] = {r["step"]: r["loss"] for r in result.rows}
        else:
            errors[recipe] = result.error
    print("| float8 | final loss | max relative loss difference vs off | final relative difference vs off | error |")
    print("|---|---:|---:|---:|---|")
    off = curves.get("off")
    for recipe in FLOAT8_RECIPES:
        if recipe in errors:
            print(f"| {recipe} | | | | {errors[recipe]} |")
            continue
        curve = curves[recipe]
        last = max(curve)
        if off is None or recipe == "off":
            note = "" if off is not None else "float8=off failed: no reference"
            print(f"| {recipe} | {curve[last]:.4f} | | | {note} |")
            continue
        rel = {s: abs(curve[s] - off[s]) / abs(off[s]) for s in curve if s in off}
        worst = max(rel, key=rel.get)
        final = rel.get(last, float("nan"))
        print(f"| {recipe} | {curve[last]:.4f} | {rel[worst]:.2e} (step {worst}) | {final:.2e} | |")
    if curves:
        steps = sorted(set().union(*curves.values()))
        shown = sorted({s for s in steps if s in (1, steps[-1]) or s % max(1, len(steps) // 5) == 0})
        names = [r for r in FLOAT8_RECIPES if r in curves]
        print("\nloss at some steps:\n")
        print("| step | " + " | ".join(names) + " |")
        print("|---:|" + "---:|" * len(names))
        for s in shown:
            print(f"| {s} | " + " | ".join(f"{curves[n][s]:.4f}" if s in curves[n] else "" for n in names) + " |")
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", *names])
                for s in steps:
                    writer.writerow([s, *(curves[n].get(s, "") for n in names)])
            print(f"\nfull curves: {args.csv}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per compile/AC point")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed (>= 1)")
    parser.add_argument("--float8-steps", type=int, default=50, help="steps of each float8 loss curve; 0 = skip")
    parser.add_argument("--float8-compile", action="store_true", help="float8 curves with compile.enable=true")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings of point names ('eager', 'compile none', ...); '' = all")
    parser.add_argument("--skip-features", action="store_true", help="only the float8 curves")
    parser.add_argument("--csv", default="", help="also write the float8 loss curves to this CSV")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per launch.py run")
    args = parser.parse_args()
    args.only = [o.strip() for o in args.only.split(",") if o.strip()]
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps)")

    print(f"# Throughput features on CPU\n\n- date: {time.strftime('%Y-%m-%d %H:%M')}\n- command: `{command_line()}`\n"
          f"- machine: {machine_summary()}\n", flush=True)
    workdir = tempfile.mkdtemp(prefix="bench-features-")
    try:
        if not args.skip_features:
            run_features(args, workdir)
        if args.float8_steps > 0:
            run_float8(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
