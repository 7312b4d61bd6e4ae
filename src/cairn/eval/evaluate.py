"""Held-out metrics: mean loss per real token, perplexity, bits per byte; and scoring a trained run."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from cairn.data.sft import SFTRows, SFTSplit, prepare_sft
from cairn.data import SplitTokens, StoryWindows, clean_texts, load_texts, make_loader, prepare_data
from cairn.util.errors import CairnError
from cairn.checkpoint.load import load
from cairn.model.transformer import Transformer
from cairn.model.ops import IGNORE_INDEX
from cairn.runtime.precision import for_checkpoint
from cairn.runtime.device import autocast


def summarize(loss_sum: float, tokens: int, n_bytes: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        # nats over all targets (the <|endoftext|> ones included) per byte of text they encode
        "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": int(tokens),
    }


@torch.no_grad()
def evaluate(model: Transformer, loader, device: torch.device, precision: str, token_bytes: np.ndarray,
             max_batches: int = 0, reduce: Optional[Callable[[list[float]], list[float]]] = None) -> dict:
    """Loss summed over every real target of the loader's batches, divided by their count (not a
    mean of per-batch means, which would weight short batches too much). `reduce` sums the three
    sums over processes when each evaluated its share of the batches."""
    was_training = model.training
    model.eval()
    table = torch.as_tensor(token_bytes)
    loss_sum, tokens, n_bytes = 0.0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast(device, precision):
            s, n = model(x, labels=y)
        loss_sum += float(s)
        tokens += int(n)
        real = batch["labels"][batch["labels"] != IGNORE_INDEX]
        n_bytes += int(table[real].sum())
    model.train(was_training)
    if reduce is not None:
        loss_sum, tokens, n_bytes = reduce([loss_sum, tokens, n_bytes])
    return summarize(loss_sum, int(tokens), int(n_bytes))


def evaluate_run(path: str | Path, data: Optional[str] = None, split: str = "test", batch_size: int = 0,
                 device: str = "auto") -> dict:
    """Score a trained model on every story of `data`, or on its run's `split`: each story from
    its own beginning, as training's evaluations read them. Returns the metrics, with what was
    scored ("what") and the checkpoint ("checkpoint")."""
    if batch_size < 0:
        raise CairnError(f"--batch-size must be positive (or 0 for the run's), got {batch_size}")
    loaded = load(path, device)
    cfg, tok = loaded.config, loaded.tokenizer
    ds, what = (_answers if cfg.data.format == "sft" else _stories)(cfg, tok, data, split)
    loader = make_loader(ds, batch_size or cfg.train.batch_size, shuffle=False,
                         seed=0, epoch=0, drop_last=False, pad_id=tok.eot_id)
    r = evaluate(loaded.model, loader, loaded.device, for_checkpoint(cfg.train.precision, loaded.device, loaded.path),
                 tok.token_bytes)
    return {**r, "what": what, "checkpoint": str(loaded.path)}


def _stories(cfg, tok, data: Optional[str], split: str):
    """Every story of `data`, or of the run's split, each read from its own beginning."""
    if data is not None:
        d = cfg.data
        texts = clean_texts(load_texts(data, d.text_field, d.txt_separator, d.hub_split))
        if not texts:
            raise CairnError(f"no text left in {data!r} after dropping empty stories: check the file and --text-field")
        stories = SplitTokens.from_texts(texts, tok)
        what = f"{data} ({len(texts)} stories)"
    else:
        stories = getattr(prepare_data(cfg.data, cfg.seed, tok), split)
        if stories.n_stories == 0:
            raise CairnError(f"the run's {split} split is empty: evaluate --split val, or pass --data")
        what = f"{split} split ({stories.n_stories} stories)"
    return StoryWindows(stories, cfg.data.seq_len), what


def _answers(cfg, tok, data: Optional[str], split: str):
    """An instruction-tuned run's examples (every record of `data`, or the run's split), one per row,
    scored on their answers."""
    prepared = prepare_sft(replace(cfg.data, source=data) if data is not None else cfg.data, cfg.seed, tok)
    if data is not None:
        examples = SFTSplit([e for name in ("train", "val", "test") for e in prepared.split(name).examples], [])
        what = f"{data} ({len(examples.examples)} examples)"
    else:
        examples = prepared.split(split)
        what = f"{split} split ({len(examples.examples)} examples)"
    if not examples.examples:
        raise CairnError(f"the run's {split} split is empty: evaluate --split val, or pass --data")
    return SFTRows(examples, cfg.data.seq_len, pack=False), what
