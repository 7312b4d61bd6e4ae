"""Generated config files through `cairn train --config F` up to the start of training: TOML documents
built from the real keys and sections and from made-up ones, values of every TOML type (huge integers,
inf and nan, dates, arrays, tables), deep nesting, and files that are not TOML or not UTF-8. The
config is resolved and checked exactly as for a real run; only the training itself is replaced by a
function that keeps the config it was given."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from cairn.config.io import SECTIONS, field_index  # noqa: E402
from cairn.config.sections import RunConfig  # noqa: E402
from props_harness import assert_clean, cli, count, snapshot  # noqa: E402

KEYS = sorted(k for k in field_index() if "." not in k)
values = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**64, 2**64), st.integers(-3, 100), st.floats(),
              st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20),
              st.sampled_from(["auto", "tiny", "gpt2", "bpe:300", "cpu", "pack", "text", "cosine", "1e3", ""]),
              st.datetimes(min_value=dt.datetime(1, 1, 1)), st.dates(), st.times()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(["preset", "source", "data"]),
                 st.text(max_size=10))


@st.composite
def config_document(draw: st.DrawFn) -> bytes:
    import tomli_w

    kind = draw(st.sampled_from(["toml", "toml", "toml", "text", "bytes", "deep"]))
    if kind == "text":
        return draw(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        n = draw(st.sampled_from([100, 10_000, 200_000]))
        return (b"lr = " + b"[" * n + b"]" * n) if draw(st.booleans()) else b"x = " + b"{a = " * n + b"1" + b"}" * n
    doc: dict[str, Any] = draw(st.dictionaries(keys, values, max_size=4))
    for section in draw(st.lists(st.sampled_from(SECTIONS + ("train", "data", "nope")), max_size=3, unique=True)):
        doc[section] = draw(st.dictionaries(keys, values, max_size=4))
    try:
        return tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):  # what TOML cannot hold (nan keys are fine; None is not)
        return b"# " + repr(doc).encode("utf-8", "backslashreplace")


@pytest.fixture
def trained_with(monkeypatch) -> list[RunConfig]:
    """`cairn train` up to training: the configs train() would have trained with."""
    got: list[RunConfig] = []

    def train(cfg: RunConfig, out: Path, **kw: Any) -> None:
        got.append(cfg)

    monkeypatch.setattr("cairn.training.train", train)
    return got


@given(document=config_document(), preset=st.sampled_from([None, "tiny"]))
def test_train_takes_any_config_file_or_refuses_it_in_one_line(tmp_path, stories_file, small_tokenizer, trained_with,
                                                                document, preset):
    count("config: cairn train --config")
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        root = Path(d)
        (root / "run.toml").write_bytes(document)
        before = snapshot(root)
        o = cli(["train", "--config", str(root / "run.toml"), "--data", str(stories_file), "--tokenizer",
                 str(small_tokenizer), "--out", str(root / "run"), *(["--preset", preset] if preset else [])])
        assert_clean(o, before, snapshot(root))
        if o.code == 0:
            assert trained_with and trained_with[-1].data.source == str(stories_file)


def test_a_config_nested_too_deeply_is_refused_in_one_line(tmp_path, stories_file, trained_with):
    # found by the property above: tomllib recurses once per nested array, and a RecursionError
    # came out of `cairn train --config` as a traceback
    path = tmp_path / "deep.toml"
    path.write_text("lr = " + "[" * 100_000 + "]" * 100_000 + "\n")
    before = snapshot(tmp_path)
    o = cli(["train", "--config", str(path), "--data", str(stories_file), "--out", str(tmp_path / "run")])
    assert o.code == 2, str(o)
    assert o.err == f"error: config file {str(path)!r} nests arrays or tables too deeply to read: fix the file\n"
    assert_clean(o, before, snapshot(tmp_path))
    assert not trained_with
