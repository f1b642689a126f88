import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402
from helpers import run_launch  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Tests that start several processes or submit to SLURM are slow too: `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before the fixtures: a module-scoped fixture that launches runs belongs to the first test asking for it
    helpers.running_test = (item.nodeid, item.get_closest_marker("slow") is not None)


def pytest_runtest_teardown(item):
    helpers.running_test = None


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer / CPU-peak cache for the whole session: trained or measured once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def launch_once(tmp_path_factory, cache_dir):
    """launch_once(args) -> (run directory, CompletedProcess): launch.py with these overrides, the session's
    data cache and a job name of its own, run once per session and checked to succeed. Tests in several
    modules that compare against the same run share it (the same key=value overrides in any order, the
    last of a repeated key winning as in Hydra). Treat the run directory as read-only: copy it to go on."""
    root = tmp_path_factory.mktemp("shared_runs")
    done: dict[tuple, tuple[Path, object]] = {}

    def launch(args: list[str], timeout: float = 600):
        key = tuple(sorted(dict(arg.split("=", 1) for arg in args).items()))
        if key not in done:
            name = f"shared_{len(done)}"
            proc = run_launch([*args, f"job.name={name}", f"data.cache_dir={cache_dir}"], cwd=root, timeout=timeout)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[key] = (root / "outputs" / name, proc)
        return done[key]

    return launch
