"""Which tokenizer a run uses: decided here and nowhere else.

A run's `tokenizer` setting is one of
  gpt2       GPT-2's exact BPE, built into cairn;
  bpe:N      an N-token byte-level BPE learned on the run's own training split (never on its
             held-out stories), or on a seeded sample of data.tokenizer_sample_bytes of it when the
             split is bigger, cached by the data's content, split settings and sample size;
  DIRECTORY  a tokenizer made by `cairn tokenizer train`.
Every run keeps a copy of an own tokenizer in RUN/tokenizer/. Whatever reads the run later
(resume, eval, generate, export) uses that copy first, so a run stays usable when the directory
it was trained with moves, and checks that the tokenizer is the one the checkpoint names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from cairn.config.sections import DataConfig, RunConfig
from cairn.data import clean_texts, load_texts, source_fingerprint, split_stories
from cairn.data.cache import cache_root
from cairn.data.sources import CHUNK_BYTES, iter_texts, resolve_files, source_bytes
from cairn.data.splits import split_assignment
from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import EOT, INFO_FILE, TOKENIZER_FILE, BPETokenizer, Tokenizer, get_tokenizer, parse_bpe_spec
from cairn.tokenizer.learn import train_bpe

log = logging.getLogger(__name__)

RUN_COPY = "tokenizer"  # RUN/tokenizer: the run's own copy of an own tokenizer


def for_training(cfg: RunConfig, run_dir: Path, resuming: bool) -> Tokenizer:
    """The tokenizer a training run in `run_dir` uses. A resumed `bpe:N` run uses its own copy
    (the very tokenizer its checkpoints were trained with); a new one learns (or finds cached) a
    BPE on its training split. A directory is used as named (a resume then checks it is the
    checkpoint's); when it has moved away, the run's copy stands in for it."""
    copy = Path(run_dir) / RUN_COPY
    has_copy = (copy / TOKENIZER_FILE).is_file()
    if cfg.tokenizer == "gpt2":
        return get_tokenizer("gpt2")
    vocab = parse_bpe_spec(cfg.tokenizer)
    if vocab is not None:
        return get_tokenizer(str(copy)) if resuming and has_copy else learn_on_split(vocab, cfg.data, cfg.seed)
    if not Path(cfg.tokenizer).is_dir() and has_copy:
        return get_tokenizer(str(copy))
    return _directory(cfg.tokenizer)


def for_checkpoint(checkpoint: Path, spec: object, recorded: object) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: the copy beside it or in its run first, else
    the directory its config names; refused when it is not the one the checkpoint recorded."""
    if not isinstance(spec, str) or spec == "gpt2":
        tokenizer = get_tokenizer("gpt2")
    else:
        places = [checkpoint / RUN_COPY]
        if checkpoint.parent.name == "checkpoints":
            places.append(checkpoint.parent.parent / RUN_COPY)
        found = next((p for p in places if (p / TOKENIZER_FILE).is_file()), None)
        if found is None and not (Path(spec) / TOKENIZER_FILE).is_file():
            raise CairnError(f"{checkpoint} was trained with the tokenizer in {spec!r}, which is gone, and its run "
                             "keeps no copy (RUN/tokenizer): put the tokenizer directory back")
        tokenizer = get_tokenizer(str(found or spec))
    check_same(tokenizer, recorded, checkpoint)
    return tokenizer


def check_same(tokenizer: Tokenizer, recorded: object, checkpoint: Path) -> None:
    """`recorded` is a checkpoint's {"name": ...} entry; a different tokenizer would read its
    token ids as other text."""
    name = recorded.get("name") if isinstance(recorded, dict) else None
    if name is not None and name != tokenizer.name:
        raise CairnError(f"{checkpoint} was trained with tokenizer {name!r}, but this run's holds "
                         f"{tokenizer.name!r}: put the run's tokenizer back (RUN/tokenizer)")


def save_copy(tokenizer: Tokenizer, run_dir: Path) -> None:
    """Keep an own tokenizer with the run (GPT-2 is built in: nothing to keep)."""
    tokenizer.save(Path(run_dir) / RUN_COPY)


def for_data(spec: str, data_cfg: DataConfig, seed: int) -> Tokenizer:
    """The tokenizer that tokenizes a data source outside a run (`cairn prepare`)."""
    vocab = parse_bpe_spec(spec)
    if vocab is not None:
        return learn_on_split(vocab, data_cfg, seed)
    return get_tokenizer("gpt2") if spec == "gpt2" else _directory(spec)


def _directory(spec: str) -> Tokenizer:
    if not (Path(spec) / TOKENIZER_FILE).is_file():
        raise CairnError(f"tokenizer {spec!r} is neither 'gpt2', 'bpe:N' nor a directory holding "
                         f"{TOKENIZER_FILE}: use 'gpt2', bpe:4096 (learned on the training split) or a directory "
                         "made by `cairn tokenizer train`")
    return get_tokenizer(spec)


def learn_on_split(vocab_size: int, data_cfg: DataConfig, seed: int) -> BPETokenizer:
    """A BPE learned on exactly the training split `cairn train` makes of `data_cfg` with `seed`, so
    no validation or test story shapes it; on a split of more than `data.tokenizer_sample_bytes`,
    on a seeded random sample of its stories of about that many bytes (`training_sample`), read
    from the source without holding the split. Cached by the data's content, the split settings and
    the sample's size: the second run with the same data maps it instead of learning it again
    (deterministic either way)."""
    d = data_cfg
    whole = _whole_split_fits(d)
    key = _split_key(vocab_size, d, seed, None if whole else d.tokenizer_sample_bytes)
    out = cache_root(d.cache_dir).parent / "tokenizers" / f"bpe{vocab_size}-{key}"
    cached = _cached(out)
    if cached is not None:
        log.info(f"using cached tokenizer {cached.name} ({cached.vocab_size} tokens) at {out}")
        return cached
    start = time.perf_counter()
    if whole:
        learn, _ = training_texts(d.source, text_field=d.text_field, txt_separator=d.txt_separator,
                                  hub_split=d.hub_split, seed=seed, n_samples=d.n_samples, train_frac=d.train_frac)
        what = f"the {len(learn):,} training stories"
    else:
        sample = training_sample(d.source, d.tokenizer_sample_bytes, text_field=d.text_field,
                                 txt_separator=d.txt_separator, hub_split=d.hub_split, seed=seed,
                                 n_samples=d.n_samples, train_frac=d.train_frac)
        learn = sample.texts
        what = (f"{len(learn):,} of the {sample.train_stories:,} training stories "
                f"({sample.n_bytes / 1e6:,.1f} of {sample.train_bytes / 1e6:,.1f} MB, a seeded sample)")
    read_s = time.perf_counter() - start
    try:
        tok = train_bpe(learn, vocab_size, out)
    except OSError as e:
        raise CairnError(f"cannot write the tokenizer cache {out} ({e.strerror or e}): "
                         f"free disk space or set {option('data.cache_dir')}") from None
    log.info(f"learned tokenizer {tok.name} ({tok.vocab_size} tokens) on {what} in {read_s:.1f}s of reading and "
             f"{time.perf_counter() - start - read_s:.1f}s of learning; cached at {out}")
    return tok


def _whole_split_fits(d: DataConfig) -> bool:
    """Whether the training split is certainly within `data.tokenizer_sample_bytes`, known without
    reading it: no limit, or local .txt/.jsonl files of no more bytes (a story's text is never longer
    than its stored form). Such a split is learned on whole, under the key it always had."""
    if not d.tokenizer_sample_bytes:
        return True
    resolved = resolve_files(d.source)
    if resolved is None or any(p.suffix.lower() not in (".txt", ".jsonl") for p in resolved[1]):
        return False
    n_bytes = source_bytes(d.source)
    return n_bytes is not None and n_bytes <= d.tokenizer_sample_bytes


def _split_key(vocab_size: int, d: DataConfig, seed: int, sample_bytes: Optional[int] = None) -> str:
    fingerprint = source_fingerprint(d.source, d.text_field, d.txt_separator, d.hub_split)
    ident: dict[str, object] = {
        "version": 2, "fingerprint": fingerprint, "text_field": d.text_field, "txt_separator": d.txt_separator,
        "hub_split": d.hub_split, "seed": seed, "n_samples": d.n_samples, "train_frac": d.train_frac,
        "vocab_size": vocab_size, "min_frequency": 2}
    if sample_bytes is not None:  # a sample (of the same seed): the whole split's key stays as it was
        ident["sample_bytes"] = sample_bytes
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _cached(out: Path) -> Optional[BPETokenizer]:
    if (out / TOKENIZER_FILE).is_file() and (out / INFO_FILE).is_file():
        return BPETokenizer(out)
    return None


def training_texts(source: str, *, text_field: str = "text", txt_separator: str = EOT, hub_split: str = "train",
                   seed: int = 42, n_samples: int = 0, train_frac: float = 0.8,
                   all_stories: bool = False) -> tuple[list[str], list[str]]:
    """(stories to learn from, held-out stories) of `source`, cleaned as `cairn train` cleans them.

    Both in file order; the first are exactly the train split `prepare_data` caches with the same
    seed, n_samples and train_frac (`split_assignment`), the second the rest of the kept stories."""
    texts = clean_texts(load_texts(source, text_field, txt_separator, hub_split))
    if not texts:
        raise CairnError(f"no text left in {source!r} after dropping empty stories: check the data and "
                         f"{option('data.text_field')}")
    if all_stories:
        return texts, []
    if not 0 < train_frac <= 1:
        raise CairnError(f"{option('data.train_frac')} must be in (0, 1], got {train_frac}")
    # the same shuffle and cut as `cairn train`: its first int(train_frac * n) stories are the training split
    splits = split_stories(texts, seed, n_samples, train_frac, 0.0)
    return splits["train"], splits["test"]


@dataclass
class Sample:
    texts: list[str]  # the sampled training stories, in file order
    n_bytes: int  # their UTF-8 bytes
    train_stories: int  # the training split's stories ...
    train_bytes: int  # ... and bytes


SAMPLE_STREAM = 0x746F6B  # the sample's random stream, apart from the split's (same seed)


def training_sample(source: str, sample_bytes: int, *, text_field: str = "text", txt_separator: str = EOT,
                    hub_split: str = "train", seed: int = 42, n_samples: int = 0,
                    train_frac: float = 0.8, chunk_bytes: int = CHUNK_BYTES) -> Sample:
    """A seeded random sample of the training split `training_texts` gives (the same seed, n_samples
    and train_frac): its stories in an order shuffled with `seed`, as many as fit in `sample_bytes`
    UTF-8 bytes (at least one), returned in file order. The whole split when it fits.

    The source is streamed twice, never held: the first pass keeps each story's length (8 bytes a
    story), which decides the split and the sample; the second keeps the sampled stories only. So
    memory holds about `sample_bytes` of text and a chunk of `chunk_bytes` being read, whatever the
    size of the source."""
    learn, _ = split_samples(source, sample_bytes, 0, text_field=text_field, txt_separator=txt_separator,
                             hub_split=hub_split, seed=seed, n_samples=n_samples, train_frac=train_frac,
                             chunk_bytes=chunk_bytes)
    return learn


def split_samples(source: str, learn_bytes: int, held_out_bytes: int, *, text_field: str = "text",
                  txt_separator: str = EOT, hub_split: str = "train", seed: int = 42, n_samples: int = 0,
                  train_frac: float = 0.8, chunk_bytes: int = CHUNK_BYTES) -> tuple[Sample, Sample]:
    """Seeded samples of the training split (about `learn_bytes`, at least one story) and of the
    held-out stories (about `held_out_bytes`; none for 0 or when every story trains), each in file
    order, from two streamed passes over the source (see `training_sample`)."""
    if not 0 < train_frac <= 1:
        raise CairnError(f"{option('data.train_frac')} must be in (0, 1], got {train_frac}")
    lengths = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8"))
                           for t in _kept(source, text_field, txt_separator, hub_split, chunk_bytes)), dtype=np.int64)
    if not len(lengths):
        raise CairnError(f"no text left in {source!r} after dropping empty stories: check the data and "
                         f"{option('data.text_field')}")
    assign = split_assignment(len(lengths), seed, n_samples, train_frac, 0.0)
    train, held = np.flatnonzero(assign == 0), np.flatnonzero(assign > 0)
    rng = np.random.default_rng([seed, SAMPLE_STREAM])
    learn_take, learn_bytes_taken = _take(train, lengths, learn_bytes, rng, at_least=1)
    held_take, held_bytes_taken = _take(held, lengths, held_out_bytes, rng, at_least=0)
    chosen = np.zeros(len(lengths), dtype=np.int8)  # 1: learn from it, 2: held out for the report
    chosen[learn_take] = 1
    chosen[held_take] = 2
    learn: list[str] = []
    held_out: list[str] = []
    for i, t in enumerate(_kept(source, text_field, txt_separator, hub_split, chunk_bytes)):
        if i < len(chosen) and chosen[i]:
            (learn if chosen[i] == 1 else held_out).append(t)
    if len(learn) != len(learn_take) or len(held_out) != len(held_take):
        raise CairnError(f"{source} changed while the tokenizer's sample was read from it: run again once it is "
                         "written")
    return (Sample(learn, learn_bytes_taken, len(train), int(lengths[train].sum())),
            Sample(held_out, held_bytes_taken, len(held), int(lengths[held].sum())))


def _take(part: np.ndarray, lengths: np.ndarray, n_bytes: int, rng: np.random.Generator,
          at_least: int) -> tuple[np.ndarray, int]:
    """The stories of `part` (indices) that fit in `n_bytes`, in an order shuffled by `rng`."""
    order = part[rng.permutation(len(part))]
    sizes = np.cumsum(lengths[order])
    n_take = min(len(order), max(at_least, int(np.searchsorted(sizes, n_bytes, side="right"))))
    return order[:n_take], int(sizes[n_take - 1]) if n_take else 0


def _kept(source: str, text_field: str, txt_separator: str, hub_split: str, chunk_bytes: int) -> Iterator[str]:
    """The source's non-empty stories (`clean_texts`'s), streamed."""
    return (t for t in iter_texts(source, text_field, txt_separator, hub_split, chunk_bytes) if t and not t.isspace())
