"""Train/validation/test splits made by story, before any tokenization or packing.

Splitting by story (not by token window) keeps every story whole in one split, so validation and
test text is never seen in training, even partly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cairn.util.errors import CairnError

SPLITS = ("train", "val", "test")

# int(0.29 * 100) is 28 in floating point; this nudge makes the tutorial's int(frac * n)
# give the count a person would compute, and cannot change an exact product.
_EPS = 1e-9


def split_sizes(n: int, train_frac: float, val_frac: float) -> tuple[int, int, int]:
    """(train, val, test) story counts: the tutorial's int(frac * n), the rest to test."""
    n_train = min(n, int(train_frac * n + _EPS))
    n_val = min(n - n_train, int(val_frac * n + _EPS))
    return n_train, n_val, n - n_train - n_val


def split_assignment(n: int, seed: int, n_samples: int = 0, train_frac: float = 0.8,
                     val_frac: float = 0.1) -> np.ndarray:
    """Which split each of `n` stories (in file order) belongs to: 0 train, 1 val, 2 test, -1 unused.

    The stories are shuffled with `seed`, the first `n_samples` (0 = all) are kept, and they are cut
    in three: train = the first int(train_frac * n), val = the next int(val_frac * n), test = the
    rest. Only this small array depends on n, so a split can be decided before the texts are read
    again one chunk at a time.
    """
    if seed < 0:
        raise CairnError(f"seed must be zero or more, got {seed}")
    if n_samples < 0:
        raise CairnError(f"data.n_samples must be zero or more, got {n_samples}")
    order = np.random.default_rng(seed).permutation(n)
    if n_samples:
        order = order[:n_samples]
    kept = len(order)
    n_train, n_val, _ = split_sizes(kept, train_frac, val_frac)
    if n_train == 0:
        raise CairnError(f"too few stories ({kept}) for the split: train_frac={train_frac:g} gives no training "
                         "story, add data or change the fractions")
    if val_frac > 0 and n_val == 0:
        raise CairnError(f"too few stories ({kept}) for the split: val_frac={val_frac:g} gives no validation "
                         "story, add data or change the fractions")
    assign = np.full(n, -1, dtype=np.int8)
    assign[order[:n_train]] = 0
    assign[order[n_train:n_train + n_val]] = 1
    assign[order[n_train + n_val:]] = 2
    return assign


def split_stories(texts: Sequence[str], seed: int, n_samples: int = 0, train_frac: float = 0.8,
                  val_frac: float = 0.1) -> dict[str, list[str]]:
    """The stories of each split (see `split_assignment`), each split in file order.

    The same texts and arguments always give the same splits; the splits are disjoint by position.
    These are exactly the stories, in the same order, that `prepare_data` tokenizes into its cache.
    """
    assign = split_assignment(len(texts), seed, n_samples, train_frac, val_frac)
    return {name: [texts[int(i)] for i in np.flatnonzero(assign == k)] for k, name in enumerate(SPLITS)}
