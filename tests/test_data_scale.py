"""Data preparation at scale: chunked reading, worker processes, bounded memory, one split everywhere."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_stories

from cairn.config.sections import DataConfig
from cairn.data import cache as cache_mod
from cairn.data import clean_texts, iter_texts, load_texts, prepare_data, split_stories
from cairn.data.sources import _dataset_chunks, read_chunk, source_chunks
from cairn.util.errors import CairnError
from cairn.tokenizer.base import get_tokenizer
from cairn.data.run_tokenizer import training_texts

EOT = "<|endoftext|>"
FILES = ("train.tokens", "val.tokens", "test.tokens", "train.offsets.npy", "val.offsets.npy", "test.offsets.npy")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def long_stories(n: int, seed: int = 0) -> list[str]:
    """Stories of TinyStories' length (~1 KB), so per-story bookkeeping is as small as it is there."""
    parts = make_stories(3 * n, seed)
    return ["\n\n".join(parts[i:i + 3]) for i in range(0, 3 * n, 3)]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def prepare(tmp_path: Path, source: Path, cache: str, tok, **kw):
    cfg_keys = {k: kw.pop(k) for k in ("n_samples", "train_frac", "val_frac") if k in kw}
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / cache), **cfg_keys)
    return prepare_data(cfg, kw.pop("seed", 7), tok, **kw)


def split_texts(split, tok) -> list[str]:
    """The stories of a cached split, decoded one by one (without their EOT)."""
    return [tok.decode(split.story(i)[:-1]) for i in range(split.n_stories)]


# ---------------------------------------------------------------- chunked reading

TXT = (f"\ufeffFirst story.\r\nStill first.\r\n{EOT}\r\n\r\n  Second {EOT} inline.\n{EOT}\n{EOT}\n"
       + "".join(f"Story {i}.\nLine two of {i}.\n  {EOT}  \n" for i in range(40)) + "Last, no separator after.")
BLANK_TXT = "".join(f"Story {i}\nline\n{'  ' if i % 3 else ''}\n\n" for i in range(50)) + "\u3000\nEnd."


@pytest.mark.parametrize("name,body,sep", [
    ("s.txt", TXT, EOT),
    ("b.txt", BLANK_TXT, "blank"),
    ("j.jsonl", "\ufeff" + "".join(json.dumps({"text": t, "n": i}) + ("\r\n" if i % 2 else "\n")
                                   for i, t in enumerate(["", "  caf\u00e9 ", None, "\u201cx\u201d\n\ny"] * 20)), EOT),
])
def test_any_chunk_size_reads_the_same_stories(tmp_path, name, body, sep):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    whole = load_texts(str(path), txt_separator=sep)
    assert len(whole) > 40
    for chunk_bytes in (1, 5, 64, 300):
        chunks = list(source_chunks(str(path), txt_separator=sep, chunk_bytes=chunk_bytes))
        assert len(chunks) >= min(5, path.stat().st_size // chunk_bytes)
        assert chunks[0].start == 0 and chunks[-1].end == path.stat().st_size
        assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
        assert list(iter_texts(str(path), txt_separator=sep, chunk_bytes=chunk_bytes)) == whole


def test_problems_name_the_file_line_whatever_the_chunk(tmp_path):
    good = [json.dumps({"text": t}) for t in make_stories(60)]
    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text("\n".join(good[:47] + ['{"text": oops}'] + good[47:]) + "\n", encoding="utf-8")
    bad_utf8 = tmp_path / "u.txt"
    head = "".join(f"Story {i}.\n{EOT}\n" for i in range(30)).encode()
    bad_utf8.write_bytes(head + b"caf\xe9\n" + head)
    for chunk_bytes in (1, 100, 1 << 20):
        with pytest.raises(CairnError) as e:
            list(iter_texts(str(bad_json), chunk_bytes=chunk_bytes))
        assert str(e.value).startswith(f"{bad_json}:48: not valid JSON")
        with pytest.raises(CairnError) as e:
            list(iter_texts(str(bad_utf8), chunk_bytes=chunk_bytes))
        assert str(e.value) == f"{bad_utf8}:61: not valid UTF-8 (byte {len(head) + 3}): convert the file to UTF-8"


def test_parquet_and_datasets_are_read_in_row_batches(tmp_path):
    texts = make_stories(3000)
    texts[5], texts[2500] = None, ""
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"story": texts}), path, row_group_size=700)
    expected = [t if t is not None else "" for t in texts]
    chunks = list(source_chunks(str(path), text_field="story", chunk_bytes=20_000))
    assert len(chunks) >= 3 and [t for c in chunks for t in read_chunk(c)[0]] == texts
    assert load_texts(str(path), text_field="story") == expected

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    chunks = list(_dataset_chunks(ds, "hub dataset 'x'", "text", 20_000))
    assert len(chunks) >= 3 and [t for c in chunks for t in read_chunk(c)[0]] == texts


