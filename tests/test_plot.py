"""`cairn plot`: training curves of several runs on one figure, from fake metrics.jsonl files."""

import json
import struct
import sys
from pathlib import Path

import pytest

from cairn.cli import main
from cairn.util.errors import CairnError
from cairn.trackers.plot import INSTALL_HINT, PANEL_TITLES, _run_names, plot_runs, read_metrics, tokens_at

pytest.importorskip("matplotlib")


def write_run(run: Path, train: list[tuple], val: list[tuple], test=None, torn=False) -> Path:
    """train: (step, loss, tokens, lr, tokens/s); val: (step, loss); test: (step, loss)."""
    run.mkdir(parents=True)
    recs = [{"kind": "train", "step": s, "epoch": 1, "train_loss": loss, "train_perplexity": 2.718 ** loss,
             "lr": lr, "grad_norm": 1.0, "tokens_per_s": tps, "tokens": tok, "time": 1.7e9 + s}
            for s, loss, tok, lr, tps in train]
    recs += [{"kind": "val", "step": s, "epoch": 1, "val_loss": loss, "val_perplexity": 2.718 ** loss,
              "val_bits_per_byte": loss / 3, "val_tokens": 999, "full": False} for s, loss in val]
    if test:
        recs.append({"kind": "test", "step": test[0], "epoch": 1, "test_loss": test[1], "test_perplexity": 1.0,
                     "test_bits_per_byte": 1.0, "test_tokens": 99})
    recs.sort(key=lambda r: r["step"])  # as a run writes them: train, then val of the same step
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (run / "metrics.jsonl").write_text(text + ('{"kind": "train", "step": 9' if torn else ""))
    return run


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path / "alpha",
                  train=[(s, 10.5 - 0.2 * s, 512 * s, 3e-3 * min(1, s / 10), 900.0 + s) for s in range(5, 45, 5)],
                  val=[(10, 8.5), (12, 8.2), (20, 6.6), (40, 2.9), (42, 2.8)], test=(42, 2.85))
    b = write_run(tmp_path / "beta",
                  train=[(5, 10.0, 1000, 1e-3, 500.0), (10, 8.0, 3000, 1e-3, 600.0), (15, 7.0, 4000, 5e-4, 650.0)],
                  val=[(7, 9.0), (15, 7.1)], torn=True)
    return a, b


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_plot_runs_draws_every_run_in_every_panel(runs, tmp_path):
    a, b = runs
    out = tmp_path / "both.png"
    fig = plot_runs([a, b], out)
    w, h = png_size(out)
    assert 800 <= w <= 3000 and 600 <= h <= 2500 and out.stat().st_size > 20_000
    ax_step, ax_tok, ax_lr, ax_tps = fig.axes[:4]
    assert tuple(ax.get_title() for ax in fig.axes[:4]) == PANEL_TITLES

    step = lines(ax_step)
    assert set(step) == {"alpha: train", "alpha: val", "alpha: test", "beta: train", "beta: val"}
    assert list(step["alpha: train"].get_xdata()) == list(range(5, 45, 5))
    assert list(step["alpha: train"].get_ydata()) == pytest.approx([10.5 - 0.2 * s for s in range(5, 45, 5)])
    assert list(step["alpha: val"].get_xdata()) == [10, 12, 20, 40, 42]
    assert list(step["beta: val"].get_ydata()) == [9.0, 7.1]  # the torn last line is ignored
    # one colour per run, the same in every panel, different between runs
    colour = {run: {ln.get_color() for ax in fig.axes[:4] for ln in ax.get_lines() if ln.get_label().startswith(run)}
              for run in ("alpha", "beta")}
    assert len(colour["alpha"]) == 1 and len(colour["beta"]) == 1 and colour["alpha"] != colour["beta"]

    tok = lines(ax_tok)
    assert list(tok["alpha: train"].get_xdata()) == [512 * s for s in range(5, 45, 5)]
    # validation placed at tokens interpolated between train records by step (and extrapolated past the last)
    assert list(tok["alpha: val"].get_xdata()) == pytest.approx([512 * s for s in (10, 12, 20, 40, 42)])
    assert list(tok["alpha: test"].get_xdata()) == pytest.approx([512 * 42])
    assert list(tok["beta: val"].get_xdata()) == pytest.approx([1000 + 2000 * 2 / 5, 4000])

    assert list(lines(ax_lr)["beta: lr"].get_ydata()) == [1e-3, 1e-3, 5e-4]
    assert list(lines(ax_tps)["alpha: tokens/s"].get_ydata()) == [900.0 + s for s in range(5, 45, 5)]
    assert ax_step.get_yscale() == "log"  # losses from ~10 down to ~3

    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0].startswith("alpha") and "best val 2.800" in legend[0] and "test 2.850" in legend[0]
    assert legend[1].startswith("beta") and {"train", "validation", "test"} <= set(legend)


def test_tokens_at_interpolates_and_extrapolates():
    train = [{"step": 10, "tokens": 100}, {"step": 20, "tokens": 300}]
    assert tokens_at(train, [0, 5, 10, 15, 20, 30]) == pytest.approx([0, 50, 100, 200, 300, 450])
    assert tokens_at([{"step": 10}], [5]) == [None]


def test_run_names_are_distinct():
    assert _run_names([Path("/x/a/run"), Path("/x/b/run"), Path("/x/c")]) == ["a/run", "b/run", "c"]


@pytest.mark.slow
def test_cli_default_outputs(runs, tmp_path, monkeypatch, capsys):
    a, b = runs
    assert main(["plot", str(a)]) == 0
    assert png_size(a / "plot.png")[0] > 0
    assert str(a / "plot.png") in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(a), str(b)]) == 0
    assert (tmp_path / "runs.png").is_file()
    assert main(["plot", str(b), "--out", "b.svg", "--title", "beta only"]) == 0
    assert (tmp_path / "b.svg").read_text().lstrip().startswith("<?xml")


def test_cli_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "RUN_DIR/plot.png" in out and "runs.png" in out


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no-metrics", "has no metrics.jsonl"),
    ("empty", "has no metrics records"),
    ("bad-out", "does not exist"),
    ("bad-format", "cannot write"),
])
def test_cli_errors_are_one_line(case, message, runs, tmp_path, capsys):
    a, _ = runs
    (tmp_path / "nometrics").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"kind": "train", "st')
    argv = {"missing": ["plot", str(tmp_path / "nope")],
            "no-metrics": ["plot", str(tmp_path / "nometrics")],
            "empty": ["plot", str(tmp_path / "empty")],
            "bad-out": ["plot", str(a), "--out", str(tmp_path / "no" / "dir" / "x.png")],
            "bad-format": ["plot", str(a), "--out", str(tmp_path / "x.notaformat")]}[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_matplotlib_says_what_to_install(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CairnError, match=r"pip install 'cairn-lm\[plot\]'"):
        plot_runs([runs[0]])
    assert "cairn-lm[plot]" in INSTALL_HINT


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "val", "step": 5, "val_loss": 3.0}\n{"kind": "val", "step": 2, "val_loss": 4.0}\n'
        '{"kind": "val", "step": 5, "val_loss": 2.5}\n')
    m = read_metrics(run)
    assert [(r["step"], r["val_loss"]) for r in m.val] == [(2, 4.0), (5, 2.5)] and m.name == "r"
