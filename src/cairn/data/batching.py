"""Turning a tokenized split into training rows and batches, in a fixed, resumable order.

Two ways to make rows:

- pack (`PackedDataset`): the split's stream (stories joined by <|endoftext|>) cut into windows of
  `seq_len` tokens. No padding, every row full; a row may span story boundaries, which the model
  learns to read through the EOT.
- pad (`PaddedDataset`): the tutorial's way, one story per row, padded to the longest row of the
  batch; padding is masked out of attention and loss.

The batch order depends only on (seed, epoch), so a run stopped after batch k of an epoch and
restarted with `start_batch=k` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
from collections.abc import Sized
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cairn.model.ops import IGNORE_INDEX
from cairn.data.cache import SplitTokens

if TYPE_CHECKING:  # (formats build their rows from this module)
    from cairn.data.formats.base import Rows



def _as_long(window: np.ndarray) -> torch.Tensor:
    # Only the window is copied out of the memmap; int64 is what embedding and cross_entropy take.
    return torch.from_numpy(np.asarray(window, dtype=np.int64))


class PackedDataset(Dataset):
    """Non-overlapping windows over the split's token stream, no padding.

    Item i: input_ids = stream[o+i*T : o+i*T+T], labels = stream[o+i*T+1 : o+i*T+T+1] (T = seq_len,
    o = offset, 0 unless shifted), so every token of the stream after the first is a target
    exactly once. The last (n_tokens - 1) % T tokens, too few for a full window, are dropped:
    len = (n_tokens - 1) // T. With `shiftable` the windows leave room for any offset below T
    (len = (n_tokens - T) // T), so `shifted(o)` cuts the same number of windows at other places.
    """

    def __init__(self, split: SplitTokens, seq_len: int, shiftable: bool = False, offset: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not 0 <= offset < seq_len or (offset and not shiftable):
            raise ValueError(f"offset {offset} needs shiftable windows and must be in [0, seq_len={seq_len})")
        self.split = split
        self.seq_len = seq_len
        self.offset = offset
        room = seq_len - 1 if shiftable else 0
        self._len = max(0, (split.n_tokens - 1 - room) // seq_len)

    def shifted(self, offset: int) -> "PackedDataset":
        return PackedDataset(self.split, self.seq_len, shiftable=True, offset=offset)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range ({self._len} windows)")
        start = self.offset + i * self.seq_len
        window = _as_long(self.split.tokens[start:start + self.seq_len + 1])
        return {"input_ids": window[:-1], "labels": window[1:]}


def epoch_offset(seq_len: int, seed: int, epoch: int) -> int:
    """Where epoch `epoch` starts cutting the packed stream: 0 for the first, then seeded, so a
    story is cut at other places in other epochs (and the tokens after a cut, with no context
    then, get some in other epochs). A function of (seed, epoch) only: resume rebuilds it."""
    if epoch == 0:
        return 0
    return int(np.random.default_rng([seed, epoch, 1]).integers(seq_len))


class PaddedDataset(Dataset):
    """One story per row, the tutorial's way, with stories longer than a row cut into chunks.

    The row of story i is [EOT] + story + [EOT]: the leading EOT stands for "beginning of text" so
    the story's first token is predicted too (in pack mode it follows the previous story's EOT),
    and the final EOT teaches the model to end a story. input = row[:-1], labels = row[1:].

    A row with more than T = seq_len inputs is cut into consecutive chunks: chunk k has inputs
    row[k*T : k*T+T] and labels row[k*T+1 : k*T+T+1]. Every token of the story (and its EOT) is
    thus a target exactly once and none is lost; a later chunk just does not see the earlier
    chunk's text as context. Items have different lengths: batch them with `collate_padded`.
    """

    def __init__(self, split: SplitTokens, seq_len: int, eot_id: Optional[int] = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.split = split
        self.seq_len = seq_len
        self.eot_id = split.eot_id if eot_id is None else int(eot_id)
        # A story of n tokens plus its EOT gives a row with n + 1 inputs: ceil((n + 1) / T) chunks.
        n_inputs = np.diff(split.offsets)
        n_chunks = -(-n_inputs // seq_len)
        self._story = np.repeat(np.arange(split.n_stories, dtype=np.int64), n_chunks)
        first_item = np.cumsum(n_chunks) - n_chunks
        self._chunk = np.arange(len(self._story), dtype=np.int64) - np.repeat(first_item, n_chunks)

    def __len__(self) -> int:
        return len(self._story)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self._story):
            raise IndexError(f"row {i} out of range ({len(self._story)} rows)")
        story, chunk = int(self._story[i]), int(self._chunk[i])
        row_len = int(self.split.offsets[story + 1] - self.split.offsets[story]) + 1  # leading EOT + story + EOT
        start = chunk * self.seq_len
        window = self._row_slice(story, start, min(start + self.seq_len + 1, row_len))
        return {"input_ids": window[:-1], "labels": window[1:]}

    def _row_slice(self, story: int, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of story's row: position 0 is the leading EOT, position p > 0
        the story's token p - 1 (its last, the story's own EOT)."""
        lo = int(self.split.offsets[story])
        if start == 0:
            return _as_long(np.concatenate([[self.eot_id], self.split.tokens[lo:lo + end - 1]]))
        return _as_long(self.split.tokens[lo + start - 1:lo + end - 1])


