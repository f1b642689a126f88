"""What checkpoint checksums cost: hashes compared in memory, then the real code (pretrain/checkpoint/integrity.py)
on a real DCP step folder, next to the save and the load it adds to, and the training thread's speed while a
background thread hashes (as it does after an async save).

    python sweeps/bench/checksum_cost.py                    # a 1 GiB checkpoint, 256 MiB in memory, 3 rounds
    python sweeps/bench/checksum_cost.py --gib 4 --rounds 5 --dir /scratch/bench
    python sweeps/bench/checksum_cost.py --gib 0.1 --mib 32 --rounds 1 --matmul-s 1     # smoke

1. GiB/s of each hash over one buffer in memory, read in 8 MiB pieces as integrity.py reads files: zlib.crc32
   (the one used), zlib.adler32, hashlib's blake2b, sha256 and sha1, and xxhash's xxh3_64 where installed (a
   dependency of `datasets`, not of ours).
2. On one process, a state dict of float32 tensors of `--gib` written with dcp.save and read back with dcp.load
   (seconds per GiB), and integrity.py's work: hashing the files just written (each rank does this for its own
   shards after a save) and verifying them before a load (sizes, then checksums). Files are read from the page
   cache, as they are right after a save; a verify of a cold checkpoint reads at the disk's speed instead.
3. A matmul loop on the main thread (the training thread's stand-in), alone and while a background thread hashes
   the checkpoint over and over, with torch using every core and then one core less: zlib releases the GIL on
   large buffers, so what remains is the competition for cores (a GPU run's training thread mostly waits on the
   GPU and leaves the cores free).

Prints markdown tables with the date, the command and the machine; medians over `--rounds`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
import zlib

from bench_overhead import command_line, machine_summary

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pretrain.checkpoint import integrity  # noqa: E402

CHUNK = 8 << 20


def hashers() -> dict:
    """name -> function(memoryview) -> digest, reading in CHUNK pieces."""

    def running(update):
        def run(view):
            value = 0
            for start in range(0, len(view), CHUNK):
                value = update(view[start : start + CHUNK], value)
            return value
        return run

    def incremental(make):
        def run(view):
            h = make()
            for start in range(0, len(view), CHUNK):
                h.update(view[start : start + CHUNK])
            return h.digest()
        return run

    found = {"crc32 (used)": running(zlib.crc32), "adler32": running(zlib.adler32)}
    for name in ("blake2b", "sha256", "sha1"):
        found[name] = incremental(getattr(hashlib, name))
    try:
        import xxhash

        found["xxh3_64"] = incremental(xxhash.xxh3_64)
    except ImportError:
        pass
    return found


def in_memory(mib: int, rounds: int) -> list[tuple[str, float]]:
    view = memoryview(os.urandom(mib << 20))
    rows = []
    for name, run in hashers().items():
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run(view)
            times.append(time.perf_counter() - start)
        rows.append((name, (mib / 1024) / statistics.median(times)))
    return rows


def on_a_checkpoint(gib: float, rounds: int, folder: str) -> dict[str, float]:
    """Seconds per GiB of dcp.save, hashing what it wrote, verifying it, dcp.load (medians)."""
    import torch
    import torch.distributed.checkpoint as dcp

    numel = int(gib * (1 << 30) / 4)
    pieces = 16  # tensors of a model's size classes do not matter here: DCP writes one file per rank
    state = {f"w{i}": torch.randn(numel // pieces) for i in range(pieces)}
    size_gib = sum(t.numel() * 4 for t in state.values()) / (1 << 30)
    times: dict[str, list[float]] = {"save": [], "hash after save": [], "verify before load": [], "load": []}
    for round_ in range(rounds):
        path = os.path.join(folder, f"step-{round_}")
        with warnings.catch_warnings():  # "torch.distributed is disabled": one process, on purpose
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            dcp.save(state, checkpoint_id=path)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            files = integrity.hash_files(path, sorted(os.listdir(path)))
            times["hash after save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            problems = integrity.size_problems(path, files) or integrity.checksum_problems(path, files, sorted(files))
            times["verify before load"].append(time.perf_counter() - start)
            assert not problems, problems
            loaded = {k: torch.empty_like(v) for k, v in state.items()}
            start = time.perf_counter()
            dcp.load(loaded, checkpoint_id=path)
            times["load"].append(time.perf_counter() - start)
        if round_ < rounds - 1:
            shutil.rmtree(path)
    return {what: statistics.median(ts) / size_gib for what, ts in times.items()}


def training_thread(folder: str, seconds: float, threads: int) -> tuple[float, float, float]:
    """With `threads` torch threads: (matmuls/s alone, matmuls/s while a thread hashes the checkpoint, the hash's
    GiB/s meanwhile)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 512)

    def matmuls_per_s() -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ a
            count += 1
        return count / (time.perf_counter() - start)

    step = sorted(n for n in os.listdir(folder) if n.startswith("step-"))[-1]
    path = os.path.join(folder, step)
    names = sorted(os.listdir(path))
    alone = matmuls_per_s()
    stop, hashed = threading.Event(), [0]

    def hash_forever():
        while not stop.is_set():
            for name in names:
                hashed[0] += integrity.file_checksum(os.path.join(path, name))["size"]

    worker = threading.Thread(target=hash_forever, daemon=True)
    start = time.perf_counter()
    worker.start()
    shared = matmuls_per_s()
    stop.set()
    worker.join()
    return alone, shared, hashed[0] / (1 << 30) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the checkpoint written and read")
    parser.add_argument("--mib", type=int, default=256, help="size of the in-memory buffer hashed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matmul-s", type=float, default=5.0, help="seconds of each matmul loop")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="checksum_cost_", dir=args.dir)
    try:
        print(f"{command_line()}\n\n{machine_summary()}; {time.strftime('%Y-%m-%d')}\n")
        print(f"Hashes in memory ({args.mib} MiB, {CHUNK >> 20} MiB pieces, median of {args.rounds}):\n")
        print("| hash | GiB/s |\n|---|---:|")
        for name, speed in in_memory(args.mib, args.rounds):
            print(f"| {name} | {speed:.2f} |")
        cost = on_a_checkpoint(args.gib, args.rounds, folder)
        print(f"\nA {args.gib:g} GiB DCP checkpoint on one process (seconds per GiB, median of {args.rounds}; "
              "files in the page cache):\n")
        print("| step | s/GiB | vs save | vs load |\n|---|---:|---:|---:|")
        for what, seconds in cost.items():
            print(f"| {what} | {seconds:.3f} | {100 * seconds / cost['save']:.0f}% | "
                  f"{100 * seconds / cost['load']:.0f}% |")
        import torch

        cores = torch.get_num_threads()
        print("\nThe training thread (512x512 float32 matmuls) while a background thread hashes the checkpoint:\n")
        print("| torch threads | matmuls/s alone | with a hashing thread | background hash GiB/s |")
        print("|---:|---:|---:|---:|")
        for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
            alone, shared, hash_speed = training_thread(folder, args.matmul_s, threads)
            print(f"| {threads} | {alone:,.0f} | {shared:,.0f} ({100 * shared / alone:.0f}%) | {hash_speed:.2f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
