"""Validation during a run: score the validation split, keep the best loss, count the patience."""

from __future__ import annotations

import logging
from typing import Callable, Optional

from cairn.data.formats import Rows

from cairn.training.rundir import MetricsLog
from cairn.checkpoint.schema import TrainState

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, evaluate: Callable[[Rows, int], dict[str, float]], val_ds: Optional[Rows], eval_batches: int,
                 patience: int, metrics: MetricsLog, on_best: Callable[[], object], whole_batches: int = 0):
        self.evaluate, self.val_ds, self.eval_batches = evaluate, val_ds, eval_batches
        # what "the whole split" scores: its first `whole_batches` batches under a time budget
        # (eval.end_val_batches), every batch (0) without one
        self.whole_batches = whole_batches
        self.patience, self.metrics, self.on_best = patience, metrics, on_best
        self.last_full_step = -1
        self.last_full: Optional[dict[str, float]] = None  # the result of that whole-split validation

    def __call__(self, s: TrainState, full: bool) -> Optional[dict[str, float]]:
        """Validate the whole split (`full`: at most `whole_batches`) or the fixed sample of
        `eval_batches`; save the best model."""
        if self.val_ds is None:
            return None
        r = self.evaluate(self.val_ds, self.whole_batches if full else self.eval_batches or self.whole_batches)
        s.last_eval_step = s.step
        if full:
            self.last_full_step, self.last_full = s.step, r
        improved = r["loss"] < s.best_val_loss
        if improved:
            s.best_val_loss, s.bad_evals = r["loss"], 0
        else:
            s.bad_evals += 1
        self.metrics.write({"kind": "val", "step": s.step, "epoch": s.epoch + 1, "val_loss": r["loss"],
                            "val_perplexity": r["perplexity"], "val_bits_per_byte": r["bits_per_byte"],
                            "val_tokens": r["tokens"], "full": full})
        log.info(f"step {s.step}: val loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, "
                 f"{r['bits_per_byte']:.3f} bits/byte{' (best)' if improved else ''}")
        if improved:
            self.on_best()
        return r

    def out_of_patience(self, s: TrainState) -> bool:
        return self.patience > 0 and s.bad_evals >= self.patience
