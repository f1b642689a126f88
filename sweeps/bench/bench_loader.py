"""What the data loader costs each rank per step, streaming text vs a token store, as the dp degree grows.

    python sweeps/bench/bench_loader.py                 # ~3 minutes on 2 cores; prints markdown tables
    python sweeps/bench/bench_loader.py --dps 1,8 --copies 4 --vocab 8192    # a quick look

The 8B recipe's local batch (2 sequences of 8192 tokens, no accumulation) on dp = 1, 8, 64, 512 ranks, each
simulated in this one process: the loader is given a dp rank (the middle one) and the dp degree, and its
next_step() is timed on the calling thread (data.prefetch_steps=0), i.e. the CPU work one rank does per step. The
streaming loader reads and tokenizes the whole global batch on every rank; the token store reads the rank's 2
windows. "Wait" is what the trainer waits in next_step() with prefetching on (data.prefetch_steps=2) when each
step computes for --step-s seconds (a sleep here, which holds no GIL; a real step holds it now and then).

The corpus is the embedded one repeated --copies times as a JSON Lines file (so the store holds at least one
global batch at dp=512), with a BPE of --vocab pieces trained on the embedded corpus. Prepare throughput is
measured on the same file with 1 and 2 processes, as `python -m pretrain.data.prepare` (the wall time of the
command, its start-up of ~3 s included: python, hydra, datasets' first load); the second store must equal the
first, byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from pretrain.config import DataConfig, ModelConfig
from pretrain.data.dataset import TokenWindowLoader
from pretrain.data.embedded import embedded_documents
from pretrain.data.store_loader import TokenStoreLoader
from pretrain.data.token_store import read_manifest
from pretrain.data.tokenizer import build_tokenizer

SEQ_LEN, LOCAL_BATCH = 8192, 2  # the 8B recipe (conf/experiment/llama3_8b.yaml)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dps", default="1,8,64,512", help="dp degrees to simulate")
    parser.add_argument("--copies", type=int, default=24, help="copies of the embedded corpus in the source file")
    parser.add_argument("--vocab", type=int, default=32000, help="pieces of the trained BPE")
    parser.add_argument("--step-s", type=float, default=1.0, help="simulated compute per step for the wait column")
    parser.add_argument("--budget-s", type=float, default=20.0, help="timing per loader and dp, at least one step")
    parser.add_argument("--work-dir", default=None, help="where the source and stores go (default: a temp dir)")
    return parser.parse_args()


def write_source(folder: str, copies: int, cache_dir: str) -> str:
    path = os.path.join(folder, "source.jsonl")
    docs = embedded_documents(cache_dir)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return path


def time_steps(loader, budget_s: float) -> tuple[float, int]:
    """Seconds per next_step() after a first one (which opens files), over at least one step and ~budget_s."""
    loader.next_step()
    steps, started = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - started < budget_s and steps < 20:
        loader.next_step()
        steps += 1
    return (time.perf_counter() - started) / steps, steps


def trainer_wait(loader, step_s: float, steps: int = 3) -> float:
    """Mean seconds next_step() blocks when each step computes for step_s, prefetching on."""
    loader.next_step()
    waited = 0.0
    for _ in range(steps):
        time.sleep(step_s)
        started = time.perf_counter()
        loader.next_step()
        waited += time.perf_counter() - started
    return waited / steps


def main() -> None:
    args = parse_args()
    dps = [int(d) for d in args.dps.split(",")]
    torch.set_num_threads(1)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_loader_")
    cache_dir = os.path.join(work, "cache")
    tokenizer = build_tokenizer(DataConfig(cache_dir=cache_dir), ModelConfig(vocab_size=args.vocab))
    source_file = write_source(work, args.copies, cache_dir)
    text = DataConfig(path="local", data_files=[source_file], tokenizer_path=tokenizer.source, cache_dir=cache_dir)
    mb = os.path.getsize(source_file) / 1e6

    print(f"## prepare: {mb:.0f} MB of JSON Lines, BPE {args.vocab} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)\n")
    print("| num_proc | seconds | tokens/s | MB/s |\n|---|---|---|---|")
    stores = {}
    for num_proc in (1, 2):
        # the command users run (its workers are spawned: from this script they would import torch again)
        out = os.path.join(work, f"store_{num_proc}")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "data=local", f"data.data_files=[{source_file}]",
                        f"data.tokenizer_path={tokenizer.source}", f"model.vocab_size={args.vocab}",
                        f"data.cache_dir={cache_dir}", "--out", out, "--num-proc", str(num_proc), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        stores[num_proc] = out
        manifest = read_manifest(out)
        print(f"| {num_proc} | {seconds:.1f} | {manifest['tokens'] / seconds:,.0f} | {mb / seconds:.1f} |", flush=True)
    same = all(filecmp.cmp(os.path.join(stores[1], n), os.path.join(stores[2], n), shallow=False)
               for n in os.listdir(stores[1]) if n.endswith(".bin"))
    print(f"\n{manifest['tokens']:,} tokens, {manifest['documents']:,} documents; stores of 1 and 2 processes "
          f"identical: {same}\n")

    store = DataConfig(path=stores[1], format="tokenized", shuffle=True, tokenizer_path=tokenizer.source)
    print(f"## loader: local batch {LOCAL_BATCH} x seq {SEQ_LEN}, cost per step on one rank (the middle one); "
          f"wait with prefetch 2 and {args.step_s:g} s steps\n")
    print("| dp | global batch tokens | streaming ms/step | token store ms/step | streaming wait ms | "
          "token store wait ms |\n|---|---|---|---|---|---|")
    for dp in dps:
        shape = (SEQ_LEN, LOCAL_BATCH, LOCAL_BATCH * dp, dp // 2, dp)
        row = [f"{dp}", f"{LOCAL_BATCH * dp * SEQ_LEN:,}"]
        waits = []
        for data in (text, store):
            cls = TokenStoreLoader if data is store else TokenWindowLoader
            inline = DataConfig(**{**vars(data), "prefetch_steps": 0})
            per_step, steps = time_steps(cls(inline, tokenizer, *shape), args.budget_s)
            row.append(f"{per_step * 1e3:,.1f}" + (f" ({steps} step{'s' * (steps > 1)})" if steps < 5 else ""))
            if per_step < args.step_s:
                waits.append(f"{trainer_wait(cls(data, tokenizer, *shape), args.step_s) * 1e3:,.2f}")
            else:
                waits.append(f"not measured: ~{per_step - args.step_s:,.1f} s (slower than a step)")
        print("| " + " | ".join(row + waits) + " |", flush=True)


if __name__ == "__main__":
    main()
