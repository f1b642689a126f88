"""Fuzz the command line. Seeded random INVALID override sets (tests/fuzz_cases.py) must be refused by
`python launch.py` the way a user should see it: a non-zero exit, a short message that names the key (or
the unknown option), no traceback, nothing written. Random VALID sets must compose and validate.

The seed is in every test id and the command line in every failure, so
`PRETRAIN_FUZZ_SEED=<seed> python -m pytest tests/test_config_fuzz.py -k <id>` replays one.

launch.py runs in this process (a subprocess costs 2-3 s): its Hydra main with sys.argv set, in a fresh
directory, output captured, SystemExit caught. pretrain.launcher.launch, the dry run and the SLURM
submission are replaced by a guard, so a set that validates by mistake fails its test and starts nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import sys
import types
from pathlib import Path

import pytest
from fuzz_cases import CHOICES, COUNTS, FREE, LEAVES, PATHS, RANGES, SEED, SLURM, VALID, invalid_cases
from helpers import REPO, compose
from hydra.core.global_hydra import GlobalHydra

from pretrain.config import resolve

MAX_LINES = 8  # of a refusal, not counting the tab-indented list of available options Hydra adds

# Each case composes (and validates) in this process, ~0.35 s on 2 cores: all ~250 take ~90 s. The quick tier
# (-m "not slow") keeps the first cases of every kind; the whole set runs with the slow tier.
QUICK_PER_KIND = 2


def sampled(cases: list[tuple[str, object]]) -> list:
    """pytest params of (id, value) pairs, the ones past the first QUICK_PER_KIND of their kind marked slow."""
    seen: dict[str, int] = {}
    params = []
    for case_id, value in cases:
        kind = case_id.split("-", 2)[2]
        seen[kind] = seen.get(kind, 0) + 1
        marks = [pytest.mark.slow] if seen[kind] > QUICK_PER_KIND else []
        params.append(pytest.param(value, id=case_id, marks=marks))
    return params

# ------------------------------------------------------------------------------------------- running launch.py


class Accepted(BaseException):
    """Raised where a run would start (a BaseException, so Hydra does not turn it into an error message)."""


class NotRefused(AssertionError):
    """An invalid set validated: launch.py would have started a run."""


@pytest.fixture(scope="module")
def launch_main():
    spec = importlib.util.spec_from_file_location("launch_under_test", REPO / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def guarded(monkeypatch):
    """Nothing can start: the local launcher, the dry run and SLURM submission of a valid point raise Accepted."""
    import pretrain.launcher
    import pretrain.slurm.hydra_launcher as slurm_launcher

    def accepted(*args, **kwargs):
        raise Accepted()

    real_submit = slurm_launcher.submit_points

    def submit_points(points, *args, **kwargs):
        if any(p.valid for p in points):
            raise Accepted()
        return real_submit(points, *args, **kwargs)  # all refused: prints the reasons, queues nothing

    monkeypatch.setattr(pretrain.launcher, "launch", accepted)
    monkeypatch.setattr(slurm_launcher, "submit_points", submit_points)
    monkeypatch.setitem(sys.modules, "pretrain.dry_run", types.SimpleNamespace(dry_run=accepted))
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")  # Hydra finds conf/ next to launch.py, as for the script
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def run_launch(main, args: tuple[str, ...], monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["launch.py", *args])
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    return code, out.getvalue()


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): ("dir",) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def written(before: dict, after: dict) -> list[str]:
    """Paths created, changed or removed."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def prepare(cwd: Path, files: tuple[str, ...], previous_run: bool) -> None:
    for rel in files:
        (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / rel).write_text('{"text": "hello world"}\n')
    if previous_run:  # a run of the default job.name that a refused command must leave alone
        step = cwd / "outputs" / "default" / "checkpoint" / "step-5"
        step.mkdir(parents=True)
        (step / "train_state.json").write_text("{}")
        (cwd / "outputs" / "default" / "metrics.jsonl").write_text("{}\n")




# ------------------------------------------------------------------------------------------- tests


def test_every_field_is_classified():
    keys = {leaf.key for leaf in LEAVES}
    tables = {"RANGES": set(RANGES), "CHOICES": set(CHOICES), "PATHS": PATHS, "FREE": FREE}
    for name, table in tables.items():
        assert table <= keys, f"{name} names keys the schema does not have: {sorted(table - keys)}"
    unclassified = sorted(
        leaf.key for leaf in LEAVES if leaf.kind != "bool" and not any(leaf.key in t for t in tables.values())
    )
    assert not unclassified, f"new fields: give each a rule in RANGES, CHOICES, PATHS or FREE: {unclassified}"


def test_cases_are_deterministic_and_many():
    cases = invalid_cases()
    assert cases == invalid_cases()
    assert len(cases) >= 200 and len(VALID) >= 50
    assert {c.id.split("-", 2)[2] for c in cases} == set(COUNTS)


@pytest.mark.parametrize("case", sampled([(c.id, c) for c in invalid_cases()]))
def test_invalid_set_is_refused(case, launch_main, guarded, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    prepare(cwd, case.files, previous_run=int(case.id.split("-")[1]) % 2 == 1)
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    try:
        code, output = run_launch(launch_main, case.args, monkeypatch)
    except Accepted:
        raise NotRefused(f"not refused, it would have started a run: {case.command}") from None
    where = f"\n{case.command}\n--- output ---\n{output}"
    assert code != 0, f"exit code 0{where}"
    assert "Traceback" not in output and 'File "' not in output, f"a traceback{where}"
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("\t")]
    assert 0 < len(lines) <= MAX_LINES, f"{len(lines)} lines, at most {MAX_LINES} wanted{where}"
    assert any(key in output for key in case.keys), f"the message names none of {list(case.keys)}{where}"
    assert not written(before, snapshot(cwd)), f"wrote {written(before, snapshot(cwd))}{where}"


@pytest.mark.parametrize("args", [("training.steps=0",), (*SLURM, "training.steps=0")], ids=["local", "slurm"])
def test_refusal_leaves_no_directory(args, launch_main, guarded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = run_launch(launch_main, args, monkeypatch)
    if code != 2 or "training.steps" not in output:
        pytest.fail(f"not refused as expected (exit {code}):\n{output}")
    assert not [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]




@pytest.mark.parametrize("args", sampled(VALID))
def test_valid_set_composes_and_validates(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    try:
        job = resolve(compose(args))
    except Exception as e:
        command = " ".join(shlex.quote(a) for a in args)
        pytest.fail(f"refused: {type(e).__name__}: {e}\n{command}  (PRETRAIN_FUZZ_SEED={SEED})")
    p = job.parallelism
    degrees = (p.data_parallel_replicate_degree * p.data_parallel_shard_degree * p.tensor_parallel_degree
               * p.pipeline_parallel_degree * p.context_parallel_degree)
    assert degrees == job.world_size or p.data_parallel_shard_degree == -1
    assert job.training.global_batch_size % job.training.local_batch_size == 0