# ---------------------------------------------------------------- the same bytes on any number of workers

@pytest.mark.slow
def test_cache_is_byte_identical_whatever_the_workers_and_chunk_size(tmp_path, tok):
    texts = long_stories(600)
    for i in range(0, 600, 37):
        texts[i] = " \n "  # empty stories are dropped before the split, wherever their chunk is
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    runs = {
        "one process, one chunk": prepare(tmp_path, src, "a", tok, workers=1),
        "one process, small chunks": prepare(tmp_path, src, "b", tok, workers=1, chunk_bytes=3000),
        "two workers, small chunks": prepare(tmp_path, src, "c", tok, workers=2, chunk_bytes=5000),
    }
    assert multiprocessing.active_children() == []  # the pool is shut down
    first = runs["one process, one chunk"]
    assert runs["two workers, small chunks"].meta["prepared"]["workers"] == 2
    for name, data in runs.items():
        assert data.key == first.key and data.meta["splits"] == first.meta["splits"], name
        for f in FILES:
            assert (data.cache_dir / f).read_bytes() == (first.cache_dir / f).read_bytes(), (name, f)
    # ... and it is what the in-memory split of the cleaned stories says, story by story
    expected = split_stories(clean_texts(texts), 7, 0, 0.8, 0.1)
    for name in ("train", "val", "test"):
        assert split_texts(first.split(name), tok) == expected[name]


@pytest.mark.slow
def test_worker_problem_names_the_file_line(tmp_path, tok):
    lines = [json.dumps({"text": t}) for t in long_stories(300)]
    lines[250] = '{"story": "no text field"}'
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CairnError) as e:
        prepare(tmp_path, src, "c", tok, workers=2, chunk_bytes=4000)
    assert str(e.value).startswith(f"{src}:251: no field 'text' (found 'story')")
    assert multiprocessing.active_children() == []
    assert not list((tmp_path / "c" / "tokens").glob("*"))


@pytest.mark.slow
def test_interrupted_parallel_prepare_leaves_no_cache_and_no_workers(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "s.jsonl", long_stories(400))
    real_bar = cache_mod._bar
    updates = []

    class StopsMidway:
        def __init__(self, bar):
            self.bar = bar

        def __enter__(self):
            self.bar.__enter__()
            return self

        def __exit__(self, *exc):
            return self.bar.__exit__(*exc)

        def update(self, n):
            updates.append(n)
            if len(updates) == 20:
                raise KeyboardInterrupt  # Ctrl-C while workers tokenize

    monkeypatch.setattr(cache_mod, "_bar", lambda total, desc, progress: (
        StopsMidway(real_bar(total, desc, progress)) if desc == "tokenize" else real_bar(total, desc, progress)))
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, src, "c", tok, workers=2, chunk_bytes=4000)
    assert len(updates) == 20
    assert multiprocessing.active_children() == []
    assert list((tmp_path / "c" / "tokens").iterdir()) == []  # neither the cache nor its temp folder


# ---------------------------------------------------------------- one split everywhere

@pytest.mark.parametrize("n_samples", [0, 150])
def test_training_texts_are_the_cached_train_split(tmp_path, tok, n_samples):
    texts = long_stories(400)
    texts[3] = ""
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    data = prepare(tmp_path, src, "c", tok, workers=1, chunk_bytes=5000, n_samples=n_samples, seed=11,
                   train_frac=0.7, val_frac=0.2)
    learn, held_out = training_texts(str(src), seed=11, n_samples=n_samples, train_frac=0.7)
    assert learn == split_texts(data.train, tok)  # the same stories, in the same (file) order
    assert sorted(held_out) == sorted(split_texts(data.val, tok) + split_texts(data.test, tok))
    n = n_samples or 399
    assert len(learn) == int(0.7 * n) and len(learn) + len(held_out) == n
    assert not set(learn) & set(held_out)


