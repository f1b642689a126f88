import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402


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
