import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = Path(os.environ.get("CAIRN_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # tests never write into the user's ~/.cache; one cache per test session
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path_factory.getbasetemp() / "cairn-cache"))


@pytest.fixture
def tinystories() -> Path:
    if not TINYSTORIES.is_dir() or not list(TINYSTORIES.glob("*.jsonl")):
        pytest.skip(f"TinyStories sample not found at {TINYSTORIES}")
    return TINYSTORIES
