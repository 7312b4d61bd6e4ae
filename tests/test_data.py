"""Tests for cairn.data: sources, splits, the token cache, packed/padded batching and batch order."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cairn.config.sections import DataConfig
from cairn.data.batching import ScoreBatches, row_lengths, score_sample
from cairn.data import (
    PackedDataset,
    PaddedDataset,
    StoryWindows,
    PreparedData,
    SplitTokens,
    clean_texts,
    collate_packed,
    collate_padded,
    epoch_order,
    load_texts,
    make_loader,
    num_batches,
    prepare_data,
    source_fingerprint,
    split_stories,
)
from cairn.data import sources as sources_mod
from cairn.data.cache import cache_root
from cairn.util.errors import CairnError
from cairn.tokenizer.base import get_tokenizer

EOT = "<|endoftext|>"
TINYSTORIES = Path(os.environ.get("CAIRN_TINYSTORIES")
                   or Path(__file__).resolve().parents[2] / "shared/data/tinystories")
needs_tinystories = pytest.mark.skipif(not any(TINYSTORIES.glob("*.jsonl")),
                                       reason=f"TinyStories sample not found at {TINYSTORIES}")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def stories(n: int, start: int = 0) -> list[str]:
    return [f"Story {i}: Tom saw a cat. The cat was {'very ' * (i % 4)}happy." for i in range(start, start + n)]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, "CairnError messages must be one line"
    return msg


# ---------------------------------------------------------------- sources

def test_txt_with_endoftext_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(f"Once upon a time.\nThe end.\n{EOT}\nSecond story.\n  {EOT}  \n\n"
                    f"Third has {EOT} inside a line.\n{EOT}\n", encoding="utf-8")
    assert load_texts(str(path)) == ["Once upon a time.\nThe end.", "Second story.",
                                     f"Third has {EOT} inside a line."]


def test_txt_with_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"One.\r\nStill one.\r\n\r\n\r\nTwo.\r\n   \r\nThree.")
    assert load_texts(str(path), txt_separator="blank") == ["One.\nStill one.", "Two.", "Three."]


def test_jsonl_keeps_text_exactly(tmp_path):
    texts = ["  Lily ran.\n\nShe fell.  ", "Ben \u201csang\u201d.", ""]
    path = write_jsonl(tmp_path / "s.jsonl", texts)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": null}\n\n')  # null story and a trailing blank line
    assert load_texts(str(path)) == texts + [""]


def test_parquet_with_custom_field(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "story": ["A cat.", None, "A dog."]}), path)
    assert load_texts(str(path), text_field="story") == ["A cat.", "", "A dog."]


def test_directory_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / "b.jsonl", ["b1", "b2"])
    (tmp_path / "a.txt").write_text(f"a1\n{EOT}\na2\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["c1"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / ".hidden" / "x.txt").write_text("not data either")
    assert load_texts(str(tmp_path)) == ["a1", "a2", "b1", "b2", "c1"]


def test_glob(tmp_path):
    write_jsonl(tmp_path / "part-2.jsonl", ["two"])
    write_jsonl(tmp_path / "part-1.jsonl", ["one"])
    write_jsonl(tmp_path / "other.jsonl", ["other"])
    assert load_texts(str(tmp_path / "part-*.jsonl")) == ["one", "two"]
    assert load_texts(str(tmp_path / "part-[2].jsonl")) == ["two"]


def test_clean_texts_drops_only_empty_and_blank():
    texts = ["A.", "", "   ", "\n\t\n", "  B.  ", "\u3000"]
    assert clean_texts(texts) == ["A.", "  B.  "]


def test_missing_paths(tmp_path):
    for source in (str(tmp_path / "nope"), "./nope.jsonl", "nope.txt", "~/no/such/dir/x", "a/b/c"):
        with pytest.raises(CairnError) as e:
            load_texts(source)
        assert f"data path {source!r} does not exist" in one_line(e)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CairnError) as e:
        load_texts(str(bad))
    assert f"{bad}:3" in one_line(e) and "JSON" in str(e.value)

    nofield = write_jsonl(tmp_path / "nofield.jsonl", ["a", "b"], field="story")
    with pytest.raises(CairnError) as e:
        load_texts(str(nofield))
    assert f"{nofield}:1" in one_line(e) and "'text'" in str(e.value) and "text-field" in str(e.value)

    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 3}\n')
    with pytest.raises(CairnError, match="notstr.jsonl:1"):
        load_texts(str(notstr))

    for name in ("latin1.txt", "latin1.jsonl"):
        path = tmp_path / name
        body = '{"text": "ok"}\n{"text": "caf\xe9"}\n' if name.endswith("jsonl") else "ok\n<|endoftext|>\ncaf\xe9\n"
        path.write_bytes(body.encode("latin-1"))
        with pytest.raises(CairnError) as e:
            load_texts(str(path))
        assert f"{path}:" in one_line(e) and "UTF-8" in str(e.value)
    assert f"{tmp_path / 'latin1.jsonl'}:2" in str(e.value)

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"story": ["x"], "id": [1]}), parquet)
    with pytest.raises(CairnError) as e:
        load_texts(str(parquet))
    assert "story, id" in one_line(e) and "'text'" in str(e.value)

    (tmp_path / "x.csv").write_text("text\nhi\n")
    with pytest.raises(CairnError, match="unknown type"):
        load_texts(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CairnError, match="no data files"):
        load_texts(str(tmp_path / "empty"))
    with pytest.raises(CairnError, match="no data files match"):
        load_texts(str(tmp_path / "*.parquet.nothing*"))


def test_hub_without_network_fails_fast(monkeypatch):
    # The probe is what stands between the user and `datasets`' long retries.
    monkeypatch.setattr(sources_mod, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(CairnError) as e:
        load_texts("roneneldan/TinyStories")
    assert time.monotonic() - t0 < 2
    assert "cannot load hub dataset 'roneneldan/TinyStories' (no network?)" in one_line(e)
    assert "pass local files with --data PATH" in e.value.for_cli()
    assert "pass local files with data.source PATH" in str(e.value)  # a Python caller is told the setting


def test_hub_real_call_is_bounded():
    # Unpatched: offline it must stop at the probe; online the hub answers "not found" quickly.
    t0 = time.monotonic()
    with pytest.raises(CairnError) as e:
        load_texts("cairn-tests-no-such-owner/no-such-dataset")
    assert time.monotonic() - t0 < 15
    one_line(e)
    if not sources_mod._hub_reachable():
        assert "pass local files" in str(e.value)


def test_hub_with_offline_env_goes_through_datasets_quickly(tmp_path):
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: set it before the process starts, as a
    # user does (in this process an earlier test may have imported it already)
    code = ("from cairn.data.sources import load_texts\nfrom cairn.util.errors import CairnError\n"
            "try:\n    load_texts('cairn-tests-no-such-owner/no-such-dataset')\n"
            "except CairnError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 20
    assert "cairn-tests-no-such-owner/no-such-dataset" in p.stdout and "pass local files" in p.stdout, p.stderr


def test_fingerprint_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_jsonl(a / "s.jsonl", ["x", "y"])
    write_jsonl(b / "s.jsonl", ["x", "y"])
    assert source_fingerprint(str(a)) == source_fingerprint(str(b))
    assert source_fingerprint(str(a / "s.jsonl")) == source_fingerprint(str(b / "s.jsonl"))
    write_jsonl(b / "s.jsonl", ["x", "z"])
    assert source_fingerprint(str(a)) != source_fingerprint(str(b))
    assert source_fingerprint(str(a), text_field="story") != source_fingerprint(str(a))
    # hub ids need no network to fingerprint, and the split matters
    assert source_fingerprint("owner/ds") != source_fingerprint("owner/ds", hub_split="validation")


# ---------------------------------------------------------------- splits

def test_split_sizes_determinism_and_disjointness():
    texts = stories(100)
    s = split_stories(texts, seed=42, n_samples=0, train_frac=0.8, val_frac=0.1)
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(texts)  # disjoint and complete
    assert s == split_stories(texts, 42, 0, 0.8, 0.1)
    assert s["train"] != split_stories(texts, 43, 0, 0.8, 0.1)["train"]
    assert s["train"] != texts[:80]  # shuffled, not the file order


def test_split_n_samples_and_rounding():
    texts = stories(100)
    s = split_stories(texts, seed=0, n_samples=30, train_frac=0.8, val_frac=0.1)
    assert [len(s[k]) for k in ("train", "val", "test")] == [24, 3, 3]
    kept = s["train"] + s["val"] + s["test"]
    assert len(set(kept)) == 30 and set(kept) <= set(texts)
    # int(0.29 * 100) is 28 in floating point; the split must give 29
    assert len(split_stories(texts, 0, 0, 0.29, 0.0)["train"]) == 29
    assert len(split_stories(texts, 0, 1000, 0.5, 0.5)["test"]) == 0  # n_samples above the count: all


def test_split_too_few_stories():
    with pytest.raises(CairnError) as e:
        split_stories(stories(5), seed=0, n_samples=0, train_frac=0.8, val_frac=0.1)
    assert "too few stories (5)" in one_line(e) and "val_frac" in str(e.value)
    with pytest.raises(CairnError, match="too few stories"):
        split_stories(stories(1), seed=0, train_frac=0.5, val_frac=0.0)
    assert len(split_stories(stories(5), seed=0, train_frac=0.8, val_frac=0.0)["train"]) == 4


# ---------------------------------------------------------------- cache

def data_cfg(tmp_path: Path, source: Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_prepare_round_trips_and_reuses_cache(logs, tmp_path, tok, monkeypatch):
    texts = stories(40) + ["", "   "]
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    cfg = data_cfg(tmp_path, src)
    data = prepare_data(cfg, seed=3, tokenizer=tok)
    assert isinstance(data, PreparedData) and data.cache_dir.parent == tmp_path / "cache" / "tokens"
    expected = split_stories(clean_texts(texts), 3, 0, 0.8, 0.1)
    for name in ("train", "val", "test"):
        split = data.split(name)
        assert split.tokens.dtype == np.uint16 and isinstance(split.tokens, np.memmap)
        assert split.n_stories == len(expected[name]) == data.meta["splits"][name]["stories"]
        assert tok.decode(split.tokens) == "".join(t + EOT for t in expected[name])
        assert tok.decode(split.story(1)[:-1]) == expected[name][1] and split.story(1)[-1] == tok.eot_id
        assert split.n_bytes == sum(len(t.encode()) for t in expected[name])
        assert split.n_bytes == int(tok.token_bytes[np.asarray(split.tokens)].sum())
    assert data.meta["stories_dropped_empty"] == 2 and data.meta["splits"]["train"]["tokens"] == data.train.n_tokens

    def refuse(text):
        raise AssertionError("tokenized again although the cache should be used")

    monkeypatch.setattr(tok, "encode", refuse)
    logs.clear()
    again = prepare_data(cfg, seed=3, tokenizer=tok)
    assert any("using cached tokens at" in line for line in logs)
    assert again.key == data.key and np.array_equal(again.train.tokens, data.train.tokens)
    assert np.array_equal(again.val.offsets, data.val.offsets)


def test_cache_key_follows_settings_and_content(tmp_path, tok):
    src = write_jsonl(tmp_path / "s.jsonl", stories(20))
    base = prepare_data(data_cfg(tmp_path, src), 0, tok).key
    keys = {
        "seed": prepare_data(data_cfg(tmp_path, src), 1, tok).key,
        "train_frac": prepare_data(data_cfg(tmp_path, src, train_frac=0.7), 0, tok).key,
        "val_frac": prepare_data(data_cfg(tmp_path, src, val_frac=0.2), 0, tok).key,
        "n_samples": prepare_data(data_cfg(tmp_path, src, n_samples=10), 0, tok).key,
    }
    (tmp_path / "moved").mkdir()
    copy = tmp_path / "moved" / "s.jsonl"
    copy.write_bytes(src.read_bytes())
    assert prepare_data(data_cfg(tmp_path, copy), 0, tok).key == base  # same content
    write_jsonl(src, stories(19) + ["A different last story."])
    keys["content"] = prepare_data(data_cfg(tmp_path, src), 0, tok).key
    assert base not in keys.values() and len(set(keys.values())) == len(keys)


def test_interrupted_prepare_leaves_nothing_and_broken_cache_is_rebuilt(logs, tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "s.jsonl", stories(20))
    cfg = data_cfg(tmp_path, src)
    real = tok.encode
    calls = []

    def dies_halfway(text):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(text)

    monkeypatch.setattr(tok, "encode", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, 0, tok)
    assert len(calls) == 10 and list((tmp_path / "cache" / "tokens").iterdir()) == []
    monkeypatch.setattr(tok, "encode", real)

    data = prepare_data(cfg, 0, tok)
    good = np.array(data.train.tokens)
    (data.cache_dir / "train.tokens").write_bytes(b"\0\0")  # a damaged cache must not be trusted
    again = prepare_data(cfg, 0, tok)
    assert any("rebuilding" in line for line in logs)
    assert np.array_equal(np.array(again.train.tokens), good)


def test_no_text_left(tmp_path, tok):
    src = write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    with pytest.raises(CairnError) as e:
        prepare_data(data_cfg(tmp_path, src), 0, tok)
    assert "no text left in" in one_line(e) and "blank.jsonl" in str(e.value)


def test_empty_test_split_and_pickling(tmp_path, tok):
    src = write_jsonl(tmp_path / "s.jsonl", stories(300))
    data = prepare_data(data_cfg(tmp_path, src, train_frac=0.9, val_frac=0.1), 0, tok)
    assert data.test.n_stories == 0 and data.test.n_tokens == 0
    assert len(PackedDataset(data.test, 8)) == 0 and len(PaddedDataset(data.test, 8)) == 0
    # A DataLoader worker gets the file's path, not a copy of the tokens.
    blob = pickle.dumps(data.train)
    assert len(blob) < data.train.tokens.nbytes
    back = pickle.loads(blob)
    assert isinstance(back.tokens, np.memmap) and np.array_equal(back.tokens, data.train.tokens)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path / "env"))
    assert cache_root("") == tmp_path / "env" / "tokens"
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg" / "tokens"
    monkeypatch.delenv("CAIRN_CACHE")
    assert cache_root("") == Path.home() / ".cache" / "cairn" / "tokens"


# ---------------------------------------------------------------- batching

def synthetic_split(lengths, eot=99) -> SplitTokens:
    """Stories of the given lengths with distinct token ids (1, 2, 3, ...), each followed by `eot`."""
    parts, offsets, nxt = [], [0], 1
    for n in lengths:
        parts += list(range(nxt, nxt + n)) + [eot]
        nxt += n
        offsets.append(len(parts))
    return SplitTokens(np.array(parts, dtype=np.uint16), np.array(offsets), n_bytes=0, eot_id=eot)


def test_packing_keeps_every_token_once(tok):
    split = SplitTokens.from_texts(stories(7), tok)
    stream = np.asarray(split.tokens, dtype=np.int64)
    assert tok.decode(stream) == "".join(t + EOT for t in stories(7))
    T = 13
    ds = PackedDataset(split, T)
    assert len(ds) == (len(stream) - 1) // T
    inputs = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).numpy()
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))]).numpy()
    assert all(ds[i]["input_ids"].dtype == torch.int64 and ds[i]["input_ids"].shape == (T,) for i in range(len(ds)))
    assert np.array_equal(inputs, stream[:len(ds) * T])
    assert np.array_equal(labels, stream[1:len(ds) * T + 1])  # each target once, in order
    assert len(stream) - 1 - len(ds) * T < T  # only a short tail is dropped
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packing_exact_fit():
    split = synthetic_split([5, 3])  # 10 tokens: 9 targets = 3 windows of 3, nothing dropped
    ds = PackedDataset(split, 3)
    assert len(ds) == 3
    assert torch.cat([ds[i]["labels"] for i in range(3)]).tolist() == [2, 3, 4, 5, 99, 6, 7, 8, 99]


def test_shifted_packing_cuts_elsewhere_with_as_many_windows():
    from cairn.data import epoch_offset

    split = synthetic_split([30, 40, 25])  # 98 tokens, 97 targets
    T = 8
    stream = np.asarray(split.tokens, dtype=np.int64)
    ds = PackedDataset(split, T, shiftable=True)
    assert len(ds) == (len(stream) - T) // T == 11
    offsets = {epoch_offset(T, 42, e) for e in range(1, 40)}
    assert epoch_offset(T, 42, 0) == 0 and len(offsets) > 3 and offsets <= set(range(T))
    for o in range(T):  # every offset: the same count, each window the stream's next T + 1 tokens
        shifted = ds.shifted(o)
        assert len(shifted) == len(ds)
        labels = torch.cat([shifted[i]["labels"] for i in range(len(shifted))]).numpy()
        assert np.array_equal(labels, stream[o + 1:o + 1 + len(ds) * T])
    with pytest.raises(ValueError, match="offset"):
        PackedDataset(split, T, offset=3)  # not shiftable: its length has no room for an offset


def test_pack_shift_moves_the_cuts_each_epoch_and_replays_them_on_resume(tmp_path, stories_file, small_tokenizer):
    """The training loader of epoch e cuts at epoch_offset(e); the first epoch is the unshifted cut;
    a loader resumed mid-epoch gives the batches the uninterrupted epoch gives."""
    from cairn.config.io import apply_overrides
    from cairn.config.presets import preset
    from cairn.data import epoch_offset
    from cairn.training.build import build_trainer
    from cairn.training.distributed import Dist

    cfg = apply_overrides(preset("tiny"), {"source": str(stories_file), "tokenizer": str(small_tokenizer),
                                           "seq_len": 16, "context_len": 64, "pack_shift": True, "end_stories": 0})
    trainer = build_trainer(cfg, tmp_path / "run", Dist())
    stream = np.asarray(trainer.data.train.split.tokens, dtype=np.int64)
    for epoch in (0, 1, 2):
        o = epoch_offset(16, cfg.seed, epoch)
        first = next(iter(trainer.batches.epoch(epoch)))["input_ids"]
        for row in first.numpy():  # every row is a window cut at o + k * 16
            starts = [k for k in range(len(stream) - 16) if (k - o) % 16 == 0
                      and np.array_equal(stream[k:k + 16], row)]
            assert starts, f"epoch {epoch}: a row not cut at offset {o}"
    assert epoch_offset(16, cfg.seed, 1) != 0 or epoch_offset(16, cfg.seed, 2) != 0
    whole = [b["input_ids"] for b in trainer.batches.epoch(1)]
    resumed = [b["input_ids"] for b in trainer.batches.epoch(1, start=2)]
    assert len(resumed) == len(whole) - 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole[2:]))


def test_padded_rows_and_chunking():
    eot = 99
    split = synthetic_split([3, 10, 1], eot=eot)
    T = 4
    ds = PaddedDataset(split, T)
    # rows have 4, 11 and 2 inputs: 1 + 3 + 1 chunks
    assert len(ds) == 5
    assert ds[0]["input_ids"].tolist() == [eot, 1, 2, 3] and ds[0]["labels"].tolist() == [1, 2, 3, eot]
    chunks = [ds[i] for i in (1, 2, 3)]
    assert [len(c["input_ids"]) for c in chunks] == [4, 4, 3]
    story = list(range(4, 14))
    assert torch.cat([c["input_ids"] for c in chunks]).tolist() == [eot] + story
    assert torch.cat([c["labels"] for c in chunks]).tolist() == story + [eot]  # none lost, none twice
    assert ds[4]["input_ids"].tolist() == [eot, 14] and ds[4]["labels"].tolist() == [14, eot]


def test_story_windows_score_every_target_once_with_context():
    eot = 99
    split = synthetic_split([3, 10, 1], eot=eot)
    T, S = 4, 2
    ds = StoryWindows(split, T, stride=S)
    # rows of 4, 11 and 2 targets: the 11 are scored as 4, then 2, 2, 2, 1 with context before them
    assert len(ds) == 7
    rows = [[eot, 1, 2, 3, eot], [eot] + list(range(4, 14)) + [eot], [eot, 14, eot]]
    scored = {0: [], 1: [], 2: []}
    story_of = [0, 1, 1, 1, 1, 1, 2]
    for i, story in enumerate(story_of):
        item = ds[i]
        x, y = item["input_ids"].tolist(), item["labels"].tolist()
        row = rows[story]
        assert len(x) == len(y) <= T
        start = row.index(x[0]) if x[0] != eot else 0
        assert x == row[start:start + len(x)] and all(t in (-100, row[start + j + 1]) for j, t in enumerate(y))
        real = [v for v in y if v != -100]
        assert y[len(y) - len(real):] == real  # the context comes first, the scored targets after it
        if i > 1 and story == 1:
            assert len(x) == T and len(y) - len(real) >= T - S  # a later window has T - S of context
        scored[story] += real
    assert [scored[k] for k in (0, 1, 2)] == [r[1:] for r in rows]  # every target once, in order
    n_targets = sum(int((b["labels"] != -100).sum())
                    for b in make_loader(ds, 3, shuffle=False, seed=0, epoch=0, drop_last=False))
    assert n_targets == split.n_tokens
    with pytest.raises(ValueError):
        StoryWindows(split, T, stride=T + 1)


def test_story_windows_loss_against_a_direct_computation():
    """The evaluation over StoryWindows equals, token by token, a direct computation: each story
    on its own from [EOT], each target t predicted from row[start:e], where e is the first window
    end (T, T + S, T + 2S, ..., capped at the row) past t and start = max(0, e - T). So a story's
    score does not depend on its neighbours, and a long story's tail sees its earlier tokens."""
    import torch.nn.functional as F

    from cairn.config.sections import ModelConfig
    from cairn.eval.metrics import evaluate
    from cairn.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_mlp=64, context_len=16)).eval()
    stories = [[5, 6, 7, 8, 9], list(range(20, 41)), [10, 11, 12, 13]]
    T, S, eot = 8, 3, 99
    parts, offsets = [], [0]
    for story in stories:
        parts += story + [eot]
        offsets.append(len(parts))
    split = SplitTokens(np.array(parts, dtype=np.uint16), np.array(offsets), n_bytes=0, eot_id=eot)
    loader = make_loader(StoryWindows(split, T, stride=S), 2, shuffle=False, seed=0, epoch=0, drop_last=False)
    r = evaluate(model, loader, torch.device("cpu"), "fp32", np.ones(128, dtype=np.int64))

    expected, count = 0.0, 0
    with torch.no_grad():
        for story in stories:
            row = [eot] + story + [eot]
            n = len(row) - 1
            ends = [min(T + k * S, n) for k in range(n)]
            for t in range(n):
                e = next(b for b in ends if b > t)
                start = max(0, e - T)
                logits = model(torch.tensor([row[start:e]]))[0, t - start]
                expected += float(F.cross_entropy(logits, torch.tensor(row[t + 1])))
                count += 1
    assert r["tokens"] == count == split.n_tokens
    assert r["loss"] * r["tokens"] == pytest.approx(expected, rel=1e-5)
    # the scoring batches (rows sorted by length, batched by positions; the head on scored rows
    # only), at several sizes and split over processes, score the same
    rows = StoryWindows(split, T, stride=S)
    for tokens in (1, 8, 20, 1000):
        assert evaluate(model, ScoreBatches(rows, tokens=tokens), torch.device("cpu"), "fp32",
                        np.ones(128, dtype=np.int64))["loss"] == pytest.approx(r["loss"], rel=1e-6)
        shares = [evaluate(model, ScoreBatches(rows, tokens=tokens, rank=k, world=3), torch.device("cpu"), "fp32",
                           np.ones(128, dtype=np.int64)) for k in range(3)]
        assert sum(x["tokens"] for x in shares) == count
        assert sum(x["loss"] * x["tokens"] for x in shares) == pytest.approx(expected, rel=1e-5)


