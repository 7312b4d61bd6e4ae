"""Generated values for the options of every command: the parsers `cairn.cli.main` builds are walked,
so a new command or option is covered without a change here. Each case gives a command a working base
(the shared trained run, a small data file) and one to three of its options with drawn values: the
option's choices, numbers of any size, arbitrary text (bytes that were not UTF-8 in argv included, as
Python hands them over: surrogate escapes), empty text. `cairn train` runs up to its training and
`cairn serve` up to its listening, each replaced by a function that returns; `cairn generate` up to
writing samples; the others run whole."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cairn.bench import speed  # noqa: E402
from cairn.cli.main import build_parser  # noqa: E402
from props_harness import Reached, assert_clean, cli, count, snapshot  # noqa: E402


def commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command and subcommand by its words (`("tokenizer", "train")`), with its parser."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        if words:
            found[words] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + (name,))

    walk(build_parser(), ())
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(
        a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))]


COMMANDS = commands()
# cairn bench's options belong to cairn.bench.speed (the parser in cairn.cli only lists the command)
COMMANDS[("bench",)] = speed.build_parser()
WALKED = sorted(COMMANDS)

argv_text = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                                       st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)), max_size=12)
numbers = st.one_of(st.integers(-5, 70), st.integers(-2**70, 2**70)).map(str)
floats = st.one_of(st.floats(), st.floats(-2, 2)).map(repr) | st.sampled_from(["nan", "-inf", "1e999", "1e3", "0x10"])


@st.composite
def value_for(draw: st.DrawFn, action: argparse.Action) -> list[str]:
    """The argv words that give `action` a drawn value."""
    flag = draw(st.sampled_from(action.option_strings))
    if action.nargs == 0:
        return [flag]
    if action.choices is not None:
        value = draw(st.one_of(st.sampled_from(list(action.choices)), argv_text))
    elif action.type is int:
        value = draw(st.one_of(numbers, numbers, argv_text))
    elif action.type is float:
        value = draw(st.one_of(floats, floats, argv_text))
    else:
        value = draw(st.one_of(argv_text, numbers, st.sampled_from(["", " ", "-", "--", "auto", "cpu", "cuda:9",
                                                                    "tiny", "gpt2", "bpe:300", "x.jsonl"])))
    if action.nargs == "?" and draw(st.booleans()):
        return [flag]
    return [f"{flag}={value}"] if draw(st.booleans()) else [flag, value]


def bases(words: tuple[str, ...], root: Path, run: Path, data: Path, tokenizer: Path) -> list[str]:
    """What `words` needs to get as far as doing its work, before the drawn options (which override it)."""
    return {
        ("train",): ["--preset", "tiny", "--data", str(data), "--tokenizer", str(tokenizer),
                     "--out", str(root / "run")],
        ("prepare",): ["--data", str(data), "--tokenizer", str(tokenizer), "--cache-dir", str(root / "cache"),
                       "--workers", "1", "--no-progress"],
        ("eval",): [str(run), "--device", "cpu"],
        ("generate",): [str(run), "--prompt", "Once", "--device", "cpu", "--max-new-tokens", "2"],
        ("serve",): [str(run), "--device", "cpu", "--port", "0"],
        ("chat",): [str(run), "--device", "cpu"],
        ("plot",): [str(run), "--out", str(root / "plot.png")],
        ("export",): [str(run), "--out", str(root / "export")],
        ("tokenizer", "train"): ["--data", str(data), "--vocab-size", "300", "--out", str(root / "tok")],
        ("bench",): ["--preset", "tiny", "--json", str(root / "bench.json")],
    }.get(words, [])


@pytest.fixture
def no_heavy_work(monkeypatch) -> None:
    """train stops before training, serve before listening, generate before writing its samples,
    bench before timing."""
    import uvicorn

    import cairn.cli.generate

    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr("cairn.training.train", quiet)
    monkeypatch.setattr(uvicorn.Server, "run", quiet)
    def first_sample(*args: Any, **kwargs: Any) -> None:  # --num-samples 10^11 would not end otherwise
        raise Reached

    monkeypatch.setattr(cairn.cli.generate, "_write", first_sample)
    # bench: its options all checked once the shape is known; the timing after that takes minutes
    shape = speed.resolve_shape

    def shaped(*args: Any) -> Any:
        shape(*args)
        raise Reached

    monkeypatch.setattr(speed, "resolve_shape", shaped)


@pytest.fixture(scope="module")
def small_run(trained_run) -> Path:
    return trained_run.run


def _case(words: tuple[str, ...]) -> Callable[..., None]:
    acts = options(COMMANDS[words])

    # a quarter of the profile's cases per command (several commands share the boundary's budget);
    # plot draws a PNG with matplotlib in each case (~1 s), so it gets fewer
    share = 10 if words == ("plot",) else 4
    @settings(max_examples=max(2, settings().max_examples // share))
    @given(data=st.data())
    def case(tmp_path: Path, stories_file: Path, small_tokenizer: Path, small_run: Path, no_heavy_work: None,
             data: st.DataObject) -> None:
        count(f"options: cairn {' '.join(words)}")
        chosen = data.draw(st.lists(st.sampled_from(acts), min_size=1, max_size=3)) if acts else []
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            root = Path(d)
            argv = [*words, *bases(words, root, small_run, stories_file, small_tokenizer)]
            for action in chosen:
                argv += data.draw(value_for(action))
            before = snapshot(root)
            here = os.getcwd()
            os.chdir(root)  # a drawn relative path (`--out 5`) is written here, not where pytest runs
            try:
                o = cli(argv)
            finally:
                os.chdir(here)
            assert_clean(o, before, snapshot(root))
    return case


@pytest.mark.parametrize("words", WALKED, ids=" ".join)
def test_every_option_of_every_command_takes_any_value_or_refuses_it_in_one_line(
        words, tmp_path, stories_file, small_tokenizer, small_run, no_heavy_work):
    _case(words)(tmp_path=tmp_path, stories_file=stories_file, small_tokenizer=small_tokenizer, small_run=small_run,
                 no_heavy_work=no_heavy_work)


def test_the_walk_finds_every_command_and_their_options():
    # a command whose parser the walk could not reach would go untested without a failure
    assert {("train",), ("prepare",), ("eval",), ("generate",), ("serve",), ("chat",), ("plot",), ("export",),
            ("tokenizer",), ("tokenizer", "train"), ("bench",)} <= set(COMMANDS)
    assert {"--lr", "--d-model", "--resume"} <= {s for a in options(COMMANDS[("train",)]) for s in a.option_strings}


def test_bench_refuses_a_bad_value_in_one_line(tmp_path):
    # found by the property above: cairn bench's own parser printed argparse's usage block before the error
    o = cli(["bench", "--d-model", "x"])
    assert o.code == 2 and o.err == "error: argument --d-model: invalid int value: 'x' (see `cairn bench --help`)\n"


@pytest.mark.parametrize("argv", [["export", "run", "--out=--"], ["prepare", "--workers=--"],
                                  ["bench", "--json=--"]], ids=lambda a: a[0])
def test_a_double_dash_given_as_an_options_value_is_refused_in_one_line(argv):
    # found by the property above: argparse takes `--` for the end of options even after `=`, and
    # handed the option an empty list; `cairn export --out=--` failed on it with an AttributeError
    o = cli(argv)
    flag = argv[-1].split("=")[0]
    assert o.code == 2 and o.err.startswith(f"error: argument {flag}: expected one argument (see `cairn "), str(o)


@pytest.mark.parametrize("flag,value", [("--n-heads", "0"), ("--d-model", "-8"), ("--seq-len", "-3"),
                                        ("--batch-size", "-1"), ("--rounds", "-2"), ("--tutorial-batch", "0")])
def test_bench_refuses_a_shape_it_cannot_build_in_one_line(flag, value):
    # found by the property above: --n-heads 0 raised ZeroDivisionError while the shape was checked
    o = cli(["bench", "--preset", "tiny", flag, value])
    assert o.code == 2 and o.err.count("\n") == 1 and flag in o.err and value in o.err, str(o)


@pytest.mark.parametrize("flag,value,says", [
    ("--vocab-size", "100000000", "--vocab-size must be at most 65536, got 100000000"),
    ("--vocab-size", str(2**70), "--vocab-size must be at most 65536"),
    ("--min-frequency", str(2**70), "--min-frequency must be from 1 to 4294967296")])
def test_tokenizer_train_refuses_sizes_it_cannot_learn_in_one_line(tmp_path, stories_file, flag, value, says):
    # found by the long run of the property above: --vocab-size 10^8 made the BPE trainer reserve
    # memory until the kernel killed the process (over 20 GB); 2^70 and a --min-frequency of 2^70
    # raised OverflowError from inside the trainer
    argv = ["tokenizer", "train", "--data", str(stories_file), "--vocab-size", "300", "--out", str(tmp_path / "t"),
            flag, value]
    before = snapshot(tmp_path)
    o = cli(argv)
    assert o.code == 2 and says in o.err, str(o)
    assert_clean(o, before, snapshot(tmp_path))


def test_generate_checks_many_samples_without_building_them_all(small_run, monkeypatch):
    # found by the property above: --num-samples 10^11 built every sample's settings in a list before
    # the model loaded, filling the memory; the seeds (all that differs) are checked by the largest
    o = cli(["generate", str(small_run), "--prompt", "x", "--num-samples", str(10**11), "--seed", str(2**64 - 5)])
    assert o.code == 2 and o.err.startswith("error: --seed must be an integer from 0 to 2**64 - 1"), str(o)

    def first_sample(*args: Any, **kwargs: Any) -> None:
        raise Reached

    monkeypatch.setattr("cairn.cli.generate._write", first_sample)
    assert cli(["generate", str(small_run), "--prompt", "x", "--num-samples", str(10**11), "--device", "cpu"]).code == 0


def test_serve_refuses_a_kv_cache_that_cannot_fit_in_one_line(small_run, no_heavy_work):
    # found by the long run of the property above: --max-concurrency 2^40 made the engine allocate
    # its KV cache for that many rows: a 36 PB tensor, and torch's RuntimeError as a traceback
    o = cli(["serve", str(small_run), "--port", "0", "--device", "cpu", "--max-concurrency", str(2**40)])
    assert o.code == 2 and "KV cache, more than the" in o.err and "lower --max-batch" in o.err, str(o)
    # the cache holds the rows decoded together: a small --max-batch serves as many requests in turn
    o = cli(["serve", str(small_run), "--port", "0", "--device", "cpu", "--max-concurrency", str(2**40),
             "--max-batch", "4"])
    assert o.code == 0, str(o)


@pytest.mark.parametrize("host", ["a\x80b", "a..b", "\udc80"])
def test_serve_refuses_a_host_that_is_no_host_name_in_one_line(small_run, no_heavy_work, host):
    # found by the long run of the property above: getaddrinfo's IDNA encoding raised UnicodeError
    o = cli(["serve", str(small_run), "--host", host, "--port", "0", "--device", "cpu"])
    assert o.code == 2 and o.err.startswith(f"error: --host {host!r} is not "), str(o)


def test_prepare_refuses_more_workers_than_a_process_pool_can_hold_in_one_line(tmp_path, capsys):
    """Found by the long property run: --workers 10^23 raised OverflowError from the process pool."""
    from cairn.cli import main

    assert main(["prepare", "--data", str(tmp_path / "none.jsonl"), "--workers", str(10**23)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --workers must be from 0") and "Traceback" not in err[0]
