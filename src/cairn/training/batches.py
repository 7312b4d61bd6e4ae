"""A run's batches and held-out scores: each rank's share of every global batch, and the metrics of
a held-out split with every rank scoring its share.

A partial evaluation (`eval_batches` = k) scores a fixed random sample of the split, the same at
every evaluation: the first k * batch_size * processes rows of one seeded order (the rows the
first k held-out batches held when they were read in that order), not the split's first stories,
which are the first source file's (the splits keep file order). The chosen rows are then scored in
batches of similar lengths and up to `score_tokens()` positions (`ScoreBatches`): the sums, and so
the metrics, do not depend on how the rows are batched.

With several processes each global batch is split as evenly as possible; a rank whose share of
one is empty (fewer rows than processes) steps on a row whose targets are all padding, which
counts nothing, so every rank takes the same steps.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from cairn.config.sections import DataConfig
from cairn.data.batching import (SCORE_TOKENS, PackedDataset, ScoreBatches, epoch_offset, make_loader, num_batches,
                                 score_sample)
from cairn.data.formats import Rows
from cairn.eval.metrics import evaluate
from cairn.model.ops import IGNORE_INDEX
from cairn.model.transformer import Transformer
from cairn.training.distributed import Dist
from cairn.training.step import Batch


class RunBatches:
    def __init__(self, train: Rows, batch_size: int, data: DataConfig, seed: int, num_workers: int, pad_id: int,
                 dist: Dist):
        self.train, self.batch_size, self.data, self.seed = train, batch_size, data, seed
        self.num_workers, self.pad_id, self.dist = num_workers, pad_id, dist

    def _loader(self, rows: Rows, epoch: int, start: int = 0) -> Iterable[Batch]:
        return make_loader(rows, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch, start_batch=start,
                           drop_last=False, num_workers=self.num_workers, pad_id=self.pad_id,
                           rank=self.dist.rank, world=self.dist.world)

    def global_batches(self, rows: Rows) -> int:
        return num_batches(len(rows), self.batch_size * self.dist.world, drop_last=False)

    def epoch(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """This rank's share of the training split's batches in epoch `epoch`, from global batch `start`."""
        rows = self.train
        if self.data.pack_shift and isinstance(rows, PackedDataset):
            rows = rows.shifted(epoch_offset(self.data.seq_len, self.seed, epoch))
        batches = self._loader(rows, epoch, start)
        if self.dist.enabled:
            return self.dist.lockstep(batches, self.global_batches(rows) - start, _masked_row(rows))
        return batches

    def held_out(self, rows: Rows, max_batches: int = 0) -> Iterable[Batch]:
        """This rank's share of held-out `rows`: all of them, or (`max_batches`) the fixed sample of
        max_batches global batches' worth of rows (`score_sample`), in length-sorted scoring
        batches (`ScoreBatches`); every rank takes the same number of steps."""
        which = score_sample(len(rows), self.seed, max_batches * self.batch_size * self.dist.world)
        batches = ScoreBatches(rows, which, self.score_tokens(), self.pad_id, self.dist.rank, self.dist.world)
        if self.dist.enabled:
            return self.dist.lockstep(batches, len(batches), _masked_row(rows))
        return batches

    def score_tokens(self) -> int:
        """Positions per scoring batch and process: SCORE_TOKENS, or a training batch's if larger."""
        return max(SCORE_TOKENS, self.batch_size * self.data.seq_len)


class Scorer:
    """Held-out metrics of the model now: every rank scores its share of the batches, the sums reduced."""

    def __init__(self, model: Transformer, batches: RunBatches, precision: str, token_bytes: np.ndarray,
                 dist: Dist):
        self.model, self.batches, self.precision, self.token_bytes, self.dist = (model, batches, precision,
                                                                                 token_bytes, dist)

    def __call__(self, rows: Rows, max_batches: int = 0) -> dict[str, float]:
        return evaluate(self.model, self.batches.held_out(rows, max_batches),
                        self.dist.device, self.precision, self.token_bytes, reduce=self.dist.sum)


def _masked_row(rows: Rows) -> Batch:
    """A one-row batch whose targets are all padding: a forward pass that counts nothing."""
    x = rows[0]["input_ids"][None]
    return {"input_ids": x, "labels": torch.full_like(x, IGNORE_INDEX)}