def test_score_batches_pad_little_and_every_process_steps_alike():
    split = synthetic_split([3, 10, 1, 7, 2, 30, 5, 1, 9])
    rows = StoryWindows(split, 8, stride=4)
    assert rows.lengths().tolist() == [len(rows[i]["input_ids"]) for i in range(len(rows))]
    assert row_lengths(PackedDataset(split, 4)).tolist() == [4] * len(PackedDataset(split, 4))
    for world in (1, 2, 3):
        per_rank = [ScoreBatches(rows, tokens=16, rank=k, world=world) for k in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of global batches everywhere
        seen = sorted(i for b in per_rank for share in b.shares for i in share)
        assert seen == list(range(len(rows)))  # every row once
        for b in per_rank:
            for share in b.shares:
                lengths = [len(rows[i]["input_ids"]) for i in share]
                assert len(share) * max(lengths) <= 16 or len(share) == 1
                assert lengths == sorted(lengths)


def test_a_partial_evaluation_scores_a_fixed_sample_of_the_old_batches_rows():
    n, seed = 50, 7
    a, b = score_sample(n, seed, 12), score_sample(n, seed, 12)
    assert a.tolist() == b.tolist() and len(a) == 12  # the same rows at every evaluation
    # the rows the first 3 batches of 4 held when held-out rows were read in the seeded order
    old = [i for batch in make_loader(_Rows(n), 4, shuffle=True, seed=seed, epoch=0, drop_last=False)
           for i in batch["input_ids"][:, 0].tolist()]
    assert sorted(old[:12]) == a.tolist()
    assert score_sample(n, seed, 0).tolist() == list(range(n)) == score_sample(n, seed, n + 5).tolist()


class _Rows:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i, i]), "labels": torch.tensor([i, i])}


