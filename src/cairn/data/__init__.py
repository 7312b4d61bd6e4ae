"""Data for cairn: load stories, split them by story, tokenize once into a memory-mapped cache,
and serve packed or padded batches in a deterministic, resumable order."""

from __future__ import annotations

from typing import Any

from cairn.data.cache import PreparedData, SplitTokens, prepare_data
from cairn.data.sources import clean_texts, iter_texts, load_texts, source_fingerprint
from cairn.data.splits import split_assignment, split_stories

# Batching needs torch (seconds to import); data worker processes import this package and need
# none of it, so those names are loaded on first use.
_BATCHING = ("PackedDataset", "PaddedDataset", "StoryWindows", "collate_packed", "collate_padded", "epoch_offset",
             "epoch_order",
             "make_loader", "num_batches")


def __getattr__(name: str) -> Any:
    if name in _BATCHING:
        from cairn.data import batching

        return getattr(batching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "load_texts",
    "iter_texts",
    "clean_texts",
    "source_fingerprint",
    "split_stories",
    "split_assignment",
    "SplitTokens",
    "PreparedData",
    "prepare_data",
    "PackedDataset",
    "PaddedDataset",
    "StoryWindows",
    "collate_padded",
    "collate_packed",
    "epoch_order",
    "make_loader",
    "num_batches",
]
