"""Throughput features on one GPU (H100/H200), then the same settings through torchtitan 0.3.0.

Llama 3 with the 8B dims (model=llama3_8b) cut to `--layers` blocks (default 4: fits one 80 GB GPU
without activation checkpointing), seq 8192, local batch 1, the embedded corpus (no network; its
2048-piece tokenizer fits the 128256-row embedding), one process, bf16 autocast:

    bf16 eager | bf16 compile | compile + float8 tensorwise | compile + float8 rowwise | compile + selective op AC

Each point is a `launch.py` run of `--steps` steps; the first `--warmup` (compilation, autotuning,
allocator warm-up) are not timed. Reports steady tokens/s, MFU (from metrics.jsonl: torchtitan's
FLOPs/token over the bf16 dense peak, float8 points too), and peak memory (memory_gib: the caching
allocator's peak reserved; memory_active_gib: its peak of live tensors).

Then, if `import torchtitan.train` works, every point again through torchtitan 0.3.0 (see
`titan_notes()` for how it is set up and what differs), parsed from its log, side by side.

On the GPU machine (the wheels come from sweeps/bench/gpu_wheels.sh, run where there is network):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 sweeps/bench/bench_gpu.py                                    # all points, then torchtitan
    python3 sweeps/bench/bench_gpu.py --points eager,compile --no-torchtitan
    # print the commands (and torchtitan's config module)
    python3 sweeps/bench/bench_gpu.py --dry
Here, without a GPU:
    python sweeps/bench/bench_gpu.py --cpu-smoke                         # the pretrain points: debug model, CPU, fp32
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

from bench_gpu_titan import print_side_by_side, run_titan, titan_available
from bench_overhead import REPO, command_line, launch_command, machine_summary, run_launch, steady_state
from gpu_points import POINTS, Point

# ----------------------------------------------------------------------------------------------------
# pretrain


def embedded_tokenizer_path(create: bool) -> str:
    """The embedded corpus' 2048-piece tokenizer (the debug model's), trained and cached on first use."""
    from pretrain.config import DataConfig, ModelConfig

    data, model = DataConfig(), ModelConfig()
    if create:
        from pretrain.data.tokenizer import build_tokenizer

        return build_tokenizer(data, model).source
    from pretrain.data.tokenizer import tokenizer_cache_key

    name = tokenizer_cache_key(data, model.vocab_size) + ".model"
    return os.path.join(os.path.expanduser(data.cache_dir), "tokenizers", name)


def base_overrides(args, tokenizer_path: str) -> list[str]:
    common = [
        "data=embedded", f"training.seq_len={args.seq_len}", f"training.local_batch_size={args.batch}",
        f"training.steps={args.steps}", f"metrics.log_freq={args.warmup}", "checkpoint.enable=false",
        "metrics.enable_aim=false",
    ]
    if args.cpu_smoke:
        return ["model=llama3_debug", f"model.n_layers={args.layers}", "cluster.device=cpu", *common]
    return ["model=llama3_8b", f"model.n_layers={args.layers}", f"data.tokenizer_path={tokenizer_path}",
            "cluster.device=cuda", *common]


def float8_missing(point: Point) -> str:
    """Why a float8 point cannot run in this checkout, or ''."""
    if point.float8 and not os.path.exists(os.path.join(REPO, "conf", "float8", f"{point.float8}.yaml")):
        return f"skipped: conf/float8/{point.float8}.yaml does not exist in this checkout"
    return ""


def run_pretrain(points: list[Point], args, workdir: str) -> dict[str, dict]:
    results = {}
    tokenizer = embedded_tokenizer_path(create=not args.dry and not args.cpu_smoke)
    for point in points:
        overrides = [*base_overrides(args, tokenizer), *point.overrides]
        name = f"bench_gpu_{point.key}"
        if args.dry:
            print(f"cd {workdir} && " + " ".join(shlex.quote(c) for c in launch_command(overrides, name)))
            continue
        skip = float8_missing(point)
        if skip:
            results[point.key] = {"error": skip}
            continue
        result = run_launch(overrides, workdir, name, args.timeout)
        try:
            results[point.key] = steady_state(result.rows, args.warmup) if result.ok else {"error": result.error}
        except ValueError as e:
            results[point.key] = {"error": str(e)}
        results[point.key]["wall_s"] = result.wall_s
        r = results[point.key]
        print(f"  {point.label}: " + (f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else r["error"]),
              file=sys.stderr, flush=True)
    return results


def print_pretrain_table(points: list[Point], results: dict[str, dict], args) -> None:
    precision = "fp32 (CPU)" if args.cpu_smoke else "bf16 autocast"
    model = f"debug model, {args.layers} layers" if args.cpu_smoke else f"Llama 3 8B dims, {args.layers} layers"
    print(f"\n## pretrain: {model}, seq {args.seq_len}, local batch {args.batch}, {precision}, one process\n")
    peak = "the CPU's measured matmul peak" if args.cpu_smoke else "the bf16 dense peak (float8 points too)"
    print(f"{args.steps} steps, the first {args.warmup} not timed; MFU against {peak}\n")
    memory = "peak RSS GiB" if args.cpu_smoke else "peak reserved GiB"
    print(f"| point | tokens/s | MFU % | {memory} | peak active GiB | final loss | run s | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for p in points:
        r = results.get(p.key, {})
        if "tokens_per_s" not in r:
            print(f"| {p.label} | | | | | | {r.get('wall_s', 0):.0f} | {r.get('error', '')} |")
            continue
        active = f"{r['memory_active_gib']:.2f}" if "memory_active_gib" in r else "n/a"
        print(f"| {p.label} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1f} | {r['memory_gib']:.2f} | {active} | "
              f"{r['loss']:.4f} | {r['wall_s']:.0f} | |")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4; --cpu-smoke: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 8192 (--cpu-smoke: 128)")
    parser.add_argument("--batch", type=int, default=1, help="local batch size")
    parser.add_argument("--steps", type=int, default=None, help="steps per point (default 30; --cpu-smoke: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 10; --cpu-smoke: 2)")
    parser.add_argument("--points", default="", help=f"comma-separated subset of {', '.join(p.key for p in POINTS)}")
    parser.add_argument("--no-torchtitan", action="store_true", help="skip the torchtitan comparison")
    parser.add_argument("--titan-cuda-graphs", action="store_true",
                        help="torchtitan with its CUDA graphs (0.3.0's default)")
    parser.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the pretrain points with the debug model on CPU (no torchtitan)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (run dirs, torchtitan logs)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.layers = args.layers or (2 if smoke else 4)
    args.seq_len = args.seq_len or (128 if smoke else 8192)
    args.steps = args.steps or (4 if smoke else 30)
    args.warmup = args.warmup or (2 if smoke else 10)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be in [1, --steps)")
    keys = [k.strip() for k in args.points.split(",") if k.strip()]
    unknown = set(keys) - {p.key for p in POINTS}
    if unknown:
        parser.error(f"unknown --points {sorted(unknown)}; choose from {[p.key for p in POINTS]}")
    points = [p for p in POINTS if not keys or p.key in keys]

    if not args.dry:
        import torch

        if not smoke and not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on the GPU machine, or use --cpu-smoke / --dry here")
    title = "Throughput features on one GPU" + (" (CPU smoke run)" if smoke else "")
    print(f"# {title}\n\n- date: {time.strftime('%Y-%m-%d %H:%M')}\n- command: `{command_line()}`\n"
          + ("" if args.dry else f"- machine: {machine_summary()}\n"), flush=True)
    workdir = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        ours = run_pretrain(points, args, workdir)
        if not args.dry:
            print_pretrain_table(points, ours, args)
        if args.no_torchtitan:
            return
        if smoke:
            print("\ntorchtitan: skipped (--cpu-smoke; the comparison needs CUDA)")
            return
        ok, why = titan_available() if not args.dry else (True, "")
        if why:
            print(f"\ntorchtitan: {why}")
        if ok:
            try:
                titan = run_titan(points, args, workdir)
            except Exception as e:  # setting up its data, tokenizer or module; the pretrain table stands
                print(f"\ntorchtitan: not run: {type(e).__name__}: {e}")
                return
            if not args.dry:
                print_side_by_side(points, ours, titan, args)
    finally:
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