def test_collate_padded_pads_to_longest_in_batch():
    ds = PaddedDataset(synthetic_split([3, 10, 1]), seq_len=1000)
    batch = collate_padded([ds[0], ds[1], ds[2]], pad_id=7)
    lengths = [4, 11, 2]
    assert batch["input_ids"].shape == (3, 11)  # the longest row here, not seq_len
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].dtype == torch.int64
    mask = batch["attention_mask"].bool()
    assert mask.sum(1).tolist() == lengths
    assert torch.equal(batch["labels"] == -100, ~mask)
    assert (batch["input_ids"][~mask] == 7).all()
    for row, n in enumerate(lengths):
        assert torch.equal(batch["labels"][row, :n], ds[row]["labels"])
        assert torch.equal(batch["input_ids"][row, :n], ds[row]["input_ids"])


def test_collate_packed():
    ds = PackedDataset(synthetic_split([20]), 4)
    batch = collate_packed([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 4)


# ---------------------------------------------------------------- batch order

def test_epoch_order():
    a = epoch_order(50, seed=1, epoch=0, shuffle=True)
    assert np.array_equal(a, epoch_order(50, 1, 0, True))
    assert not np.array_equal(a, epoch_order(50, 1, 1, True))
    assert not np.array_equal(a, epoch_order(50, 2, 0, True))
    assert sorted(a.tolist()) == list(range(50))
    assert epoch_order(5, 1, 3, False).tolist() == [0, 1, 2, 3, 4]


def test_num_batches():
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(10, 3, drop_last=True) == 3
    assert num_batches(0, 3, drop_last=False) == 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_resumes_exactly(drop_last):
    ds = PackedDataset(synthetic_split([30, 40, 25]), 4)  # 24 windows
    full = [b["input_ids"] for b in make_loader(ds, 5, shuffle=True, seed=7, epoch=2, drop_last=drop_last)]
    assert len(full) == num_batches(len(ds), 5, drop_last)
    seen = torch.cat([b[:, 0] for b in full]).tolist()
    assert len(seen) == len(set(seen)) == (20 if drop_last else 24)  # each window at most once
    for k in (0, 1, 3, len(full)):
        tail = [b["input_ids"] for b in make_loader(ds, 5, shuffle=True, seed=7, epoch=2, start_batch=k,
                                                     drop_last=drop_last)]
        assert len(tail) == len(full) - k and all(torch.equal(x, y) for x, y in zip(tail, full[k:]))
    other = [b["input_ids"] for b in make_loader(ds, 5, shuffle=True, seed=7, epoch=3, drop_last=drop_last)]
    assert not all(torch.equal(x, y) for x, y in zip(other, full))
    with pytest.raises(ValueError):
        make_loader(ds, 5, shuffle=True, seed=7, epoch=2, start_batch=len(full) + 1, drop_last=drop_last)


def test_loader_padded_and_workers():
    ds = PaddedDataset(synthetic_split([3, 10, 1, 6, 2]), 5)
    batches = list(make_loader(ds, 3, shuffle=True, seed=0, epoch=0, drop_last=False, pad_id=0))
    assert all(set(b) == {"input_ids", "labels", "attention_mask"} for b in batches)
    assert all(b["input_ids"].shape[1] == b["attention_mask"].sum(1).max() for b in batches)
    n_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_targets == ds.split.n_tokens  # every story token and EOT is a target once
    with_workers = list(make_loader(ds, 3, shuffle=True, seed=0, epoch=0, drop_last=False, num_workers=2))
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, with_workers))


