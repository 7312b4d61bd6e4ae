"""--time-budget: the plan is measured, the calibration leaves no trace, a resumed run keeps the plan;
tokenizers learned on the training split; the stories written at the end of a run."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cairn.cli import main
from cairn.config.rules import parse_duration
from cairn.util.errors import CairnError
from cairn.training import train
from helpers import assert_same_weights, config


def small(stories: Path, tokenizer: Path, **overrides):
    """helpers.config with the test run's small tokenizer."""
    return config(stories, tokenizer=tokenizer, **overrides)


def saved_plan(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())["plan"]


@pytest.mark.parametrize("text,seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), (" 2M ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten minutes", "-5m", "0s", "nanm", "inf"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(CairnError, match="not a duration"):
        parse_duration(bad)


@pytest.mark.slow
def test_budgeted_run_is_the_planned_run_and_a_resume_keeps_the_plan(logs, tmp_path, stories_file, small_tokenizer):
    # report_every is beyond the stop, so no pace check can shorten the plan before step 6
    budgeted = tmp_path / "budgeted"
    # max_steps caps the plan, so the resumed run stays short whatever the machine's speed
    budgeted_cfg = dict(time_budget="60s", max_steps=30, report_every=1000, epochs=1, end_stories=0)
    cfg = small(stories_file, small_tokenizer, **budgeted_cfg)
    out = train(cfg, budgeted, stop_after=6)
    plan = saved_plan(Path(out["checkpoint"]))
    assert plan["budget_s"] == 60 and plan["step_s"] > 0 and plan["total_steps"] > 6
    run_json = json.loads((budgeted / "run.json").read_text())
    assert run_json["plan"] == plan

    # the calibration steps were undone: the same weights as a run told the plan's steps up front
    fixed = tmp_path / "fixed"
    train(small(stories_file, small_tokenizer, max_steps=plan["total_steps"], report_every=1000, epochs=plan["epochs"],
                 end_stories=0), fixed, stop_after=6)
    a = load_file(str(Path(out["checkpoint"]) / "model.safetensors"))
    b = load_file(str(next((fixed / "checkpoints").glob("*step0000006")) / "model.safetensors"))
    assert_same_weights(a, b)

    # resuming keeps the plan (no second measurement, no new step count) and finishes it
    logs.clear()
    done = train(small(stories_file, small_tokenizer, **budgeted_cfg),
                 budgeted,
                 resume=True)
    assert done["step"] == plan["total_steps"]
    assert any("keeping the time budget's plan" in m for m in logs)
    assert not any(m.startswith("time budget 60s") for m in logs)


@pytest.mark.slow
def test_a_budget_too_short_fails_in_one_line_and_writes_nothing(tmp_path, stories_file, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(out), "--time-budget", "0.5s",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "time budget" in err[0] and "raise --time-budget" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_budgeted_cli_run_ends_within_its_budget(tmp_path, stories_file, small_tokenizer, capsys):
    """The run's own account; test_cli times a budgeted `cairn` process from outside."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(out), "--time-budget", "12s",
                 "--tokenizer", str(small_tokenizer),
                 "--no-progress", "--d-model", "32", "--n-heads", "4", "--seq-len", "32", "--batch-size", "4"]) == 0
    log = capsys.readouterr().out
    assert "time budget 12s" in log and "steps (" in log
    seconds = float(log.split("done in ")[1].split("s")[0])
    assert seconds <= 12  # the plan keeps a margin; a slow machine shortens the plan instead of overrunning
    # run.json holds the plan followed to the end: the last re-plan's, if the pace changed it
    planned = [int(line.rsplit(" to ", 1)[1].split()[0]) for line in log.splitlines() if "re-planned from" in line]
    first = int(log.split("-> ")[1].split(" steps")[0])
    assert json.loads((out / "run.json").read_text())["plan"]["total_steps"] == (planned or [first])[-1]
    stories = (out / "stories.md").read_text()
    assert stories.count("## Story") == 1 and "Once upon a time" in stories


def test_bpe_tokenizer_is_learned_on_the_training_split_cached_and_kept_with_the_run(logs, tmp_path, stories_file):
    from cairn.data import load_texts, split_stories
    from cairn.checkpoint.load import load

    cfg = config(stories_file, max_steps=4, end_stories=2, end_story_tokens=8)
    cfg.tokenizer = "bpe:300"
    train(cfg, tmp_path / "a")
    learned = next(m for m in logs if m.startswith("learned tokenizer"))
    cached = Path(learned.split("cached at ")[1])
    info = json.loads((cached / "cairn-tokenizer.json").read_text())
    assert (cached / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes()
    texts = load_texts(str(stories_file))
    n_train = len(split_stories(texts, cfg.seed, 0, cfg.data.train_frac, cfg.data.val_frac)["train"])
    assert info["trained_on"]["stories"] == n_train < len(texts)  # the held-out stories never shaped it
    assert load(tmp_path / "a").tokenizer.vocab_size <= 300

    logs.clear()
    cfg2 = config(stories_file, max_steps=4, end_stories=0)
    cfg2.tokenizer = "bpe:300"
    train(cfg2, tmp_path / "b")
    assert any(m.startswith("using cached tokenizer") for m in logs)
    assert_same_weights(load_file(str(tmp_path / "a" / "checkpoints" / "tiny_final" / "model.safetensors")),
                        load_file(str(tmp_path / "b" / "checkpoints" / "tiny_final" / "model.safetensors")))
    stories = (tmp_path / "a" / "stories.md").read_text()
    assert stories.count("## Story") == 2 and "One day, a little girl named Lily" in stories


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:x", "bpe:"])
def test_bad_bpe_specs_are_refused(tmp_path, stories_file, capsys, spec):
    assert main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(tmp_path / "r"),
                 "--tokenizer", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bpe:N" in err[0]
    assert not (tmp_path / "r").exists()


def test_an_epoch_end_that_would_overrun_the_budget_ends_the_run_there(tmp_path, stories_file, small_tokenizer,
                                                                        monkeypatch):
    """An epoch's end validates and saves. When that would run past the deadline, the run stops at
    the epoch's last step and its end validates the final model once, in the time kept for it;
    it does not validate at the epoch's end, take one more step, find itself late and validate again."""
    from cairn.training.budget.budget import Budget

    fit = Budget.fit

    def pessimistic(self, costs, work):
        fit(self, costs, work)
        self.epoch_end_s = 1e6  # as if the epoch's validation would outlast the budget

    monkeypatch.setattr(Budget, "fit", pessimistic)
    out = tmp_path / "run"
    done = train(small(stories_file, small_tokenizer, time_budget="60s", report_every=1000, eval_every=0,
                       end_stories=0), out)
    plan_json = json.loads((out / "run.json").read_text())["plan"]
    per_epoch = plan_json["steps_per_epoch"]
    assert plan_json["total_steps"] > per_epoch  # the plan went on past the first epoch
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert done["stopped"] == "time budget" and done["step"] == per_epoch
    assert [r["step"] for r in records if r["kind"] == "val"] == [per_epoch]  # once, at the end
    assert not list((out / "checkpoints").glob("*epoch*"))


def test_sampled_epoch_end_validation_still_ends_on_the_whole_split(tmp_path, stories_file, small_tokenizer):
    """epoch_val = "sample": an epoch's end validates the fixed sample the periodic evaluations use
    (and a budget plans for that), and the run's last figure is still the whole split's."""
    out = tmp_path / "run"
    train(small(stories_file, small_tokenizer, epochs=2, eval_every=0, eval_batches=1, epoch_val="sample",
                end_stories=0), out)
    per_epoch = json.loads((out / "run.json").read_text())["plan"]["steps_per_epoch"]
    vals = [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert [(r["step"], r["full"]) for r in vals] == [(per_epoch, False), (2 * per_epoch, False), (2 * per_epoch, True)]
    assert vals[0]["val_tokens"] < vals[2]["val_tokens"]


@pytest.mark.parametrize("step,pace,expect", [
    (50, 0.05, None),  # a tenth of the plan not yet done: it does not grow yet...
    (50, 0.2, 550),  # ... but shrinks when the steps left no longer fit (100 s left)
    (500, 0.05, 2500),  # later a machine that sped up grows it
    (500, 0.4, 750),  # and one that slowed down shrinks it
    (500, 0.1995, None),  # a wobble within GROW_MARGIN (fits 1001) leaves it alone
])
def test_the_plan_follows_the_recent_pace_both_ways(step, pace, expect):
    from cairn.training.budget.plan import replan

    assert replan(step, total=1000, warmup=3, pace_s=pace, left_s=100.0, overhead_s=0.0) == expect


def test_a_replan_counts_the_overhead_and_never_goes_below_the_steps_done_or_the_warmup():
    from cairn.training.budget.plan import replan

    # 100 s at 0.1 s per step plus 0.1 s of evaluations and checkpoints per step: 500 more steps
    assert replan(500, total=2000, warmup=3, pace_s=0.1, left_s=100.0, overhead_s=0.1) == 1000
    assert replan(500, total=2000, warmup=3, pace_s=10.0, left_s=1.0, overhead_s=0.0) == 500
    assert replan(5, total=2000, warmup=60, pace_s=10.0, left_s=1.0, overhead_s=0.0) == 60
    assert replan(500, total=1000, warmup=3, pace_s=0.01, left_s=100.0, overhead_s=0.0, max_steps=1200) == 1200


def test_a_budget_plan_reserves_the_end_and_spreads_the_evaluations():
    from cairn.training.budget.plan import SAFETY_FRAC, SAFETY_S, Costs, Workload, plan

    c = Costs(step_s=0.1, eval_batch_s=0.05, checkpoint_s=0.5, story_token_s=0.01)
    w = Workload(steps_per_epoch=1000, val_batches=20, test_batches=10, eval_every=100, eval_sample_batches=4,
                 epoch_val_batches=20, checkpoint_every=200, story_tokens=300, best_val_batches=20)
    b = plan(600.0, elapsed_s=30.0, c=c, w=w)
    # validation, the best weights' validation, test; the last state, the final and a best checkpoint
    assert b.reserve_s == (20 + 20 + 10) * 0.05 + 3 * 0.5 + 300 * 0.01
    assert b.epoch_end_s == 20 * 0.05 + 0.5
    assert abs(b.overhead_s - ((4 * 0.05 + 0.5) / 100 + 0.5 / 200 + b.epoch_end_s / 1000)) < 1e-12
    available = 600 - 30 - b.reserve_s - SAFETY_FRAC * 600 - SAFETY_S
    assert b.steps == int(available // (0.1 + b.overhead_s))
    with pytest.raises(CairnError, match="too short"):
        plan(10.0, elapsed_s=9.0, c=c, w=w)


@pytest.mark.slow
def test_the_budget_clock_starts_with_the_process_not_after_the_imports():
    """A wall clock around `cairn train` counts the interpreter's start and torch's import: so
    does the budget. A process that sleeps before asking has an age of at least the sleep."""
    import subprocess
    import sys

    code = ("import time; time.sleep(1.0); from cairn.cli.main import process_started; "
            "print(time.monotonic() - process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.0 <= age < 30


def test_the_deadline_keeps_the_plans_margin(tmp_path, stories_file, small_tokenizer, monkeypatch):
    """Re-plans fit the steps into the time left before the deadline: the deadline itself must sit
    the margin before the end, or each re-plan would spend the margin kept for a slower machine."""
    from cairn.training.budget import plan as budget
    from cairn.training.budget.budget import Budget

    seen = {}
    plan, fit = budget.plan, Budget.fit

    def planned(*args, **kwargs):
        seen["plan"] = plan(*args, **kwargs)
        return seen["plan"]

    def spy(self, costs, work):
        fit(self, costs, work)
        seen.update(started=self.started, deadline=self.deadline)

    monkeypatch.setattr(budget, "plan", planned)
    monkeypatch.setattr(Budget, "fit", spy)
    train(small(stories_file, small_tokenizer, time_budget="40s", max_steps=3, end_stories=0), tmp_path / "run")
    kept = seen["started"] + 40 - seen["deadline"]  # what the steps may never use
    assert kept == pytest.approx(seen["plan"].reserve_s + 0.03 * 40 + budget.SAFETY_S)


# ---------------------------------------------------------------- an end whose cost does not grow with the data


def test_the_end_is_planned_for_at_most_end_val_batches_and_a_big_test_after_the_budget():
    from cairn.training.budget.plan import Costs, Workload, end_reserve, plan

    c = Costs(step_s=0.1, eval_batch_s=0.05, checkpoint_s=0.5, story_token_s=0.01)
    big = Workload(steps_per_epoch=10**6, val_batches=100, test_batches=5000, eval_every=500, eval_sample_batches=8,
                   epoch_val_batches=8, checkpoint_every=500, story_tokens=900, best_val_batches=100,
                   end_val_bound=100, whole_val_batches=5000)
    b = plan(600.0, elapsed_s=150.0, c=c, w=big)
    assert b.reserve_s == end_reserve(c, big) == (100 + 100) * 0.05 + 3 * 0.5 + 900 * 0.01  # no test in it
    assert b.past_budget_s == 5000 * 0.05 and b.steps > 3000
    small_test = Workload(**{**big.__dict__, "test_batches": 50})
    assert end_reserve(c, small_test) == b.reserve_s + 50 * 0.05  # a test within the bound is kept for


def test_a_run_with_max_steps_is_not_refused_for_its_end_and_the_refusal_names_the_way_out():
    from cairn.training.budget.plan import Costs, Workload, plan

    c = Costs(step_s=0.1, eval_batch_s=1.0, checkpoint_s=0.5, story_token_s=0.01)
    w = Workload(steps_per_epoch=1000, val_batches=500, test_batches=0, eval_every=0, eval_sample_batches=8,
                 epoch_val_batches=8, checkpoint_every=0, story_tokens=0, best_val_batches=500)
    with pytest.raises(CairnError, match="budget.time_budget off") as e:
        plan(600.0, elapsed_s=100.0, c=c, w=w)  # the end alone takes 1000s
    assert "--time-budget off" in e.value.for_cli()
    b = plan(600.0, elapsed_s=100.0, c=c, w=Workload(**{**w.__dict__, "max_steps": 5}))
    assert b.steps == 5 and not b.end_in_budget and b.reserve_s == 0 and b.past_budget_s > 400


def test_a_budgeted_end_validates_and_tests_at_most_their_bounds(tmp_path, stories_file, small_tokenizer):
    """Under a budget the end's validation and end_on_best's comparison score a fixed sample of
    end_val_batches batches, the test one of end_test_batches; without one, the whole splits."""
    common = dict(max_steps=8, eval_every=2, eval_batches=1, report_every=1000, end_stories=0, end_val_batches=1,
                  end_test_batches=2, lr=3e-2)
    train(small(stories_file, small_tokenizer, time_budget="60s", **common), tmp_path / "b")
    train(small(stories_file, small_tokenizer, **common), tmp_path / "n")

    def ends(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r["kind"] == "val" and r["full"]][-1], [r for r in recs if r["kind"] == "val"][0]

    (bounded, sample), (whole, _) = ends(tmp_path / "b"), ends(tmp_path / "n")
    assert bounded["val_tokens"] == sample["val_tokens"] < whole["val_tokens"]

    def test_tokens(run):
        return next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["kind"] == "test")["test_tokens"]

    assert 0 < test_tokens(tmp_path / "b") < test_tokens(tmp_path / "n")


def test_budgeted_presets_run_with_max_steps_or_without_their_budget(tmp_path, stories_file, capsys):
    """A smoke run of cpu-10min: --max-steps within its 10-minute budget, and --time-budget off."""
    common = ["train", "--preset", "cpu-10min", "--data", str(stories_file), "--no-progress", "--compile", "false",
              "--end-stories", "0", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "a"), "--max-steps", "3"]) == 0
    log = capsys.readouterr().out
    assert "time budget 600s" in log and json.loads((tmp_path / "a" / "run.json").read_text())["plan"][
        "total_steps"] == 3
    assert main([*common, "--out", str(tmp_path / "b"), "--max-steps", "2", "--time-budget", "off"]) == 0
    log = capsys.readouterr().out
    assert "time budget" not in log and json.loads((tmp_path / "b" / "run.json").read_text())["plan"][
        "total_steps"] == 2


def test_a_budget_too_short_for_the_end_still_runs_the_asked_steps(tmp_path, stories_file, small_tokenizer, logs):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(stories_file), "--out", str(out), "--time-budget", "0.5s",
                 "--max-steps", "2", "--tokenizer", str(small_tokenizer), "--no-progress", "--end-stories", "0"]) == 0
    assert any("past the budget" in m and "--time-budget off" in m for m in logs)
    assert json.loads((out / "run.json").read_text())["plan"]["total_steps"] >= 1


