import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before torch is imported (in this process and in every process a test starts): OpenMP threads
# that spin while they wait for one another make tiny models several times slower when the
# machine's cores are busy with other work, as on a shared CI runner; waiting threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = Path(os.environ.get("CAIRN_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories"))

# Tests train with a small tokenizer learned once per test run, unless they are about GPT-2's: with
# GPT-2's 50,257 tokens the embedding and the output layer are over 95% of a tiny model's weights,
# FLOPs and checkpoint bytes.
SMALL_VOCAB = 384


def have_tinystories() -> bool:
    return TINYSTORIES.is_dir() and any(TINYSTORIES.glob("*.jsonl"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # tests never write into the user's ~/.cache; one cache per test run (shared fixtures included)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAIRN_CACHE", str(tmp_path_factory.getbasetemp() / "cairn-cache"))
        yield


@pytest.fixture
def tinystories() -> Path:
    if not have_tinystories():
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


def write_stories(path: Path, texts: list[str]) -> Path:
    """A JSON Lines file of {"text": story} lines."""
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts), encoding="utf-8")
    return path


@pytest.fixture
def stories_file(tmp_path) -> Path:
    return write_stories(tmp_path / "stories.jsonl", make_stories(60))


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A SMALL_VOCAB-token byte-level BPE (a directory, as `cairn tokenizer train` writes it), learned
    once per test run on generated stories and, when present, the TinyStories sample's first file.
    Pass it as `--tokenizer DIR` or `cfg.tokenizer = str(DIR)`; the trainer sets the vocab_size."""
    from cairn.data import load_texts
    from cairn.tokenizer.learn import train_bpe

    texts = make_stories(300)
    if have_tinystories():
        texts += load_texts(str(sorted(TINYSTORIES.glob("*.jsonl"))[0]))
    out = tmp_path_factory.mktemp("tokenizer") / f"bpe{SMALL_VOCAB}"
    train_bpe(texts, SMALL_VOCAB, out)
    return out


# ---------------------------------------------------------------- one trained run for all tests

# The tiny preset on 400 stories with the small tokenizer: 80 steps, evaluations every 10, step
# checkpoints every 15 (all kept), best and final, the test split scored at the end.
TRAINED_RUN_ARGS = ["--preset", "tiny", "--n-samples", "400", "--seq-len", "64", "--batch-size", "8",
                    "--eval-every", "10", "--eval-batches", "4", "--checkpoint-every", "15", "--report-every", "5",
                    "--lr", "3e-3", "--max-steps", "80", "--no-progress"]


@dataclass(frozen=True)
class TrainedRun:
    data: Path  # what it trained on: the TinyStories sample, or generated stories where the sample is absent
    tokenizer: Path
    run: Path  # the run directory, shared: a test that resumes, extends or damages it works on a copy
    log: str  # what `cairn train` printed


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_tokenizer) -> TrainedRun:
    """A finished `cairn train` run shared by all the tests (trained in-process)."""
    from cairn.cli import main

    base = tmp_path_factory.mktemp("trained-run")
    data = TINYSTORIES if have_tinystories() else write_stories(base / "stories.jsonl", make_stories(1000))
    run = base / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *TRAINED_RUN_ARGS, "--data", str(data), "--tokenizer", str(small_tokenizer),
                     "--out", str(run)])
    assert code == 0, out.getvalue()
    return TrainedRun(data, small_tokenizer, run, out.getvalue())


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


# ---------------------------------------------------------------- hypothesis: the property tests' profiles

def _hypothesis_profiles() -> None:
    """`cairn` (the default): a few dozen generated cases per boundary, derandomized so a CI run is
    the same every time; CAIRN_PROPERTY_EXAMPLES asks for more (benchmarks/scripts/properties.py), and
    with CAIRN_PROPERTY_SEED they are drawn from that seed instead of derandomized."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the property tests skip themselves without it
        return
    seed = os.environ.get("CAIRN_PROPERTY_SEED")
    settings.register_profile(
        "cairn", max_examples=int(os.environ.get("CAIRN_PROPERTY_EXAMPLES", "25")), derandomize=seed is None,
        deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large, HealthCheck.large_base_example])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cairn"))


_hypothesis_profiles()
