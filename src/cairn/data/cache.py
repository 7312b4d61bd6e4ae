"""Tokenize once, then memory-map: each split becomes one flat token file on disk.

A split is stored as the packed stream itself, every story followed by <|endoftext|>:

    s0 EOT s1 EOT s2 EOT ...

plus the story boundaries (`offsets`), so packed windows are plain slices of the file and padded
rows are found through the offsets. Files live in `<cache root>/tokens/<key>/`, where the key
hashes the data's content and everything that changes the tokens; a second run with the same data
and settings maps the files instead of tokenizing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NoReturn, Optional, Sequence, TypeVar

import numpy as np

from cairn.config.sections import DataConfig
from cairn.util import files
from cairn.util.errors import CairnError, option
from cairn.tokenizer.base import Tokenizer
from cairn.util.host import usable_cores
from cairn.data.parallel import ChunkPool, encode_chunk, scan_chunk
from cairn.data.sources import (CHUNK_BYTES, Chunk, ChunkProblem, LineCounter, TextsChunk, source_bytes,
                                source_chunks, source_fingerprint)
from cairn.data.splits import SPLITS, split_assignment

if TYPE_CHECKING:
    from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger(__name__)

# Bump when the file layout or the meaning of the cache changes: old caches are then ignored.
# 2: a split's stories are in file order (1: in shuffled order).
FORMAT_VERSION = 2
_ENCODE_BATCH = 1024  # stories per encode_batch call: enough to keep tiktoken's threads busy
_STALE_TMP_S = 24 * 3600  # temp folders older than this were left by a killed prepare
# Below this, one core tokenizes a source (~16 MB/s) in about the time workers take to start
# (each imports cairn and builds its tokenizer, ~1-2 s).
_POOL_MIN_BYTES = 32 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    # Little-endian on disk whatever the machine, so a cache can be copied between machines.
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class SplitTokens:
    """One split as a flat token stream (each story followed by EOT) and its story boundaries.

    `tokens[offsets[i]:offsets[i + 1]]` is story i with its trailing EOT. `n_bytes` is the UTF-8
    size of the split's story texts (EOTs add none), the denominator of bits per byte.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, n_bytes: int, eot_id: int,
                 path: Optional[Path] = None):
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError("offsets must start at 0 and end at len(tokens)")
        self.tokens = tokens
        self.offsets = offsets
        self.n_bytes = int(n_bytes)
        self.eot_id = int(eot_id)
        self.path = path  # the token file when memory-mapped; lets workers re-map instead of copying

    @property
    def n_stories(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def story(self, i: int) -> np.ndarray:
        """Story i's tokens, ending with its EOT (a view, no copy)."""
        if not -self.n_stories <= i < self.n_stories:
            raise IndexError(f"story {i} out of range ({self.n_stories} stories)")
        i %= self.n_stories
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return self.n_stories

    def __repr__(self) -> str:
        return f"SplitTokens(stories={self.n_stories}, tokens={self.n_tokens}, bytes={self.n_bytes})"

    # DataLoader workers started with "spawn" pickle the dataset; a memmap would be pickled as a
    # full in-memory copy, so send the file's path and map it again on the other side.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["tokens"] = None
            state["_dtype"] = self.tokens.dtype.str
        return state

    def __setstate__(self, state: dict) -> None:
        dtype = state.pop("_dtype", None)
        self.__dict__.update(state)
        if self.tokens is None:
            self.tokens = _map_tokens(self.path, np.dtype(dtype), int(self.offsets[-1]))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Tokenizer, progress: bool = False) -> "SplitTokens":
        """Tokenize `texts` in memory (e.g. to evaluate an arbitrary file). Texts are used as given."""
        chunks, offsets, n_bytes = [], [0], 0
        for batch_tokens, batch_offsets, batch_bytes in _encode(texts, tokenizer, progress, "tokenize"):
            chunks.append(batch_tokens)
            offsets.extend((batch_offsets + offsets[-1]).tolist())
            n_bytes += batch_bytes
        dtype = token_dtype(tokenizer.vocab_size)
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        return cls(tokens, np.array(offsets, dtype=np.int64), n_bytes, tokenizer.eot_id)

    @classmethod
    def load(cls, directory: Path, split: str, meta: dict) -> "SplitTokens":
        info = meta["splits"][split]
        path = Path(directory) / f"{split}.tokens"
        tokens = _map_tokens(path, np.dtype(meta["dtype"]), info["tokens"])
        offsets = np.load(Path(directory) / f"{split}.offsets.npy")
        return cls(tokens, offsets, info["bytes"], meta["eot_id"], path=path)


