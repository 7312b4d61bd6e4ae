"""The command line end to end on the real TinyStories sample: train, checkpoints, eval, generate.

The commands run in-process through `cairn.cli.main` on the shared trained run (conftest's
`trained_run`, on generated stories where the sample is absent); one `python -m cairn` process
checks what only a real process shows: its exit code and its wall-clock time under --time-budget.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import TRAINED_RUN_ARGS, make_stories, write_stories
from helpers import records

from cairn.cli import main
from cairn.checkpoint import store as ckpt


def cairn(capsys, *args) -> str:
    """`cairn ARGS` in-process: its stdout (it must succeed)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, f"cairn {' '.join(map(str, args))} failed ({code}):\n{out}\n{err}"
    return out


def test_train_lowers_validation_loss_and_writes_its_run_directory(trained_run):
    run = trained_run.run
    recs = records(run)
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
    assert "test: loss" in trained_run.log


def test_eval_json_on_the_test_split_matches_training_report(trained_run, capsys):
    run = trained_run.run
    out = json.loads(cairn(capsys, "eval", run, "--json"))
    assert set(out) == {"loss", "perplexity", "bits_per_byte", "tokens", "positions", "seconds", "tokens_per_s"}
    test = next(m for m in records(run) if m["kind"] == "test")
    assert out["loss"] == pytest.approx(test["test_loss"], rel=1e-5)
    assert out["tokens"] == test["test_tokens"]
    assert 0 < out["bits_per_byte"] < out["loss"]


@pytest.mark.slow
def test_eval_on_the_training_split_scores_the_training_stories(trained_run, capsys):
    run = trained_run.run
    seen = json.loads(cairn(capsys, "eval", run, "--split", "train", "--json"))
    held_out = json.loads(cairn(capsys, "eval", run, "--split", "val", "--json"))
    # the splits are 0.8 / 0.1 of the stories: the training split has about 8x the tokens. (This
    # few-step model has not yet seen its training stories often enough to fit them better.)
    assert 6 < seen["tokens"] / held_out["tokens"] < 10
    assert seen["loss"] > 0 and seen["bits_per_byte"] > 0


def test_eval_on_other_stories_evaluates_every_story(trained_run, tmp_path, capsys):
    from cairn.tokenizer.base import get_tokenizer

    run = trained_run.run
    stories = ["Once upon a time there was a cat. The cat liked milk. The end.",
               "Tom had a red ball. He threw it to his dog. The dog ran fast and got it.",
               # longer than the run's 64-token rows: scored in overlapping windows, each token once
               " ".join(make_stories(3, seed=5))] * 5
    f = write_stories(tmp_path / "other.jsonl", stories)
    out = json.loads(cairn(capsys, "eval", run, "--data", f, "--json"))
    # every story is scored whole: each of its tokens, then the <|endoftext|> that ends it
    tok = get_tokenizer(str(run / "tokenizer"))
    assert max(len(tok.encode(s)) for s in stories) > 64
    assert out["tokens"] == sum(len(tok.encode(s)) + 1 for s in stories)
    assert out["loss"] > 0


def test_generate_prints_a_continuation_reproducibly(trained_run, capsys):
    run = trained_run.run
    args = ("generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 30, "--seed", 5, "--top-k", 50)
    a, b = cairn(capsys, *args), cairn(capsys, *args)
    assert a.startswith("Once upon a time") and len(a) > len("Once upon a time") + 10
    assert a == b
    c = cairn(capsys, "generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 30, "--seed", 6,
              "--top-k", 50)
    assert c != a
    greedy = cairn(capsys, "generate", run / "checkpoints" / "tiny_best", "--prompt", "Lily", "--temperature", 0,
                   "--max-new-tokens", 10)
    assert greedy.startswith("Lily")


def test_existing_run_directory_is_never_overwritten(trained_run, capsys):
    run = trained_run.run
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    code = main(["train", *TRAINED_RUN_ARGS, "--data", str(trained_run.data), "--out", str(run),
                 "--tokenizer", str(trained_run.tokenizer), "--max-steps", "2"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_budgeted_cairn_process_ends_within_its_budget(tmp_path, small_tokenizer):
    """`python -m cairn train --time-budget`: the process itself, timed from outside (start-up,
    imports and the end of the run included), exits 0 within the budget."""
    budget = 10
    data = write_stories(tmp_path / "stories.jsonl", make_stories(200))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cairn", "train", "--preset", "tiny", "--data", str(data),
                        "--tokenizer", str(small_tokenizer), "--out", str(out), "--time-budget", f"{budget}s",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    wall = time.monotonic() - start
    log = r.stdout
    assert r.returncode == 0, log + r.stderr
    assert f"time budget {budget}s" in log and "steps (" in log
    # the plan keeps a margin; a slow machine shortens the plan instead of overrunning
    assert wall <= budget, (wall, log)
    # run.json holds the plan followed to the end: the last re-plan's, if the pace changed it
    planned = [int(line.rsplit(" to ", 1)[1].split()[0]) for line in log.splitlines() if "re-planned from" in line]
    first = int(log.split("-> ")[1].split(" steps")[0])
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["total_steps"] == (planned or [first])[-1]
    final = ckpt.read_checkpoint(next((out / "checkpoints").glob("*_final")))
    assert 0 < final.meta["state"]["step"] <= plan["total_steps"]
    stories = (out / "stories.md").read_text()  # the end of the run, within the budget too
    assert stories.count("## Story") == 1 and "Once upon a time" in stories
