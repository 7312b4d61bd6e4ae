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


def make_stories(n: int, seed: int = 0) -> list[str]:
    """Small generated stories with some structure (names, actions, an ending) to learn from."""
    import random

    rng = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
    things = ["ball", "cat", "kite", "cake", "tree", "boat", "dog", "hat"]
    verbs = ["liked", "found", "lost", "saw", "wanted", "made", "shared", "painted"]
    moods = ["happy", "sad", "tired", "excited", "brave", "kind"]
    out = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        lines = [f"Once upon a time, there was a {rng.choice(moods)} child named {a}."]
        for _ in range(rng.randint(2, 6)):
            lines.append(f"{a} {rng.choice(verbs)} a {rng.choice(things)} with {b}.")
        lines.append(f"In the end, {a} and {b} were {rng.choice(moods)}. The end.")
        out.append(" ".join(lines))
    return out


@pytest.fixture
def stories_file(tmp_path) -> Path:
    import json

    f = tmp_path / "stories.jsonl"
    f.write_text("".join(json.dumps({"text": s}) + "\n" for s in make_stories(60)), encoding="utf-8")
    return f


@pytest.fixture
def logs():
    """The messages cairn logs during the test, in order."""
    import logging

    got: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    logger, handler = logging.getLogger("cairn"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)
