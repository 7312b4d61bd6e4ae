"""The model worker of `cairn serve`: one thread that decodes every sequence in flight together.

Requests put their sequences (a prompt's token ids, sampling settings with their stop strings) into a queue.
The worker prefills each new sequence into a row of a `RowKVCache`, then runs one forward pass per
step for all the sequences it holds, each row at its own position, and samples every row with the
sequence's own seeded generator: a sequence's text does not depend on what else runs beside it,
and equals `cairn generate`'s (`generate_ids` and `TextStream`) for the same prompt and settings.

`Engine.open(jobs)` is the entry point for a route (completions, or a chat route that formats its
messages into token ids): it reserves slots (or raises `Busy`), and returns a `Generation` whose
events are the text pieces of every sequence as they are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence as Seq

import torch

from cairn.inference.generate import TextPieces, penalize_repeats, pick_next
from cairn.inference.sampling import SamplingConfig
from cairn.model.transformer import RowKVCache, Transformer
from cairn.tokenizer.base import Tokenizer

log = logging.getLogger("cairn.serve")


class Busy(Exception):
    """Every slot is taken: the request is refused rather than queued without bound."""


@dataclass
class Job:
    """One sequence to generate: the tokens it continues, how to sample and where to stop."""
    ids: list[int]
    sampling: SamplingConfig


@dataclass
class Event:
    """A piece of text of sequence `index`; the last event of a sequence has its `finish_reason`
    ("stop", "eot", "length", or "error") and how many tokens it generated."""
    index: int
    text: str
    tokens: int
    finish_reason: Optional[str] = None


class _Sequence:
    """A sequence in the worker: its tokens so far (at most the context's worth are read), its
    generator, its text, and its row in the cache (None once past the context)."""

    def __init__(self, index: int, job: Job, context_len: int, device: torch.device, tokenizer: Tokenizer,
                 emit: Callable[[Event], None]):
        self.index, self.s, self.emit = index, job.sampling, emit
        self.ids = list(job.ids)[-context_len:]  # a prompt longer than the context keeps its end
        self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)
        self.pieces = TextPieces(tokenizer, job.sampling.stop)
        self.new = 0
        self.done = False
        self.cancelled = False


class Engine:
    """A worker thread with at most `max_concurrency` sequences in flight (admitted, not yet released),
    of which at most `max_batch` (default: all) are decoded together; the others wait their turn."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_concurrency: int = 16,
                 max_batch: Optional[int] = None):
        self.model, self.tokenizer, self.max_concurrency = model.eval(), tokenizer, max_concurrency
        self.max_batch = min(max_batch or max_concurrency, max_concurrency)
        self.context_len = model.cfg.context_len
        p = next(model.parameters())
        self.device = p.device
        self.cache = RowKVCache(model.cfg, self.max_batch, p.device, p.dtype)
        self._inbox: queue.Queue[Optional[_Sequence]] = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._rows: list[_Sequence] = []  # in cache row order
        self._sliding: list[_Sequence] = []  # past the context: each step recomputes the last context_len tokens
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self.steps = 0  # decode forward passes
        self.rows_decoded = 0  # sequences advanced by them: rows_decoded / steps is the mean batch
        self._thread = threading.Thread(target=self._run, name="cairn-serve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the requests' side

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def open(self, jobs: Seq[Job], loop: Optional[asyncio.AbstractEventLoop] = None) -> "Generation":
        """Start generating `jobs` (raises Busy when their slots are not free). Close the
        Generation when done with it: that frees the slots at once, finished or not."""
        with self._lock:
            if self._in_flight + len(jobs) > self.max_concurrency:
                raise Busy(f"{self._in_flight} of {self.max_concurrency} sequences in flight")
            self._in_flight += len(jobs)
        return Generation(self, jobs, loop or asyncio.get_running_loop())

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is per thread: set it in the worker's
            while not self._closed:
                self._take_new(block=not (self._rows or self._sliding or self._waiting))
                try:
                    self._drop_done()
                    self._prefill_waiting()
                    self._decode_step()
                except Exception:  # noqa: BLE001 - a failed step ends its sequences, not the server
                    log.exception("generation failed")
                    for seq in list(self._rows) + self._sliding + list(self._waiting):
                        self._finish(seq, "error")
                    self._waiting.clear()
                    self._drop_done()

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_done(self) -> None:
        """Forget finished and cancelled sequences."""
        self._free_rows(lambda seq: seq.done or seq.cancelled)
        self._sliding = [seq for seq in self._sliding if not (seq.done or seq.cancelled)]
        self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)

    def _free_rows(self, leaves: Callable[[_Sequence], bool]) -> list[_Sequence]:
        """Take the sequences for which `leaves` holds out of the cache; the last rows move into the gaps."""
        gone = []
        for i in reversed(range(len(self._rows))):  # rows after i were kept: the last one may fill i
            if leaves(self._rows[i]):
                gone.append(self._rows[i])
                last = len(self._rows) - 1
                if i != last:
                    self.cache.move(last, i)
                    self._rows[i] = self._rows[last]
                self._rows.pop()
        return gone

    def _prefill_waiting(self) -> None:
        """Read each new sequence's prompt into a free row and sample its first token."""
        while self._waiting and len(self._rows) + len(self._sliding) < self.max_batch:
            seq = self._waiting.popleft()
            row = len(self._rows)
            view = self.cache.row(row)
            logits = self.model(torch.tensor([seq.ids], device=self.device), view)
            self.cache.lengths[row] = view.length
            self._rows.append(seq)
            self._sample(seq, logits[:, -1, :])
            self._drop_done()
            self._leave_cache_when_full()

    def _decode_step(self) -> None:
        """One token for every sequence: cached rows together, then those past the context together."""
        if self._rows:
            last = torch.tensor([[seq.ids[-1]] for seq in self._rows], device=self.device)
            logits = self.model(last, self.cache)[:, -1, :]
            self.steps += 1
            self.rows_decoded += len(self._rows)
            for b, seq in enumerate(list(self._rows)):
                self._sample(seq, logits[b:b + 1])
        if self._sliding:
            window = torch.tensor([seq.ids[-self.context_len:] for seq in self._sliding], device=self.device)
            logits = self.model(window)[:, -1, :]
            self.steps += 1
            self.rows_decoded += len(self._sliding)
            for b, seq in enumerate(list(self._sliding)):
                self._sample(seq, logits[b:b + 1])
        self._drop_done()
        self._leave_cache_when_full()

    def _leave_cache_when_full(self) -> None:
        """A sequence whose next token would not fit the context drops its oldest tokens, which moves
        every position: its cache is no longer valid, and it goes on without one (as generate_ids)."""
        self._sliding += self._free_rows(lambda seq: len(seq.ids) > self.context_len)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The next token of `seq` from its logits [1, V], as generate_ids picks it; then its text."""
        s = seq.s
        if seq.cancelled:
            return
        last = penalize_repeats(logits.float(), seq.ids, s.repetition_penalty)
        nxt = int(pick_next(last, s, seq.generator))
        if s.stop_at_eot and nxt == self.tokenizer.eot_id:
            self._finish(seq, "eot", seq.pieces.finish())
            return
        seq.ids.append(nxt)
        seq.new += 1
        piece = seq.pieces.push(nxt)
        if seq.pieces.stopped:
            self._finish(seq, "stop", piece)
        elif seq.new >= s.max_new_tokens:
            self._finish(seq, "length", piece + seq.pieces.finish())
        elif piece:
            seq.emit(Event(seq.index, piece, seq.new))

    def _finish(self, seq: _Sequence, reason: str, piece: str = "") -> None:
        seq.done = True
        seq.emit(Event(seq.index, piece, seq.new, reason))


class Generation:
    """The sequences of one request in flight: iterate `events()` (async) for their pieces; `close()`
    (also on leaving `events()` early, e.g. when the client went away) stops them and frees their slots."""

    def __init__(self, engine: Engine, jobs: Seq[Job], loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._open = len(jobs)  # sequences whose last event the reader has not had
        self._running = len(jobs)  # sequences the worker has not finished
        self._closed = False
        self._released = threading.Lock()  # taken once: by close() or by the last sequence's end
        self._seqs = [_Sequence(i, job, engine.context_len, engine.device, engine.tokenizer, self._emit)
                      for i, job in enumerate(jobs)]
        for seq in self._seqs:
            engine._inbox.put(seq)

    def _emit(self, event: Event) -> None:  # called by the worker thread
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopping): nobody is listening
            for seq in self._seqs:
                seq.cancelled = True
        if event.finish_reason is not None:
            self._running -= 1
            if self._running == 0:  # the work is done: the slots are free even if nobody reads the events
                self._release()

    def _release(self) -> None:
        if self._released.acquire(blocking=False):
            self.engine._release(len(self._seqs))

    async def events(self) -> AsyncIterator[Event]:
        try:
            while self._open:
                event = await self._events.get()
                if event.finish_reason is not None:
                    self._open -= 1
                yield event
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for seq in self._seqs:
            seq.cancelled = True
        self._release()
