"""Fault injection: what a hostile or unlucky user can do to a run, and what the run does about it.

    python sweeps/bench/faults.py [--out /tmp/faults] [--seed 0]

Each case starts real `launch.py` processes on a tiny model (CPU), does something bad to them (a kill at a
random moment, a signal, a corrupted checkpoint file, a second run of the same directory, a bad data
file, a changed model on resume), then prints one table row:

    case | exit code | first line of the message | traceback | data lost

"data lost" is yes when a checkpoint step that was complete before the case is gone or altered, or when
resuming after the fault does not reproduce the reference losses of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
    "model.multiple_of=32", "training.seq_len=32", "training.local_batch_size=4", "training.deterministic=true",
    "lr_scheduler.warmup_steps=2", "optimizer.lr=3e-3", "metrics.log_freq=1", "metrics.enable_aim=false",
    "checkpoint.interval=4", "checkpoint.keep_latest_k=0",
]
STEPS = 40


@dataclass
class Row:
    case: str
    code: int | None
    message: str
    traceback: bool
    lost: bool | None


class Lab:
    def __init__(self, root: Path, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.cache = root / "cache"
        self.references: dict[tuple[str, ...], dict[int, float]] = {}

    def reference(self, layout: tuple[str, ...] = ()) -> dict[int, float]:
        """The losses of an uninterrupted run in this parallel layout (layouts differ in the last bits)."""
        if layout not in self.references:
            name = "reference" + "".join(f"_{len(self.references)}" for _ in layout[:1])
            proc = self.run(self.args(name, *layout))
            assert proc.returncode == 0, proc.stderr[-3000:]
            self.references[layout] = self.losses(name)
        return self.references[layout]

    def args(self, name: str, *extra: str) -> list[str]:
        return [*TINY, f"training.steps={STEPS}", f"job.name={name}", f"data.cache_dir={self.cache}", *extra]

    def run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=self.root, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    start_new_session=True)

    def run_dir(self, name: str) -> Path:
        return self.root / "outputs" / name

    def losses(self, name: str) -> dict[int, float]:
        path = self.run_dir(name) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    def fresh_copy(self, name: str, source: str = "reference") -> None:
        shutil.rmtree(self.run_dir(name), ignore_errors=True)
        shutil.copytree(self.run_dir(source), self.run_dir(name), ignore=shutil.ignore_patterns(".run.lock*"))


def message(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("error", "stopped")):
            return line[:150]
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1][:150] if lines else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    """The complete step folders' files and their bytes."""
    files = {}
    for step in sorted(folder.glob("step-*")):
        if step.name.endswith(".partial"):
            continue
        for f in step.rglob("*"):
            if f.is_file():
                files[str(f.relative_to(folder))] = f.read_bytes()
    return files


def row_for(case: str, proc, lost: bool | None) -> Row:
    out = (proc.stdout or "") + (proc.stderr or "")
    return Row(case, proc.returncode, message(proc.stderr or out), "Traceback" in out, lost)


def resumes_exactly(lab: Lab, name: str, extra: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, bool]:
    """Rerun the same command to the end; True when every step's loss equals the reference's."""
    again = lab.run(lab.args(name, *extra))
    got, want = lab.losses(name), lab.reference(tuple(a for a in extra if a.startswith(("parallelism", "cluster"))))
    return again, again.returncode == 0 and all(got.get(s) == want[s] for s in want)


# ----------------------------------------------------------------------------- cases
def kill_at_random(lab: Lab, name: str, sig: signal.Signals, extra: tuple[str, ...] = (), twice: bool = False) -> Row:
    shutil.rmtree(lab.run_dir(name), ignore_errors=True)
    log = lab.root / f"{name}.log"
    proc = lab.start(lab.args(name, *extra), log)
    target = lab.rng.randint(2, STEPS - 8)  # a random moment: while step `target` (or its save) runs
    while not re.search(rf"step\s+{target} \|", log.read_text()) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(lab.rng.uniform(0.0, 0.1))
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        if twice:
            time.sleep(0.3)
            os.killpg(proc.pid, sig)
    code = proc.wait(120)
    first = log.read_text()
    again, exact = resumes_exactly(lab, name, extra)
    said = message(first) if code and code > 0 else f"(ended by {signal.Signals(-code).name})" if code else "(finished)"
    return Row(f"{sig.name}{' twice' if twice else ''} at step {target} {' '.join(extra)}".strip(), code, said,
               "Traceback" in first or "Traceback" in again.stderr, not exact)


def corrupt(lab: Lab, case: str, damage: Callable[[Path], None], *extra: str) -> Row:
    name = re.sub(r"\W+", "_", case)
    lab.fresh_copy(name)
    folder = lab.run_dir(name) / "checkpoint"
    # the run resumes from its latest step: make it the one at step 8 (so there are later steps to train)
    for step in folder.glob("step-*"):
        if int(step.name.split("-")[1]) > 8:
            shutil.rmtree(step)
    damage(folder)
    before = snapshot(folder)
    proc = lab.run(lab.args(name, *extra))
    after = snapshot(folder)
    lost = any(key not in after for key in before)  # a complete step the run did not write is gone
    return row_for(case, proc, lost)


