"""`cairn eval`: score a trained run on held-out data, each record read as its format reads it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from cairn.checkpoint.load import load
from cairn.config.sections import validate
from cairn.data.batching import SCORE_TOKENS, ScoreBatches, row_lengths
from cairn.data.formats import get_format
from cairn.eval.metrics import evaluate
from cairn.runtime.precision import for_checkpoint
from cairn.util.errors import CairnError, option


def evaluate_run(path: str | Path, data: Optional[str] = None, split: str = "test", batch_size: int = 0,
                 device: str = "auto", stride: Optional[int] = None) -> dict[str, Any]:
    """Score a trained model on every story of `data`, or on its run's `split`: each story from
    its own beginning, as training's evaluations read them. A story longer than the run's seq_len
    is read in windows that each score the next `stride` targets (None: the run's eval.stride).
    Returns the metrics, with what was scored ("what"), the checkpoint ("checkpoint"), and how
    long the scoring itself took ("seconds", "tokens_per_s"; loading and tokenizing left out)
    for how many input positions run ("positions": more than "tokens" where windows overlap)."""
    if batch_size < 0:
        raise CairnError(f"{option('train.batch_size')} must be positive (or 0 for the run's), got {batch_size}")
    loaded = load(path, device)
    cfg, tok = loaded.config, loaded.tokenizer
    if stride is not None:  # the config's own checks hold it: zero or more, at most seq_len
        cfg = validate(replace(cfg, eval=replace(cfg.eval, stride=stride)))
    ds, what = get_format(cfg.data.format).held_out(cfg, tok, data, split)
    # rows sorted by length in batches of up to SCORE_TOKENS positions (or batch_size rows' worth):
    # what is scored, and so the metrics, do not depend on the batching
    tokens = batch_size * cfg.data.seq_len if batch_size else max(SCORE_TOKENS,
                                                                  cfg.train.batch_size * cfg.data.seq_len)
    loader = ScoreBatches(ds, tokens=tokens, pad_id=tok.eot_id)
    precision = for_checkpoint(cfg.system.precision, loaded.device, loaded.path)
    start = time.perf_counter()
    r = evaluate(loaded.model, loader, loaded.device, precision, tok.token_bytes)
    seconds = time.perf_counter() - start
    return {**r, "seconds": seconds, "tokens_per_s": r["tokens"] / seconds if seconds > 0 else float("nan"),
            "positions": int(row_lengths(ds).sum()), "what": what, "checkpoint": str(loaded.path)}