def test_a_machine_that_slows_down_moves_the_last_step_earlier_by_the_ends_slowdown():
    """The end of the run (its validations, test, checkpoints, stories) was planned at the pace
    measured at the start; when a neighbour's load makes steps k times slower, the end takes about
    k times its plan too, so the steps stop that much earlier and the run still ends in its budget
    (a 1x cpu-10min run under a load of 11 otherwise ended at 873 s of its 600)."""
    import time

    from cairn.checkpoint.schema import Plan
    from cairn.config.sections import ScheduleConfig
    from cairn.training.budget.budget import Budget
    from cairn.training.budget.plan import SLOWDOWN_STEPS
    from cairn.training.distributed import Dist

    b = Budget(Plan(100, 100, 1000, 10, 10, budget_s=600, step_s=0.1), 600.0, time.monotonic(), Dist(),
               ScheduleConfig(), 0)
    b.deadline, b.reserve_s, b.epoch_end_s = time.monotonic() + 100, 20.0, 1.0
    for _ in range(50):
        b.after_step(0.1)  # at the measured pace: the deadline as planned
    assert b.slowdown() == pytest.approx(1.0) and b.end_of_steps() == b.deadline
    for _ in range(SLOWDOWN_STEPS):
        b.after_step(0.5)  # five times slower now
    assert b.slowdown() == pytest.approx(5.0)
    assert b.end_of_steps() == pytest.approx(b.deadline - 4 * 20.0)
    assert not b.past_deadline()
    b.reserve_s = 30.0  # an end of 150 s at this pace, with 100 s left before the deadline
    assert b.past_deadline()
    for _ in range(SLOWDOWN_STEPS):
        b.after_step(0.05)  # faster than measured never moves the deadline later
    assert b.slowdown() == 1.0 and b.end_of_steps() == b.deadline
    b.after_step(20.0)  # one step that compiles a new shape is not a slower machine
    assert b.slowdown() == 1.0 and not b.past_deadline()
