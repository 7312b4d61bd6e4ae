"""What the commands do is a library call first: scoring a run, preparing data, reading a run's
config, finding a run's tokenizer. Each gives what its command prints."""

import json
import shutil

import pytest

from cairn.cli import main
from cairn.eval.run import evaluate_run
from cairn.util.errors import CairnError


@pytest.mark.slow
def test_evaluate_run_is_what_cairn_eval_prints(trained_run, capsys):
    r = evaluate_run(trained_run.run, split="val")
    capsys.readouterr()
    assert main(["eval", str(trained_run.run), "--split", "val", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    scores = ("loss", "perplexity", "bits_per_byte", "tokens", "positions")
    assert {k: printed[k] for k in scores} == {k: r[k] for k in scores}
    # the scoring's own time (two processes time it apart): present, positive, and tokens over seconds
    assert printed["seconds"] > 0 and printed["tokens_per_s"] == pytest.approx(printed["tokens"] / printed["seconds"])
    # windows overlap (eval.stride 0 = half of seq_len): some inputs are run twice, none left out
    assert r["tokens"] <= r["positions"] < 2 * r["tokens"] + 64 * 2
    assert r["checkpoint"].endswith("_final") and r["what"].startswith("val split (")
    # the run's own last validation of the whole split scored the same model on the same stories
    vals = [json.loads(x) for x in (trained_run.run / "metrics.jsonl").read_text().splitlines()]
    last = [v for v in vals if v["kind"] == "val" and v.get("full")][-1]
    assert abs(last["val_loss"] - r["loss"]) < 1e-5 and last["val_tokens"] == r["tokens"]


@pytest.mark.slow
def test_eval_stride_reads_every_target_once_with_more_or_less_context(trained_run, capsys):
    """--stride trades context for inputs run: the same targets are scored at any stride, with
    fewer inputs run the longer it is (stride = seq_len: only a story's last window runs some
    inputs again, as its context), and a different loss (the context differs)."""
    from cairn.training.resume import run_config

    seq_len = run_config(trained_run.run).data.seq_len
    default = evaluate_run(trained_run.run, split="val")
    apart = evaluate_run(trained_run.run, split="val", stride=seq_len)
    dense = evaluate_run(trained_run.run, split="val", stride=max(1, seq_len // 8))
    assert default["tokens"] == apart["tokens"] == dense["tokens"]
    assert apart["positions"] < default["positions"] < dense["positions"]
    assert len({default["loss"], apart["loss"], dense["loss"]}) == 3
    assert main(["eval", str(trained_run.run), "--split", "val", "--stride", str(seq_len + 1)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: eval.stride") and "set --stride to at most seq_len" in last
    with pytest.raises(CairnError, match=r"eval.stride \(\d+\) is longer than data.seq_len"):
        evaluate_run(trained_run.run, split="val", stride=seq_len + 1)
    with pytest.raises(CairnError, match=r"eval.stride must be zero or more, got -1"):
        evaluate_run(trained_run.run, split="val", stride=-1)


def test_prepare_reports_the_splits_the_run_trained_on(trained_run):
    from cairn.data.report import prepare, report_lines
    from cairn.data.run_tokenizer import for_data
    from cairn.training.resume import run_config

    cfg = run_config(trained_run.run)
    report = prepare(cfg, for_data(cfg.tokenizer, cfg.data, cfg.seed))
    run = json.loads((trained_run.run / "run.json").read_text())
    assert report["cached"] and report["splits"] == run["data"]["splits"]
    assert report["tokens"] == sum(s["tokens"] for s in run["data"]["splits"].values())
    lines = report_lines(report)
    assert lines[0].startswith("cached ") and "already prepared" in lines[-2]


def test_loading_uses_the_runs_own_copy_of_its_tokenizer(trained_run, tmp_path):
    from cairn.checkpoint.load import load
    from cairn.tokenizer.base import get_tokenizer

    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    cfg = json.loads(next((run / "checkpoints").glob("*_final")).joinpath("state.json").read_text())["config"]
    assert cfg["tokenizer"] == str(trained_run.tokenizer)  # the run names the directory it trained with ...
    loaded = load(run)  # ... and uses its own copy of it: the same tokenizer, kept with the run
    assert loaded.tokenizer.name == get_tokenizer(str(trained_run.tokenizer)).name
    assert loaded.tokenizer.directory.resolve() == (run / "tokenizer").resolve()
