"""Own byte-level BPE tokenizers: train, exact round trips, content-derived names, a run end to end."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cairn.cli import main
from cairn.config.io import apply_overrides
from cairn.config.presets import preset
from cairn.util.errors import CairnError
from cairn.checkpoint.load import load
from cairn.tokenizer.base import get_tokenizer
from cairn.tokenizer.learn import train_bpe
from cairn.training import train
from conftest import make_stories

EXTRA = ["Zoë's café served crème brûlée. 日本語のテキスト. Emoji: 🐱🚀!", "Tabs\tand\nnew lines  and   spaces. "]
TRICKY = "Lily’s cat said: “héllo” 123!\n\nThe end. <|endoftext|> ok 🐱 日本 \t x  "


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe(make_stories(300) + EXTRA, 512, out)
    return out


def test_trained_tokenizer_files_and_identity(tokdir):
    tok = get_tokenizer(str(tokdir))
    info = json.loads((tokdir / "cairn-tokenizer.json").read_text())
    raw = (tokdir / "tokenizer.json").read_bytes()
    assert tok.name == info["name"] == "bpe-" + hashlib.sha256(raw).hexdigest()[:16]
    assert tok.vocab_size == info["vocab_size"] <= 512 and tok.vocab_size > 300
    assert tok.eot_id == info["eot_id"] == tok.tok.token_to_id("<|endoftext|>")
    # the story end is one token; in text it is ordinary characters
    assert tok.eot_id not in tok.encode("a <|endoftext|> b")


def test_round_trips_exactly_and_counts_bytes(tokdir):
    tok = get_tokenizer(str(tokdir))
    for text in [TRICKY, *EXTRA, make_stories(1, seed=99)[0], "", " ", "\U0001f600" * 3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes[tok.eot_id] == 0
    assert tok.encode_batch([TRICKY, "Once upon a time"]) == [tok.encode(TRICKY), tok.encode("Once upon a time")]
    # training text compresses: far fewer tokens than bytes
    story = make_stories(1, seed=7)[0]
    assert len(tok.encode(story)) < len(story.encode()) / 2.5


def test_name_follows_the_content(tmp_path, tokdir):
    stories = make_stories(300) + EXTRA
    again = train_bpe(stories, 512, tmp_path / "again")
    assert again.name == get_tokenizer(str(tokdir)).name  # same data, same tokenizer, same name
    other = train_bpe(stories[:150], 512, tmp_path / "other")
    assert other.name != again.name
    smaller = train_bpe(stories, 290, tmp_path / "smaller")
    assert smaller.name != again.name
    # a hand-edited tokenizer.json no longer matches its cairn-tokenizer.json: refused
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "again", edited)
    (edited / "tokenizer.json").write_text((edited / "tokenizer.json").read_text() + "\n")
    with pytest.raises(CairnError, match="changed after training"):
        get_tokenizer(str(edited))


def test_cli_tokenizer_train(tmp_path, stories_file, capsys):
    out = tmp_path / "cli-tok"
    assert main(["tokenizer", "train", "--data", str(stories_file), "--vocab-size", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tok = get_tokenizer(str(out))
    assert tok.name in printed and f"id {tok.eot_id}" in printed and "bytes/token" in printed
    assert main(["tokenizer", "train", "--data", str(stories_file), "--vocab-size", "100", "--out",
                 str(tmp_path / "x")]) == 2
    assert "at least 257" in capsys.readouterr().err


def tiny(source: Path, tokenizer: Path, **kw):
    cfg = preset("tiny")
    base = {"source": str(source), "tokenizer": str(tokenizer), "d_model": 32, "n_heads": 4, "n_layers": 2,
            "d_mlp": 64, "context_len": 64, "seq_len": 32, "batch_size": 4, "max_steps": 6, "eval_every": 3,
            "eval_batches": 2, "checkpoint_every": 3, "report_every": 2}
    return apply_overrides(cfg, {**base, **kw})


@pytest.mark.slow
def test_train_eval_generate_with_an_own_tokenizer(tmp_path, tokdir, stories_file, capsys):
    tokcopy = tmp_path / "mytok"
    shutil.copytree(tokdir, tokcopy)
    tok = get_tokenizer(str(tokcopy))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(stories_file), "--tokenizer", str(tokcopy),
                 "--out", str(run), "--max-steps", "6", "--d-model", "32", "--n-heads", "4", "--d-mlp", "64",
                 "--seq-len", "32", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3",
                 "--no-progress"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["tokenizer"] == {"name": tok.name, "vocab_size": tok.vocab_size}
    loaded = load(run, device="cpu")
    assert loaded.config.model.vocab_size == tok.vocab_size == loaded.model.lm_head.weight.shape[0]
    assert loaded.tokenizer.name == tok.name
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0
    assert main(["generate", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")

    # the run keeps its own copy of the tokenizer: it still loads when the original moves away
    assert (run / "tokenizer" / "tokenizer.json").is_file(), "the training loop must save RUN/tokenizer"
    shutil.move(str(tokcopy), str(tmp_path / "moved"))
    assert load(run, device="cpu").tokenizer.name == tok.name
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--no-progress"]) == 0


def test_resume_with_another_tokenizer_is_refused(tmp_path, tokdir, stories_file):
    # another tokenizer of the same vocabulary size: only its name (content hash) tells them apart
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((tokdir / "tokenizer.json").read_text() + "\n")
    assert get_tokenizer(str(other)).name != get_tokenizer(str(tokdir)).name
    run = tmp_path / "run"
    train(tiny(stories_file, tokdir), run, stop_after=3)
    with pytest.raises(CairnError, match="tokenizer"):
        train(tiny(stories_file, other), run, resume=True)


def test_two_tokenizers_never_share_a_token_cache(tmp_path, tokdir, stories_file):
    from cairn.data import prepare_data

    other = train_bpe(make_stories(300, seed=1), 512, tmp_path / "other")
    cfg = tiny(stories_file, tokdir)
    a = prepare_data(cfg.data, cfg.seed, get_tokenizer(str(tokdir)))
    b = prepare_data(cfg.data, cfg.seed, other)
    assert a.cache_dir != b.cache_dir
    assert a.train.n_bytes == b.train.n_bytes


@pytest.mark.skipif(os.environ.get("CAIRN_SKIP_HF") == "1", reason="asked to skip transformers")
def test_export_with_an_own_tokenizer(tmp_path, tokdir, stories_file):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cairn.export.hf import export_hf

    run = tmp_path / "run"
    train(tiny(stories_file, tokdir), run)
    out = export_hf(run, tmp_path / "hf")
    tok = get_tokenizer(str(tokdir))
    hf_tok = AutoTokenizer.from_pretrained(out)
    story = make_stories(1, seed=3)[0]
    assert hf_tok(story)["input_ids"] == tok.encode(story)
    assert hf_tok.decode(tok.encode(TRICKY)) == TRICKY
    assert hf_tok.eos_token_id == tok.eot_id
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = load(run, device="cpu")
    x = torch.tensor([([tok.eot_id] + tok.encode(story))[:64]])
    with torch.no_grad():
        assert (loaded.model(x) - hf(x).logits).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- the learning sample of a bpe:N run


def _corpus(path: Path, n: int) -> Path:
    from conftest import write_stories

    return write_stories(path, make_stories(n, seed=3))


def test_the_tokenizer_sample_is_seeded_bounded_and_from_the_training_split(tmp_path):
    from cairn.data.run_tokenizer import training_sample, training_texts

    src = str(_corpus(tmp_path / "c.jsonl", 600))
    train_split, _ = training_texts(src, seed=5, train_frac=0.8)
    a = training_sample(src, 8000, seed=5, train_frac=0.8)
    assert a.texts == training_sample(src, 8000, seed=5, train_frac=0.8).texts  # the same seed, the same sample
    assert a.texts != training_sample(src, 8000, seed=6, train_frac=0.8).texts
    assert a.n_bytes == sum(len(t.encode()) for t in a.texts) <= 8000
    assert a.n_bytes > 8000 - max(len(t.encode()) for t in train_split)  # as many stories as fit
    assert a.train_stories == len(train_split) and a.train_bytes == sum(len(t.encode()) for t in train_split)
    position = {t: i for i, t in enumerate(train_split)}
    assert all(t in position for t in a.texts)  # never a held-out story ...
    assert [position[t] for t in a.texts] == sorted(position[t] for t in a.texts)  # ... and in file order
    assert training_sample(src, 10**9, seed=5, train_frac=0.8).texts == train_split  # the whole split when it fits


def test_the_tokenizer_sample_streams_the_source(tmp_path, monkeypatch):
    """A corpus of many read chunks gives a small sample while memory holds about a chunk and the
    sample, never the source's stories."""
    import tracemalloc

    from cairn.data import run_tokenizer

    src = str(_corpus(tmp_path / "big.jsonl", 20000))  # 4.4 MB, read in 64 kB chunks
    monkeypatch.setattr(run_tokenizer, "load_texts", None)  # nothing loads the whole source
    tracemalloc.start()
    try:
        sample = run_tokenizer.training_sample(src, 20_000, seed=1, chunk_bytes=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = Path(src).stat().st_size
    assert sample.n_bytes <= 20_000
    assert peak < total / 4, (peak, total)  # the stories alone, as Python strings, would take more than `total`


def test_a_bpe_run_learns_on_about_the_sample_bytes_and_caches_it_by_them(logs, tmp_path):
    from cairn.config.sections import DataConfig
    from cairn.data.run_tokenizer import _split_key, learn_on_split

    src = str(_corpus(tmp_path / "c.jsonl", 800))
    sampled = DataConfig(source=src, cache_dir=str(tmp_path / "cache"), tokenizer_sample_bytes=30_000)
    tok = learn_on_split(300, sampled, seed=2)
    info = json.loads((tok.directory / "cairn-tokenizer.json").read_text())
    assert 25_000 < info["trained_on"]["bytes"] <= 30_000
    assert any("a seeded sample" in m for m in logs)
    logs.clear()
    assert learn_on_split(300, sampled, seed=2).name == tok.name
    assert any(m.startswith("using cached tokenizer") for m in logs)
    # what decides the sample is in the key; a split within the bytes keeps the key it always had
    whole = DataConfig(source=src, cache_dir=str(tmp_path / "cache"), tokenizer_sample_bytes=0)
    assert _split_key(300, whole, 2) != _split_key(300, sampled, 2, 30_000) != _split_key(300, sampled, 2, 40_000)
    assert tok.directory.name.endswith(_split_key(300, sampled, 2, 30_000))
    roomy = DataConfig(source=src, cache_dir=str(tmp_path / "cache"))  # the default: more than the file
    assert learn_on_split(300, roomy, seed=2).directory.name.endswith(_split_key(300, whole, 2))


def test_cli_tokenizer_train_learns_on_a_streamed_sample_of_a_big_source(tmp_path, capsys, monkeypatch):
    """`cairn tokenizer train` on a source bigger than --tokenizer-sample-bytes learns on a seeded sample
    of the training split and reports on a sample of the held-out stories, without loading the source;
    it learns the same tokenizer as `cairn train`'s bpe:N on the same split and sample."""
    from cairn.config.sections import DataConfig
    from cairn.data import run_tokenizer
    from cairn.data.run_tokenizer import split_samples, training_texts

    src = str(_corpus(tmp_path / "c.jsonl", 800))
    train_split, held = training_texts(src, seed=3, train_frac=0.9)
    learn, report = split_samples(src, 30_000, 10_000, seed=3, train_frac=0.9)
    assert set(learn.texts) <= set(train_split) and set(report.texts) <= set(held)  # never crossed
    assert 0 < report.n_bytes <= 10_000 and report.train_stories == len(held)
    monkeypatch.setattr(run_tokenizer, "load_texts", None)  # nothing loads the whole source
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", src, "--vocab-size", "300", "--out", str(out), "--seed", "3",
                 "--train-frac", "0.9", "--tokenizer-sample-bytes", "30000"]) == 0
    printed = capsys.readouterr().out
    assert f"on {len(learn.texts):,} stories of {len(train_split):,}" in printed and "a seeded sample" in printed
    cfg = DataConfig(source=src, cache_dir=str(tmp_path / "cache"), train_frac=0.9, tokenizer_sample_bytes=30_000)
    assert run_tokenizer.learn_on_split(300, cfg, seed=3).name == get_tokenizer(str(out)).name