def test_n_samples_streamed_reads_only_what_it_needs(tmp_path, tok, monkeypatch):
    texts = long_stories(500)
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    encoded = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: encoded.append(1) or real(text))
    data = prepare(tmp_path, src, "c", tok, workers=1, chunk_bytes=2000, n_samples=20, train_frac=0.5,
                   val_frac=0.25)
    assert [data.split(s).n_stories for s in ("train", "val", "test")] == [10, 5, 5]
    assert len(encoded) == 20  # chunks holding no sampled story are not tokenized
    expected = split_stories(texts, 7, 20, 0.5, 0.25)
    assert {s: split_texts(data.split(s), tok) for s in expected} == expected


# ---------------------------------------------------------------- bounded memory

_PEAK = """
import json, resource, sys
from cairn.config.sections import DataConfig
from cairn.data import prepare_data
from cairn.tokenizer.base import get_tokenizer
if __name__ == "__main__":
    tok = get_tokenizer("gpt2")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepare_data(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2]), 0, tok, workers=1)
    print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def _peak_growth_mb(source: Path, cache: Path) -> float:
    r = subprocess.run([sys.executable, "-c", _PEAK, str(source), str(cache)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["growth_kb"] / 1024


@pytest.mark.slow
def test_peak_memory_does_not_follow_the_file_size(tmp_path):
    block = "".join(json.dumps({"text": t}) + "\n" for t in long_stories(500)).encode()
    sizes = {}
    for name, mb in (("small", 2), ("large", 26)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "wb") as f:
            for _ in range(-(-mb * 10**6 // len(block))):
                f.write(block)
        sizes[name] = path.stat().st_size / 1e6
    small = _peak_growth_mb(tmp_path / "small.jsonl", tmp_path / "cache-small")
    large = _peak_growth_mb(tmp_path / "large.jsonl", tmp_path / "cache-large")
    # Holding the texts would add more than the file's size; the streamed path adds only a few
    # bytes per story (the split of each, its token count) on top of a few chunks.
    assert large - small < 0.25 * (sizes["large"] - sizes["small"]), (small, large, sizes)


# ---------------------------------------------------------------- cairn prepare

def test_cairn_prepare_reports_and_reuses_the_cache(tmp_path, capsys):
    from cairn.cli import main

    src = write_jsonl(tmp_path / "s.jsonl", long_stories(200))

    def run(*extra):
        capsys.readouterr()
        code = main(["prepare", "--data", str(src), "--cache-dir", str(tmp_path / "c"), "--seed", "3",
                     "--n-samples", "100", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = json.loads(run("--json", "--workers", "1"))
    assert out["cached"] is False and out["workers"] == 1 and out["source_bytes"] == src.stat().st_size
    assert [out["splits"][s]["stories"] for s in ("train", "val", "test")] == [80, 10, 10]
    assert out["tokens"] > 0 and out["mb_per_s"] > 0 and out["peak_rss_mb"] > 0
    text = run()
    assert text.startswith("cached ") and "80 stories" in text and "peak memory" in text
    assert main(["prepare", "--data", str(src), "--workers", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--workers" in err


def test_the_scale_corpus_script_writes_seeded_sentence_shuffled_copies(tmp_path):
    """benchmarks/scripts/scale_corpus.py: copy 0 is the sample, each later copy its stories with
    their sentences in a seeded order; the same seed writes the same bytes."""
    from conftest import REPO, write_stories

    sample = tmp_path / "sample"
    sample.mkdir()
    stories = ["One. Two! Three? Four.", "Lily ran. Tom sat. They laughed. The end."]
    write_stories(sample / "s.jsonl", stories)
    outs, script = [], REPO / "benchmarks" / "scripts" / "scale_corpus.py"
    for seed in (0, 0, 1):
        out = tmp_path / f"big{len(outs)}.jsonl"
        outs.append(out)
        subprocess.run([sys.executable, str(script), "--sample", str(sample), "--times", "5", "--seed", str(seed),
                        "--out", str(out)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    texts = load_texts(str(outs[0]))
    assert len(texts) == 10 and texts[:2] == stories
    assert all(sorted(t.split(" ")) == sorted(stories[i % 2].split(" ")) for i, t in enumerate(texts))
    assert len(set(texts)) > 6  # the copies differ from each other
    assert outs[0].read_bytes() == outs[1].read_bytes() != outs[2].read_bytes()
