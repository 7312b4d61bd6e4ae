"""Data for cairn: load stories, split them by story, tokenize once into a memory-mapped cache,
and serve packed or padded batches in a deterministic, resumable order."""

from __future__ import annotations

from .batching import (
    PackedDataset,
    PaddedDataset,
    collate_packed,
    collate_padded,
    epoch_order,
    make_loader,
    num_batches,
)
from .cache import PreparedData, SplitTokens, prepare_data
from .sources import clean_texts, load_texts, source_fingerprint
from .splits import split_stories

__all__ = [
    "load_texts",
    "clean_texts",
    "source_fingerprint",
    "split_stories",
    "SplitTokens",
    "PreparedData",
    "prepare_data",
    "PackedDataset",
    "PaddedDataset",
    "collate_padded",
    "collate_packed",
    "epoch_order",
    "make_loader",
    "num_batches",
]