def largest_shard(folder: Path, step: int = 8) -> Path:
    return max((folder / f"step-{step}").glob("*.distcp"), key=lambda p: p.stat().st_size)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def concurrent(lab: Lab) -> Row:
    """A long run, a second one of the same directory while it trains, then Ctrl-C of the first."""
    name = "concurrent"
    shutil.rmtree(lab.run_dir(name), ignore_errors=True)
    log = lab.root / "concurrent.log"
    first = lab.start(lab.args(name, "training.steps=100000"), log)
    while not re.search(r"step\s+2 \|", log.read_text()) and first.poll() is None:
        time.sleep(0.01)
    second = lab.run(lab.args(name, "optimizer.lr=5e-4"))
    os.killpg(first.pid, signal.SIGINT)
    first.wait(120)
    path = lab.run_dir(name) / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    lost = first.returncode != 130 or len(steps) != len(set(steps))  # one loss curve, stopped with its checkpoint
    return row_for("second run of a live run directory", second, lost)


def bad_data(lab: Lab, case: str, filename: str, content: bytes, *extra: str) -> Row:
    data = lab.root / "data" / filename
    data.parent.mkdir(exist_ok=True)
    data.write_bytes(content)
    name = re.sub(r"\W+", "_", case)
    proc = lab.run(lab.args(name, "data=local", f"data.data_files=[{data}]", *extra))
    return row_for(case, proc, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/pretrain-faults")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    root = Path(opts.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lab = Lab(root, opts.seed)
    lab.reference()
    other = root / "data" / "other.txt"
    other.parent.mkdir()
    other.write_text((REPO / "README.md").read_text())

    rows = [
        kill_at_random(lab, "kill9", signal.SIGKILL),
        kill_at_random(lab, "kill9_async", signal.SIGKILL, ("checkpoint.async_mode=async", "checkpoint.interval=2")),
        kill_at_random(lab, "sigint", signal.SIGINT),
        kill_at_random(lab, "sigterm", signal.SIGTERM),
        kill_at_random(lab, "sigint2", signal.SIGINT, twice=True),
        kill_at_random(lab, "kill9_2p", signal.SIGKILL, ("parallelism=fsdp", "cluster.nproc_per_node=2")),
        kill_at_random(lab, "sigterm_2p", signal.SIGTERM, ("parallelism=fsdp", "cluster.nproc_per_node=2")),
        kill_at_random(lab, "sigint_2p", signal.SIGINT, ("parallelism=fsdp", "cluster.nproc_per_node=2")),
        concurrent(lab),
        corrupt(lab, "one flipped byte in a .distcp shard", lambda f: flip_byte(largest_shard(f))),
        corrupt(lab, "truncated .distcp shard", lambda f: os.truncate(largest_shard(f), 100)),
        corrupt(lab, "latest step without .metadata", lambda f: (f / "step-8" / ".metadata").unlink()),
        corrupt(lab, "latest step folder emptied",
                lambda f: [p.unlink() for p in (f / "step-8").iterdir()]),
        corrupt(lab, "truncated train_state.json", lambda f: os.truncate(f / "step-8" / "train_state.json", 10)),
        corrupt(lab, "resume with model.n_layers=4", lambda f: None, "model.n_layers=4"),
        corrupt(lab, "resume with model.n_heads=8 (same shapes)", lambda f: None, "model.n_heads=8",
                "model.n_kv_heads=4"),
        corrupt(lab, "resume on another dataset", lambda f: None, "data=local", f"data.data_files=[{other}]"),
        bad_data(lab, "binary .jsonl", "bin.jsonl", os.urandom(4096)),
        bad_data(lab, "malformed .jsonl", "bad.jsonl", b'{"text": "fine"}\n{"text": oops\n'),
        bad_data(lab, "non-UTF-8 .txt", "latin.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 50),
        bad_data(lab, "numbers as text in .jsonl", "num.jsonl", b'{"text": 1}\n{"text": [1, 2]}\n' * 20),
        bad_data(lab, "missing text field", "field.jsonl", b'{"body": "no text key"}\n' * 20),
    ]
    for case, extra in (("unwritable job.dump_folder", "job.dump_folder=/proc/nope"),
                        ("training.seq_len=10000000", "training.seq_len=10000000")):
        rows.append(row_for(case, lab.run(lab.args(re.sub(r"\W+", "_", case), extra)), False))

    print("| case | exit code | first line of the message | traceback | data lost |")
    print("|---|---:|---|---|---|")
    for r in rows:
        lost = "n/a" if r.lost is None else "yes" if r.lost else "no"
        text = r.message.replace("|", "\\|").replace(str(root), "<out>")
        print(f"| {r.case} | {r.code} | {text} | {'yes' if r.traceback else 'no'} | {lost} |")


if __name__ == "__main__":
    main()