def _map_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file (an empty test split)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _encode(texts: Sequence[str], tokenizer: Tokenizer, progress: bool,
            desc: str) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (tokens, end offsets within the batch, utf-8 bytes) per batch of stories."""
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    eot = [tokenizer.eot_id]
    # disable=None turns the bar off when stderr is not a terminal (logs, tests).
    with tqdm(total=len(texts), desc=desc, unit="story", disable=None if progress else True) as bar:
        for start in range(0, len(texts), _ENCODE_BATCH):
            batch = list(texts[start:start + _ENCODE_BATCH])
            encoded = tokenizer.encode_batch(batch)
            lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
            flat = np.fromiter(itertools.chain.from_iterable(ids + eot for ids in encoded),
                               dtype=np.int64, count=int(lengths.sum()))
            if len(flat) and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
                raise ValueError(f"tokenizer {tokenizer.name} returned ids outside its vocabulary")
            yield flat.astype(dtype), np.cumsum(lengths), sum(len(t.encode("utf-8")) for t in batch)
            bar.update(len(batch))


# ---------------------------------------------------------------- the prepared data

@dataclass
class PreparedData:
    """The three tokenized splits of one data configuration, and where they are cached."""

    train: SplitTokens
    val: SplitTokens
    test: SplitTokens
    cache_dir: Path
    key: str
    meta: dict = field(default_factory=dict)
    built: bool = False  # tokenized by this call (False: an existing cache was mapped)

    def split(self, name: str) -> SplitTokens:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else $CAIRN_CACHE, else ~/.cache/cairn; tokens go in its `tokens` folder."""
    base = cache_dir or os.environ.get("CAIRN_CACHE") or "~/.cache/cairn"
    return Path(os.path.expanduser(base)) / "tokens"


def _identity(data_cfg: DataConfig, seed: int, tokenizer: Tokenizer, fingerprint: str) -> dict:
    """Everything that decides the cached tokens (the source's content, not its path)."""
    return {
        "format": FORMAT_VERSION,
        "source_fingerprint": fingerprint,
        "text_field": data_cfg.text_field,
        "txt_separator": data_cfg.txt_separator,
        "hub_split": data_cfg.hub_split,
        "seed": seed,
        "n_samples": data_cfg.n_samples,
        "train_frac": data_cfg.train_frac,
        "val_frac": data_cfg.val_frac,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
    }


