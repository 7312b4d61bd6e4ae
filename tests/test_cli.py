"""The command line end to end on the real TinyStories sample: train, checkpoints, eval, generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--preset", "tiny", "--n-samples", "800", "--seq-len", "64", "--batch-size", "8", "--eval-every", "10",
        "--eval-batches", "4", "--checkpoint-every", "15", "--report-every", "5", "--lr", "3e-3"]


def cairn(*args, cwd=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "cairn", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"cairn {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    shared = Path(os.environ.get("CAIRN_TINYSTORIES", Path(__file__).resolve().parents[2] / "shared/data/tinystories"))
    if not list(shared.glob("*.jsonl")):
        pytest.skip("TinyStories sample not found")
    run = tmp_path_factory.mktemp("cli") / "run"
    r = cairn("train", *TINY, "--data", shared, "--out", run, "--max-steps", 40, "--no-progress")
    return shared, run, r


def test_train_lowers_validation_loss_and_writes_its_run_directory(trained):
    shared, run, r = trained
    recs = metrics(run)
    val = [m["val_loss"] for m in recs if m["kind"] == "val"]
    assert len(val) >= 4 and val[-1] < val[0] - 0.5, val
    train = [m for m in recs if m["kind"] == "train"]
    assert {"step", "epoch", "train_loss", "lr", "tokens_per_s", "mfu"} <= set(train[0])
    assert all(0 < m["mfu"] < 1 for m in train)
    assert {"val_loss", "val_perplexity"} <= set(next(m for m in recs if m["kind"] == "val"))
    test = [m for m in recs if m["kind"] == "test"]
    assert len(test) == 1 and test[0]["test_loss"] > 0 and test[0]["test_perplexity"] > 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    # step checkpoints at 15 and 30 both kept (never overwritten), plus best and final
    assert {"tiny_checkpoint_step0000015", "tiny_checkpoint_step0000030", "tiny_best", "tiny_final"} <= set(names)
    assert (run / "config.toml").is_file() and (run / "run.json").is_file()
    assert "test: loss" in r.stdout


def test_eval_json_on_the_test_split_matches_training_report(trained):
    _, run, _ = trained
    out = json.loads(cairn("eval", run, "--json").stdout)
    assert set(out) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    test = next(m for m in metrics(run) if m["kind"] == "test")
    assert out["loss"] == pytest.approx(test["test_loss"], rel=1e-5)
    assert out["tokens"] == test["test_tokens"]
    assert 0 < out["bits_per_byte"] < out["loss"]


def test_eval_on_the_training_split_scores_the_training_stories(trained):
    _, run, _ = trained
    seen = json.loads(cairn("eval", run, "--split", "train", "--json").stdout)
    held_out = json.loads(cairn("eval", run, "--split", "val", "--json").stdout)
    # the splits are 0.8 / 0.1 of the stories: the training split has about 8x the tokens. (This
    # few-step model has not yet seen its training stories often enough to fit them better.)
    assert 6 < seen["tokens"] / held_out["tokens"] < 10
    assert seen["loss"] > 0 and seen["bits_per_byte"] > 0


def test_eval_on_other_stories_evaluates_every_story(trained, tmp_path):
    _, run, _ = trained
    stories = ["Once upon a time there was a cat. The cat liked milk. The end.",
               "Tom had a red ball. He threw it to his dog. The dog ran fast and got it."] * 5
    f = tmp_path / "other.jsonl"
    f.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    out = json.loads(cairn("eval", run, "--data", f, "--json").stdout)
    assert out["tokens"] > 0 and out["loss"] > 0


def test_generate_prints_a_continuation_reproducibly(trained):
    _, run, _ = trained
    args = ("generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 30, "--seed", 5, "--top-k", 50)
    a, b = cairn(*args), cairn(*args)
    assert a.stdout.startswith("Once upon a time") and len(a.stdout) > len("Once upon a time") + 10
    assert a.stdout == b.stdout
    c = cairn("generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 30, "--seed", 6, "--top-k", 50)
    assert c.stdout != a.stdout
    greedy = cairn("generate", run / "checkpoints" / "tiny_best", "--prompt", "Lily", "--temperature", 0,
                   "--max-new-tokens", 10)
    assert greedy.stdout.startswith("Lily")


def test_existing_run_directory_is_never_overwritten(trained):
    shared, run, _ = trained
    before = (run / "metrics.jsonl").read_bytes()
    r = cairn("train", *TINY, "--data", shared, "--out", run, "--max-steps", 2, check=False)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (run / "metrics.jsonl").read_bytes() == before