# ---------------------------------------------------------------- the real TinyStories sample

@needs_tinystories
def test_tinystories_sample(tmp_path, tok):
    texts = load_texts(str(TINYSTORIES))
    assert len(texts) == 4709 and clean_texts(texts) == texts
    assert load_texts(str(TINYSTORIES / "*.jsonl")) == texts
    data = prepare_data(DataConfig(source=str(TINYSTORIES), cache_dir=str(tmp_path)), 42, tok)
    splits = (data.train, data.val, data.test)
    assert [s.n_stories for s in splits] == [3767, 470, 472]
    assert sum(s.n_tokens for s in splits) == 970663 + 4709
    assert sum(int((np.asarray(s.tokens) == tok.eot_id).sum()) for s in splits) == 4709
    assert sum(s.n_bytes for s in splits) == sum(len(t.encode()) for t in texts)
    assert len(PackedDataset(data.train, 256)) == (data.train.n_tokens - 1) // 256


def test_an_epochs_short_last_batch_steps_eager_and_full_ones_compiled(tmp_path, stories_file, small_tokenizer):
    """torch.compile would compile the short last batch's shape again (seconds, once an epoch):
    the step runs that one batch on the eager model, every full one on the compiled forward, and
    trains on both."""
    from cairn.training.build import build_trainer
    from cairn.training.distributed import Dist
    from helpers import config

    cfg = config(stories_file, tokenizer=small_tokenizer, end_stories=0, batch_size=3)
    trainer = build_trainer(cfg, tmp_path / "run", Dist())
    stepper = trainer.stepper
    assert stepper.rows == 3
    batches = list(trainer.batches.epoch(0))
    assert len(batches) > 2 and batches[-1]["input_ids"].shape[0] < 3, "the split needs a short last batch"
    compiled_rows: list[int] = []

    def compiled(x, **kw):  # stands in for torch.compile(wrapped): the routing is under test
        compiled_rows.append(x.shape[0])
        return stepper.wrapped(x, **kw)

    stepper.forward = compiled
    for b in batches:
        result = stepper([b], 1e-3, trainer.state)
        assert result.tokens == int((b["labels"] != -100).sum())
    assert compiled_rows == [3] * (len(batches) - 1)
    assert trainer.state.step == len(batches)
