"""Chunks of a source parsed and tokenized on every core, results handed back in order.

Workers are separate processes (tokenizers hold the GIL for much of their work), started with
"spawn" so they never inherit a parent's threads or locks (a training process has torch's); each
builds its tokenizer once, from the same spec the parent's tokenizer was made from. At most
`window` chunks are queued or in flight, and results are consumed in chunk order, so memory is
bounded by a few chunks whatever the size of the source and the output does not depend on which
worker finishes first.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from array import array
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np

from cairn.util.errors import CairnError
from cairn.tokenizer.base import Tokenizer
from cairn.data.sources import Chunk, clean_texts, read_chunk

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

_WORKER_TOKENIZER: Optional[Tokenizer] = None  # a worker process's tokenizer, built once by _init_worker


def tokenizer_spec(tokenizer: Tokenizer) -> Optional[str]:
    """What `get_tokenizer` rebuilds `tokenizer` from in a worker; None if it cannot be rebuilt."""
    if tokenizer.name == "gpt2":
        return "gpt2"
    directory = getattr(tokenizer, "directory", None)
    return str(directory) if directory is not None else None


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL, OOM killer) cannot shut its pool down; its workers would
    # otherwise wait on the task queue forever.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(spec: str, name: str, parent: int) -> None:
    global _WORKER_TOKENIZER
    # Ctrl-C reaches the whole process group; the parent alone decides to stop, then shuts the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per core already: a tokenizer's own threads would only compete with the others.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    from cairn.tokenizer.base import get_tokenizer

    tok = get_tokenizer(spec)
    if tok.name != name:
        raise CairnError(f"tokenizer {spec!r} is {tok.name} in a worker, not {name}: it changed on disk; run again")
    _WORKER_TOKENIZER = tok


# ---------------------------------------------------------------- what one task does

def scan_chunk(chunk: Chunk, tokenizer: Optional[Tokenizer] = None) -> tuple[int, int, int]:
    """(stories, non-empty stories, newlines) of a chunk: pass 1 of `prepare_data`."""
    stories, n_lines = read_chunk(chunk)
    return len(stories), len(clean_texts(stories)), n_lines


def encode_stories(texts: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """(token stream with an EOT after each story, tokens per story with its EOT, UTF-8 bytes).

    Stories are encoded one by one on this core: each one's id list is copied into the stream at
    once, so a chunk never holds all its ids as Python ints (tens of bytes each).
    """
    stream = array("I")  # C unsigned int: 32 bits on every platform numpy supports
    lengths = np.empty(len(texts), dtype=np.int64)
    eot, n_bytes = tokenizer.eot_id, 0
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        stream.extend(ids)
        stream.append(eot)
        lengths[i] = len(ids) + 1
        n_bytes += len(text.encode("utf-8"))
    flat = np.frombuffer(stream, dtype=f"u{stream.itemsize}")
    if len(flat) and int(flat.max()) >= tokenizer.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} returned ids outside its vocabulary")
    return flat.astype(dtype), lengths, n_bytes


def encode_chunk(chunk: Chunk, assign: np.ndarray, dtype: np.dtype, n_splits: int,
                 tokenizer: Optional[Tokenizer] = None) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Pass 2 of `prepare_data`: the chunk's non-empty stories, `assign[i]` saying which split
    story i goes to (-1: none), tokenized; one (stream, lengths, bytes) per split."""
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    if tok is None:
        raise RuntimeError("encode_chunk without a tokenizer outside a ChunkPool worker")
    stories = clean_texts(read_chunk(chunk)[0])
    if len(stories) != len(assign):
        where = getattr(chunk, "path", "the data")
        raise CairnError(f"{where} changed while it was being prepared ({len(stories)} stories in a part that "
                         f"had {len(assign)}): run again once it is written")
    return [encode_stories([t for t, a in zip(stories, assign) if a == s], tok, dtype) for s in range(n_splits)]


# ---------------------------------------------------------------- the pool

class ChunkPool:
    """Runs task functions over chunks, in this process (workers=1) or in a pool of processes.

    A task function takes its arguments and then `tokenizer`: the parent's tokenizer when it runs in the
    parent process, None in a worker (which uses the one it built).
    """

    def __init__(self, workers: int, tokenizer: Tokenizer):
        self.workers = max(1, workers)
        self.tokenizer = tokenizer
        self.spec = tokenizer_spec(tokenizer)
        if self.spec is None:
            self.workers = 1  # a tokenizer not made by get_tokenizer cannot be rebuilt in a worker
        self._executor: Optional[ProcessPoolExecutor] = None

    def __enter__(self) -> "ChunkPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            # Running tasks finish (a chunk is a fraction of a second), queued ones are dropped.
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            if getattr(multiprocessing.current_process(), "_inheriting", False):
                # A spawned worker runs the parent's main script again on start; one that prepares
                # data at import time would start workers of its own, without end.
                raise CairnError("prepare_data ran while a worker process was starting: put the script's code "
                                 "under `if __name__ == \"__main__\":`")
            assert self.spec is not None  # more than one worker only for a tokenizer a worker can rebuild
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self.spec, self.tokenizer.name, os.getpid()))
        return self._executor

    def map(self, fn: Callable[..., Any], tasks: Iterable[tuple],
            here: Optional[Callable[[tuple], bool]] = None) -> Iterator[tuple[tuple, Any]]:
        """(args, fn(*args)) for each argument tuple, in order; at most 2 tasks per worker in flight.

        Tasks for which `here(args)` is true run in this process, when sending them would cost
        more than running them."""
        if self.workers == 1:
            for args in tasks:
                yield args, fn(*args, self.tokenizer)
            return
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        executor = self._start()
        pending: deque = deque()
        window = 2 * self.workers
        try:
            for args in tasks:
                if here is not None and here(args):
                    future: Future = Future()
                    future.set_result(fn(*args, self.tokenizer))
                else:
                    future = executor.submit(fn, *args, None)
                pending.append((args, future))
                if len(pending) >= window:
                    args0, future = pending.popleft()
                    yield args0, future.result()
            while pending:
                args0, future = pending.popleft()
                yield args0, future.result()
        except BrokenProcessPool:
            raise CairnError(f"a data worker process died (out of memory, or a script calling prepare_data "
                             f"without an `if __name__ == \"__main__\":` guard?): prepare with fewer workers "
                             f"(now {self.workers}), e.g. cairn prepare --workers 1") from None
        finally:
            for _, future in pending:
                future.cancel()