def cache_key(data_cfg: DataConfig, seed: int, tokenizer: Tokenizer, fingerprint: str) -> str:
    """sha256 of the cache's identity."""
    ident = _identity(data_cfg, seed, tokenizer, fingerprint)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_valid_meta(directory: Path) -> Optional[dict]:
    """The cache's meta if every file is there with the size it promises, else None."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            info = meta["splits"][split]
            if (directory / f"{split}.tokens").stat().st_size != info["tokens"] * itemsize:
                return None
            if not (directory / f"{split}.offsets.npy").is_file():
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_cached(directory: Path, key: str, meta: dict) -> PreparedData:
    return PreparedData(train=SplitTokens.load(directory, "train", meta), val=SplitTokens.load(directory, "val", meta),
                        test=SplitTokens.load(directory, "test", meta), cache_dir=directory, key=key, meta=meta)


def _verify(directory: Path, meta: dict, vocab_size: int) -> Optional[str]:
    """What is wrong with a cache whose files have the right sizes, or None: story offsets that
    do not run from 0 up to the token count, counts that disagree with meta.json, token ids
    outside the vocabulary. Reads every token once (memory-mapped, a chunk at a time)."""
    try:
        if not (isinstance(meta["eot_id"], int) and 0 <= meta["eot_id"] < vocab_size):
            return f"meta.json's eot_id {meta['eot_id']!r} is not a token id"
        for split in SPLITS:
            info = meta["splits"][split]
            offsets = np.load(directory / f"{split}.offsets.npy", allow_pickle=False)
            if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) != info["stories"] + 1:
                return f"{split}.offsets.npy does not hold {info['stories']} stories' offsets"
            if len(offsets) and (offsets[0] != 0 or offsets[-1] != info["tokens"] or np.any(np.diff(offsets) < 1)):
                return f"{split}.offsets.npy does not run from 0 up to the split's {info['tokens']} tokens"
            if not (isinstance(info["bytes"], int) and info["bytes"] >= 0):
                return f"meta.json's {split} byte count {info['bytes']!r} is impossible"
            tokens = _map_tokens(directory / f"{split}.tokens", np.dtype(meta["dtype"]), info["tokens"])
            for start in range(0, len(tokens), 1 << 24):
                if int(tokens[start:start + (1 << 24)].max()) >= vocab_size:
                    return f"{split}.tokens holds token ids beyond the vocabulary of {vocab_size}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _remove_stale_temps(root: Path) -> None:
    # A prepare killed outright (SIGKILL, power loss) cannot clean up after itself; the next one does.
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _make_meta(data_cfg: DataConfig, seed: int, tokenizer: Tokenizer, key: str, fingerprint: str,
               n_loaded: int, n_kept: int, counts: dict) -> dict:
    return {
        **_identity(data_cfg, seed, tokenizer, fingerprint),
        "key": key,
        "source": data_cfg.source,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).str,
        "stories_loaded": n_loaded,
        "stories_dropped_empty": n_loaded - n_kept,
        "splits": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_workers(workers: int, n_bytes: Optional[int]) -> int:
    """Processes to tokenize with: `workers` when given (> 0); for 0, every usable core, or one for
    local files of under _POOL_MIN_BYTES, which one core tokenizes before workers would have started."""
    if workers < 0:
        raise CairnError(f"{option('workers')} must be 0 (every core) or more, got {workers}")
    if workers:
        return workers
    if n_bytes is not None and n_bytes < _POOL_MIN_BYTES:
        return 1
    return usable_cores()


@dataclass
class _Scan:
    """Pass 1: what the source holds, counted chunk by chunk without keeping any text."""

    stories: int = 0  # as read, empty ones included
    kept: list[int] = field(default_factory=list)  # non-empty stories per chunk
    n_bytes: int = 0  # bytes read (file bytes; Arrow buffer bytes for parquet/hub data)

    @property
    def n_kept(self) -> int:
        return int(sum(self.kept))


def _in_order(results: Iterator[T], lines: LineCounter) -> Iterator[T]:
    """`ChunkPool.map`'s results, with a chunk's bad data reported at its line in the file."""
    while True:
        try:
            item = next(results)
        except StopIteration:
            return
        except ChunkProblem as p:
            raise lines.locate(p) from None
        yield item


def _chunks(data_cfg: DataConfig, chunk_bytes: int) -> Iterator[Chunk]:
    return source_chunks(data_cfg.source, data_cfg.text_field, data_cfg.txt_separator, data_cfg.hub_split,
                         chunk_bytes)


def _bar(total: Optional[int], desc: str, progress: bool) -> tqdm[NoReturn]:
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal (logs, tests).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if progress else True)


def _already_read(args: tuple) -> bool:
    # Counting texts already in memory is cheaper than sending them to a worker.
    return isinstance(args[0], TextsChunk)


def _scan(data_cfg: DataConfig, pool: ChunkPool, chunk_bytes: int, total: Optional[int], progress: bool) -> _Scan:
    scan, lines = _Scan(), LineCounter()
    tasks = ((chunk,) for chunk in _chunks(data_cfg, chunk_bytes))
    with _bar(total, "read", progress) as bar:
        results = pool.map(scan_chunk, tasks, here=_already_read)
        for (chunk,), (n_stories, n_kept, n_lines) in _in_order(results, lines):
            lines.advance(chunk, n_lines)
            scan.stories += n_stories
            scan.kept.append(n_kept)
            scan.n_bytes += chunk.n_bytes
            bar.update(chunk.n_bytes)
    return scan


def _changed(where: str, detail: str) -> CairnError:
    return CairnError(f"{where} changed while it was being prepared ({detail}): run again once it is written")


def _encode_tasks(data_cfg: DataConfig, chunk_bytes: int, scan: _Scan, assign: np.ndarray,
                  dtype: np.dtype) -> Iterator[tuple]:
    """Pass 2's tasks: each chunk with its stories' splits; chunks with no story in any split are skipped."""
    bounds = np.concatenate([[0], np.cumsum(scan.kept, dtype=np.int64)])
    n = 0
    for n, chunk in enumerate(_chunks(data_cfg, chunk_bytes), start=1):
        if n > len(scan.kept):
            break
        part = assign[bounds[n - 1]:bounds[n]]
        if (part >= 0).any():
            yield chunk, part, dtype, len(SPLITS)
    if n != len(scan.kept):
        raise _changed(data_cfg.source, f"{n} parts, first read {len(scan.kept)}")


def _write_splits(directory: Path, data_cfg: DataConfig, pool: ChunkPool, chunk_bytes: int, scan: _Scan,
                  assign: np.ndarray, dtype: np.dtype, progress: bool) -> dict:
    """Pass 2: read and tokenize the chunks again, append each story to its split's files; return the counts.

    A split's stories are stored in file order, not in the shuffled order that picked them: the
    split is still a seeded random sample, the training loader reshuffles windows (or rows) every
    epoch, and file order lets each story be written the moment its chunk is tokenized, whatever
    the number of workers or the chunk size. Only which stories share a packed window follows the
    file, which matters only for data sorted by content.
    """
    lengths: list[list[np.ndarray]] = [[] for _ in SPLITS]
    n_bytes = [0] * len(SPLITS)
    tasks = _encode_tasks(data_cfg, chunk_bytes, scan, assign, dtype)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(directory / f"{s}.tokens", "wb")) for s in SPLITS]
        # With n_samples, chunks without a sampled story are skipped: the share of bytes is unknown.
        bar = stack.enter_context(_bar(None if data_cfg.n_samples else scan.n_bytes, "tokenize", progress))
        try:
            for (chunk, *_), parts in pool.map(encode_chunk, tasks):
                for i, (tokens, story_lengths, part_bytes) in enumerate(parts):
                    tokens.tofile(files[i])
                    lengths[i].append(story_lengths)
                    n_bytes[i] += part_bytes
                bar.update(chunk.n_bytes)
        except ChunkProblem as p:
            raise _changed(p.path, "pass 1 read it without this problem") from None
    counts = {}
    for i, s in enumerate(SPLITS):
        story_lengths = np.concatenate(lengths[i] or [np.zeros(0, dtype=np.int64)])
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(story_lengths, dtype=np.int64)])
        np.save(directory / f"{s}.offsets.npy", offsets)
        counts[s] = {"stories": len(offsets) - 1, "tokens": int(offsets[-1]), "bytes": n_bytes[i]}
    return counts


def prepare_data(data_cfg: DataConfig, seed: int, tokenizer: Tokenizer, *,
                 workers: int = 0, chunk_bytes: int = CHUNK_BYTES, progress: bool = True) -> PreparedData:
    """Read, clean, split and tokenize the data once; later calls with the same settings map the cache.

    The source is streamed twice, a chunk of about `chunk_bytes` at a time: pass 1 counts the
    non-empty stories, which fixes the seeded split of each one (`split_assignment`); pass 2
    tokenizes the chunks on `workers` processes (0: every usable core) and appends each story to
    its split. Memory holds a few chunks per worker and a few bytes per story, never the source,
    and the files are the same whatever `workers` and `chunk_bytes` are.

    The cache is written into a temporary folder and renamed into place in one step, so an
    interrupted prepare never leaves a partial cache that a later run would trust.
    """
    root = cache_root(data_cfg.cache_dir)
    fingerprint = source_fingerprint(data_cfg.source, data_cfg.text_field, data_cfg.txt_separator,
                                     data_cfg.hub_split)
    key = cache_key(data_cfg, seed, tokenizer, fingerprint)
    final = root / key

    meta = _read_valid_meta(final)
    problem = _verify(final, meta, tokenizer.vocab_size) if meta is not None else None
    if meta is not None and problem is None:
        log.info(f"using cached tokens at {final}")
        return _load_cached(final, key, meta)
    if final.exists():
        state = f"corrupt ({problem})" if problem else "incomplete or from another version"
        log.warning(f"cache at {final} is {state}: rebuilding it")
        shutil.rmtree(final, ignore_errors=True)

    start = time.perf_counter()
    total = source_bytes(data_cfg.source)
    with ChunkPool(prepare_workers(workers, total), tokenizer) as pool:
        log.info(f"reading {data_cfg.source}" + (f" ({total / 1e6:,.1f} MB)" if total is not None else "")
            + f" with {pool.workers} worker{'s' if pool.workers > 1 else ''}")
        scan = _scan(data_cfg, pool, chunk_bytes, total, progress)
        if scan.n_kept == 0:
            raise CairnError(f"no text left in {data_cfg.source} after dropping empty stories: "
                             f"check the data and {option('data.text_field')} / {option('data.txt_separator')}")
        assign = split_assignment(scan.n_kept, seed, data_cfg.n_samples, data_cfg.train_frac, data_cfg.val_frac)
        log.info(f"{scan.stories} stories loaded, {scan.stories - scan.n_kept} empty dropped; "
            + ", ".join(f"{s} {int((assign == i).sum())}" for i, s in enumerate(SPLITS)))

        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CairnError(f"cannot create the cache folder {root} ({e.strerror}): "
                             f"set {option('data.cache_dir')} or CAIRN_CACHE") from None
        _remove_stale_temps(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        try:
            try:
                counts = _write_splits(tmp, data_cfg, pool, chunk_bytes, scan, assign,
                                       token_dtype(tokenizer.vocab_size), progress)
                meta = _make_meta(data_cfg, seed, tokenizer, key, fingerprint, scan.stories, scan.n_kept, counts)
                meta["prepared"] = {"source_bytes": scan.n_bytes, "workers": pool.workers,
                                    "seconds": round(time.perf_counter() - start, 3)}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                files.fsync_tree(tmp)  # the rename below must never publish files still in the page cache
            except OSError as e:
                raise CairnError(f"cannot write the token cache in {root} ({e.strerror or e}): "
                                 f"free disk space or set {option('data.cache_dir')}") from None
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process (another rank, a parallel run) finished the same cache first: use it.
                meta = _read_valid_meta(final)
                if meta is None:
                    raise
        finally:
            # Whatever stopped us (an error, Ctrl-C), the half-written folder must not linger.
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"cached tokens at {final}: " + ", ".join(f"{s} {counts[s]['tokens']:,}" for s in SPLITS) + " tokens")
    data = _load_cached(final, key, meta)
    data.built = True
    return data