class StoryWindows(PaddedDataset):
    """Held-out scoring, one story at a time: every story is read from its own beginning.

    Row i is [EOT] + story + [EOT], as in `PaddedDataset`, so no story is scored with another
    story in its context (packed windows give it the previous story's tail) or cut off from its
    own beginning at a window boundary. A row with more than T = seq_len inputs is scored in
    overlapping windows (a sliding window): the first scores targets [0, T), each later one the
    next `stride` targets with the T - stride inputs before them as context and their labels
    masked (IGNORE_INDEX). Every target is still scored exactly once, and none with less than
    T - stride tokens of context. Batch with `collate_padded`.
    """

    def __init__(self, split: SplitTokens, seq_len: int, stride: Optional[int] = None,
                 eot_id: Optional[int] = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        stride = max(1, seq_len // 2) if stride is None else int(stride)
        if not 1 <= stride <= seq_len:
            raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
        self.split, self.seq_len, self.stride = split, seq_len, stride
        self.eot_id = split.eot_id if eot_id is None else int(eot_id)
        windows = []  # (story, first new target, end of targets), targets indexed in the row's labels
        for story, n in enumerate(np.diff(split.offsets).tolist()):
            a, b = 0, min(seq_len, n)
            windows.append((story, a, b))
            while b < n:
                a, b = b, min(b + stride, n)
                windows.append((story, a, b))
        self._windows = np.asarray(windows, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self._windows)

    def lengths(self) -> np.ndarray:
        """Each window's number of inputs, without reading its tokens."""
        ends = self._windows[:, 2]
        return ends - np.maximum(0, ends - self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self._windows):
            raise IndexError(f"window {i} out of range ({len(self._windows)} windows)")
        story, a, b = (int(v) for v in self._windows[i])
        start = max(0, b - self.seq_len)  # row position of the first input
        window = self._row_slice(story, start, b + 1)
        labels = window[1:].clone()
        labels[:a - start] = IGNORE_INDEX  # context only: scored by an earlier window
        return {"input_ids": window[:-1], "labels": labels}


def collate_padded(batch: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest row in this batch (not to a fixed length).

    input_ids gets `pad_id` at padding, labels get IGNORE_INDEX (never in the loss), attention_mask is
    1 on real tokens and 0 on padding. All three are int64 [B, L].
    """
    length = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length packed windows: input_ids and labels, int64 [B, T], no mask needed."""
    return {
        "input_ids": torch.stack([item["input_ids"] for item in batch]),
        "labels": torch.stack([item["labels"] for item in batch]),
    }


def num_batches(n_items: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch of `n_items` rows."""
    return n_items // batch_size if drop_last else -(-n_items // batch_size)


def epoch_order(n_items: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The row order of one epoch: a function of (seed, epoch) only, so it can be rebuilt on resume."""
    if not shuffle:
        return np.arange(n_items, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n_items).astype(np.int64)


def make_loader(dataset: Rows, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                start_batch: int = 0, drop_last: bool, num_workers: int = 0, pad_id: int = 0,
                pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader over batches `start_batch`.. of the given epoch.

    The batches are fixed from `epoch_order`; resuming with start_batch=k yields exactly batches
    k, k+1, ... of the uninterrupted epoch. `PaddedDataset` batches are padded with
    `collate_padded`; any other dataset's items are stacked with `collate_packed`.

    With `world` processes, batch b is global: rows order[b*W*B : (b+1)*W*B] (B = batch_size), of
    which process `rank` takes the rank-th slice of B rows. W processes with batch B thus see, batch
    for batch, the rows one process with batch W*B sees, and start_batch counts global batches.
    Without drop_last the short last global batch is split as evenly as possible, and a process
    whose slice is empty gets one batch fewer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} processes")
    if not isinstance(dataset, Sized):  # torch's Dataset does not promise a length; batches index rows
        raise TypeError(f"make_loader needs a dataset with a length, not {type(dataset).__name__}")
    n = len(dataset)
    size = batch_size * world
    total = num_batches(n, size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {total} batches")
    order = epoch_order(n, seed, epoch, shuffle)
    shares = (np.array_split(order[b * size:(b + 1) * size], world)[rank] for b in range(start_batch, total))
    batches = [share.tolist() for share in shares if len(share)]
    collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]]
    if isinstance(dataset, PaddedDataset) or getattr(dataset, "ragged", False):  # rows of their own lengths
        collate = functools.partial(collate_padded, pad_id=pad_id)
    else:
        collate = collate_packed
    # A private generator: otherwise every new iterator draws its base seed from the global torch
    # RNG, which dropout also uses, and a resumed run (one more iterator) would drift from the
    # uninterrupted one.
    # a DataLoader indexes any object with __getitem__ and __len__: Rows need not subclass torch's Dataset
    return DataLoader(cast(Dataset, dataset), batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


# Positions (rows x their padded length) per scoring batch and process. Scoring keeps no
# activations for a backward pass, so its batches can be much larger than training's: fewer,
# larger matmuls, and the per-batch costs paid less often.
SCORE_TOKENS = 8192


def row_lengths(rows: "Rows") -> np.ndarray:
    """The number of inputs of each row: from the rows' own `lengths()` when they have one (no
    tokens read), equal for packed windows, else read row by row."""
    own = getattr(rows, "lengths", None)
    if callable(own):
        return np.asarray(own(), dtype=np.int64)
    if isinstance(rows, PackedDataset):
        return np.full(len(rows), rows.seq_len, dtype=np.int64)
    return np.array([len(rows[i]["input_ids"]) for i in range(len(rows))], dtype=np.int64)


def score_sample(n_rows: int, seed: int, rows: int = 0) -> np.ndarray:
    """Which held-out rows an evaluation scores: all of them (`rows` = 0), or the first `rows` of
    one seeded order, a fixed random sample that is the same at every evaluation (a split's first
    rows would be its first source file's stories: the splits keep file order). The order is
    `epoch_order(n_rows, seed, 0)`, the one the held-out batches were once read in, so a sample of
    k batches of B rows on W processes is the k * B * W rows those batches held."""
    if not rows or rows >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    return np.sort(epoch_order(n_rows, seed, 0, shuffle=True)[:rows])


class ScoreBatches:
    """Held-out rows in batches that pad little: the chosen rows sorted by length (ties in row
    order) and cut into global batches of at most `tokens` positions per process (rows x the
    longest row, at least one row). Global batch b is split as evenly as possible over the `world`
    processes, process `rank` taking the rank-th share, so every process steps through the same
    number of batches (`len`); the sums of loss, targets and bytes do not depend on the batching,
    so the scores equal those of one story at a time (up to float rounding).

    Iterating yields this process's non-empty shares, collated with `collate_padded`."""

    def __init__(self, rows: "Rows", which: Optional[np.ndarray] = None, tokens: int = SCORE_TOKENS,
                 pad_id: int = 0, rank: int = 0, world: int = 1):
        if tokens < 1:
            raise ValueError(f"tokens must be positive, got {tokens}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of {world} processes")
        self.rows, self.pad_id, self.rank, self.world = rows, pad_id, rank, world
        which = np.arange(len(rows), dtype=np.int64) if which is None else np.asarray(which, dtype=np.int64)
        lengths = row_lengths(rows)[which]
        by_length = np.argsort(lengths, kind="stable")
        which, lengths = which[by_length], lengths[by_length]
        self.global_batches: list[np.ndarray] = []
        start = 0
        for i, length in enumerate(lengths.tolist()):  # ascending: row i is the longest so far
            if i > start and -(-(i + 1 - start) // world) * length > tokens:
                self.global_batches.append(which[start:i])
                start = i
        if start < len(which):
            self.global_batches.append(which[start:])
        shares = (np.array_split(b, world)[rank] for b in self.global_batches)
        self.shares = [share.tolist() for share in shares if len(share)]

    def __len__(self) -> int:
        return len(self.global_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for share in self.shares:
            yield collate_padded([self.rows[i] for i in share], self.pad_id)
