"""Held-out metrics: mean loss per real token, perplexity, bits per byte (the kernel training and
`cairn eval` share)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from cairn.model.transformer import Transformer
from cairn.model.ops import IGNORE_INDEX
from cairn.runtime.device import autocast


def summarize(loss_sum: float, tokens: int, n_bytes: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        # nats over all targets (the <|endoftext|> ones included) per byte of text they encode
        "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": int(tokens),
    }


@torch.no_grad()
def evaluate(model: Transformer, loader: Iterable[dict[str, torch.Tensor]], device: torch.device, precision: str,
             token_bytes: np.ndarray, max_batches: int = 0,
             reduce: Optional[Callable[[list[float]], list[float]]] = None) -> dict[str, float]:
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
        loss_sum, summed_tokens, summed_bytes = reduce([loss_sum, tokens, n_bytes])
        tokens, n_bytes = int(summed_tokens), int(summed_bytes)
    return summarize(loss_sum, tokens, n_bytes)
