import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer / CPU-peak cache for the whole session: trained or measured once."""
    return tmp_path_factory.mktemp("cache")
